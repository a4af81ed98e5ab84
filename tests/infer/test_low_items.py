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


def _crafted(export_dir, dst, change, *, refingerprint_it=True):
    """A linked copy of ``export_dir`` with ``change(manifest)`` applied to its export.json (the
    fingerprint recomputed unless told not to, so only the change itself is under test)."""
    from infer_helpers import refingerprint

    from stbir_infer.contract import MANIFEST

    bad = linked_export(export_dir, dst)
    m = json.loads((bad / MANIFEST).read_text())
    change(bad, m)
    if refingerprint_it:
        refingerprint(m)
    (bad / MANIFEST).write_text(json.dumps(m))
    return bad


def test_a_swapped_graph_under_the_old_fingerprint_is_refused(indexed, export_dir, tmp_path):
    """export.json's fingerprint is recomputed from its files map: a graph swapped in with its
    sha256 updated but the export's old fingerprint (which the index recorded) is refused, in
    one line, before any graph is read."""
    import hashlib

    from stbir_infer.encoders import Encoders
    from stbir_infer.errors import ExportDirError

    tmp, _ = indexed
    swapped = (export_dir / "image_encoder.onnx").read_bytes()

    def swap(bad, m):
        (bad / "sketch_encoder.onnx").unlink()  # a hard link: never write through it
        (bad / "sketch_encoder.onnx").write_bytes(swapped)
        m["files"]["sketch_encoder.onnx"] = hashlib.sha256(swapped).hexdigest()

    bad = _crafted(export_dir, tmp_path / "swapped", swap, refingerprint_it=False)
    with pytest.raises(ExportDirError, match="fingerprint does not match"):
        Encoders(bad)
    r = run_cli("query", "--model", bad, "--index", tmp / "idx", "--text", "a red star")
    assert r.exit_code == 2 and one_error_line(r.stderr) and "fingerprint" in r.stderr, r.output
    # The same files under their own fingerprint are another export, and load as one.
    m = json.loads((bad / "export.json").read_text())
    from infer_helpers import refingerprint

    (bad / "export.json").write_text(json.dumps(refingerprint(m)))
    assert Encoders(bad).fingerprint == m["fingerprint"] != Encoders(export_dir).fingerprint


def _set(*keys, value):
    def change(bad, m):
        parent = m
        for key in keys[:-1]:
            parent = parent[key]
        parent[keys[-1]] = value
    return change


def _hf_tokenizer(value):
    """The tokenizer section of a Hugging Face text tower (stbir_infer/hf_tokenizer.py), whose
    context_length is ``value``; the file is listed, never parsed (the export is refused first)."""
    def change(bad, m):
        import hashlib

        (bad / "tokenizer" / "tokenizer.json").write_text("{}")
        m["files"]["tokenizer/tokenizer.json"] = hashlib.sha256(b"{}").hexdigest()
        m["tokenizer"] = {"type": "hf_tokenizers", "file": "tokenizer/tokenizer.json",
                          "context_length": value, "vocab_size": 30522, "pad_token_id": 0,
                          "clean": "whitespace"}
    return change


_BAD_VALUES = {
    "fusion_weight string": ("fusion_weight", _set("fusion_weight", value="0.5")),
    "fusion_weight bool": ("fusion_weight", _set("fusion_weight", value=True)),
    "fusion_weight NaN": ("fusion_weight", _set("fusion_weight", value=float("nan"))),
    "fusion_weight 2": ("fusion_weight", _set("fusion_weight", value=2)),
    "default_weight string": ("fusion.default_weight",
                              _set("fusion", "default_weight", value="0.5")),
    "embed_dim string": ("embed_dim", _set("embed_dim", value="128")),
    "embed_dim bool": ("embed_dim", _set("embed_dim", value=True)),
    "embed_dim NaN": ("embed_dim", _set("embed_dim", value=float("nan"))),
    "embed_dim float": ("embed_dim", _set("embed_dim", value=128.5)),
    "embed_dim negative": ("embed_dim", _set("embed_dim", value=-128)),
    "embed_dim 0": ("embed_dim", _set("embed_dim", value=0)),
    "embed_dim absurd": ("embed_dim", _set("embed_dim", value=65537)),
    "embed_dim null": ("embed_dim", _set("embed_dim", value=None)),
    "fusion_weight 10**400": ("fusion_weight", _set("fusion_weight", value=10**400)),
    "clip context_length 1e9": ("context_length", _set("tokenizer", "context_length", value=1e9)),
    "clip context_length int 1e9": ("context_length",
                                    _set("tokenizer", "context_length", value=10**9)),
    "clip context_length string": ("context_length",
                                   _set("tokenizer", "context_length", value="77")),
    "clip context_length bool": ("context_length",
                                 _set("tokenizer", "context_length", value=True)),
    "clip context_length 0": ("context_length", _set("tokenizer", "context_length", value=0)),
    "clip vocab_size string": ("vocab_size", _set("tokenizer", "vocab_size", value="x")),
    "hf context_length 1e9": ("context_length", _hf_tokenizer(1e9)),
    "hf context_length string": ("context_length", _hf_tokenizer("64")),
    "hf context_length bool": ("context_length", _hf_tokenizer(True)),
    "tokenizer not a map": ("tokenizer", _set("tokenizer", value="clip_bpe")),
    "tokenizer type unknown": ("tokenizer.type", _set("tokenizer", "type", value="sentencepiece")),
}


@pytest.mark.parametrize("case", list(_BAD_VALUES))
def test_a_bad_export_json_value_is_refused_at_load_in_one_line(indexed, export_dir, tmp_path,
                                                                case):
    """A string, bool, NaN or absurd size in export.json: ExportDirError when the export is
    loaded (the CLI: one line, exit 2), not an internal error, a huge allocation at the first
    text query, or a silent conversion."""
    from stbir_infer.encoders import Encoders
    from stbir_infer.errors import ExportDirError

    tmp, sketch = indexed
    key, change = _BAD_VALUES[case]
    bad = _crafted(export_dir, tmp_path / "export", change)
    with pytest.raises(ExportDirError, match=key) as info:
        Encoders(bad)  # nothing is tokenised or run: the old code's failures came later, if at all
    assert "\n" not in str(info.value)
    r = run_cli("query", "--model", bad, "--index", tmp / "idx", "--sketch", sketch)
    assert r.exit_code == 2 and one_error_line(r.stderr) and key in r.stderr, r.output


@pytest.mark.parametrize("change", [
    _set("tokenizer", "context_length", value=None), _set("fusion", value=None),
    _set("fusion_weight", value=1), _hf_tokenizer(64)], ids=["no context_length", "no fusion",
                                                             "weight 1", "hf tokenizer"])
def test_good_export_json_values_still_load(export_dir, tmp_path, change):
    from stbir_infer.encoders import Encoders

    Encoders(_crafted(export_dir, tmp_path / "export", change))


def test_a_number_past_pythons_digit_limit_is_one_line(indexed, export_dir, tmp_path):
    """json.loads raises a plain ValueError (not JSONDecodeError) for an integer of over 4,300
    digits: that too is unreadable JSON, exit 2."""
    from stbir_infer.contract import MANIFEST

    tmp, sketch = indexed
    bad = linked_export(export_dir, tmp_path / "export")
    text = (bad / MANIFEST).read_text()
    (bad / MANIFEST).write_text(text.replace('"embed_dim": 128', '"embed_dim": 1' + "0" * 5000))
    assert "0" * 5000 in (bad / MANIFEST).read_text()
    r = run_cli("query", "--model", bad, "--index", tmp / "idx", "--sketch", sketch)
    assert r.exit_code == 2 and one_error_line(r.stderr) and "JSON" in r.stderr, r.output
