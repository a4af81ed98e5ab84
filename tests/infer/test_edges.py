"""stbir_infer.edges: the pseudo-sketch the edge gallery stores is a fixed line drawing of the
photo's outlines, the same every time, and training draws its variants with the same code."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from stbir_infer import edges


def _square_photo(size=(200, 160)) -> Image.Image:
    img = Image.new("RGB", size, (20, 30, 40))
    ImageDraw.Draw(img).rectangle((50, 40, 150, 120), fill=(230, 220, 210))
    return img


def test_gallery_sketch_draws_the_outline_black_on_white_at_work_size():
    sk = edges.gallery_sketch(_square_photo())
    assert sk.mode == "L" and max(sk.size) == edges.WORK_SIZE and sk.size == (256, 205)
    a = np.asarray(sk)
    s = edges.WORK_SIZE / 200
    top, left, bottom = round(40 * s), round(50 * s), round(120 * s)
    mid = round(100 * s)
    # ink on the square's top edge and left edge, paper inside it and far outside
    assert a[top - 3:top + 4, mid].min() < 60
    assert a[round(80 * s), left - 3:left + 4].min() < 60
    assert a[(top + bottom) // 2, mid] == 255
    assert a[5, 5] == 255
    assert 0.01 < (a < 128).mean() < 0.15


def test_gallery_sketch_is_deterministic_and_training_variants_differ():
    photo = _square_photo()
    assert np.array_equal(np.asarray(edges.gallery_sketch(photo)),
                          np.asarray(edges.gallery_sketch(photo)))
    rng = np.random.default_rng(0)
    v1 = np.asarray(edges.render(edges.extract(photo, "canny", rng), rng))
    v2 = np.asarray(edges.render(edges.extract(photo, "canny", rng), rng))
    assert not np.array_equal(v1, v2)


def test_the_training_side_uses_the_runtime_extraction():
    from stbir_train import sketchify

    assert sketchify.extract is edges.extract and sketchify.render is edges.render
    assert sketchify.METHODS == edges.METHODS == ("canny", "xdog")


def test_a_flat_photo_has_no_ink_and_an_unknown_method_is_refused():
    flat = Image.new("RGB", (64, 64), (128, 128, 128))
    assert (np.asarray(edges.gallery_sketch(flat)) == 255).all()
    with pytest.raises(ValueError, match="unknown sketch method"):
        edges.extract(flat, "hed")
