"""stbir_infer.encoders: the ONNX graphs against the torch model, export dir errors, int8 files."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from infer_helpers import make_photos, one_error_line, run_cli
from PIL import Image

from stbir_infer.contract import fingerprint
from stbir_infer.encoders import Encoders
from stbir_infer.errors import ExportDirError, QueryError
from stbir_infer.fusion import Fusion

MIN_COSINE, MAX_ABS = 0.99999, 1e-4


@pytest.fixture(scope="module")
def torch_model(small_checkpoint):
    from models import load_model

    model, _ = load_model(small_checkpoint)
    return model


def test_runtime_embeddings_equal_the_torch_model(encoders, torch_model, tmp_path):
    import torch

    from stbir_train.synth import caption, render_sketch, sample_item

    rng = np.random.default_rng(3)
    items = [sample_item(rng, f"x{i}") for i in range(6)]
    photo_paths = [tmp_path / name for name in make_photos(tmp_path, [f"p{i}.png" for i in range(6)], seed=3)]
    sketches = [render_sketch(it, rng, size=s) for it, s in zip(items, (96, 64, 80, 120, 50, 96))]
    texts = [caption(it, rng) for it in items] + [
        "", "A RED STAR!!", " ".join(["very long caption"] * 30), "caf\u00e9 &amp; \U0001F600 \u6f22\u5b57"]
    img_spec, sk_spec = encoders.spec("image"), encoders.spec("sketch")
    assert img_spec == torch_model.input_specs()["image"]
    assert sk_spec == torch_model.input_specs()["sketch"]
    got = {"image": encoders.image(photo_paths), "sketch": encoders.sketch(sketches),
           "text": encoders.text(texts)}
    with torch.no_grad():
        want = {
            "image": torch_model.encode_image(torch.from_numpy(encoders.preprocess("image", photo_paths))),
            "sketch": torch_model.encode_sketch(torch.from_numpy(encoders.preprocess("sketch", sketches))),
            "text": torch_model.encode_text(torch_model.tokenizer()(texts)),
        }
    for branch in ("image", "sketch", "text"):
        a, b = got[branch], want[branch].numpy()
        assert a.shape == b.shape and a.dtype == np.float32
        assert np.allclose(np.linalg.norm(a, axis=1), 1, atol=1e-5)
        assert (a * b).sum(1).min() >= MIN_COSINE, branch
        assert np.abs(a - b).max() <= MAX_ABS, branch
    # The sketch graph's drawing descriptor, after the embedding in each row.
    pixels = encoders.preprocess("sketch", sketches)
    rows = encoders.encode_sketch_drawings(pixels)
    with torch.no_grad():
        t_emb, t_drawing = torch_model.encode_sketch_graph(torch.from_numpy(pixels))
    dim = encoders.embed_dim
    assert rows.shape == (len(sketches), dim + encoders.drawing_dim) and encoders.drawing_dim > 0
    assert np.abs(rows[:, :dim] - got["sketch"]).max() <= MAX_ABS
    assert np.abs(rows[:, dim:] - t_drawing.numpy()).max() <= MAX_ABS
    # Fusion: the export's weight, as the torch model fuses at query time.
    fusion = Fusion(encoders)
    with torch.no_grad():
        fused = torch_model.fuse_for_query(want["sketch"][:1], want["text"][:1]).numpy()[0]
    ours = fusion.combine(got["sketch"][0], got["text"][0])
    assert fusion.default_weight == pytest.approx(float(torch_model.query_sketch_weight))
    assert float(ours @ fused) >= MIN_COSINE
    assert np.array_equal(fusion.combine(None, got["text"][0]), got["text"][0])
    with pytest.raises(QueryError):
        fusion.combine(None, None)


@pytest.mark.parametrize("drawing", [None, {"output": "drawing"}, {"output": "drawing", "dim": 0},
                                     {"output": "drawing", "dim": "1024"}, {"output": "", "dim": 8},
                                     {"output": "drawing", "dim": 10**9}, [1, 2]])
def test_the_drawing_entry_is_optional_and_checked(tmp_path, export_dir, drawing):
    """An export from before the drawing descriptor (no entry) runs its sketch graph for the
    embedding alone; a malformed entry is one clear ExportDirError."""
    q = tmp_path / "q"
    shutil.copytree(export_dir, q)
    manifest = json.loads((q / "export.json").read_text())
    if drawing is None:
        del manifest["encoders"]["sketch"]["drawing"]
    else:
        manifest["encoders"]["sketch"]["drawing"] = drawing
    (q / "export.json").write_text(json.dumps(manifest))
    if drawing is not None:
        with pytest.raises(ExportDirError, match="encoders.sketch.drawing"):
            Encoders(q)
        return
    old, new = Encoders(q), Encoders(export_dir)
    assert old.drawing_dim == 0 and new.drawing_dim > 0
    pixels = old.preprocess("sketch", [Image.new("L", (64, 64), 255)])
    rows = old.encode_sketch_drawings(pixels)
    assert rows.shape == (1, old.embed_dim)
    assert np.allclose(rows, new.encode_sketch_drawings(pixels)[:, :new.embed_dim], atol=1e-6)


def test_export_dir_errors(tmp_path, export_dir):
    with pytest.raises(ExportDirError, match="not found"):
        Encoders(tmp_path / "nope")
    with pytest.raises(ExportDirError, match="no export.json"):
        Encoders(tmp_path)
    bad = tmp_path / "bad"
    shutil.copytree(export_dir, bad)
    manifest = json.loads((bad / "export.json").read_text())
    (bad / "export.json").write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(ExportDirError, match="version 99"):
        Encoders(bad)
    (bad / "export.json").write_text(json.dumps(manifest))
    (bad / "image_encoder.onnx").unlink()
    with pytest.raises(ExportDirError, match="image_encoder.onnx is missing"):
        Encoders(bad)
    (bad / "image_encoder.onnx").write_bytes(b"garbage")
    enc = Encoders(bad)
    assert "image_encoder.onnx" in enc.verify_files()
    with pytest.raises(ExportDirError, match="sha256 does not match|onnxruntime cannot load"):
        enc.image([Image.new("RGB", (64, 64))])
    assert Encoders(export_dir).verify_files() == []
    res = run_cli("info", "--model", tmp_path / "nope", "--index", tmp_path / "idx")
    assert res.exit_code == 2 and one_error_line(res.stderr)


def test_int8_precision_uses_the_quantised_files(export_dir, tmp_path):
    with pytest.raises(ExportDirError, match="no int8 graph"):
        Encoders(export_dir, precision="int8")
    q = tmp_path / "q"
    shutil.copytree(export_dir, q)
    manifest = json.loads((q / "export.json").read_text())
    for branch in ("sketch", "image", "text"):  # stand-ins: the fp32 graphs under int8 names
        f = manifest["encoders"][branch]["file"]
        shutil.copy(q / f, q / f.replace(".onnx", ".int8.onnx"))
        manifest["encoders"][branch]["int8_file"] = f.replace(".onnx", ".int8.onnx")
        manifest["files"][f.replace(".onnx", ".int8.onnx")] = manifest["files"][f]
    manifest["fingerprint"] = fingerprint(manifest["files"])
    (q / "export.json").write_text(json.dumps(manifest))
    enc8, enc = Encoders(q, precision="int8"), Encoders(export_dir)
    assert np.allclose(enc8.text(["a red star"]), enc.text(["a red star"]), atol=1e-6)
    assert enc8.graph_file("text").name == "text_encoder.int8.onnx"
    with pytest.raises(ExportDirError):
        Encoders(export_dir, precision="fp16")
