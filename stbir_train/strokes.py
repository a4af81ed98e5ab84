"""The ``contour`` pseudo-sketch recipe: a photo -> the few long strokes a person would draw.

A Canny map keeps every edge of a scene, texture and background included; a person draws the
object's outline and a few inner lines (issue 27). This recipe, training side only (scikit-image):

1. Canny at a blur that grows with the variant's abstraction ``level`` (0 detailed, 1 sparse);
2. a salience map (centre prior x colour contrast against the photo's border, the usual
   "background touches the frame" prior; no pretrained detector is available offline);
3. long-contour selection: connected edge chains scored by length x edge strength x salience;
   short chains go, then the best chains are kept until they hold a share of the total score;
4. smoothing: the kept chains are blurred and re-thinned, which joins small gaps and merges the
   double edges of thin parts into one line, as a hand would draw them;
5. per variant: stroke dropout (whole strokes), an affine and an elastic jitter that keep the ink
   inside the canvas, then strokes of the page canvas's pen width.

The runtime's edge gallery keeps drawing ``stbir_infer.edges.gallery_sketch`` (numpy + PIL);
this recipe only changes what the sketch tower learns from.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter
from skimage import color, feature, filters, measure, morphology, transform

from stbir_infer.edges import STROKE_WIDTH, WORK_SIZE

# The page's default pen at the working size (6 px on the 512-px canvas = 3 px at 256; the
# runtime's drawings and tests/web/test_canvas.py use the same constant).
PEN_WIDTH = STROKE_WIDTH
MARGIN = 4  # px kept free at the working size's border after jitter


def gray_and_rgb(photo: Image.Image) -> tuple[np.ndarray, np.ndarray]:
    """The photo at WORK_SIZE (long side): gray [H, W] and RGB [H, W, 3], floats in [0, 1]."""
    w, h = photo.size
    s = WORK_SIZE / max(w, h)
    size = (max(1, round(w * s)), max(1, round(h * s)))
    rgb = np.asarray(photo.convert("RGB").resize(size, Image.Resampling.BICUBIC), np.float64) / 255
    return color.rgb2gray(rgb), rgb


def salience(rgb: np.ndarray, centre: float = 0.35) -> np.ndarray:
    """[H, W] in [0, 1]: a Gaussian centre prior (sd ``centre`` of each side) times the Lab
    distance to the border's median colour (blurred, scaled by its 95th percentile)."""
    h, w = rgb.shape[:2]
    lab = filters.gaussian(color.rgb2lab(rgb), sigma=3, channel_axis=-1)
    b = max(2, min(h, w) // 32)
    frame = np.concatenate([lab[:b].reshape(-1, 3), lab[-b:].reshape(-1, 3),
                            lab[:, :b].reshape(-1, 3), lab[:, -b:].reshape(-1, 3)])
    dist = np.linalg.norm(lab - np.median(frame, axis=0), axis=-1)
    contrast = np.clip(dist / max(np.percentile(dist, 95), 1e-6), 0, 1)
    yy, xx = np.mgrid[0:h, 0:w]
    prior = np.exp(-0.5 * (((yy - (h - 1) / 2) / (centre * h)) ** 2
                           + ((xx - (w - 1) / 2) / (centre * w)) ** 2))
    return prior * (0.25 + 0.75 * contrast)


def select_contours(edges: np.ndarray, weight: np.ndarray, min_len: int, keep: float,
                    max_parts: int) -> np.ndarray:
    """Boolean map of the edge chains (8-connected components of ``edges``) worth drawing:
    chains shorter than ``min_len`` pixels go; of the rest, the highest-scoring (sum of
    ``weight`` over the chain) are kept until they hold ``keep`` of the total score, at most
    ``max_parts`` of them."""
    labels = measure.label(edges, connectivity=2)
    n = labels.max()
    if n == 0:
        return np.zeros_like(edges, bool)
    length = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    score = np.bincount(labels.ravel(), weights=weight.ravel(), minlength=n + 1)[1:]
    score = np.where(length >= min_len, score, 0.0)
    order = np.argsort(-score)
    total = score.sum()
    if total <= 0:
        return np.zeros_like(edges, bool)
    cum = np.cumsum(score[order])
    count = min(max_parts, int(np.searchsorted(cum, keep * total)) + 1)
    chosen = order[:count][score[order[:count]] > 0] + 1
    return np.isin(labels, chosen)


def smooth(strokes: np.ndarray, sigma: float) -> np.ndarray:
    """Blur the strokes and thin them again: one smooth one-pixel line where there were wiggles,
    small gaps or two close parallel edges."""
    if sigma <= 0 or not strokes.any():
        return strokes
    soft = filters.gaussian(strokes.astype(np.float64), sigma)
    return morphology.skeletonize(soft > 0.25 * soft.max())


def contour_strokes(photo: Image.Image, level: float = 0.5, emphasis: float = 1.0,
                    smooth_sigma: float = 1.5) -> np.ndarray:
    """One-pixel stroke map of ``photo`` at WORK_SIZE under the recipe, at abstraction ``level``
    (0: many strokes, 1: a few long ones) and salience ``emphasis`` (0: none)."""
    gray, rgb = gray_and_rgb(photo)
    sigma = 1.5 + 2.0 * level
    edges = feature.canny(gray, sigma=sigma, low_threshold=0.75, high_threshold=0.9,
                          use_quantiles=True)
    strength = filters.sobel(filters.gaussian(gray, sigma))
    weight = strength / max(strength.max(), 1e-9)
    if emphasis > 0:
        weight = weight * salience(rgb) ** emphasis
    kept = select_contours(edges, weight, min_len=int(10 + 30 * level), keep=0.9 - 0.45 * level,
                           max_parts=int(40 - 28 * level))
    return smooth(kept, smooth_sigma)


def jitter(strokes: np.ndarray, rng: np.random.Generator, drop: float = 0.2,
           rotate: float = 10.0, elastic: float = 3.0) -> np.ndarray:
    """A hand's variation of ``strokes`` (same shape): each stroke (8-connected chain) dropped
    with probability ``drop`` (the largest always stays), an affine map about the centre (up to
    ``rotate`` degrees, scale 0.85-1.05, shear, shift) and a smooth elastic displacement of up
    to ``elastic`` px; the result is scaled back inside the canvas when it leaves it."""
    h, w = strokes.shape
    labels = measure.label(strokes, connectivity=2)
    n = labels.max()
    if n == 0:
        return strokes.copy()
    sizes = np.bincount(labels.ravel())[1:]
    alive = rng.random(n) >= drop
    alive[np.argmax(sizes)] = True
    ys, xs = np.nonzero(np.isin(labels, np.flatnonzero(alive) + 1))
    centre = np.array([(w - 1) / 2, (h - 1) / 2])
    affine = transform.AffineTransform(scale=rng.uniform(0.85, 1.05),
                                       rotation=np.deg2rad(rng.uniform(-rotate, rotate)),
                                       shear=np.deg2rad(rng.uniform(-6, 6)),
                                       translation=rng.uniform(-0.05, 0.05, 2) * (w, h))
    pts = affine(np.stack([xs, ys], 1) - centre) + centre
    if elastic > 0:
        for axis in (0, 1):
            field = _smooth_field((h, w), rng, 5, elastic)
            pts[:, axis] += field[ys, xs]
    pts = _inside(pts, w, h)
    out = np.zeros_like(strokes)
    out[np.round(pts[:, 1]).astype(int), np.round(pts[:, 0]).astype(int)] = True
    return out


def _inside(pts: np.ndarray, w: int, h: int) -> np.ndarray:
    """Points [N, 2] (x, y) shifted, and scaled about their box centre if need be, to lie within
    MARGIN of the canvas border."""
    lo, hi = pts.min(0), pts.max(0)
    room = np.array([w - 1 - 2 * MARGIN, h - 1 - 2 * MARGIN], float)
    s = min(1.0, *(room / np.maximum(hi - lo, 1e-6)))
    mid = (lo + hi) / 2
    pts = (pts - mid) * s + mid
    lo, hi = pts.min(0), pts.max(0)
    shift = np.maximum(MARGIN - lo, 0) - np.maximum(hi - (np.array([w, h]) - 1 - MARGIN), 0)
    return np.clip(pts + shift, 0, np.array([w - 1, h - 1]))


def _smooth_field(shape, rng, cells: int, amp: float) -> np.ndarray:
    """A smooth random field (bicubic upsample of a coarse grid), values about +-amp."""
    coarse = rng.uniform(-1, 1, (cells, cells)).astype(np.float32)
    up = Image.fromarray(coarse, "F").resize(shape[::-1], Image.Resampling.BICUBIC)
    return np.asarray(up, np.float64) * amp


def draw(strokes: np.ndarray, rng: np.random.Generator | None = None) -> Image.Image:
    """Stroke map -> black-on-white L drawing with strokes PEN_WIDTH px wide; with ``rng``,
    half the drawings softened (a canvas anti-aliases) and a light ink tone drawn."""
    ink = morphology.dilation(strokes, morphology.footprint_rectangle((PEN_WIDTH, PEN_WIDTH)))
    img = Image.fromarray(np.where(ink, 0, 255).astype(np.uint8), "L")
    if rng is None:
        return img
    if rng.random() < 0.5:
        img = img.filter(ImageFilter.GaussianBlur(0.6))
    tone = int(rng.integers(0, 50))
    arr = np.asarray(img, np.float32)
    return Image.fromarray((tone + arr * (255 - tone) / 255).astype(np.uint8), "L")


def contour_sketches(photo: Image.Image, n: int, rng: np.random.Generator) -> list[Image.Image]:
    """``n`` training variants of ``photo``: each its own abstraction level, salience emphasis
    and hand jitter."""
    out = []
    for _ in range(n):
        # level 1 measured too sparse (benchmarks/sketch_recipes.py): up to 0.75
        strokes = contour_strokes(photo, level=rng.uniform(0.0, 0.75), emphasis=rng.uniform(0.5, 2.0))
        out.append(draw(jitter(strokes, rng), rng))
    return out
