"""Issue 15.2: the kinds of files real photo collections hold, through enroll and query.

One folder holds one file of each kind, built here with PIL; one enroll (the CLI) indexes it.
Each file either encodes the pixels a correct conversion gives (the index's vector for it scores
~1 against the vector of a reference image converted by hand, and clearly less against the
wrong conversion) or is skipped with one line naming it.
"""

from __future__ import annotations

import struct
import zlib
from io import BytesIO

import numpy as np
import pytest
from infer_helpers import run_cli
from PIL import Image, ImageDraw

from stbir_infer import Searcher
from stbir_infer import preprocess as P

SAME = 0.9999  # cosine of two encodings of the same pixels (float noise only)


def _photo(w: int = 96, h: int = 72) -> Image.Image:
    """An asymmetric colour photo: a ramp, a red block top-left, a blue bar at the bottom."""
    x = np.linspace(0, 1, w)[None, :, None]
    y = np.linspace(0, 1, h)[:, None, None]
    arr = np.concatenate([x * 200 + 30 + 0 * y, y * 180 + 40 + 0 * x, (1 - x) * 150 + 50 + 0 * y], 2)
    img = Image.fromarray(arr.astype(np.uint8), "RGB")
    d = ImageDraw.Draw(img)
    d.rectangle((4, 4, w // 3, h // 3), fill=(220, 20, 30))
    d.rectangle((0, h - 12, w, h), fill=(20, 40, 200))
    return img


def _png_bomb(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares width x height 8-bit RGB pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def _pad_or_crop(img: Image.Image, spec: dict) -> Image.Image:
    """The export's resize done the naive way (full-size intermediate), as a reference."""
    size = spec["size"]
    w, h = img.size
    if spec.get("resize_mode", "shortest") == "pad":
        s = size / max(w, h)
        small = img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.BICUBIC)
        canvas = Image.new(img.mode, (size, size), tuple(spec.get("pad_fill") or [255] * 3))
        canvas.paste(small, ((size - small.width) // 2, (size - small.height) // 2))
        return canvas
    nw, nh = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    big = img.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = round((nw - size) / 2), round((nh - size) / 2)
    return big.crop((left, top, left + size, top + size))


@pytest.fixture(scope="module")
def real(export_dir, tmp_path_factory):
    """(searcher, enroll stderr, {kind: (file, correct reference, wrong reference)}, the pixel
    arrays enroll encoded)."""
    root = tmp_path_factory.mktemp("real")
    photos = root / "photos"
    photos.mkdir()
    cases = {}

    src = _photo()  # stored sideways: EXIF orientation 6 says "rotate 90 degrees clockwise"
    exif = Image.Exif()
    exif[0x0112] = 6
    src.rotate(90, expand=True).save(photos / "exif.jpg", quality=95, exif=exif)
    decoded = Image.open(photos / "exif.jpg").convert("RGB")
    cases["exif"] = ("exif.jpg", decoded.rotate(-90, expand=True), decoded)

    _photo().convert("CMYK").save(photos / "cmyk.jpg", quality=95)
    cmyk = Image.open(photos / "cmyk.jpg")
    assert cmyk.mode == "CMYK"
    c, m, y, k = (np.asarray(b, np.float64) for b in cmyk.split())
    rgb = np.stack([255 - np.minimum(255, v + k) for v in (c, m, y)], 2)  # CMYK -> RGB by hand
    wrong = Image.fromarray(np.stack([c, m, y], 2).astype(np.uint8), "RGB")  # channels as RGB
    cases["cmyk"] = ("cmyk.jpg", Image.fromarray(rgb.astype(np.uint8), "RGB"), wrong)

    pal = Image.new("P", (80, 80), 0)  # index 0 is transparent (and black in the palette)
    pal.putpalette([0, 0, 0, 230, 120, 20, 30, 90, 200] + [0] * 759)
    d = ImageDraw.Draw(pal)
    d.ellipse((10, 10, 60, 60), fill=1)
    d.rectangle((45, 45, 75, 75), fill=2)
    pal.save(photos / "palette.png", transparency=0)
    idx = np.asarray(pal)
    lut = np.array([[255, 255, 255], [230, 120, 20], [30, 90, 200]], np.uint8)
    cases["palette"] = ("palette.png", Image.fromarray(lut[idx], "RGB"), pal.convert("RGB"))

    ramp = (np.linspace(0, 65535, 90)[None, :] * np.linspace(0.3, 1, 70)[:, None]).astype(np.uint16)
    Image.frombytes("I;16", ramp.shape[::-1], ramp.astype("<u2").tobytes()).save(photos / "gray16.png")
    ref16 = Image.fromarray((ramp / 65535 * 255 + 0.5).astype(np.uint8), "L").convert("RGB")
    cases["gray16"] = ("gray16.png", ref16, Image.fromarray(ramp.astype(np.uint8), "L").convert("RGB"))

    y = np.arange(2000)
    bands = np.stack([128 + 127 * np.sin(2 * np.pi * y / 50), y / 2000 * 255, 255 - y / 2000 * 255], 1)
    strip = Image.fromarray(bands[:, None, :].astype(np.uint8), "RGB")  # 1 x 2000
    strip.save(photos / "strip.png")
    shifted = Image.fromarray(np.roll(bands, 25, 0)[:, None, :].astype(np.uint8), "RGB")
    cases["strip"] = ("strip.png", strip, shifted)  # wrong: a crop off centre by 25 rows

    buf = BytesIO()
    _photo(400, 300).save(buf, "JPEG", quality=90)
    (photos / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (photos / "bomb.png").write_bytes(_png_bomb(40_000, 40_000))

    from stbir_infer.encoders import Encoders

    seen = []  # every pixel array enroll encodes: the test's window on "which pixels"
    original = Encoders.encode_pixels

    def spy(self, branch, pixels):
        seen.extend(np.array(pixels, np.float32))
        return original(self, branch, pixels)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Encoders, "encode_pixels", spy)
        res = run_cli("enroll", "--images", photos, "--model", export_dir, "--index",
                      root / "index", "--threads", "1")
    assert res.exit_code == 0, res.output
    return Searcher(export_dir, root / "index", threads=1), res.stderr, cases, seen


def _score(searcher: Searcher, name: str, vector: np.ndarray) -> float:
    hits = searcher.search(vector, top_k=20)
    return next(h.score for h in hits if h.path.endswith("/" + name))


@pytest.mark.parametrize("kind", ["exif", "cmyk", "palette", "gray16", "strip"])
def test_each_kind_is_enrolled_with_the_correctly_converted_pixels(real, kind):
    searcher, _, cases, seen = real
    name, right, wrong = cases[kind]
    enc = searcher.encoders
    spec = enc.spec("image")
    if kind == "strip":  # the reference resize is the naive full-size one
        right, wrong = _pad_or_crop(right, spec), _pad_or_crop(wrong, spec)
    want, other = P.preprocess(right, spec), P.preprocess(wrong, spec)
    tol = 0.05 if kind == "strip" else 1e-5  # the strip's box resize rounds a few levels apart
    assert min(np.abs(s - want).max() for s in seen) <= tol, kind
    assert min(np.abs(s - other).max() for s in seen) > 0.1, kind  # the wrong one was not
    assert _score(searcher, name, enc.encode_pixels("image", want[None])[0]) >= (
        0.999 if kind == "strip" else SAME)


def test_truncated_and_bomb_files_are_one_skipped_line_each(real):
    searcher, stderr, _, _ = real
    lines = [ln for ln in stderr.splitlines() if ln.startswith("skipped:")]
    for name in ("truncated.jpg", "bomb.png"):
        mine = [ln for ln in lines if f"/{name}:" in ln]
        assert len(mine) == 1, stderr
    assert "Traceback" not in stderr
    assert searcher.info()["images"] == 5


def test_transparent_sketch_queries_like_the_same_drawing_on_white(real, tmp_path):
    """A sketch drawn on a transparent canvas (P with a transparent index, and LA) is black on
    white, like the training sketches: the same hits and scores as the flattened drawing."""
    searcher, _, _, _ = real
    la = Image.new("LA", (120, 60), (0, 0))
    ImageDraw.Draw(la).line([(10, 50), (60, 8), (110, 50)], fill=(0, 255), width=4)
    la.save(tmp_path / "la.png")
    pal = la.convert("RGBA").convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    pal.save(tmp_path / "pal.png", transparency=pal.getpixel((0, 0)))
    white = Image.new("L", la.size, 255)
    white.paste(la.getchannel("L"), mask=la.getchannel("A"))
    enc = searcher.encoders
    want = enc.preprocess("sketch", [white])
    for path in (tmp_path / "la.png", tmp_path / "pal.png"):
        assert np.abs(enc.preprocess("sketch", [str(path)]) - want).max() <= 1e-5, path.name
        got = searcher.query(sketch=str(path), top_k=5)
        ref = searcher.query(sketch=white, top_k=5)
        assert [h.path for h in got] == [h.path for h in ref]
        assert np.allclose([h.score for h in got], [h.score for h in ref], atol=1e-5)
    black = enc.preprocess("sketch", [la.getchannel("L")])  # alpha dropped: black on black
    assert np.abs(black - want).max() > 1.0


@pytest.mark.parametrize("mode", ["shortest", "pad"])
def test_both_resize_modes_give_the_reference_pixels_for_any_shape(mode):
    spec = {"size": 32, "channels": 3, "mean": [0.5] * 3, "std": [0.5] * 3,
            "interpolation": "bicubic", "resize_mode": mode, "pad_fill": [128, 128, 128]}
    for w, h in ((96, 72), (72, 96), (1, 300), (300, 1), (32, 32)):
        img = _photo(max(w, 24), max(h, 24)).resize((w, h))
        want = (np.asarray(_pad_or_crop(img, spec), np.float32).transpose(2, 0, 1) / 255 - 0.5) / 0.5
        got = P.preprocess(img, spec)
        assert got.shape == (3, 32, 32)
        assert np.abs(got - want).max() <= (2 / 255 if max(w, h) / min(w, h) > 8 else 1e-6), (w, h)


def test_pad_keeps_a_wide_sketch_whole_where_the_crop_cuts_it():
    sketch = Image.new("L", (300, 60), 255)
    ImageDraw.Draw(sketch).line([(2, 30), (40, 30)], fill=0, width=6)  # a stroke at the far left
    spec = {"size": 64, "channels": 1, "mean": [0.5], "std": [0.5], "interpolation": "bicubic"}
    crop = P.preprocess(sketch, {**spec, "resize_mode": "shortest"})
    pad = P.preprocess(sketch, {**spec, "resize_mode": "pad", "pad_fill": [255]})
    assert crop.min() == 1.0  # all white: the stroke was cut off
    assert pad.min() < -0.5  # the stroke is there
    assert (pad[:, :20] == 1.0).all()  # the padding is white
    with pytest.raises(ValueError):
        P.preprocess(sketch, {**spec, "resize_mode": "stretch"})
