"""Curriculum noise: photo and sketch corruption that gets likelier and stronger as a stage goes on.

Photos get blur, brightness/contrast/saturation jitter (never hue: colour is what the caption
says), pixel noise and occlusion; sketches get stroke dropout, positional jitter and thicker or
thinner strokes. All from ``data.curriculum_noise`` in the config, with per-stage overrides.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from stbir_train.config import CurriculumSpec, NoiseSpec


class NoiseSchedule:
    def __init__(self, spec: CurriculumSpec):
        self.spec = spec

    def _modality(self, target: str, modality: str) -> NoiseSpec:
        base = getattr(self.spec, modality)
        override = self.spec.stages.get(target)
        if override is None:
            return base
        return dataclasses.replace(base, **getattr(override, modality))

    def enabled(self, target: str) -> bool:
        override = self.spec.stages.get(target)
        return self.spec.enabled and (override is None or override.enabled)

    def params(self, target: str, epoch: int, modality: str, seen: int = 0) -> tuple[float, float]:
        """(probability, strength) for ``modality`` ("photo" or "sketch") at ``epoch`` (0-based,
        counted within the stage), after ``seen`` training samples of the stage. Linear from start
        to max over ``ramp_samples`` (or, when that is null, ``ramp_epochs``), then flat."""
        if not self.enabled(target):
            return 0.0, 0.0
        s = self._modality(target, modality)
        done, ramp = (seen, s.ramp_samples) if s.ramp_samples is not None else (epoch, s.ramp_epochs)
        frac = 1.0 if ramp <= 0 else min(done / ramp, 1.0)
        prob = s.start_prob + (s.max_prob - s.start_prob) * frac
        strength = s.start_strength + (s.max_strength - s.start_strength) * frac
        return max(prob, s.start_prob), max(strength, s.start_strength)


def corrupt_photo(img: Image.Image, strength: float, rng: np.random.Generator) -> Image.Image:
    ops = [op for op in (_blur, _jitter, _pixel_noise, _occlude) if rng.random() < 0.5] or [_blur]
    for op in ops:
        img = op(img, strength, rng)
    return img


def corrupt_sketch(img: Image.Image, strength: float, rng: np.random.Generator) -> Image.Image:
    ops = [op for op in (_stroke_dropout, _shift, _thickness) if rng.random() < 0.5] or [_stroke_dropout]
    for op in ops:
        img = op(img, strength, rng)
    return img


def _blur(img, s, rng):
    return img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.3, 0.3 + 1.5 * s))))


def _jitter(img, s, rng):
    for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        img = enhance(img).enhance(float(rng.uniform(1 - 0.4 * s, 1 + 0.4 * s)))
    return img


def _pixel_noise(img, s, rng):
    arr = np.asarray(img, np.float32)
    arr = arr + rng.normal(0, 30 * s, arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), img.mode)


def _occlude(img, s, rng):
    arr = np.array(img)
    h, w = arr.shape[:2]
    bh, bw = max(1, int(h * s * rng.uniform(0.2, 0.4))), max(1, int(w * s * rng.uniform(0.2, 0.4)))
    y, x = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
    arr[y:y + bh, x:x + bw] = rng.integers(0, 256, arr.shape[2:] if arr.ndim == 3 else ())
    return Image.fromarray(arr, img.mode)


def _stroke_dropout(img, s, rng):
    """White out a few random patches: strokes the drawer skipped."""
    arr = np.array(img)
    h, w = arr.shape[:2]
    for _ in range(int(rng.integers(1, 2 + int(4 * s)))):
        r = max(1, int(min(h, w) * rng.uniform(0.05, 0.05 + 0.15 * s)))
        y, x = int(rng.integers(0, h)), int(rng.integers(0, w))
        arr[max(0, y - r):y + r, max(0, x - r):x + r] = 255
    return Image.fromarray(arr, img.mode)


def _shift(img, s, rng):
    """A small translation: a hand that drew a little off."""
    d = max(1, int(round(s * 0.05 * img.size[0])))
    dx, dy = (int(v) for v in rng.integers(-d, d + 1, 2))
    return img.transform(img.size, Image.Transform.AFFINE, (1, 0, dx, 0, 1, dy), fillcolor=255)


def _thickness(img, s, rng):
    """Thicker strokes (a dilation of the ink), or fainter ones (a lighter pen)."""
    if rng.random() < 0.6:
        return img.filter(ImageFilter.MinFilter(3 if s < 0.7 else 5))
    lift = int(120 * s)
    return img.point(lambda v: min(255, v + lift))
