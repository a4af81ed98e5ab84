"""Issue 27: the ``contour`` pseudo-sketch recipe (stbir_train.strokes): long strokes kept,
short ones dropped, strokes as wide as the page canvas's pen, jitter that keeps ink on the page."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from stbir_infer.edges import WORK_SIZE
from stbir_train import strokes as S


def _object_photo(clutter: bool = True) -> Image.Image:
    """A dark disc in the middle of a light photo, with small specks of texture near the border."""
    img = Image.new("RGB", (WORK_SIZE, WORK_SIZE), (200, 210, 220))
    d = ImageDraw.Draw(img)
    d.ellipse((70, 70, 186, 186), fill=(40, 30, 20))
    if clutter:
        rng = np.random.default_rng(0)
        for x, y in rng.integers(4, 60, (12, 2)):
            d.rectangle((x, y, x + 2, y + 2), fill=(90, 90, 90))
    return img


def test_long_contour_selection_drops_short_segments():
    edges = np.zeros((64, 64), bool)
    edges[10, 5:55] = True  # a 50-px line
    edges[30:33, 30] = True  # a 3-px segment
    edges[50, 50:52] = True  # a 2-px one
    kept = S.select_contours(edges, np.ones((64, 64)), min_len=10, keep=1.0, max_parts=10)
    assert kept[10, 5:55].all()
    assert not kept[30:33, 30].any() and not kept[50, 50:52].any()


def test_selection_keeps_the_best_scoring_chains_up_to_the_share():
    edges = np.zeros((64, 64), bool)
    edges[10, 2:62] = True  # 60 px, weight 1
    edges[30, 2:42] = True  # 40 px, weight 1
    edges[50, 2:62] = True  # 60 px, but in a low-weight region
    weight = np.ones((64, 64))
    weight[45:] = 0.05
    kept = S.select_contours(edges, weight, min_len=5, keep=0.55, max_parts=10)
    assert kept[10].any() and not kept[30].any() and not kept[50].any()
    assert S.select_contours(edges, weight, min_len=5, keep=1.0, max_parts=2)[[10, 30]].any(1).all()


def test_recipe_draws_the_object_outline_not_the_specks():
    strokes = S.contour_strokes(_object_photo(), level=0.5)
    ys, xs = np.nonzero(strokes)
    assert ys.size > 150  # the disc's outline (circumference ~360 px) is there ...
    r = np.hypot(ys - 128, xs - 128)
    assert np.median(np.abs(r - 58)) < 6  # ... on the disc's edge
    assert not strokes[:62, :62].any()  # the specks in the corner are not


def test_stroke_width_matches_the_canvas_pen():
    assert S.PEN_WIDTH == 3  # 6-px default brush on the 512-px canvas, at the 256-px work size
    strokes = np.zeros((WORK_SIZE, WORK_SIZE), bool)
    strokes[128, 40:200] = True
    ink = np.asarray(S.draw(strokes)) < 128
    widths = ink[:, 60:180].sum(0)
    assert (widths == S.PEN_WIDTH).all()


def test_jitter_keeps_ink_inside_the_canvas():
    strokes = np.zeros((WORK_SIZE, WORK_SIZE), bool)
    strokes[0, :] = strokes[-1, :] = strokes[:, 0] = strokes[:, -1] = True  # ink on every edge
    strokes[100:160, 128] = True
    for seed in range(20):
        out = S.jitter(strokes, np.random.default_rng(seed), drop=0.0, rotate=15, elastic=4)
        ys, xs = np.nonzero(out)
        assert ys.size > 0.6 * strokes.sum() / 1.5  # shrunk at most, not lost
        assert ys.min() >= S.MARGIN - 1 and xs.min() >= S.MARGIN - 1
        assert ys.max() <= WORK_SIZE - S.MARGIN and xs.max() <= WORK_SIZE - S.MARGIN
        img = np.asarray(S.draw(out)) < 128
        assert not img[0].any() and not img[-1].any() and not img[:, 0].any() and not img[:, -1].any()


def test_stroke_dropout_removes_whole_strokes_and_keeps_the_largest():
    strokes = np.zeros((WORK_SIZE, WORK_SIZE), bool)
    strokes[20, 20:230] = True  # the largest
    for k in range(8):
        strokes[60 + 20 * k, 100:140] = True
    counts = []
    for seed in range(10):
        out = S.jitter(strokes, np.random.default_rng(seed), drop=0.5, rotate=0, elastic=0)
        counts.append(out.sum())
        assert out.sum() >= 200  # the long line always stays
    assert min(counts) < strokes.sum() - 35 and len(set(counts)) > 1


def test_variants_differ_and_are_black_on_white():
    rng = np.random.default_rng(3)
    a, b = S.contour_sketches(_object_photo(), 2, rng)
    x, y = np.asarray(a), np.asarray(b)
    assert a.mode == "L" and x.shape == (WORK_SIZE, WORK_SIZE)
    assert (x < 128).mean() < 0.2 and (x < 128).any()
    assert not np.array_equal(x, y)
