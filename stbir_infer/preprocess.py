"""Image preprocessing in PIL + numpy: the one implementation training, export and runtime share.

An *input spec* is a plain dict (it is written into ``export.json``)::

    {"size": 64, "channels": 3, "mean": [...], "std": [...],
     "interpolation": "bicubic", "resize_mode": "shortest"}

``resize_mode`` "shortest": resize the shortest side to ``size`` (PIL, so it matches open_clip's
torchvision ``Resize`` on PIL images), centre-crop to ``size`` x ``size``. "pad" (plus
``pad_fill``, 0-255 per channel, default white): resize the longest side to ``size`` and centre
the picture on a ``size`` square of the fill, so nothing is cut off (a wide sketch keeps the
strokes at its ends; docs/real-photos.md, "Crop or pad"). Then scale to [0, 1] and normalise per channel.

Bounded work per image (sketches, photos, the web API and enroll all come through here):

* the size is read from the file's header before any pixel is decoded; more than ``MAX_PIXELS``
  decoded pixels is an ImageDecodeError (PIL's own decompression-bomb limit, checked when the
  header is read, is one too);
* ``load`` decodes a JPEG whose short side is at least ``DRAFT_FACTOR`` x the target size at a
  reduced DCT scale (1/2, 1/4 or 1/8; the short side stays >= 2 x the target, so the bicubic
  downscale still has twice the pixels it needs). That changes pixels slightly against a full
  decode, so it is only done there: training, the parity tests and every image under
  4 x the target decode in full, as before;
* an image more elongated than ``MAX_INTERMEDIATE`` allows (short side scaled to ``size``, long
  side over ``MAX_INTERMEDIATE`` x ``size``) is resized straight into the centre crop (PIL's
  ``box``): the same crop of the same picture, never the huge intermediate (a 1 x 100000 PNG
  would otherwise need 64 x 6,400,000 pixels). No aspect ratio is refused: any image has a
  well-defined centre crop, and this path costs ``size``^2 whatever the shape. Images at most
  that elongated keep the exact resize-then-crop of before (the box path rounds a few pixels
  one level differently, and parity with open_clip is tested to 1e-4).
* an image of more than ``LEAN_PIXELS`` decoded pixels whose short side is at least
  ``DRAFT_FACTOR`` x the target (the large-JPEG rule, for formats without a reduced-scale decode)
  goes through the per-pixel conversions (16-bit scaling, palette, alpha onto white, RGB / L) in
  bands of about a megapixel, each box-reduced (PIL ``reduce``) by the integer factor that keeps
  the short side >= 2 x the target, and the EXIF orientation is applied to the reduced image. So
  no full-size copy is made: a 49 MP RGBA or 16-bit PNG costs its decoded pixels plus a few MB,
  not the 0.7 to 1.3 GB that the full-size conversions took. Like the JPEG draft, this changes
  pixels slightly against the full path, so only images that large take it. A thin image of
  that many pixels (short side under the rule: a 190 x 263,000 16-bit PNG) is converted in the
  same bands without the reduce (the same pixels as the full path), so it costs its decoded
  pixels plus its 8-bit result, not 1.3 GB of float64 copies.
"""

from __future__ import annotations

import os
import stat
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps

from stbir_infer.contract import MANIFEST
from stbir_infer.errors import ExportDirError, ImageDecodeError


class SpecError(ExportDirError, ValueError):
    """An input spec this runtime cannot follow (an export's ``preprocess``): exit 2, and enroll
    stops instead of skipping every photo. Still a ValueError, as it was."""


_RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}

# 50 MP: a 50 MP phone photo or an 8192 x 6144 scan decodes (about 150 MB as RGB, a few times
# that at peak through the alpha / mode conversions); anything larger is refused unless it is a
# JPEG that ``load`` can decode at a reduced scale (a 100 MP camera JPEG decodes at 1/8 then).
MAX_PIXELS = 50_000_000
# Long side / short side above which the resize goes straight into the crop (see above).
MAX_INTERMEDIATE = 8
DRAFT_FACTOR = 4
# Decoded pixels above which a large image is converted in bands and reduced (see above).
LEAN_PIXELS = 8_000_000
MAX_SPEC_SIZE = 4096  # the largest input side an export may ask for
# File names a folder of training or calibration images is read by.
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
_BAND_PIXELS = 1 << 20
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I", "F")
# Modes whose full-size conversion costs several times the decoded image (16-bit and float via
# float64, palette and alpha via RGBA): converted in bands above LEAN_PIXELS whatever the shape.
_WIDE_MODES = (*_SIXTEEN_BIT, "P", "PA", "RGBA", "LA")
_EXIF_METHODS = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                 4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
                 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
                 8: Image.Transpose.ROTATE_90}

__all__ = ["DRAFT_FACTOR", "IMAGE_EXTENSIONS", "ImageDecodeError", "LEAN_PIXELS", "MAX_INTERMEDIATE",
           "MAX_PIXELS", "MAX_SPEC_SIZE", "SpecError", "check_spec", "load", "open_image",
           "pad_fill", "preprocess"]


def _label(source) -> str:
    if isinstance(source, (str, Path)):
        return str(source)
    name = getattr(source, "name", None)
    return str(name) if isinstance(name, (str, Path)) else f"<{type(source).__name__}>"


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0][:200] if text else type(exc).__name__)


def _open_regular(path):
    """``path`` opened for reading if it is a regular file: O_NONBLOCK, so a FIFO given as a
    sketch cannot hang a query or a batch, and a device is refused."""
    f = open(path, "rb", opener=  # noqa: SIM115 - returned to the caller, who closes it
             lambda p, flags: os.open(p, flags | getattr(os, "O_NONBLOCK", 0)))
    if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
        f.close()
        raise ImageDecodeError("not a regular file")
    return f


def _check_pixels(img: Image.Image, label: str) -> None:
    w, h = img.size
    if w < 1 or h < 1:
        raise ImageDecodeError(f"{label}: image has no pixels ({w}x{h})")
    if w * h > MAX_PIXELS:
        raise ImageDecodeError(f"{label}: {w}x{h} is {w * h / 1e6:.0f} megapixels, more than the "
                               f"{MAX_PIXELS / 1e6:.0f} this runtime decodes")


def _draft(img: Image.Image, target: int | None) -> None:
    """Let a JPEG decode at 1/2, 1/4 or 1/8 scale when it is >= DRAFT_FACTOR x the target."""
    if not target or img.format not in ("JPEG", "MPO") or min(img.size) < DRAFT_FACTOR * int(target):
        return
    want = 2 * int(target)
    img.draft(None, (want, want))  # the largest scale that keeps both sides >= want


def open_image(source: str | Path | Image.Image, channels: int, *,
               target: int | None = None) -> Image.Image:
    """Decode to an 8-bit RGB (channels=3) or L (channels=1) image, upright per its EXIF tag.

    ``source``: a path, a file-like object (e.g. BytesIO) or a PIL image. Transparency is
    flattened onto white (a sketch drawn on a transparent canvas is black on white, like the
    training sketches); 16-bit and float images are scaled to 8 bits. ``target`` (the size the
    image will be resized to; ``load`` passes it) lets a large JPEG decode at reduced scale.
    Raises ImageDecodeError (one line) for an unreadable, truncated or oversized image.
    """
    label = _label(source)
    if isinstance(source, (str, Path)):
        try:
            f = _open_regular(source)
        except (OSError, ImageDecodeError) as exc:
            raise ImageDecodeError(f"{label}: not a readable image ({_one_line(exc)})") from None
        with f:
            return open_image(f, channels, target=target)
    try:
        if isinstance(source, Image.Image):
            img = source
            if isinstance(img, ImageFile.ImageFile) and img.tile:  # opened, not yet decoded
                _check_pixels(img, label)
        else:
            img = Image.open(source)  # reads the header only
            _draft(img, target)
            _check_pixels(img, label)
        img.load()
        factor = _lean_factor(img, target)
        if factor > 1 or (img.width * img.height > LEAN_PIXELS and img.mode in _WIDE_MODES):
            return _reduce_in_bands(img, channels, factor)  # factor 1: converted in bands only
        img = ImageOps.exif_transpose(img) or img
        return _convert(img, channels)
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(f"{label}: refused, too many pixels ({_one_line(exc)})") from None
    except MemoryError:
        err = ImageDecodeError(f"{label}: not enough memory to decode it")
        err.transient = True
        raise err from None
    except Exception as exc:  # PIL raises several types for a bad or truncated file
        raise ImageDecodeError(f"{label}: not a readable image ({_one_line(exc)})") from None


def _convert(img: Image.Image, channels: int, top: float | None = None) -> Image.Image:
    """The per-pixel conversions to 8-bit L / RGB (``top``: the 16-bit / float scale, None: from
    this image)."""
    if img.mode in _SIXTEEN_BIT:
        arr = np.asarray(img, np.float64)
        if top is None:
            top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / top * 255 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img.convert("RGBA"))
    return img.convert("L" if channels == 1 else "RGB")


def _lean_factor(img: Image.Image, target: int | None) -> int:
    """The box-reduce factor for an image too large to convert at full size (1: convert as is)."""
    w, h = img.size
    if not target or w * h <= LEAN_PIXELS or min(w, h) < DRAFT_FACTOR * int(target):
        return 1
    return max(1, min(w, h) // (2 * int(target)))


def _reduce_in_bands(img: Image.Image, channels: int, factor: int) -> Image.Image:
    """``_convert`` in bands of rows (a multiple of ``factor``), each reduced by ``factor``, then
    the EXIF orientation: never a full-size copy of the image."""
    w, h = img.size
    orientation = img.getexif().get(0x0112)  # read as exif_transpose reads it
    rows = max(1, _BAND_PIXELS // (w * factor)) * factor
    top = None
    if img.mode in _SIXTEEN_BIT and not img.mode.startswith("I;16"):
        peak = np.max([np.asarray(img.crop((0, y, w, min(h, y + rows)))).max()
                       for y in range(0, h, rows)])
        top = 65535.0 if peak > 255 else 255.0
    out = Image.new("L" if channels == 1 else "RGB", (-(-w // factor), -(-h // factor)))
    for y in range(0, h, rows):
        band = _convert(img.crop((0, y, w, min(h, y + rows))), channels, top)
        out.paste(band.reduce(factor), (0, y // factor))
    method = _EXIF_METHODS.get(orientation) if isinstance(orientation, int) else None
    return out.transpose(method) if method is not None else out


def preprocess(img: Image.Image, spec: dict) -> np.ndarray:
    """One decoded image -> float32 array [C, size, size], normalised as the spec says.

    ``resize_mode``: "shortest" (short side to ``size``, centre crop: open_clip's default) or
    "pad" (long side to ``size``, centred on a square of ``pad_fill``: nothing is cut off)."""
    mode = spec.get("resize_mode", "shortest")
    if mode == "pad":
        img = _pad(img, spec)
    elif mode == "shortest":
        img = _shortest_crop(img, spec)
    else:
        raise SpecError(f"{MANIFEST}: unsupported resize_mode {str(mode)[:40]!r}")
    # Normalised in place on the fresh, contiguous H x W (x C) copy, channels last; the same
    # float32 operations on every value as (x / 255 - mean) / std, without the temporaries.
    arr = np.asarray(img).astype(np.float32)
    mean, std = _mean_std(tuple(spec["mean"]), tuple(spec["std"]))
    arr /= 255.0
    arr -= mean
    arr /= std
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


@lru_cache(maxsize=16)
def _mean_std(mean: tuple, std: tuple) -> tuple[np.ndarray, np.ndarray]:
    out = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    for a in out:
        a.flags.writeable = False  # shared by every call (and thread)
    return out


def _resample(spec: dict):
    name = spec.get("interpolation", "bicubic")
    if not isinstance(name, str) or name not in _RESAMPLE:
        raise SpecError(f"{MANIFEST}: interpolation {str(name)[:40]!r} is not one of "
                             f"{', '.join(_RESAMPLE)}")
    return _RESAMPLE[name]


def _shortest_crop(img: Image.Image, spec: dict) -> Image.Image:
    """"shortest": the short side resized to ``size``, then the centre ``size`` square."""
    size = int(spec["size"])
    w, h = img.size
    # torchvision's Resize(int) rounds the long side down; do the same so crops line up.
    new_w, new_h = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    left = int(round((new_w - size) / 2.0))
    top = int(round((new_h - size) / 2.0))
    resample = _resample(spec)
    if max(new_w, new_h) > MAX_INTERMEDIATE * size:
        # Resize only the part of the picture the centre crop keeps (in source coordinates).
        sx, sy = w / new_w, h / new_h
        box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
        return img.resize((size, size), resample, box=box)
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), resample)
    return img.crop((left, top, left + size, top + size))


def pad_fill(spec: dict) -> tuple[int, ...]:
    """The "pad" mode's fill, 0-255 per channel: the spec's ``pad_fill``, else white."""
    fill = spec.get("pad_fill") or [255] * int(spec["channels"])
    return tuple(int(v) for v in fill)


def _pad(img: Image.Image, spec: dict) -> Image.Image:
    """"pad": the long side resized to ``size`` (aspect kept), centred on a ``size`` square of
    ``pad_fill``. Nothing is cut off; the work is bounded by the source pixels plus size^2."""
    size = int(spec["size"])
    w, h = img.size
    s = size / max(w, h)
    new_w, new_h = max(1, min(size, round(w * s))), max(1, min(size, round(h * s)))
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), _resample(spec))
    fill = pad_fill(spec)
    canvas = Image.new(img.mode, (size, size), fill[0] if img.mode == "L" else fill)
    canvas.paste(img, ((size - new_w) // 2, (size - new_h) // 2))
    return canvas


def check_spec(spec) -> None:
    """A SpecError unless ``spec`` is one this runtime can follow: ``size`` 1..MAX_SPEC_SIZE,
    ``channels`` 1 or 3, ``mean`` / ``std`` one finite number per channel (std not 0). An export's
    bad value (size 0, a string) was an internal error at the first image."""
    size, channels = spec.get("size"), spec.get("channels")
    if not (isinstance(size, int) and not isinstance(size, bool) and 1 <= size <= MAX_SPEC_SIZE):
        raise SpecError(f"{MANIFEST}: preprocess size {str(size)[:40]!r} is not an integer "
                        f"from 1 to {MAX_SPEC_SIZE}")
    if channels not in (1, 3) or isinstance(channels, bool):
        raise SpecError(f"{MANIFEST}: preprocess channels {str(channels)[:40]!r} is not 1 or 3")
    for key in ("mean", "std"):
        try:
            v = np.asarray(spec.get(key), np.float64)
        except (TypeError, ValueError):
            v = np.zeros(0)
        if v.shape != (channels,) or not np.isfinite(v).all() or (key == "std" and (v == 0).any()):
            raise SpecError(f"{MANIFEST}: preprocess {key} is not {channels} finite number(s)")


def load(source: str | Path | Image.Image, spec: dict) -> np.ndarray:
    """Decode and preprocess in one call (a large JPEG decodes at reduced scale, see above)."""
    check_spec(spec)
    return preprocess(open_image(source, int(spec["channels"]), target=int(spec["size"])), spec)
