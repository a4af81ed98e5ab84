"""One query parser (issue 29, item 3): the CLI, ``--batch``, the web API and ``Searcher`` refuse
the same bad value with the same message, because all of them go through ``QuerySpec``."""

from __future__ import annotations

import json

import pytest

from stbir_infer.errors import QueryError
from stbir_infer.query_spec import MAX_TEXT_CHARS, QuerySpec, limits, mode_of
from stbir_infer.web.requests import HTTPError, read_query

BAD = [
    ({"text": "x" * (MAX_TEXT_CHARS + 1)}, "characters long; at most 1,000"),
    ({"text": "a\ud800b"}, "lone surrogate"),
    ({"text": ["a"]}, "text must be a string"),
    ({"text": "x", "top_k": 0}, "top_k must be an integer"),
    ({"text": "x", "top_k": True}, "top_k must be an integer"),
    ({"text": "x", "sketch_weight": 1.5}, "sketch_weight must be a number from 0 to 1"),
    ({"text": "x", "image_weight": -0.1}, "image_weight must be a number from 0 to 1"),
    ({"text": "x", "min_score": "high"}, "min_score must be a number or auto"),
    ({"text": "x", "where": ["folder"]}, "is not KEY=VALUE"),
    ({"text": "x", "like": -1}, "like must be the id of a photo"),
    ({"text": "   "}, "a query needs"),
    ({"top_k": 3}, "a query needs"),
]


def _web(payload: dict) -> str:
    body = json.dumps(payload).encode()
    headers = {"Content-Length": str(len(body)), "Content-Type": "application/json"}
    with pytest.raises(HTTPError) as info:
        read_query(headers, lambda n: body[:n])
    assert info.value.status == 400
    return info.value.message


@pytest.mark.parametrize(("query", "message"), BAD)
def test_every_entry_refuses_a_bad_part_with_one_message(query, message):
    with pytest.raises(QueryError, match=message) as direct:
        QuerySpec.parse(**query)
    with pytest.raises(QueryError) as batch:  # a --batch line / a Searcher.query_many dict
        QuerySpec.from_dict(query)
    assert str(batch.value) == str(direct.value)
    with pytest.raises(QueryError) as served:  # the server's own top_k limit
        QuerySpec.parse(**query, max_top_k=200)
    if "\ud800" not in str(query.get("text")):  # JSON cannot carry a lone surrogate as such
        assert _web(query) == str(served.value)


def test_good_parts_are_normalised_once():
    spec = QuerySpec.parse(text="  a dog  ", top_k=3, sketch_weight=1, min_score="AUTO",
                           where=["folder=a", "folder=b", "kind=pet"], like=7)
    assert spec.text == "  a dog  " and spec.top_k == 3 and spec.sketch_weight == 1.0
    assert spec.min_score == "auto" and spec.like == 7
    assert spec.where == {"folder": frozenset({"a", "b"}), "kind": frozenset({"pet"})}
    assert spec.mode == "image+text"
    assert QuerySpec.parse(text="   ", sketch="s.png").text is None  # blank text is no text


def test_web_top_k_limit_and_unknown_keys():
    assert "between 1 and 200" in _web({"text": "x", "top_k": 201})
    with pytest.raises(QueryError, match="unknown key"):
        QuerySpec.from_dict({"text": "x", "colour": "red"})
    assert "unknown key" in _web({"text": "x", "colour": "red"})


def test_an_example_photo_and_an_index_id_are_exclusive():
    with pytest.raises(QueryError, match="not both"):
        QuerySpec.parse(image="a.jpg", like=3)
    with pytest.raises(QueryError, match="must be a file path"):
        QuerySpec.parse(image=b"\x89PNG")


def test_modes_name_their_inputs_in_a_fixed_order():
    assert mode_of(True, False, True) == "sketch+text"
    assert mode_of(False, True, False) == "image"
    assert mode_of(True, True, True) == "sketch+image+text"
    with pytest.raises(QueryError):
        mode_of(False, False, False)


def test_the_page_reads_the_same_limits():
    got = limits(200)
    assert got["max_text"] == MAX_TEXT_CHARS and got["max_top_k"] == 200
