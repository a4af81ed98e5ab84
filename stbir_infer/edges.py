"""Pseudo-sketches: a photo -> the line drawing the sketch tower is trained on (numpy + PIL only).

Training (`stbir_train.sketchify`) draws jittered variants of these; the runtime's edge gallery
(`gallery_sketch`) draws one fixed, unjittered drawing per enrolled photo, so a hand-drawn query
can be compared with a line drawing instead of a photo. Two extractors:

- ``canny``: Gaussian blur, Sobel gradients, non-maximum suppression (one-pixel lines) and
  hysteresis between two thresholds set per photo as percentiles of the gradient magnitude;
- ``xdog``: the eXtended Difference of Gaussians (Winnemoeller et al. 2012), thresholded, then
  Zhang-Suen thinned.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter

METHODS = ("canny", "xdog")
WORK_SIZE = 256  # long side the extraction runs at (photos are scaled to it, up or down)
# Pen width of a drawing at WORK_SIZE: the page's canvas (512 px, brush 6) draws the same share
# of the side (tests/web/test_canvas.py checks what the server receives).
STROKE_WIDTH = 3


# -- filters ----------------------------------------------------------------------------------

def gauss(a: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur with edge replication."""
    r = max(1, int(3 * sigma + 0.5))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    h, w = a.shape
    p = np.pad(a, r, mode="edge")
    v = sum(wt * p[i:i + h, :] for i, wt in enumerate(k))
    return sum(wt * v[:, i:i + w] for i, wt in enumerate(k))


def shifts(a: np.ndarray) -> list[np.ndarray]:
    """The 8 neighbours of every pixel (P2..P9 clockwise from north), zero outside."""
    p = np.pad(a, 1)
    h, w = a.shape
    at = lambda dy, dx: p[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]  # noqa: E731
    return [at(-1, 0), at(-1, 1), at(0, 1), at(1, 1), at(1, 0), at(1, -1), at(0, -1), at(-1, -1)]


def dilate(a: np.ndarray) -> np.ndarray:
    return a | np.logical_or.reduce(shifts(a))


def canny(gray: np.ndarray, sigma: float = 1.4, high_pct: float = 90.0,
          low_ratio: float = 0.45) -> np.ndarray:
    """Boolean one-pixel edge map of a float gray image in [0, 1]."""
    g = gauss(gray, sigma)
    gp = np.pad(g, 1, mode="edge")
    gx = (gp[:-2, 2:] + 2 * gp[1:-1, 2:] + gp[2:, 2:]) - (gp[:-2, :-2] + 2 * gp[1:-1, :-2] + gp[2:, :-2])
    gy = (gp[2:, :-2] + 2 * gp[2:, 1:-1] + gp[2:, 2:]) - (gp[:-2, :-2] + 2 * gp[:-2, 1:-1] + gp[:-2, 2:])
    mag = np.hypot(gx, gy)
    # Non-maximum suppression along the gradient direction, quantised to 4 directions.
    ang = (np.rad2deg(np.arctan2(gy, gx)) + 180.0) % 180.0
    n = shifts(mag)  # N, NE, E, SE, S, SW, W, NW
    # 0: gradient along x (compare E, W), 1: along SE-NW (y points down), 2: along y, 3: NE-SW
    d = np.digitize(ang, [22.5, 67.5, 112.5, 157.5]) % 4
    pairs = [(n[2], n[6]), (n[3], n[7]), (n[0], n[4]), (n[1], n[5])]
    keep = np.zeros_like(mag, bool)
    for k, (a, b) in enumerate(pairs):
        keep |= (d == k) & (mag >= a) & (mag >= b)
    mag = np.where(keep, mag, 0.0)
    nz = mag[mag > 0]
    if nz.size == 0:
        return np.zeros_like(mag, bool)
    high = np.percentile(nz, high_pct)
    strong, weak = mag >= high, mag >= high * low_ratio
    for _ in range(64):  # hysteresis: grow strong edges along weak ones
        grown = dilate(strong) & weak
        if (grown == strong).all():
            break
        strong = grown
    return strong


def xdog(gray: np.ndarray, sigma: float = 1.2, k: float = 1.6, tau: float = 0.98,
         ink_pct: float = 6.0, phi: float = 40.0) -> np.ndarray:
    """Boolean ink map (XDoG, thresholded at 0.5), thinned to one-pixel strokes. The threshold
    ``eps`` is set per photo so that about ``ink_pct`` percent of the pixels are ink before
    thinning (a fixed eps gives solid dark areas in one photo and nothing in another)."""
    d = gauss(gray, sigma) - tau * gauss(gray, sigma * k)
    eps = min(-1e-3, float(np.percentile(d, ink_pct)))
    e = np.where(d >= eps, 1.0, 1.0 + np.tanh(phi * (d - eps)))
    return thin(e < 0.5)


def thin(ink: np.ndarray, max_iter: int = 40) -> np.ndarray:
    """Zhang-Suen thinning of a boolean image (vectorised; both sub-iterations per pass)."""
    img = ink.copy()
    for _ in range(max_iter):
        changed = False
        for step in (0, 1):
            p = shifts(img)
            nb = sum(x.astype(np.int8) for x in p)
            seq = p + [p[0]]
            trans = sum((~seq[i] & seq[i + 1]).astype(np.int8) for i in range(8))
            p2, p4, p6, p8 = p[0], p[2], p[4], p[6]
            c = ~(p2 & p4 & p6) if step == 0 else ~(p2 & p4 & p8)
            c2 = ~(p4 & p6 & p8) if step == 0 else ~(p2 & p6 & p8)
            kill = img & (nb >= 2) & (nb <= 6) & (trans == 1) & c & c2
            if kill.any():
                img &= ~kill
                changed = True
        if not changed:
            break
    return img


# -- drawings -----------------------------------------------------------------------------------

def _smooth_field(shape, rng, cells: int, amp: float) -> np.ndarray:
    """A smooth random field (bicubic upsample of a coarse grid), values about +-amp."""
    coarse = rng.uniform(-1, 1, (cells, cells)).astype(np.float32)
    up = Image.fromarray(coarse, "F").resize(shape[::-1], Image.Resampling.BICUBIC)
    return np.asarray(up, np.float64) * amp


def extract(photo: Image.Image, method: str, rng: np.random.Generator | None = None) -> np.ndarray:
    """Boolean stroke map of an RGB/L photo at WORK_SIZE (long side); ``rng`` jitters the
    parameters (None: the defaults)."""
    w, h = photo.size
    s = WORK_SIZE / max(w, h)
    size = (max(1, round(w * s)), max(1, round(h * s)))
    gray = np.asarray(photo.convert("L").resize(size, Image.Resampling.BICUBIC), np.float64) / 255
    if method == "canny":
        kw = {} if rng is None else dict(sigma=rng.uniform(1.2, 2.2), high_pct=rng.uniform(86, 93))
        return canny(gray, **kw)
    if method == "xdog":
        kw = {} if rng is None else dict(sigma=rng.uniform(1.0, 1.8), ink_pct=rng.uniform(4, 8))
        return xdog(gray, **kw)
    raise ValueError(f"unknown sketch method {method!r} (known: {', '.join(METHODS)})")


def render(strokes: np.ndarray, rng: np.random.Generator | None, jitter: bool = True) -> Image.Image:
    """Stroke map -> a black-on-white L drawing. With ``jitter`` (training variants) the strokes
    are warped, patches dropped, width and ink drawn from ``rng``; without, the drawing is fixed
    (STROKE_WIDTH-px strokes at WORK_SIZE, softened, black) and ``rng`` is not used."""
    if jitter and rng is None:
        raise ValueError("a jittered drawing needs an rng")
    rng = rng if rng is not None else np.random.default_rng(0)  # unused without jitter
    h, w = strokes.shape
    ys, xs = np.nonzero(strokes)
    if jitter and ys.size:
        amp = rng.uniform(1.0, 3.5)
        dy = _smooth_field((h, w), rng, 5, amp)[ys, xs]
        dx = _smooth_field((h, w), rng, 5, amp)[ys, xs]
        keep = _smooth_field((h, w), rng, 8, 1.0)[ys, xs] > rng.uniform(-1.0, -0.35)  # drop patches
        ys = np.clip(np.round(ys + dy), 0, h - 1).astype(int)[keep]
        xs = np.clip(np.round(xs + dx), 0, w - 1).astype(int)[keep]
    ink = np.zeros((h, w), bool)
    ink[ys, xs] = True
    ink &= sum(x.astype(np.int8) for x in shifts(ink)) >= 1  # isolated specks go
    img = Image.fromarray(np.where(ink, 0, 255).astype(np.uint8), "L")
    img = img.filter(ImageFilter.MinFilter(STROKE_WIDTH))  # crisp or softened (below)
    if not jitter or int(rng.integers(2, 4)) == 2:  # (half the variants)
        img = img.filter(ImageFilter.GaussianBlur(0.6))
    tone = int(rng.integers(0, 70)) if jitter else 0
    arr = np.asarray(img, np.float32)
    return Image.fromarray((tone + arr * (255 - tone) / 255).astype(np.uint8), "L")


def gallery_sketch(photo: Image.Image, method: str = "canny") -> Image.Image:
    """The edge gallery's drawing of an enrolled photo: default extraction, no jitter (the same
    photo always gives the same drawing, so its vector is reproducible)."""
    return render(extract(photo, method), None, jitter=False)


__all__ = ["METHODS", "STROKE_WIDTH", "WORK_SIZE", "canny", "dilate", "extract", "gallery_sketch",
           "gauss", "render", "shifts", "thin", "xdog"]
