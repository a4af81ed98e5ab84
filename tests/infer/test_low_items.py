"""Issue 26, the "Low" list: each a one-line refusal (exit 2) or an honest message, never an
internal error or a hang."""

from __future__ import annotations

import json
import os

import pytest
from infer_helpers import linked_export, make_photos, make_sketch, one_error_line, run_cli

from stbir_infer.errors import ParameterError
from stbir_infer.paths import display
from stbir_infer.searcher import Searcher


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, export_dir):
    tmp = tmp_path_factory.mktemp("low")
    items = make_photos(tmp / "photos", ["a.png", "b.png"])
    Searcher(export_dir, tmp / "idx").enroll(tmp / "photos")
    return tmp, make_sketch(tmp / "s.png", items["a.png"])


def test_ef_search_beyond_the_cap_is_one_line_exit_2(indexed, export_dir):
    tmp, sketch = indexed
    for value in ("100000000000000000000000", "1e23"):
        r = run_cli("query", "--model", export_dir, "--index", tmp / "idx", "--sketch", sketch,
                    "--ef-search", value)
        assert r.exit_code == 2 and one_error_line(r.stderr), r.stderr
    with pytest.raises(ParameterError, match="ef_search"):
        Searcher(export_dir, tmp / "idx", ef_search=10**23)


def test_export_vectors_into_a_symlinked_folder_is_refused(indexed, tmp_path):
    tmp, _ = indexed
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    r = run_cli("export-vectors", tmp_path / "link", "--index", tmp / "idx")
    assert r.exit_code == 2 and one_error_line(r.stderr) and "symbolic link" in r.stderr
    assert (tmp_path / "link").is_symlink() and not any((tmp_path / "real").iterdir())


def test_a_where_that_matches_nothing_says_so(indexed, export_dir):
    tmp, sketch = indexed
    r = run_cli("query", "--model", export_dir, "--index", tmp / "idx", "--sketch", sketch,
                "--where", "folder=nothing-here")
    assert r.exit_code == 0 and "matches --where" in r.stderr and "empty" not in r.stderr


def test_relocate_to_an_existing_file_says_so(indexed, tmp_path):
    tmp, _ = indexed
    f = tmp_path / "a-file"
    f.write_text("x")
    r = run_cli("relocate", "--index", tmp / "idx", tmp / "photos", f)
    assert r.exit_code == 2 and one_error_line(r.stderr) and "not a folder" in r.stderr


def test_bidi_controls_in_names_are_escaped():
    assert display("/g/a\u202egpj.exe") == "/g/a\\u202egpj.exe"
    for c in "\u200e\u200f\u202a\u202b\u202c\u202d\u2066\u2067\u2068\u2069\u061c":
        assert c not in display(f"/g/x{c}.png")
    assert display("/g/café.png") == "/g/café.png"


def test_a_fifo_as_a_batch_sketch_fails_that_query_only(indexed, export_dir, tmp_path):
    tmp, sketch = indexed
    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)
    batch = tmp_path / "batch.jsonl"
    batch.write_text(json.dumps({"sketch": str(fifo)}) + "\n" + json.dumps({"sketch": str(sketch)})
                     + "\n")
    r = run_cli("query", "--model", export_dir, "--index", tmp / "idx", "--batch", batch)
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(lines) == 2 and "error" in lines[0] and lines[1].get("results"), r.stdout


@pytest.mark.parametrize("branch, key, value", [
    ("image", "size", 0), ("image", "size", "64"), ("image", "size", 10**9),
    ("sketch", "channels", 2), ("image", "std", [0, 0, 0]), ("image", "mean", [1.0]),
    ("sketch", "interpolation", "lanczos9")])
def test_a_bad_preprocess_value_in_export_json_is_one_line_exit_2(indexed, export_dir, tmp_path,
                                                                   branch, key, value):
    from stbir_infer.contract import MANIFEST

    tmp, sketch = indexed
    bad = linked_export(export_dir, tmp_path / "export")
    m = json.loads((bad / MANIFEST).read_text())
    m["encoders"][branch]["preprocess"][key] = value
    (bad / MANIFEST).write_text(json.dumps(m))
    args = (["query", "--sketch", sketch, "--index", tmp / "idx"] if branch == "sketch"
            else ["enroll", "--images", tmp / "photos", "--index", tmp_path / "idx"])
    r = run_cli(*args, "--model", bad)
    assert r.exit_code == 2 and one_error_line(r.stderr) and key in r.stderr, r.stderr
