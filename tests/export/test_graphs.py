"""The three exported graphs: what they compute against torch, what they hold, int8 variants."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from models import PRESETS, ModelSpec, build_model, load_model, save_checkpoint
from stbir_export import export_checkpoint

MIN_COSINE, MAX_ABS = 0.99999, 1e-4
TEXTS = ["a red circle", "", "a small blue square made of wood", "green triangle on grass",
         " ".join(["very long caption"] * 40), "Caf\u00e9 &amp; THE yellow star", "two lines"]


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _inputs(model, out: Path, encoder: str, n: int):
    """(onnx feeds, torch embeddings) for n items, computed here independently of the exporter."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        if encoder == "text":
            tokens = model.tokenizer()([TEXTS[i % len(TEXTS)] for i in range(n)])
            table = np.load(out / "token_embedding.npy", allow_pickle=False)
            ids = tokens.numpy()
            feeds = {"token_embeddings": table[ids], "eot_position": ids.argmax(-1)}
            return feeds, model.encode_text(tokens).numpy()
        spec = model.input_specs()[encoder]
        x = torch.randn(n, spec["channels"], spec["size"], spec["size"], generator=g)
        return {"pixels": x.numpy()}, getattr(model, f"encode_{encoder}")(x).numpy()


def _cos(a, b):
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def test_text_graph_has_no_vocabulary_lookup(exported, small_model):
    out, _, _ = exported
    table = np.load(out / "token_embedding.npy", allow_pickle=False)
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
