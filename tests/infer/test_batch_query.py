"""Searcher.query_many and `stbir-infer query --batch`: the same answers as one query at a time;
a bad query fails alone."""

from __future__ import annotations

import io
import json

import pytest
from infer_helpers import make_photos, make_sketch, run_cli
from PIL import Image

from stbir_infer.batch_query import read_lines
from stbir_infer.errors import QueryError
from stbir_infer.searcher import Searcher


@pytest.fixture(scope="module")
def setup(export_dir, tmp_path_factory):
    """A 12-photo index and 5 sketches of some of its photos."""
    root = tmp_path_factory.mktemp("batch")
    items = make_photos(root / "photos", [f"p{i:02d}.png" for i in range(12)])
    sketches = [str(make_sketch(root / f"s{i}.png", items[f"p{i:02d}.png"], seed=i))
                for i in range(5)]
    idx = root / "idx"
    Searcher(export_dir, idx, threads=1).enroll(root / "photos")
    return export_dir, idx, sketches


def _queries(sketches):
    return [{"sketch": sketches[0]},
            {"text": "a small red object"},
            {"sketch": sketches[1], "text": "a blue thing", "top_k": 3},
            {"sketch": sketches[2], "text": "something round", "sketch_weight": 0.2},
            {"sketch": Image.open(sketches[3]), "text": "   "},  # blank text: sketch only
            {"text": "a green shape", "min_score": 0.0, "top_k": 12},
            {"sketch": sketches[4], "text": "a yellow", "top_k": 1}]


def _same(a, b):
    assert [(h.rank, h.path, h.duplicates) for h in a] == [(h.rank, h.path, h.duplicates) for h in b]
    assert all(abs(x.score - y.score) < 1e-5 for x, y in zip(a, b))


def test_query_many_equals_one_query_at_a_time(setup):
    export_dir, idx, sketches = setup
    s = Searcher(export_dir, idx, threads=1)
    queries = _queries(sketches)
    batched = s.query_many(queries, batch_size=3)  # several encoder batches
    assert len(batched) == len(queries)
    for q, got in zip(queries, batched):
        _same(got, s.query(**q))
    assert len(batched[2]) == 3 and len(batched[6]) == 1
    assert s.query_many([]) == []


def test_a_bad_query_fails_alone_or_raises(setup, tmp_path):
    export_dir, idx, sketches = setup
    s = Searcher(export_dir, idx, threads=1)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    bad = [{"text": "x", "top_k": 0}, {"sketch": str(tmp_path / "bad.png")}, {"text": "  "},
           {"text": 3}, {"text": "x", "sketch_weight": 2}, {"text": "x", "colour": 1}, "x"]
    good = {"sketch": sketches[0], "text": "a red thing"}
    out = s.query_many([good, *bad, good], errors="return")
    assert all(isinstance(r, QueryError) for r in out[1:-1])
    assert "colour" in str(out[6]) and "not an image" in str(out[2]) or "readable" in str(out[2])
    _same(out[0], s.query(**good))
    _same(out[-1], out[0])
    with pytest.raises(QueryError, match="top_k"):
        s.query_many([good, bad[0]])


def test_cli_batch_prints_one_json_line_per_query_equal_to_single_queries(setup, tmp_path):
    export_dir, idx, sketches = setup
    lines = [{"sketch": sketches[0], "text": "a red thing"}, {"text": "a blue thing", "top_k": 2},
             {"sketch": sketches[1], "min_score": 0.0}]
    src = tmp_path / "q.jsonl"
    src.write_text("\n".join(json.dumps(q) for q in lines[:2]) + "\n\n" + json.dumps(lines[2]) + "\n")
    res = run_cli("query", "--batch", src, "--model", export_dir, "--index", idx, "-k", 4)
    assert res.exit_code == 0, res.output
    records = [json.loads(line) for line in res.stdout.splitlines()]
    assert [r["line"] for r in records] == [1, 2, 4]  # numbered by input line; blank skipped
    for q, rec in zip(lines, records):
        args = ["query", "--json", "--model", export_dir, "--index", idx, "-k", q.get("top_k", 4)]
        for key in ("sketch", "text", "min_score"):
            if key in q:
                args += [f"--{key.replace('_', '-')}", q[key]]
        single = json.loads(run_cli(*args).stdout)
        keys = ("sketch", "text", "top_k", "fusion", "fusion_weight", "min_score")
        assert {k: rec["query"][k] for k in keys} == {k: single["query"][k] for k in keys}
        assert [h["path"] for h in rec["results"]] == [h["path"] for h in single["results"]]
        assert all(abs(a["score"] - b["score"]) < 1e-5
                   for a, b in zip(rec["results"], single["results"]))


def test_cli_batch_bad_lines_get_error_records_then_exit_2(setup, tmp_path):
    export_dir, idx, sketches = setup
    src = tmp_path / "q.jsonl"
    src.write_text('{"text": "a red thing"}\nnot json\n[1]\n{"sketch": 5}\n'
                   '{"text": "x", "top_k": 0}\n{"sketch": "missing.png"}\n{"text": "b"}\n'
                   '{"text": "c", "where": {"no_such_tag": "v"}}\n')
    res = run_cli("query", "--batch", src, "--model", export_dir, "--index", idx)
    assert res.exit_code == 2
    records = [json.loads(line) for line in res.stdout.splitlines()]
    assert [r["line"] for r in records] == list(range(1, 9))
    assert ["error" in r for r in records] == [False, True, True, True, True, True, False, True]
    assert "no_such_tag" in records[-1]["error"]
    assert "6 of 8 queries failed" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    usage = run_cli("query", "--batch", src, "--text", "x", "--model", export_dir, "--index", idx)
    assert usage.exit_code == 2 and "--batch" in usage.stderr


def test_read_lines_refuses_an_overlong_line_without_losing_the_next():
    data = b'{"text": "a"}\n' + b"x" * 5000 + b"\n" + b'{"text": "b"}\n'
    got = list(read_lines(io.BytesIO(data), limit=100))
    assert [n for n, _ in got] == [1, 2, 3]
    assert isinstance(got[1][1], QueryError) and "longer than" in str(got[1][1])
    assert got[2][1] == {"text": "b"}
