"""stbir_export: checkpoint -> export dir (three verified ONNX graphs + runtime assets)."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

from models import PRESETS, ModelSpec, build_model, load_model, save_checkpoint
from stbir_export import ExportError, export_checkpoint
from stbir_export import exporter, verify
from stbir_export.cli import main

MIN_COSINE, MAX_ABS = 0.99999, 1e-4
TEXTS = ["a red circle", "", "a small blue square made of wood", "green triangle on grass",
         " ".join(["very long caption"] * 40), "Caf\u00e9 &amp; THE yellow star", "two lines"]


@pytest.fixture(scope="module")
def small_model(small_checkpoint):
    model, _ = load_model(small_checkpoint)
    return model


@pytest.fixture(scope="module")
def exported(small_checkpoint, tmp_path_factory):
    """One int8 export of the small preset, reused by every test that only reads it."""
    out = tmp_path_factory.mktemp("export") / "small"
    lines: list[str] = []
    manifest = export_checkpoint(small_checkpoint, out, quantize="int8", log=lines.append)
    return out, manifest, "\n".join(lines)


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _inputs(model, out: Path, encoder: str, n: int):
    """(onnx feeds, torch embeddings) for n items, computed here independently of the exporter."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        if encoder == "text":
            tokens = model.tokenizer()([TEXTS[i % len(TEXTS)] for i in range(n)])
            table = np.load(out / "token_embedding.npy")
            ids = tokens.numpy()
            feeds = {"token_embeddings": table[ids], "eot_position": ids.argmax(-1)}
            return feeds, model.encode_text(tokens).numpy()
        spec = model.input_specs()[encoder]
        x = torch.randn(n, spec["channels"], spec["size"], spec["size"], generator=g)
        return {"pixels": x.numpy()}, getattr(model, f"encode_{encoder}")(x).numpy()


def _cos(a, b):
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


# -- the export dir -------------------------------------------------------------------------------

def test_manifest_follows_the_contract(exported, small_model):
    out, manifest, _ = exported
    on_disk = json.loads((out / "export.json").read_text())
    assert on_disk == manifest
    assert manifest["format"] == "stbir-export" and manifest["format_version"] == 1
    assert manifest["embed_dim"] == small_model.embed_dim == 128
    assert manifest["fusion_weight"] == pytest.approx(float(small_model.fusion_weight))
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


def test_text_graph_has_no_vocabulary_lookup(exported, small_model):
    out, _, _ = exported
    table = np.load(out / "token_embedding.npy")
    weight = small_model.clip.token_embedding.weight.detach().numpy()
    assert table.dtype == np.float32 and table.shape == weight.shape
    np.testing.assert_array_equal(table, weight)
    graph = onnx.load(out / "text_encoder.onnx").graph
    vocab_rows = table.shape[0]
    big = {t.name for t in graph.initializer if t.dims and t.dims[0] == vocab_rows}
    assert not big, f"vocabulary-sized initializers in the text graph: {big}"
    inits = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Gather" and node.input[0] in inits:
            assert inits[node.input[0]].dims[0] != vocab_rows
    # nor is the table (6.3M floats) in there under another shape: the graph is far smaller
    assert sum(int(np.prod(t.dims)) for t in graph.initializer) < table.size / 2


@pytest.mark.parametrize("encoder", ["sketch", "image", "text"])
def test_graph_matches_torch_at_batch_1_and_7(exported, small_model, encoder):
    out, _, _ = exported
    path = out / f"{encoder}_encoder.onnx"
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    for value in list(model.graph.input) + list(model.graph.output):
        assert value.type.tensor_type.shape.dim[0].dim_param == "batch"
    sess = _session(path)
    feeds, want = _inputs(small_model, out, encoder, 7)
    got7 = sess.run(None, feeds)[0]
    got1 = sess.run(None, {k: v[:1] for k, v in feeds.items()})[0]
    assert got7.shape == (7, 128) and got1.shape == (1, 128)
    np.testing.assert_allclose(np.linalg.norm(got7, axis=-1), 1.0, atol=1e-5)
    for got, ref in ((got7, want), (got1, want[:1])):
        assert _cos(got, ref).min() >= MIN_COSINE
        assert np.abs(got - ref).max() <= MAX_ABS
    np.testing.assert_allclose(got1[0], got7[0], atol=1e-5)


def test_int8_variants_stay_close_to_fp32(exported, small_model):
    out, manifest, log = exported
    cosines = manifest["quantization"]["int8"]["cosine_to_fp32"]
    assert set(cosines) == {"sketch", "image", "text"}
    assert min(cosines.values()) >= 0.99
    for encoder in ("image", "text"):  # recomputed here on other inputs
        entry = manifest["encoders"][encoder]
        feeds, _ = _inputs(small_model, out, encoder, 7)
        fp32 = _session(out / entry["file"]).run(None, feeds)[0]
        int8 = _session(out / entry["int8_file"]).run(None, feeds)[0]
        assert _cos(int8, fp32).min() >= 0.99
    assert (out / "image_encoder.int8.onnx").stat().st_size < (out / "image_encoder.onnx").stat().st_size
    assert "int8 text: min cosine to fp32" in log


def test_export_prints_op_tables(exported):
    _, manifest, log = exported
    for name in ("sketch_encoder.onnx", "image_encoder.onnx", "text_encoder.onnx"):
        assert name in log
    assert log.count("file size") == 3 and log.count("before") == 3
    assert "LayerNormalization" in log and "Conv" in log
    assert "verify text: onnxruntime min cosine" in log


def test_reported_verification_is_within_bounds(exported):
    _, manifest, _ = exported
    for name, v in manifest["verification"].items():
        assert v["min_cosine"] >= MIN_COSINE and v["max_abs_diff"] <= MAX_ABS, name
        assert v["reference_min_cosine"] >= MIN_COSINE, name
        assert v["reference_max_abs_diff"] <= MAX_ABS, name


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
    assert result.stderr == "stbir-export: error: internal error: RuntimeError: simulated failure\n"
    assert list(tmp_path.iterdir()) == []


# -- the seed-sized preset ------------------------------------------------------------------------

@pytest.mark.slow
def test_seed_preset_exports_and_verifies(tmp_path):
    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "seed.pt", build_model(ModelSpec(**PRESETS["seed"])))
    lines: list[str] = []
    start = time.perf_counter()
    manifest = export_checkpoint(ckpt, tmp_path / "out", quantize="int8",
                                 log=lambda s: (print(s), lines.append(s)))
    print(f"seed export: {time.perf_counter() - start:.1f} s")
    assert manifest["embed_dim"] == 512
    assert manifest["encoders"]["image"]["inputs"][0]["shape"] == ["batch", 3, 224, 224]
    assert manifest["encoders"]["text"]["inputs"][0]["shape"] == ["batch", 77, 512]
    for v in manifest["verification"].values():
        assert v["min_cosine"] >= MIN_COSINE and v["max_abs_diff"] <= MAX_ABS
        assert v["reference_min_cosine"] >= MIN_COSINE
    assert min(manifest["quantization"]["int8"]["cosine_to_fp32"].values()) >= 0.99
    out = tmp_path / "out"
    for rel, digest in manifest["files"].items():
        assert hashlib.sha256((out / rel).read_bytes()).hexdigest() == digest
    model, _ = load_model(ckpt)
    sess = _session(out / "text_encoder.onnx")
    for n in (1, 7):
        feeds, want = _inputs(model, out, "text", n)
        got = sess.run(None, feeds)[0]
        assert _cos(got, want).min() >= MIN_COSINE and np.abs(got - want).max() <= MAX_ABS
