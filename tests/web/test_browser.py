"""stbir-infer serve end to end in a real headless browser (Debian's chromium + chromedriver,
driven by Selenium): open the page, draw strokes, type a caption, search, see the thumbnails.

Skipped where chromium, chromedriver or the selenium package is missing (``make test`` on a bare
machine); CI installs them. The screenshot lands in ``test-artifacts/serve-browser.png``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts"
N_PHOTOS = 16
TOP_K = 8
CHROME_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1280,960", "--hide-scrollbars")


def _find(*names: str) -> str | None:
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    return None


CHROMIUM = os.environ.get("STBIR_CHROMIUM") or _find("chromium", "chromium-browser")
CHROMEDRIVER = os.environ.get("STBIR_CHROMEDRIVER") or _find("chromedriver")
# Module-level marks: they skip before the session's export fixture is built.
pytestmark = [
    pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                       reason="chromium and chromedriver are not installed "
                              "(Debian: apt-get install chromium chromium-driver)"),
    pytest.mark.skipif(importlib.util.find_spec("selenium") is None,
                       reason="the selenium package is not installed (pip install selenium)"),
]


@pytest.fixture(scope="module")
def base_url(small_export, tmp_path_factory):
    from stbir_infer.searcher import Searcher
    from stbir_infer.web import App, make_server
    from stbir_train.synth import render_photo, sample_item

    photos = tmp_path_factory.mktemp("browser") / "photos"
    photos.mkdir()
    for i in range(N_PHOTOS):
        rng = np.random.default_rng(i)
        render_photo(sample_item(rng, f"item{i}"), rng).save(photos / f"photo_{i:02d}.png")
    index_dir = photos.parent / "index"
    searcher = Searcher(small_export, index_dir, threads=1)
    searcher.enroll(photos)
    app = App(searcher)
    app.warm_up()
    srv = make_server(app, "127.0.0.1", 0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/"
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # selenium-manager must not try to download
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROME_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    drv = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    drv.set_page_load_timeout(30)
    yield drv
    drv.quit()


def _wait(predicate, timeout: float = 20.0, what: str = "condition", seen=None):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    detail = f" (page shows: {seen()!r})" if seen is not None else ""
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}{detail}")


def _draw(drv, canvas, strokes):
    """Strokes in canvas fractions (0..1) drawn with real pointer input (press, moves, release)."""
    from selenium.webdriver.common.action_chains import ActionChains

    w, h = canvas.size["width"], canvas.size["height"]
    for stroke in strokes:
        x0, y0 = stroke[0]
        chain = ActionChains(drv, duration=10)
        chain.move_to_element_with_offset(canvas, int((x0 - 0.5) * w), int((y0 - 0.5) * h))
        chain.click_and_hold()
        px, py = x0, y0
        for x, y in stroke[1:]:
            chain.move_by_offset(int((x - px) * w), int((y - py) * h))
            px, py = x, y
        chain.release()
        chain.perform()


def _stroke_as(drv, canvas, kind: str, points, pressure: float = 0.5):
    """One stroke from a ``pen`` or ``touch`` pointer (W3C actions: chromedriver sends them to
    the page as pointer events of that pointerType, with the pressure given)."""
    from selenium.webdriver.common.actions.action_builder import ActionBuilder
    from selenium.webdriver.common.actions.pointer_input import PointerInput

    w, h = canvas.size["width"], canvas.size["height"]
    builder = ActionBuilder(drv, mouse=PointerInput(kind, f"{kind}-1"), duration=10)
    act = builder.pointer_action
    at = [(int((x - 0.5) * w), int((y - 0.5) * h)) for x, y in points]
    act.move_to(canvas, *at[0])
    act.pointer_down(pressure=pressure)
    for x, y in at[1:]:
        act.move_to(canvas, x, y, pressure=pressure)
    act.pointer_up()
    builder.perform()


def _ink_pixels(drv) -> int:
    return drv.execute_script("""
        const c = document.getElementById('sketch');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let n = 0;
        for (let i = 0; i < d.length; i += 4) if (d[i] < 128) n++;
        return n;""")


def _loaded_thumbnails(drv) -> int:
    return drv.execute_script("""
        return [...document.querySelectorAll('#results .result img')]
            .filter(img => img.complete && img.naturalWidth > 0).length;""")


def test_draw_type_search_and_see_results(driver, base_url, tmp_path):
    from selenium.webdriver.common.by import By

    drv = driver
    drv.get(base_url)
    info = drv.find_element(By.ID, "gallery-info")
    _wait(lambda: f"{N_PHOTOS} images" in info.text, what="the gallery info from /api/health")
    # show every hit (the min-score slider would hide those below the export's threshold)
    drv.execute_script("const s = document.getElementById('min-score'); s.value = '0';"
                       "s.dispatchEvent(new Event('input'));")

    canvas = drv.find_element(By.ID, "sketch")
    assert _ink_pixels(drv) == 0
    # a five-pointed star, then a circle-ish loop round it
    star = [(0.5, 0.14), (0.61, 0.4), (0.88, 0.4), (0.66, 0.57), (0.75, 0.84),
            (0.5, 0.67), (0.25, 0.84), (0.34, 0.57), (0.12, 0.4), (0.39, 0.4), (0.5, 0.14)]
    loop = [(0.5 + 0.42 * np.cos(a), 0.5 + 0.42 * np.sin(a)) for a in np.linspace(0, 2 * np.pi, 25)]
    _draw(drv, canvas, [star, loop])
    ink = _ink_pixels(drv)
    assert ink > 500, "the strokes did not reach the canvas"

    # undo takes the loop away, and the drawing alone already searched (debounced, live)
    drv.find_element(By.ID, "undo").click()
    assert 0 < _ink_pixels(drv) < ink
    status = drv.find_element(By.ID, "status")
    _wait(lambda: "by sketch ·" in status.text, what="the live sketch search",
          seen=lambda: status.text)

    # type a caption, set top-k and press Search
    drv.find_element(By.ID, "text").send_keys("a red striped star")
    top_k = drv.find_element(By.ID, "top-k")
    top_k.clear()
    top_k.send_keys(str(TOP_K))
    drv.find_element(By.ID, "search").click()
    _wait(lambda: f"{TOP_K} results by sketch + text" in status.text, what="sketch + text results",
          seen=lambda: status.text)
    results = drv.find_elements(By.CSS_SELECTOR, "#results .result")
    assert len(results) == TOP_K
    _wait(lambda: _loaded_thumbnails(drv) == TOP_K, what="the thumbnails to load")
    names = [r.find_element(By.CSS_SELECTOR, ".name").text for r in results]
    assert all(n.startswith("photo_") and n.endswith(".png") for n in names)
    scores = [float(r.find_element(By.CSS_SELECTOR, ".score").text) for r in results]
    assert scores == sorted(scores, reverse=True)

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "serve-browser.png"
    drv.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000

    # clear the canvas: the caption alone searches
    drv.find_element(By.ID, "clear").click()
    assert _ink_pixels(drv) == 0
    _wait(lambda: "by text ·" in status.text, what="the text-only search after clear",
          seen=lambda: status.text)

    # a pen (pressure sets the width) and a finger draw too
    _stroke_as(drv, canvas, "pen", [(0.1, 0.2), (0.5, 0.2), (0.9, 0.2)], pressure=0.1)
    light = _ink_pixels(drv)
    _stroke_as(drv, canvas, "pen", [(0.1, 0.5), (0.5, 0.5), (0.9, 0.5)], pressure=1.0)
    heavy = _ink_pixels(drv) - light
    assert 0 < light < heavy, (light, heavy)
    before = _ink_pixels(drv)
    _stroke_as(drv, canvas, "touch", [(0.2, 0.8), (0.5, 0.7), (0.8, 0.8)])
    assert _ink_pixels(drv) > before
    _wait(lambda: "by sketch + text ·" in status.text, what="the search after pen and touch strokes",
          seen=lambda: status.text)

    # a sketch file instead of a drawing: it replaces the canvas and is searched
    from stbir_train.synth import render_sketch, sample_item

    sketch_png = tmp_path / "my sketch.png"
    render_sketch(sample_item(np.random.default_rng(7), "s"), np.random.default_rng(7)).save(sketch_png)
    drv.find_element(By.ID, "clear").click()
    _wait(lambda: "by text ·" in status.text, what="the text-only search after clear",
          seen=lambda: status.text)
    drv.find_element(By.ID, "upload").send_keys(str(sketch_png))
    _wait(lambda: drv.find_element(By.ID, "upload-name").text == "my sketch.png", what="the upload")
    assert _ink_pixels(drv) > 0
    _wait(lambda: "by sketch + text ·" in status.text, what="the search of the uploaded sketch",
          seen=lambda: status.text)

    severe = [e for e in drv.get_log("browser") if e.get("level") == "SEVERE"]
    assert not severe, severe
