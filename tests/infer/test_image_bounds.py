"""Issue 13.4: the work per image is bounded (thin strips, decompression bombs, truncated files,
huge JPEGs), in the one function every sketch, photo, web upload and enroll goes through."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stbir_infer import preprocess as P
from stbir_infer.errors import ImageDecodeError, StbirInferError

REPO = Path(__file__).resolve().parents[2]
IMAGE_SPEC = {"size": 64, "channels": 3, "mean": [0.48145466, 0.4578275, 0.40821073],
              "std": [0.26862954, 0.26130258, 0.27577711], "interpolation": "bicubic",
              "resize_mode": "shortest"}
SKETCH_SPEC = {"size": 64, "channels": 1, "mean": [0.5], "std": [0.5], "interpolation": "bicubic",
               "resize_mode": "shortest"}
PEAK_MB = 256

# Runs one preprocess.load in a fresh interpreter and reports the growth of its peak RSS. The
# address-space limit only keeps a regression (the old code needs > 5 GB for 1 x 300000) from
# hurting the machine: it turns into a MemoryError instead.
_MEASURE = r"""
import json, resource, sys, time
resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
from stbir_infer import preprocess as P
spec = json.loads(sys.argv[2])
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
try:
    out = P.load(sys.argv[1], spec)
    result = {"shape": list(out.shape), "finite": bool(abs(out).max() < 10)}
except Exception as exc:
    result = {"error": type(exc).__name__, "message": str(exc)}
result["seconds"] = time.perf_counter() - t
result["peak_mb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
print(json.dumps(result))
"""


def measure(path: Path, spec: dict) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", _MEASURE, str(path), json.dumps(spec)],
                          capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def png_header_only(width: int, height: int, mode: str = "RGB") -> bytes:
    """A small PNG whose header declares width x height (its pixel data is a few bytes)."""
    color = {"RGB": 2, "L": 0}[mode]

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, color, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 1000)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("size,spec", [((1, 100000), SKETCH_SPEC), ((1, 300000), IMAGE_SPEC),
                                       ((300000, 1), IMAGE_SPEC)])
def test_thin_strips_cost_little_memory_and_time(tmp_path, size, spec):
    mode = "L" if spec["channels"] == 1 else "RGB"
    rng = np.random.default_rng(0)
    shape = (size[1], size[0]) + (() if mode == "L" else (3,))
    path = tmp_path / "strip.png"
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)
    assert path.stat().st_size < 2_000_000
    r = measure(path, spec)
    assert "error" not in r, r
    assert r["shape"] == [spec["channels"], 64, 64] and r["finite"]
    assert r["peak_mb"] < PEAK_MB, r
    assert r["seconds"] < 2.0, r


def test_elongated_images_keep_the_centre_crop():
    """Past MAX_INTERMEDIATE the resize goes straight into the crop: the same picture as the old
    resize-then-crop (within PIL's rounding), not a shifted or stretched one."""
    rng = np.random.default_rng(1)
    # Smooth content, so a one-level rounding difference is all that can differ.
    y, x = np.mgrid[0:900, 0:30]
    arr = np.stack([(x * 8) % 256, (y // 3) % 256, ((x + y) * 2) % 256], -1).astype(np.uint8)
    for img in (Image.fromarray(arr), Image.fromarray(arr.transpose(1, 0, 2).copy()),
                Image.fromarray(rng.integers(0, 256, (5, 1000, 3), dtype=np.uint8))):
        w, h = img.size
        assert max(w, h) / min(w, h) > P.MAX_INTERMEDIATE
        size = 64
        nw, nh = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
        left, top = int(round((nw - size) / 2.0)), int(round((nh - size) / 2.0))
        old = np.asarray(img.resize((nw, nh), Image.Resampling.BICUBIC)
                         .crop((left, top, left + size, top + size)), np.float32)
        new = P.preprocess(img, {**IMAGE_SPEC, "mean": [0, 0, 0], "std": [1, 1, 1]}) * 255
        diff = np.abs(new.transpose(1, 2, 0) - old)
        assert diff.mean() < 1.0 and np.percentile(diff, 99) <= 3, (img.size, diff.max())


@pytest.mark.parametrize("width,height", [(30000, 30000), (8000, 7000)])
def test_huge_header_is_refused_before_decoding(tmp_path, width, height):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header_only(width, height))
    assert path.stat().st_size < 200
    r = measure(path, IMAGE_SPEC)
    assert r["error"] == "ImageDecodeError", r
    assert "\n" not in r["message"] and str(path) in r["message"]
    assert r["peak_mb"] < 64 and r["seconds"] < 1.0, r
    # Also as bytes (the web API) and as an opened, not yet decoded, PIL image.
    with pytest.raises(ImageDecodeError):
        P.load(BytesIO(path.read_bytes()), SKETCH_SPEC)
    if width * height < 2 * Image.MAX_IMAGE_PIXELS:  # PIL's Image.open refuses larger itself
        with pytest.raises(ImageDecodeError, match="megapixels"):
            P.load(Image.open(path), IMAGE_SPEC)


def _encoded(fmt: str, **kw) -> bytes:
    rng = np.random.default_rng(2)
    buf = BytesIO()
    Image.fromarray(rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)).save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_files_are_one_line_decode_errors(tmp_path, fmt):
    data = _encoded(fmt)
    for cut in (len(data) // 2, len(data) * 3 // 4, 40):
        path = tmp_path / f"cut{cut}.{fmt.lower()}"
        path.write_bytes(data[:cut])
        for source in (path, BytesIO(data[:cut])):
            with pytest.raises(ImageDecodeError) as info:
                P.load(source, IMAGE_SPEC)
            assert "\n" not in str(info.value)
    assert P.load(BytesIO(data), IMAGE_SPEC).shape == (3, 64, 64)


def test_large_jpeg_decodes_at_reduced_scale(tmp_path):
    y, x = np.mgrid[0:900, 0:1200]
    arr = np.stack([x % 256, y % 256, ((x // 7 + y // 5) * 9) % 256], -1).astype(np.uint8)
    big = tmp_path / "big.jpg"
    Image.fromarray(arr).save(big, quality=92)
    drafted = P.open_image(big, 3, target=64)
    assert drafted.size == (300, 225)  # 1/4 scale: short side 225 >= 2 x 64
    assert P.open_image(big, 3).size == (1200, 900)  # no target (training): full decode
    full = P.preprocess(P.open_image(big, 3), IMAGE_SPEC)
    fast = P.load(big, IMAGE_SPEC)
    assert np.abs(fast - full).mean() < 0.05
    # Under DRAFT_FACTOR x the target, load is the full decode, pixel for pixel.
    small = tmp_path / "small.jpg"
    Image.fromarray(arr[:250, :300]).save(small, quality=92)
    assert np.array_equal(P.load(small, IMAGE_SPEC),
                          P.preprocess(P.open_image(small, 3), IMAGE_SPEC))


def test_image_decode_error_is_a_runtime_error_and_errors_import_no_preprocess(tmp_path):
    assert issubclass(ImageDecodeError, StbirInferError) and issubclass(ImageDecodeError, ValueError)
    assert ImageDecodeError.exit_code == 2 and P.ImageDecodeError is ImageDecodeError
    code = ("import sys, stbir_infer.errors; "
            "assert 'stbir_infer.preprocess' not in sys.modules, 'errors imports preprocess'; "
            "assert 'PIL' not in sys.modules")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-1000:]


def png_bomb(width: int, height: int, color_type: int, bit_depth: int = 8) -> bytes:
    """A valid PNG of width x height black pixels: a few hundred KB that decode to hundreds of MB
    (built row by row, never as a whole raw image)."""
    channels = {0: 1, 2: 3, 6: 4}[color_type]
    row = b"\x00" * (1 + width * channels * bit_depth // 8)
    comp = zlib.compressobj(9)
    data = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + body))
        return struct.pack(">I", len(body)) + kind + body + crc

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", data)
            + chunk(b"IEND", b""))


@pytest.mark.parametrize("color_type,bit_depth,spec", [(6, 8, IMAGE_SPEC), (0, 16, SKETCH_SPEC),
                                                       (0, 16, IMAGE_SPEC), (6, 8, SKETCH_SPEC)])
def test_bombs_under_the_pixel_cap_cost_under_256_mb(tmp_path, color_type, bit_depth, spec):
    """Found by benchmarks/fuzz.py: a 49 MP RGBA PNG (under MAX_PIXELS) took ~740 MB at peak
    through the full-size alpha flattening, a 49 MP 16-bit PNG ~1.3 GB through float64 copies.
    Such images are converted in bands and box-reduced now: their decoded pixels plus a few MB."""
    path = tmp_path / "bomb.png"
    path.write_bytes(png_bomb(7000, 7000, color_type, bit_depth))
    assert P.MAX_PIXELS > 7000 * 7000 and path.stat().st_size < 2_000_000
    r = measure(path, spec)
    assert "error" not in r, r
    assert r["shape"] == [spec["channels"], 64, 64] and r["finite"]
    assert r["peak_mb"] < PEAK_MB, r


def _large_picture(mode: str) -> Image.Image:
    """3000 x 2800 (8.4 MP, over LEAN_PIXELS) of smooth content in ``mode``."""
    y, x = np.mgrid[0:2800, 0:3000]
    r, g, b = (x * 255 // 2999), (y * 255 // 2799), ((x + y) * 255 // 5798)
    if mode == "RGBA":
        a = 40 + (x + 2 * y) * 215 // 8597
        return Image.fromarray(np.stack([r, g, b, a], -1).astype(np.uint8), "RGBA")
    if mode == "I;16":
        return Image.fromarray((x * 16 + y * 4).astype(np.uint16))
    if mode == "P":
        return Image.fromarray(np.stack([r, g, b], -1).astype(np.uint8)).quantize(64)
    return Image.fromarray(np.stack([r, g, b], -1).astype(np.uint8), "RGB")


@pytest.mark.parametrize("mode", ["RGBA", "I;16", "P", "RGB"])
@pytest.mark.parametrize("spec", [IMAGE_SPEC, SKETCH_SPEC])
@pytest.mark.parametrize("orientation", [1, 6])
def test_large_images_reduced_in_bands_match_the_full_path(tmp_path, monkeypatch, mode, spec,
                                                           orientation):
    """The banded, box-reduced path gives the same picture (within resampling differences) as
    converting at full size, EXIF orientation included."""
    img = _large_picture(mode)
    assert img.width * img.height > P.LEAN_PIXELS
    path = tmp_path / "large.png"
    exif = Image.Exif()
    exif[0x0112] = orientation
    img.save(path, exif=exif.tobytes())
    lean = P.load(path, spec)
    monkeypatch.setattr(P, "LEAN_PIXELS", 10**12)
    full = P.load(path, spec)
    assert lean.shape == full.shape == (spec["channels"], 64, 64)
    diff = np.abs(lean - full) * np.asarray(spec["std"], np.float32)[:, None, None] * 255
    assert diff.mean() < 1.5 and np.percentile(diff, 99) < 8, (diff.mean(), diff.max())


def test_images_up_to_lean_pixels_take_the_full_path(monkeypatch):
    """At or under LEAN_PIXELS nothing changed: the banded path is not entered."""
    called = []
    monkeypatch.setattr(P, "_reduce_in_bands", lambda *a: called.append(a))
    img = Image.new("RGBA", (2000, 4000), (10, 20, 30, 128))
    assert img.width * img.height == P.LEAN_PIXELS
    assert P.load(img, IMAGE_SPEC).shape == (3, 64, 64) and not called
