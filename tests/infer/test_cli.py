"""``stbir-infer query`` / ``info`` / ``--help``: output formats, usage errors, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from infer_helpers import make_photos, make_sketch, one_error_line, run_cli

from stbir_infer.errors import IndexNotFoundError, QueryError
from stbir_infer.searcher import Searcher


def test_query_sketch_text_both_and_neither(export_dir, gallery, tmp_path):
    photos, items = gallery
    idx = tmp_path / "idx"
    Searcher(export_dir, idx).enroll(photos)
    sketch = make_sketch(tmp_path / "sketch.png", items["c.png"])
    common = ["--model", export_dir, "--index", idx]
    outputs = {}
    for name, args in {"sketch": ["--sketch", sketch], "text": ["--text", "a red striped star"],
                       "both": ["--sketch", sketch, "--text", "a red striped star"]}.items():
        res = run_cli("query", *args, "--top-k", 3, "--json", *common)
        assert res.exit_code == 0, res.output
        data = json.loads(res.stdout)
        assert [r["rank"] for r in data["results"]] == [1, 2, 3]
        assert all({"rank", "score", "path"} <= set(r) for r in data["results"])
        assert data["model"] == json.loads((export_dir / "export.json").read_text())["fingerprint"]
        outputs[name] = data
        plain = run_cli("query", *args, "--top-k", 3, *common)
        lines = plain.stdout.strip().splitlines()
        assert len(lines) == 3
        rank, score, path = lines[0].split(maxsplit=2)
        assert rank == "1" and path == data["results"][0]["path"]
        assert float(score) == pytest.approx(data["results"][0]["score"], abs=1e-4)
    assert outputs["both"]["query"]["fusion_weight"] == 0.5
    assert outputs["sketch"]["query"]["fusion_weight"] is None
    # The library gives the same ranking, and fuses as normalize(w*s + (1-w)*t).
    s = Searcher(export_dir, idx)
    both = s.query(sketch=sketch, text="a red striped star", top_k=3)
    assert [h.path for h in both] == [r["path"] for r in outputs["both"]["results"]]
    enc = s.encoders
    v = enc.sketch([sketch])[0] * 0.5 + enc.text(["a red striped star"])[0] * 0.5
    manual = s.search(v / np.linalg.norm(v), top_k=3)
    assert [h.path for h in manual] == [h.path for h in both]
    assert [h.score for h in manual] == pytest.approx([h.score for h in both], abs=1e-5)
    # Neither half: a usage error, one line, exit 2 (also for an empty --text).
    for args in ([], ["--text", "  "]):
        res = run_cli("query", *args, *common)
        assert res.exit_code == 2
        assert one_error_line(res.stderr)
    with pytest.raises(QueryError):
        s.query()
    # A sketch that is not an image: exit 2, no traceback.
    (tmp_path / "bad.png").write_text("nope")
    res = run_cli("query", "--sketch", tmp_path / "bad.png", *common)
    assert res.exit_code == 2 and "not a readable image" in res.stderr
    assert "Traceback" not in res.output
    with pytest.raises(QueryError):
        s.query(sketch=tmp_path / "bad.png")


def test_query_without_index_and_info(export_dir, tmp_path):
    res = run_cli("query", "--text", "a", "--model", export_dir, "--index", tmp_path / "none")
    assert res.exit_code == 2 and "no index here yet" in res.stderr
    with pytest.raises(IndexNotFoundError):
        Searcher(export_dir, tmp_path / "none").query(text="a")
    res = run_cli("info", "--model", export_dir, "--index", tmp_path / "none", "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)["exists"] is False
    make_photos(tmp_path / "p", ["a.png"])
    env = {"STBIR_MODEL": str(export_dir), "STBIR_INDEX": str(tmp_path / "idx")}
    assert run_cli("enroll", "--images", tmp_path / "p", "-q", env=env).exit_code == 0
    res = run_cli("info", env=env)
    assert res.exit_code == 0 and "images 1" in res.stdout and "M 16" in res.stdout
    assert "stbir-small" in res.stdout


def test_cli_help_and_unknown_option(export_dir):
    res = run_cli("--help")
    assert res.exit_code == 0 and "enroll" in res.stdout and "query" in res.stdout
    res = run_cli("query", "--nope")
    assert res.exit_code == 2 and res.stderr.startswith("stbir-infer: error: No such option")
    assert len(res.stderr.strip().splitlines()) == 1
    proc = subprocess.run([sys.executable, "-m", "stbir_infer", "query"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.startswith("stbir-infer: error:")


def test_info_verify_checks_every_export_file(export_dir, gallery, tmp_path):
    import shutil

    photos, _ = gallery
    export = tmp_path / "export"
    shutil.copytree(export_dir, export)
    idx = tmp_path / "idx"
    Searcher(export, idx).enroll(photos)
    res = run_cli("info", "--verify", "--json", "--model", export, "--index", idx)
    assert res.exit_code == 0, res.output
    verified = json.loads(res.stdout)["verified"]
    assert verified["files"] == len(json.loads((export / "export.json").read_text())["files"])
    # The text graph is not read by `info`: only --verify notices that it was modified.
    graph = export / "text_encoder.onnx"
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0xFF
    graph.write_bytes(bytes(data))
    assert run_cli("info", "--model", export, "--index", idx).exit_code == 0
    res = run_cli("info", "--verify", "--model", export, "--index", idx)
    assert res.exit_code == 2 and one_error_line(res.stderr)
    assert "text_encoder.onnx" in res.stderr
