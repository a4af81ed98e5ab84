"""Real sketch/photo pairs from a folder in the Sketchy layout, and their training augmentation.

    ROOT/photo/<class>/<id>.jpg        the photo a person looked at
    ROOT/sketch/<class>/<id>-<k>.png   sketch k of that photo

``read_pairs`` lists them (optionally only some classes, or all but some: a k-fold over classes
keeps its test classes out); ``augment`` gives a human sketch the hand variation the pseudo-
sketches get, after re-drawing its strokes with the page canvas's pen.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from stbir_infer.edges import WORK_SIZE
from stbir_train.errors import DataError

PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png")


@dataclass
class SketchPairs:
    photos: list[Path]  # one per photo
    classes: list[str]  # the photo's class (its folder)
    sketches: list[list[Path]]  # per photo, its sketches (at least one)

    def __len__(self) -> int:
        return len(self.photos)


def read_pairs(root: str | Path, classes: list[str] | None = None,
               exclude: list[str] | None = None) -> SketchPairs:
    """The photos of ``root`` that have at least one sketch, sorted by class and id; ``classes``
    keeps only those class folders, ``exclude`` drops these. A folder without that layout, a
    class named that is not there, or nothing left is one DataError line."""
    root = Path(root)
    if not (root / "photo").is_dir() or not (root / "sketch").is_dir():
        raise DataError(f"{root}: expected photo/<class>/<id>.jpg and sketch/<class>/<id>-<k>.png "
                        "(the Sketchy layout)")
    present = sorted(p.name for p in (root / "photo").iterdir() if p.is_dir())
    for name in (classes or []) + (exclude or []):
        if name not in present:
            raise DataError(f"{root}: no class folder photo/{name}")
    wanted = [c for c in (classes or present) if c not in set(exclude or [])]
    photos, owners, sketches = [], [], []
    for cls in wanted:
        by_id: dict[str, list[Path]] = {}
        for s in sorted((root / "sketch" / cls).glob("*.png")):
            stem, dash, k = s.stem.rpartition("-")
            if dash and k.isdigit():
                by_id.setdefault(stem, []).append(s)
        for p in sorted((root / "photo" / cls).iterdir()):
            if p.suffix.lower() in PHOTO_SUFFIXES and by_id.get(p.stem):
                photos.append(p)
                owners.append(cls)
                sketches.append(by_id[p.stem])
    if not photos:
        raise DataError(f"{root}: no photo with a sketch in the classes asked for")
    return SketchPairs(photos, owners, sketches)


def augment(sketch: Image.Image, rng: np.random.Generator, drop: float = 0.1, rotate: float = 8.0,
            elastic: float = 2.0) -> Image.Image:
    """A human sketch re-drawn at WORK_SIZE with the canvas pen (its strokes thinned to their
    centre lines first, so every source's line width becomes the page's), strokes dropped,
    affine and elastic jitter (``stbir_train.strokes.jitter``)."""
    from skimage import morphology

    from stbir_train import strokes

    gray = sketch.convert("L")
    s = WORK_SIZE / max(gray.size)
    size = (max(1, round(gray.width * s)), max(1, round(gray.height * s)))
    ink = np.asarray(gray.resize(size, Image.Resampling.BILINEAR)) < 160
    lines = morphology.skeletonize(ink)
    if lines.any():
        lines = strokes.jitter(lines, rng, drop=drop, rotate=rotate, elastic=elastic)
    return strokes.draw(lines, rng)
