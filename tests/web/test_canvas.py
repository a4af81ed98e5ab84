"""The page's canvas draws what the sketch tower is trained on (issue 27 item 4): strokes drawn in a
real headless browser reach the server as a white, square sketch whose pen is as wide, for its
size, as the pseudo-sketches' (``stbir_infer.edges``: STROKE_WIDTH px at WORK_SIZE), and decode
to the drawing the same strokes make in Python. Skipped like tests/web/test_browser.py where
chromium, chromedriver or selenium is missing."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from PIL import Image, ImageDraw
from test_browser import _draw, _wait, driver, pytestmark  # noqa: F401 (fixture, marks)

from stbir_infer.edges import STROKE_WIDTH, WORK_SIZE

CANVAS = 512
# strokes in canvas fractions: a horizontal bar, a vertical bar, an open triangle
STROKES = [[(0.15, 0.3), (0.85, 0.3)],
           [(0.3, 0.45), (0.3, 0.9)],
           [(0.5, 0.85), (0.7, 0.5), (0.9, 0.85)]]


@pytest.fixture(scope="module")
def served(small_export, tmp_path_factory):
    """(base url, the sketches the searcher received) for a page over a few enrolled photos."""
    from stbir_infer.searcher import Searcher
    from stbir_infer.web import App, make_server
    from stbir_train.synth import render_photo, sample_item

    class Recording(Searcher):
        received: list = []

        def query_many(self, queries, **kw):
            self.received += [q.sketch for q in queries if getattr(q, "sketch", None) is not None]
            return super().query_many(queries, **kw)

    photos = tmp_path_factory.mktemp("canvas") / "photos"
    photos.mkdir()
    for i in range(4):
        rng = np.random.default_rng(i)
        render_photo(sample_item(rng, f"item{i}"), rng).save(photos / f"photo_{i}.png")
    searcher = Recording(small_export, photos.parent / "index", threads=1)
    searcher.enroll(photos)
    srv = make_server(App(searcher), "127.0.0.1", 0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/", searcher.received
    srv.shutdown()
    srv.server_close()


def _expected(size: int, width: float) -> np.ndarray:
    """The strokes drawn in Python: round-capped lines of ``width`` on a white square."""
    img = Image.new("L", (size, size), 255)
    d = ImageDraw.Draw(img)
    for stroke in STROKES:
        pts = [(x * size, y * size) for x, y in stroke]
        d.line(pts, fill=0, width=round(width), joint="curve")
        for x, y in pts:
            d.ellipse((x - width / 2, y - width / 2, x + width / 2, y + width / 2), fill=0)
    return np.asarray(img) < 128


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    out = mask.copy()
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            out |= np.roll(np.roll(mask, dy, 0), dx, 1)
    return out


def test_the_server_receives_the_drawing_at_the_training_pen_width(driver, served):  # noqa: F811
    from selenium.webdriver.common.by import By

    base_url, received = served
    driver.get(base_url)
    status = driver.find_element(By.ID, "status")
    canvas = driver.find_element(By.ID, "sketch")
    assert (canvas.get_attribute("width"), canvas.get_attribute("height")) == (str(CANVAS),) * 2
    received.clear()
    _draw(driver, canvas, STROKES)
    _wait(lambda: received and "by sketch ·" in status.text, what="the live sketch search",
          seen=lambda: status.text)
    img = received[-1]
    assert img.size == (CANVAS, CANVAS)
    gray = np.asarray(img.convert("L"))
    ink = gray < 128
    # white paper everywhere but the strokes; dark ink (the pseudo-sketches' ink is 0..70)
    assert (gray[~_dilate(ink, 2)] >= 250).all()
    assert np.median(gray[ink]) <= 70

    # the pen: its width over the canvas side is the pseudo-sketches' STROKE_WIDTH / WORK_SIZE
    pen = STROKE_WIDTH * CANVAS / WORK_SIZE
    column = ink[:, int(0.5 * CANVAS)]  # across the horizontal bar, away from other strokes
    rows = np.flatnonzero(column[: int(0.4 * CANVAS)])
    assert abs(len(rows) - pen) <= 1.5, (len(rows), pen)

    # the same strokes drawn in Python: every ink pixel is near an expected one and vice versa
    want = _expected(CANVAS, pen)
    assert (ink & ~_dilate(want, 3)).sum() <= 0.02 * ink.sum()
    assert (want & ~_dilate(ink, 3)).sum() <= 0.02 * want.sum()
