"""int8 graphs: static (calibrated) quantisation where it is faster, dynamic where that wins.

onnxruntime's dynamic quantisation (``quantize_dynamic``) turns MatMul / Gemm weights into int8 and
quantises activations at run time; it leaves Conv alone, so a convolutional tower gains nothing.
Static quantisation (``quantize_static``, QDQ format, per-channel int8 weights, uint8
activations, full 8-bit range for VNNI CPUs) also quantises every Conv, with activation ranges
taken from calibration images (percentile calibration: min-max lets a few outliers stretch the
ranges; on the demo's image tower, 128 images, min cosine to fp32 0.9946 with min-max, 0.9962
with percentile; entropy 0.9946). It covers the convolutional ops only (``STATIC_OP_TYPES``); a
tower's MatMul / Gemm (the small image tower's attention pooling, projection heads) are then
quantised dynamically on top. Static attention (QLinearMatMul, QLinearSoftmax) cost the trained
demo image tower its accuracy (min cosine 0.987, so dynamic int8 shipped at 0.70x fp32); conv
static + dynamic attention: 0.9996 at 0.49x fp32 (batch 1; the sketch tower the same as all-static).

For the sketch and image towers, when calibration images are given, both are built; each is
compared with the fp32 graph on held-out calibration images (cosine) and timed at batch 1 in the
runtime's own session settings, and the faster of those with cosine >= ``MIN_COSINE`` ships
(else the closer one, with a warning); one whose static quantisation fails gets dynamic int8, the
reason recorded. The text tower (a transformer fed token embeddings) is quantised dynamically:
static measured no faster on it (demo text tower, batch 1: 0.35 ms static, 0.26 ms dynamic).
export.json records the choice and the figures per tower.

Calibration images (``stbir-export --calibration``):

* ``auto``: the training data named in the checkpoint's recorded config: each category's
  ``train_sketches`` for the sketch tower and ``train_images`` for the image tower, the data
  root found from where training wrote the checkpoint (``<config dir>/<output_dir>/checkpoints``);
* a folder: every image under it, for both towers; when it has ``sketches`` and ``photos`` (or
  ``images``) subfolders, each tower takes its own.

At most ``CALIBRATION_IMAGES`` (+ ``CHECK_IMAGES`` held out) per tower, a seeded sample, decoded
and preprocessed by ``stbir_infer.preprocess`` exactly as the runtime does. No image, or one that
does not decode, is an ExportError naming it.
"""

from __future__ import annotations

import contextlib
import io
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.scoped import quiet_logs
from stbir_export import verify as verification
from stbir_export.errors import ExportError
from stbir_infer.preprocess import IMAGE_EXTENSIONS, ImageDecodeError
from stbir_infer.preprocess import load as load_image
from stbir_infer.session import SessionSettings, open_session

AUTO = "auto"
PIXEL_TOWERS = ("sketch", "image")
CALIBRATION_IMAGES = 256
CHECK_IMAGES = 64
# Ranges are merged batch by batch, so memory holds one batch's activations: 16 images of 64 px,
# 1 of 224 px (8 per batch took the seed preset's export to a 5.7 GB peak).
CALIBRATION_BATCH_PIXELS = 16 * 64 * 64
MIN_COSINE = 0.995
SUBFOLDERS = {"sketch": ("sketches", "sketch"), "image": ("photos", "images", "image", "photo")}
# Calibrated ops. AveragePool is left out: ORT still fuses it between two quantised Convs, and
# its own calibrated range only lowered the cosine (0.9991 against 0.9996).
STATIC_OP_TYPES = ["Conv", "Add", "Relu", "Clip", "MaxPool", "GlobalAveragePool", "Concat"]
STATIC_SETTINGS = {"format": "QDQ", "per_channel": True, "reduce_range": False,
                   "weight_type": "int8", "activation_type": "uint8", "calibrate": "percentile",
                   "op_types": STATIC_OP_TYPES, "dynamic_op_types": verification.INT8_OP_TYPES}
TIMED_CALLS = 20


@dataclass
class Calibration:
    """Preprocessed calibration (``calibrate``) and held-out (``check``) pixels per tower."""

    source: str
    calibrate: dict[str, np.ndarray]
    check: dict[str, np.ndarray]
    folders: dict[str, list[str]]

    def describe(self) -> dict:
        return {"source": self.source, "folders": self.folders,
                "images": {b: int(len(x)) for b, x in self.calibrate.items()},
                "held_out": {b: int(len(x)) for b, x in self.check.items()}}


# -- calibration images -----------------------------------------------------------------------

def calibration_set(source, checkpoint: Path, config: dict | None, specs: dict) -> Calibration:
    """Load the calibration images of ``source`` ("auto" or a folder) for both pixel towers."""
    if str(source) == AUTO:
        folders, label = _auto_folders(Path(checkpoint), config or {})
    else:
        folders, label = _dir_folders(Path(source).expanduser()), str(source)
    calibrate, check = {}, {}
    for branch in PIXEL_TOWERS:
        files = _image_files(folders[branch])
        if not files:
            raise ExportError(f"--calibration {label}: no images for the {branch} tower in "
                              f"{', '.join(map(str, folders[branch]))}")
        random.Random(0).shuffle(files)
        n_check = min(CHECK_IMAGES, len(files) // 5)
        pixels = _load(files[:n_check + CALIBRATION_IMAGES], specs[branch], label)
        calibrate[branch] = pixels[n_check:]
        check[branch] = pixels[:n_check] if n_check else pixels  # a tiny set checks on itself
    return Calibration(label, calibrate, check,
                       {b: [str(f) for f in folders[b]] for b in PIXEL_TOWERS})


def _auto_folders(checkpoint: Path, config: dict) -> tuple[dict[str, list[Path]], str]:
    """The training folders of the checkpoint's config, resolved against the config's folder
    (training writes checkpoints to <config dir>/<output_dir>/checkpoints/)."""
    data = config.get("data") if isinstance(config, dict) else None
    cats = data.get("categories") if isinstance(data, dict) else None
    if not isinstance(cats, dict) or not cats:
        raise ExportError(f"--calibration auto: {checkpoint.name} records no training data; "
                          "pass --calibration DIR (a folder of photos and sketches)")
    root = Path(str(data.get("root") or "."))
    if not root.is_absolute():
        out = Path(str(config.get("output_dir") or "."))
        base = checkpoint.expanduser().absolute().parent.parent
        for _ in out.parts if not out.is_absolute() else ():
            base = base.parent
        root = base / root
    keys = {"sketch": "train_sketches", "image": "train_images"}
    folders = {b: [root / str(c.get(k)) for c in cats.values() if isinstance(c, dict) and c.get(k)]
               for b, k in keys.items()}
    missing = [f for b in PIXEL_TOWERS for f in folders[b] if not f.is_dir()]
    if missing or not all(folders.values()):
        where = missing[0] if missing else root
        raise ExportError(f"--calibration auto: the training data is not here ({where} is "
                          "missing); pass --calibration DIR (a folder of photos and sketches)")
    return folders, f"auto ({root})"


def _dir_folders(path: Path) -> dict[str, list[Path]]:
    if not path.is_dir():
        raise ExportError(f"--calibration {path}: not a folder")
    own = {b: [path / n for n in names if (path / n).is_dir()][:1]
           for b, names in SUBFOLDERS.items()}
    return own if all(own.values()) else {b: [path] for b in PIXEL_TOWERS}


def _image_files(folders: list[Path]) -> list[Path]:
    """Image files (by suffix) under ``folders``, sorted; hidden names skipped."""
    found = set()
    for folder in folders:
        for top, dirs, names in os.walk(folder):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            found.update(Path(top) / n for n in names
                         if not n.startswith(".") and Path(n).suffix.lower() in IMAGE_EXTENSIONS)
    return sorted(found)


def _load(files: list[Path], spec: dict, label: str) -> np.ndarray:
    try:
        return np.stack([load_image(f, spec) for f in files])
    except (ImageDecodeError, OSError) as exc:
        raise ExportError(f"--calibration {label}: {exc}") from None


# -- quantising one tower ---------------------------------------------------------------------

class _Batches:
    """onnxruntime's CalibrationDataReader protocol over an array, a bounded batch at a time."""

    def __init__(self, name: str, pixels: np.ndarray):
        n = max(1, CALIBRATION_BATCH_PIXELS // (pixels.shape[-1] * pixels.shape[-2]))
        self.feeds = [{name: pixels[i:i + n]} for i in range(0, len(pixels), n)]
        self.start, self.end = 0, len(self.feeds)

    def __len__(self) -> int:
        return len(self.feeds)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.start, self.end = start_index, min(end_index, len(self.feeds))

    def get_next(self):
        if self.start >= self.end:
            return None
        self.start += 1
        return self.feeds[self.start - 1]


def quantize_static(src: Path, dst: Path, pixels: np.ndarray, input_name: str = "pixels") -> None:
    """QDQ static quantisation of ``src``'s convolutional ops, calibrated on ``pixels``
    [N, C, S, S]; then dynamic int8 for its MatMul / Gemm."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quant_pre_process
    from onnxruntime.quantization import quantize_static as ort_static

    with tempfile.TemporaryDirectory(prefix="stbir-quant-") as scratch, quiet_logs("onnxruntime"), \
            contextlib.redirect_stdout(io.StringIO()):  # its calibrator prints progress per batch
        prepared = Path(scratch) / "prepared.onnx"
        quant_pre_process(str(src), str(prepared))  # shape inference + folding, as ORT advises
        ort_static(prepared, dst, _Batches(input_name, pixels), quant_format=QuantFormat.QDQ,
                   per_channel=True, reduce_range=False, activation_type=QuantType.QUInt8,
                   weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.Percentile,
                   op_types_to_quantize=STATIC_OP_TYPES,
                   extra_options={"CalibStridedMinMax": 1})  # one batch of tensors at a time
    verification.quantize_int8(dst, dst)


def _dynamic(model, encoder: str, fp32: Path, int8: Path, table, batch: int, log, why: str) -> dict:
    verification.quantize_int8(fp32, int8)
    cos = verification.int8_cosine(model, encoder, fp32, int8, table, batch)
    log(f"  int8 {encoder}: min cosine to fp32 {cos:.5f} (dynamic: {why})"
        f"{'' if cos >= verification.INT8_WARN_COSINE else '  (warning: low)'}")
    return {"method": "dynamic", "op_types": verification.INT8_OP_TYPES, "cosine_to_fp32": cos,
            "why": why}


def _batch1_ms(sessions: dict, feed: dict) -> dict[str, float]:
    """Median batch-1 ms of each session, in two passes of per-session blocks (load that comes
    and goes is shared; each block warmed up first)."""
    times = {k: [] for k in sessions}
    for _ in range(2):
        for k, sess in sessions.items():
            for _ in range(3):
                sess.run(None, feed)
            for _ in range(TIMED_CALLS // 2):
                t0 = time.perf_counter()
                sess.run(None, feed)
                times[k].append(time.perf_counter() - t0)
    return {k: round(float(np.median(v)) * 1000, 4) for k, v in times.items()}


def quantize_tower(model, encoder: str, fp32: Path, int8: Path, calibration: Calibration | None,
                   table: np.ndarray | None, batch: int, log) -> dict:
    """Write ``int8`` for one tower; return its export.json record (method, cosine, timings)."""
    dynamic = lambda why: _dynamic(model, encoder, fp32, int8, table, batch, log, why)
    if encoder not in PIXEL_TOWERS:
        return dynamic("a transformer fed token embeddings: dynamic MatMul/Gemm int8")
    if calibration is None:
        return dynamic("no calibration images (--calibration)")
    with tempfile.TemporaryDirectory(prefix="stbir-int8-") as scratch:
        built = {"static": Path(scratch) / "static.onnx", "dynamic": Path(scratch) / "dynamic.onnx"}
        try:
            quantize_static(fp32, built["static"], calibration.calibrate[encoder])
        except Exception as exc:  # e.g. a non-finite activation the histograms cannot bin
            return dynamic(f"static quantisation failed: {str(exc).splitlines()[0][:200]}")
        verification.quantize_int8(fp32, built["dynamic"])
        settings = SessionSettings()  # the runtime's defaults
        sessions = {k: open_session(str(p), settings, label=p.name)
                    for k, p in {"fp32": fp32, **built}.items()}
        held = calibration.check[encoder]
        want = sessions["fp32"].run(None, {"pixels": held})[0]
        cos = {k: verification.compare(sessions[k].run(None, {"pixels": held})[0], want)[0]
               for k in built}
        ms = _batch1_ms(sessions, {"pixels": held[:1]})
        del sessions
        good = [k for k in built if cos[k] >= MIN_COSINE]
        method = min(good, key=ms.get) if good else max(built, key=cos.get)
        shutil.copyfile(built[method], int8)
    log(f"  int8 {encoder}: {method} (batch-1 ms: fp32 {ms['fp32']:.3f}, static {ms['static']:.3f}"
        f", dynamic {ms['dynamic']:.3f}; min cosine to fp32 on {len(held)} held-out images: "
        f"static {cos['static']:.5f}, dynamic {cos['dynamic']:.5f})"
        + ("" if good else f"  (warning: none reaches {MIN_COSINE})"))
    record = {"method": method, "cosine_to_fp32": cos[method], "candidates_cosine": cos,
              "batch1_ms": ms, "min_cosine": MIN_COSINE}
    if method == "static":
        record["settings"] = STATIC_SETTINGS
    else:
        record["op_types"] = verification.INT8_OP_TYPES
    return record


__all__ = ["AUTO", "CALIBRATION_IMAGES", "Calibration", "MIN_COSINE", "calibration_set",
           "quantize_static", "quantize_tower"]
