"""Static int8 (stbir_export.quantize): calibration from the checkpoint's training data or a
folder, the per-tower choice recorded in export.json, retrieval parity through the runtime, and
calibration errors as one line with exit status 2."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from models import ModelSpec, build_model, save_checkpoint
from stbir_export import export_checkpoint
from stbir_export.cli import main
from stbir_export.errors import ExportError
from stbir_export.quantize import MIN_COSINE
from stbir_infer.fusion import Fusion
from stbir_train.config import load_config


@pytest.fixture(scope="module")
def trained_layout(tiny_dataset, tmp_path_factory):
    """A checkpoint where training writes it (<config dir>/runs/checkpoints/), its recorded
    config naming the tiny dataset by a path relative to the config's folder."""
    import torch

    base = tmp_path_factory.mktemp("run")
    config = load_config(tiny_dataset / "config.yaml").to_dict()  # as training records it
    config["output_dir"] = "runs"
    config["data"]["root"] = os.path.relpath(tiny_dataset, base)
    torch.manual_seed(0)
    ckpt = base / "runs" / "checkpoints" / "best.pt"
    ckpt.parent.mkdir(parents=True)
    save_checkpoint(ckpt, build_model(ModelSpec()), config=config, metrics={})
    return ckpt


@pytest.fixture(scope="module")
def calibrated(trained_layout, tmp_path_factory):
    out = tmp_path_factory.mktemp("int8") / "export"
    lines: list[str] = []
    manifest = export_checkpoint(trained_layout, out, quantize="int8", calibration="auto",
                                 verify=False, log=lines.append)
    return out, manifest, "\n".join(lines)


def _ops(path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path)).graph.node}


def _static_matmuls(path) -> list[str]:
    """MatMul / Gemm nodes fed by a DequantizeLinear (static QDQ attention)."""
    graph = onnx.load(str(path)).graph
    dq = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return [n.name for n in graph.node if n.op_type in ("MatMul", "Gemm") and set(n.input) & dq]


def test_auto_calibration_reads_the_training_data_and_records_each_choice(calibrated, tiny_dataset):
    out, manifest, log = calibrated
    q = manifest["quantization"]["int8"]
    cal = q["calibration"]
    assert cal["source"].startswith("auto (")
    assert os.path.samefile(cal["source"][len("auto ("):-1], tiny_dataset)
    # 4 categories x 12 training photos, 2 sketches each; a fifth of them held out for the check
    assert cal["images"] == {"sketch": 96 - 19, "image": 48 - 9} and cal["held_out"] == {
        "sketch": 19, "image": 9}
    assert all("trainA" in f for f in cal["folders"]["sketch"])
    assert all("trainB" in f for f in cal["folders"]["image"])
    towers = q["encoders"]
    assert towers["text"]["method"] == "dynamic" and "int8 text: min cosine to fp32" in log
    for branch in ("sketch", "image"):
        rec = towers[branch]
        assert rec["method"] in ("static", "dynamic")
        assert set(rec["batch1_ms"]) == {"fp32", "static", "dynamic"}
        good = [m for m, c in rec["candidates_cosine"].items() if c >= MIN_COSINE]
        if good:  # the faster of those close enough to fp32 ships
            assert rec["method"] == min(good, key=rec["batch1_ms"].get)
        ops = _ops(out / manifest["encoders"][branch]["int8_file"])
        if rec["method"] == "static":  # QDQ around every Conv: onnxruntime runs them in int8
            assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
            # ... and MatMul / Gemm (the image tower's attention pooling) dynamic int8 on top
            assert _static_matmuls(out / manifest["encoders"][branch]["int8_file"]) == []
            if _ops(out / manifest["encoders"][branch]["file"]) & {"MatMul", "Gemm"}:
                assert "DynamicQuantizeLinear" in ops
        else:
            assert "DynamicQuantizeLinear" in ops
        assert f"int8 {branch}: {rec['method']} (batch-1 ms" in log
    assert "sketch_encoder.int8.onnx" in manifest["files"]
    # the small preset's CNN towers are where static int8 pays; a random-init one still calibrates
    assert towers["sketch"]["method"] == "static"


def _vectors(enc, rows, root) -> dict:
    sketches = [root / s for r in rows for s in r["positive_sketches"]]
    owner = np.array([i for i, r in enumerate(rows) for _ in r["positive_sketches"]])
    v = {"image": enc.image([root / r["image"] for r in rows]), "sketch": enc.sketch(sketches),
         "text": enc.text([r["text"] for r in rows])}
    return {**v, "sketch+text": Fusion(enc).combine(v["sketch"], v["text"][owner]), "owner": owner}


def _test_split(config_path, where):
    from stbir_train.manifest import build_manifests, manifest_paths, read_manifest_rows

    cfg = load_config(config_path)
    if where is not None:
        cfg.output_dir = str(where)
    if not manifest_paths(cfg)["test"].is_file():
        build_manifests(cfg)
    return read_manifest_rows(manifest_paths(cfg)["test"]), cfg.resolve(cfg.data.root)


def test_int8_vectors_match_fp32_through_the_runtime(calibrated, tiny_dataset):
    """Held-out test photos, sketches and captions (never calibrated on) through the runtime's
    Encoders at both precisions. (Rank parity needs a trained model: a random-init one maps every
    photo to nearly one direction, see the slow test below.)"""
    from stbir_infer.encoders import Encoders

    out, _, _ = calibrated
    rows, root = _test_split(tiny_dataset / "config.yaml", out.parent / "manifests")
    v32 = _vectors(Encoders(out, threads=1), rows, root)
    v8 = _vectors(Encoders(out, threads=1, precision="int8"), rows, root)
    for branch, floor in (("sketch", MIN_COSINE), ("image", MIN_COSINE), ("text", 0.99),
                          ("sketch+text", 0.99)):
        cos = (v32[branch] * v8[branch]).sum(1)
        assert cos.min() >= floor, (branch, cos.min())


DEMO = Path(__file__).resolve().parents[2] / "runs" / "demo" / "data"


@pytest.mark.slow
@pytest.mark.skipif(not (DEMO / "runs" / "checkpoints" / "best.pt").is_file(),
                    reason="needs the trained demo model (make demo)")
def test_int8_recall_at_10_matches_fp32_on_the_trained_demo_model(tmp_path):
    from stbir_infer.encoders import Encoders

    out = tmp_path / "export"
    export_checkpoint(DEMO / "runs" / "checkpoints" / "best.pt", out, quantize="int8",
                      calibration="auto", verify=False, log=lambda s: None)
    rows, root = _test_split(DEMO / "config.yaml", None)
    recall = {}
    for precision in ("fp32", "int8"):
        v = _vectors(Encoders(out, precision=precision), rows, root)
        top = np.argsort(-(v["sketch+text"] @ v["image"].T), axis=1)[:, :10]
        recall[precision] = (top == v["owner"][:, None]).any(1).mean()
    assert recall["fp32"] >= 0.9  # a trained model, or the comparison means nothing
    assert abs(recall["int8"] - recall["fp32"]) <= 0.01, recall


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _one_line_exit_2(result, *needles):
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("stbir-export: error: ")
    for needle in needles:
        assert needle in result.stderr, result.stderr


def test_calibration_errors_are_one_line_exit_2(small_checkpoint, tiny_dataset, tmp_path):
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "notes.txt").write_text("no images here\n")
    out = tmp_path / "out"
    _one_line_exit_2(_cli(small_checkpoint, out, "--quantize", "int8", "--calibration", empty),
                     "no images for the sketch tower", str(empty))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    _one_line_exit_2(_cli(small_checkpoint, out, "--quantize", "int8", "--calibration", bad),
                     "broken.png", "not a readable image")
    # config={}: nothing recorded to find; the default is auto
    _one_line_exit_2(_cli(small_checkpoint, out, "--quantize", "int8"),
                     "records no training data", "--calibration DIR")
    _one_line_exit_2(_cli(small_checkpoint, out, "--quantize", "int8", "--calibration",
                          tmp_path / "nowhere"), "not a folder")
    with pytest.raises(ExportError, match="--quantize int8"):
        export_checkpoint(small_checkpoint, out, calibration=tiny_dataset, log=lambda s: None)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["bad", "empty"]


def test_auto_calibration_when_the_training_data_moved(tiny_dataset, tmp_path):
    import torch

    config = load_config(tiny_dataset / "config.yaml").to_dict()
    config["output_dir"], config["data"]["root"] = "runs", "data-gone"
    ckpt = tmp_path / "runs" / "checkpoints" / "best.pt"
    ckpt.parent.mkdir(parents=True)
    torch.manual_seed(0)
    save_checkpoint(ckpt, build_model(ModelSpec()), config=config, metrics={})
    _one_line_exit_2(_cli(ckpt, tmp_path / "out", "--quantize", "int8"),
                     "the training data is not here", "data-gone")


def test_auto_calibration_of_a_sketch_tuned_checkpoint_elsewhere(trained_layout, tiny_dataset,
                                                                  tmp_path):
    """stbir-train sketch-tune writes its checkpoint anywhere, with the run's training config;
    --calibration auto resolves that config from the checkpoint it was tuned from."""
    from models import load_model
    from models.checkpoint import read_checkpoint

    model, _ = load_model(trained_layout)
    state = read_checkpoint(trained_layout)
    tuned = tmp_path / "elsewhere" / "tuned.pt"
    tuned.parent.mkdir()
    save_checkpoint(tuned, model, config=state["config"], metrics={},
                    sketch_tune={"checkpoint": str(trained_layout.resolve()), "steps": 1})
    manifest = export_checkpoint(tuned, tmp_path / "out", quantize="int8", calibration="auto",
                                 verify=False, log=lambda s: None)
    source = manifest["quantization"]["int8"]["calibration"]["source"]
    assert os.path.samefile(source[len("auto ("):-1], tiny_dataset)


def test_a_calibration_folder_with_sketches_and_photos_feeds_each_tower_its_own(tiny_dataset,
                                                                                 tmp_path):
    import shutil

    from stbir_export.quantize import calibration_set

    specs = build_model(ModelSpec()).input_specs()
    folder = tmp_path / "calib"
    shutil.copytree(tiny_dataset / "star" / "trainA", folder / "sketches")  # 24 sketches
    shutil.copytree(tiny_dataset / "star" / "trainB", folder / "photos" / "nested")  # 12 photos
    cal = calibration_set(folder, tmp_path / "unused.pt", None, specs)
    assert cal.folders == {"sketch": [str(folder / "sketches")], "image": [str(folder / "photos")]}
    assert cal.calibrate["sketch"].shape[1:] == (1, 64, 64)
    assert len(cal.calibrate["sketch"]) + len(cal.check["sketch"]) == 24
    assert len(cal.calibrate["image"]) + len(cal.check["image"]) == 12
    (folder / "photos").rename(tmp_path / "elsewhere")  # no photos/: every image serves both
    cal = calibration_set(folder, tmp_path / "unused.pt", None, specs)
    assert cal.folders == {"sketch": [str(folder)], "image": [str(folder)]}
    assert cal.calibrate["image"].shape[1] == 3 and len(cal.calibrate["image"]) == 24 - 4


def test_a_failing_static_quantisation_falls_back_to_dynamic(calibrated, trained_layout, tmp_path,
                                                            monkeypatch):
    from models import load_model
    from stbir_export import quantize

    def boom(*a, **k):
        raise ValueError("autodetected range of [0, inf] is not finite\nmore")

    monkeypatch.setattr(quantize, "quantize_static", boom)
    out, _, _ = calibrated
    model, _ = load_model(trained_layout)
    pixels = np.zeros((2, 3, 64, 64), np.float32)
    lines: list[str] = []
    calibration = quantize.Calibration("x", {"image": pixels}, {"image": pixels}, {})
    rec = quantize.quantize_tower(model, "image", out / "image_encoder.onnx", tmp_path / "i8.onnx",
                                  calibration, None, 2, lines.append)
    assert rec["method"] == "dynamic" and rec["cosine_to_fp32"] >= 0.99
    assert rec["why"] == "static quantisation failed: autodetected range of [0, inf] is not finite"
    assert "DynamicQuantizeLinear" in _ops(tmp_path / "i8.onnx") and len(lines) == 1
