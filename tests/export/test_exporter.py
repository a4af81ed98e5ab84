"""stbir_export: checkpoint -> export dir (export.json contract, atomic install, errors, CLI)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from stbir_export import ExportError, export_checkpoint, exporter, verify
from stbir_export.cli import main
from stbir_infer import contract

# -- the export dir -------------------------------------------------------------------------------

def test_manifest_follows_the_contract(exported, small_model):
    out, manifest, _ = exported
    on_disk = json.loads((out / "export.json").read_text())
    assert on_disk == manifest
    assert manifest["format"] == "stbir-export" and manifest["format_version"] == 1
    assert set(manifest) >= set(contract.MANIFEST_KEYS)
    assert manifest["fingerprint"] == contract.fingerprint(manifest["files"])
    assert manifest["embed_dim"] == small_model.embed_dim == 128
    assert manifest["fusion_weight"] == pytest.approx(float(small_model.query_sketch_weight))
    assert manifest["opset"] == 17 and manifest["clip_model"] == "stbir-small"
    enc = manifest["encoders"]
    specs = small_model.input_specs()
    for name in ("sketch", "image"):
        assert enc[name]["preprocess"] == specs[name]
        assert enc[name]["inputs"] == [{"name": "pixels", "dtype": "float32", "shape": [
            "batch", specs[name]["channels"], specs[name]["size"], specs[name]["size"]]}]
        assert enc[name]["output"] == "embedding"
    assert enc["sketch"]["inputs"][0]["shape"][1] == 1
    L, D = small_model.context_length, small_model.clip.token_embedding.weight.shape[1]
    assert enc["text"]["inputs"] == [
        {"name": "token_embeddings", "shape": ["batch", L, D], "dtype": "float32"},
        {"name": "eot_position", "shape": ["batch"], "dtype": "int64"}]
    assert enc["text"]["token_embedding"] == "token_embedding.npy"
    tok = manifest["tokenizer"]
    assert tok["type"] == "clip_bpe" and tok["context_length"] == L == 32
    assert (tok["sot_token_id"], tok["eot_token_id"], tok["clean"]) == (49406, 49407, "lower")
    assert (out / tok["bpe_file"]).is_file()
    assert manifest["source_checkpoint"]["file"] == "small.pt"
    for name in ("sketch", "image", "text"):
        assert set(manifest["verification"][name]) >= {"min_cosine", "max_abs_diff",
                                                       "reference_min_cosine"}
    # the sketch graph's second output, verified against torch like the embedding
    assert enc["sketch"]["drawing"] == {"output": "drawing", "dim": small_model.sketch.drawing_dim}
    assert "drawing" not in enc["image"] and "drawing" not in enc["text"]
    assert manifest["verification"]["sketch"]["drawing"]["min_cosine"] >= verify.MIN_COSINE


def test_hashes_and_fingerprint_match_the_files(exported, small_checkpoint):
    out, manifest, _ = exported
    on_disk = {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
               for p in out.rglob("*") if p.is_file() and p.name != "export.json"}
    assert manifest["files"] == on_disk
    assert {"sketch_encoder.onnx", "image_encoder.onnx", "text_encoder.onnx",
            "token_embedding.npy", "tokenizer/bpe_simple_vocab_16e6.txt.gz",
            "sketch_encoder.int8.onnx", "image_encoder.int8.onnx",
            "text_encoder.int8.onnx"} == set(on_disk)
    canonical = json.dumps(on_disk, sort_keys=True, separators=(",", ":")).encode()
    assert manifest["fingerprint"] == hashlib.sha256(canonical).hexdigest()
    ckpt_sha = hashlib.sha256(Path(small_checkpoint).read_bytes()).hexdigest()
    assert manifest["source_checkpoint"]["sha256"] == ckpt_sha


def test_bpe_file_is_open_clips(exported):
    from open_clip.tokenizer import default_bpe

    out, manifest, _ = exported
    assert (out / manifest["tokenizer"]["bpe_file"]).read_bytes() == Path(default_bpe()).read_bytes()


def test_failed_verification_leaves_no_export(small_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(verify, "MAX_ABS_DIFF", -1.0)  # nothing can pass
    out = tmp_path / "out"
    with pytest.raises(ExportError, match=r"verification failed: sketch .*max abs diff"):
        export_checkpoint(small_checkpoint, out, log=lambda s: None)
    assert list(tmp_path.iterdir()) == []  # neither OUT_DIR nor the temp build dir
    out.mkdir()
    (out / "export.json").write_text("{}")  # an older export survives a failed --force
    with pytest.raises(ExportError, match="verification failed"):
        export_checkpoint(small_checkpoint, out, force=True, log=lambda s: None)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert (out / "export.json").read_text() == "{}"


# -- errors ---------------------------------------------------------------------------------------

def _bad_checkpoints(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(os.urandom(4096))
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, other)
    return {"missing": (tmp_path / "nope.pt", "not found"),
            "corrupt": (corrupt, "not a readable checkpoint"),
            "foreign": (other, "not an STBIR checkpoint")}


@pytest.mark.parametrize("case", ["missing", "corrupt", "foreign"])
def test_bad_checkpoint_is_a_clear_error(tmp_path, case):
    path, message = _bad_checkpoints(tmp_path)[case]
    out = tmp_path / "out"
    with pytest.raises(ExportError, match=message):
        export_checkpoint(path, out, log=lambda s: None)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    result = CliRunner().invoke(main, [str(path), str(out)])
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("stbir-export: error: ")
    assert message in result.stderr and "Traceback" not in result.output


def test_unwritable_out_dir(small_checkpoint, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    for out in (blocker / "out", blocker):
        with pytest.raises(ExportError, match="cannot write|not a directory"):
            export_checkpoint(small_checkpoint, out, log=lambda s: None)
        result = CliRunner().invoke(main, [str(small_checkpoint), str(out)])
        assert result.exit_code == 2 and result.stderr.count("\n") == 1
        assert result.stderr.startswith("stbir-export: error: ")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores permissions")
def test_read_only_parent(small_checkpoint, tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir(mode=0o500)
    try:
        with pytest.raises(ExportError, match="cannot write"):
            export_checkpoint(small_checkpoint, parent / "out", log=lambda s: None)
    finally:
        parent.chmod(0o700)


def test_non_empty_out_dir_needs_force(small_checkpoint, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="not empty.*--force"):
        export_checkpoint(small_checkpoint, out, log=lambda s: None)
    runner = CliRunner()
    result = runner.invoke(main, [str(small_checkpoint), str(out)])
    assert result.exit_code == 2 and "--force" in result.stderr
    assert result.stderr.count("\n") == 1
    assert (out / "keep.txt").read_text() == "mine"
    result = runner.invoke(main, [str(small_checkpoint), str(out), "--force", "--no-verify"])
    assert result.exit_code == 0, result.output
    assert not (out / "keep.txt").exists()
    manifest = json.loads((out / "export.json").read_text())
    assert manifest["verification"] is None and "quantization" not in manifest
    assert "file size" in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp / old dirs left


def test_force_refuses_to_delete_the_checkpoint(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    ckpt = folder / "best.pt"
    ckpt.write_bytes(b"placeholder")  # never read: refused before loading
    with pytest.raises(ExportError, match="holds the checkpoint"):
        export_checkpoint(ckpt, folder, force=True, log=lambda s: None)
    assert ckpt.exists()


def test_cli_usage_errors_are_one_line(small_checkpoint, tmp_path):
    runner = CliRunner()
    for args in ([], [str(small_checkpoint)], [str(small_checkpoint), str(tmp_path / "o"),
                                                "--quantize", "int4"],
                 [str(small_checkpoint), str(tmp_path / "o"), "--opset", "9"]):
        result = runner.invoke(main, args)
        assert result.exit_code == 2, args
        assert result.stderr.count("\n") == 1 and result.stderr.startswith("stbir-export: error:")
    assert not (tmp_path / "o").exists()


def test_cli_internal_failure_exits_1(small_checkpoint, tmp_path, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("simulated\nfailure")

    monkeypatch.setattr(exporter, "_build", boom)
    result = CliRunner().invoke(main, [str(small_checkpoint), str(tmp_path / "o")])
    assert result.exit_code == 1
    assert result.stderr == ("stbir-export: error: internal error: RuntimeError: simulated "
                             "(set STBIR_DEBUG=1 for a traceback)\n")
    assert list(tmp_path.iterdir()) == []
