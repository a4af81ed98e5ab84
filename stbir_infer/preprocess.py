"""Image preprocessing in PIL + numpy: the one implementation training, export and runtime share.

An *input spec* is a plain dict (it is written into ``export.json``)::

    {"size": 64, "channels": 3, "mean": [...], "std": [...],
     "interpolation": "bicubic", "resize_mode": "shortest"}

Resize the shortest side to ``size`` (PIL, so it matches open_clip's torchvision ``Resize`` on PIL
images), centre-crop to ``size`` x ``size``, scale to [0, 1], normalise per channel.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

_RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}


class ImageDecodeError(ValueError):
    """A file that is not a readable image."""


def open_image(source: str | Path | Image.Image, channels: int) -> Image.Image:
    """Decode to an 8-bit RGB (channels=3) or L (channels=1) image, upright per its EXIF tag.

    Transparency is flattened onto white (a sketch drawn on a transparent canvas is black on
    white, like the training sketches); 16-bit and float images are scaled to 8 bits.
    """
    if isinstance(source, Image.Image):
        img = source
    else:
        try:
            img = Image.open(source)
            img.load()
        except Exception as exc:  # PIL raises several types for a bad file
            raise ImageDecodeError(f"{source}: not a readable image ({exc})") from None
    img = ImageOps.exif_transpose(img) or img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / top * 255 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img.convert("RGBA"))
    return img.convert("L" if channels == 1 else "RGB")


def preprocess(img: Image.Image, spec: dict) -> np.ndarray:
    """One decoded image -> float32 array [C, size, size], normalised as the spec says."""
    size = int(spec["size"])
    w, h = img.size
    if spec.get("resize_mode", "shortest") != "shortest":
        raise ValueError(f"unsupported resize_mode {spec['resize_mode']!r}")
    # torchvision's Resize(int) rounds the long side down; do the same so crops line up.
    new_w, new_h = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), _RESAMPLE[spec.get("interpolation", "bicubic")])
    left = int(round((new_w - size) / 2.0))
    top = int(round((new_h - size) / 2.0))
    img = img.crop((left, top, left + size, top + size))
    arr = np.asarray(img, np.float32) / 255.0
    if arr.ndim == 2:
        arr = arr[None]
    else:
        arr = arr.transpose(2, 0, 1)
    mean = np.asarray(spec["mean"], np.float32)[:, None, None]
    std = np.asarray(spec["std"], np.float32)[:, None, None]
    return (arr - mean) / std


def load(source: str | Path | Image.Image, spec: dict) -> np.ndarray:
    """Decode and preprocess in one call."""
    return preprocess(open_image(source, int(spec["channels"])), spec)
