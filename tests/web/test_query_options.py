"""The web API's sketch_weight and min_score (and the page's slider and "no match")."""

from __future__ import annotations

import json

import pytest
from web_helpers import build_gallery, multipart

from stbir_infer.searcher import Searcher
from stbir_infer.web import App
from stbir_infer.web.requests import HTTPError, query_from_json


@pytest.fixture(scope="module")
def app(combiner_export, tmp_path_factory):
    index, _, sketches = build_gallery(combiner_export[0], tmp_path_factory.mktemp("webopts"), n=4)
    return App(Searcher(combiner_export[0], index, threads=1)), sketches


def _post(app, payload=None, form=None):
    if form is not None:
        ctype, body = multipart(*form)
    else:
        ctype, body = "application/json", json.dumps(payload).encode()
    headers = {"Content-Type": ctype, "Content-Length": str(len(body))}
    resp = app.handle("POST", "/api/query", headers, lambda n: body[:n])
    return resp.status, json.loads(resp.body)


def test_sketch_weight_and_min_score_reach_the_searcher(app):
    app, sketches = app
    sketch = ("s.png", sketches["photo_01.png"], "image/png")
    status, both = _post(app, form=({"text": "a red star", "top_k": 4}, {"sketch": sketch}))
    assert status == 200 and both["query"]["fusion_weight"] == 0.6 and both["no_match"] is False
    status, only = _post(app, form=({"text": "a red star", "top_k": 4, "sketch_weight": "1"},
                                    {"sketch": sketch}))
    _, sk = _post(app, form=({"top_k": 4}, {"sketch": sketch}))
    assert only["query"]["fusion_weight"] == 1.0
    assert [(r["path"], round(r["score"], 5)) for r in only["results"]] == \
        [(r["path"], round(r["score"], 5)) for r in sk["results"]]
    status, none = _post(app, {"text": "a red star", "min_score": 1.5})
    assert status == 200 and none["results"] == [] and none["no_match"] is True
    assert none["query"]["min_score"] == 1.5
    status, auto = _post(app, {"text": "a red star", "min_score": "auto"})
    assert status == 200 and auto["query"]["min_score"] == 0.2
    assert all(r["score"] >= 0.2 for r in auto["results"])
    health = json.loads(app.handle("GET", "/api/health", {}, None).body)
    assert health["model"]["fusion"] == "combiner" and health["model"]["score_threshold"] is True


@pytest.mark.parametrize("payload, words", [
    ({"text": "x", "sketch_weight": 2}, "sketch_weight must be a number from 0 to 1"),
    ({"text": "x", "sketch_weight": "abc"}, "sketch_weight must be"),
    ({"text": "x", "sketch_weight": True}, "sketch_weight must be"),
    ({"text": "x", "min_score": "abc"}, "min_score must be a number or auto"),
    ({"text": "x", "min_score": [1]}, "min_score must be")])
def test_bad_values_are_a_400_with_one_line(payload, words):
    with pytest.raises(HTTPError) as exc:
        query_from_json(json.dumps(payload).encode(), 200)
    assert exc.value.status == 400 and words in exc.value.message and "\n" not in exc.value.message


def test_the_page_has_the_slider_and_says_no_match():
    from stbir_infer.web.app import STATIC_DIR

    html = (STATIC_DIR / "index.html").read_text()
    js = (STATIC_DIR / "app.js").read_text()
    assert 'id="sketch-weight"' in html and 'type="range"' in html and 'id="min-score"' in html
    # the slider starts at the export's per-mode threshold (its behaviour: test_browser_query.py)
    assert '"sketch_weight"' in js and "score_thresholds" in js and "no match above" in js
