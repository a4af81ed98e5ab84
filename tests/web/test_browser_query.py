"""The page's query features in a real headless browser (issue 28): "more like this" on a result,
an example photo chosen or dropped as the query, the min-score slider (default: the export's threshold for
the query's mode; hides weaker hits and says how many), the folder / tag filters, the
sketch-weight slider, and labels on every input. Skipped like tests/web/test_browser.py where
chromium, chromedriver or selenium is missing."""

from __future__ import annotations

import base64
import threading

import numpy as np
import pytest
from test_browser import _draw, _wait, driver, pytestmark  # noqa: F401 - fixtures and skip marks

STAR = [(0.5, 0.14), (0.61, 0.4), (0.88, 0.4), (0.66, 0.57), (0.75, 0.84), (0.5, 0.67),
        (0.25, 0.84), (0.34, 0.57), (0.12, 0.4), (0.39, 0.4), (0.5, 0.14)]


@pytest.fixture(scope="module")
def site(small_export, tmp_path_factory):
    """Two enrolled roots: cats/{indoor,outdoor} tagged pet=cat, dogs/ tagged pet=dog."""
    from stbir_infer.searcher import Searcher
    from stbir_infer.web import App, make_server
    from stbir_train.synth import render_photo, sample_item

    root = tmp_path_factory.mktemp("browser-query")
    folders = {"cats/indoor": 4, "cats/outdoor": 4, "dogs": 4}
    i = 0
    for folder, n in folders.items():
        (root / folder).mkdir(parents=True)
        for _ in range(n):
            rng = np.random.default_rng(100 + i)
            render_photo(sample_item(rng, f"item{i}"), rng).save(root / folder / f"p{i:02d}.png")
            i += 1
    searcher = Searcher(small_export, root / "index", threads=1)
    searcher.enroll(root / "cats", tags={"pet": "cat"})
    searcher.enroll(root / "dogs", tags={"pet": "dog"})
    app = App(searcher)
    app.warm_up()
    srv = make_server(app, "127.0.0.1", 0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield {"url": f"http://127.0.0.1:{srv.server_address[1]}/", "root": root,
           "searcher": searcher, "n": i}
    srv.shutdown()
    srv.server_close()


def _page(drv, site):
    from selenium.webdriver.common.by import By

    drv.get(site["url"])
    info = drv.find_element(By.ID, "gallery-info")
    _wait(lambda: f"{site['n']} images" in info.text, what="the gallery info")
    return drv.find_element(By.ID, "status")


def _results(drv) -> list[dict]:
    return drv.execute_script("""
        return [...document.querySelectorAll('#results .result')].map(li => ({
            name: li.querySelector('.name').textContent, title: li.querySelector('.name').title,
            score: Number(li.dataset.score), hidden: li.hidden,
            same: !!li.querySelector('.same')}));""")


def _slide(drv, element_id: str, value: float) -> None:
    drv.execute_script("""const s = document.getElementById(arguments[0]); s.value = arguments[1];
                          s.dispatchEvent(new Event('input', {bubbles: true}));""",
                       element_id, str(value))


def _text_search(drv, status, text: str, by: str = "text"):
    from selenium.webdriver.common.by import By

    box = drv.find_element(By.ID, "text")
    box.clear()
    box.send_keys(text)
    drv.find_element(By.ID, "search").click()
    _wait(lambda: f"by {by} ·" in status.text and not drv.execute_script(
        "return document.body.classList.contains('busy')"), what=f"the {by} search",
        seen=lambda: status.text)


def test_more_like_this_and_an_example_photo(driver, site):  # noqa: F811
    from selenium.webdriver.common.by import By

    status = _page(driver, site)
    _slide(driver, "min-score", 0)
    _text_search(driver, status, "a shape")
    target = _results(driver)[3]["name"]
    buttons = driver.find_elements(By.CSS_SELECTOR, "#results .result .more")
    assert buttons[3].get_attribute("aria-label") == f"More like {target}"
    buttons[3].click()
    _wait(lambda: "by photo ·" in status.text, what="the more-like-this search",
          seen=lambda: status.text)
    got = _results(driver)
    assert got[0]["name"] == target and got[0]["same"] and not any(r["same"] for r in got[1:])
    assert driver.find_element(By.ID, "text").get_attribute("value") == ""
    assert driver.find_element(By.ID, "photo-name").text == f"like: {target}"
    # a photo file chosen as the query: the enrolled one comes back first, marked
    driver.find_element(By.ID, "photo-clear").click()
    photo = site["root"] / "dogs" / "p09.png"
    driver.find_element(By.ID, "photo").send_keys(str(photo))
    _wait(lambda: driver.find_element(By.ID, "photo-name").text == "like: p09.png",
          what="the chosen photo")
    _wait(lambda: "by photo ·" in status.text and _results(driver)[0]["name"] == "p09.png",
          what="the photo search", seen=lambda: status.text)
    assert _results(driver)[0]["same"]


def test_min_score_slider_defaults_to_the_mode_threshold_and_hides_weaker_hits(driver, site):  # noqa: F811
    from selenium.webdriver.common.by import By

    status = _page(driver, site)
    _text_search(driver, status, "a red star")
    health = driver.execute_script("return fetch('/api/health').then(r => r.json())")
    default = health["score_thresholds"].get("text", 0)
    slider = float(driver.execute_script("return document.getElementById('min-score').value"))
    assert slider == pytest.approx(default, abs=1e-6)
    scores = [r["score"] for r in _results(driver)]
    _slide(driver, "min-score", (scores[2] + scores[3]) / 2)
    cut = float(driver.execute_script("return document.getElementById('min-score').value"))
    shown = _results(driver)
    hidden = [r for r in shown if r["hidden"]]
    assert [r["score"] < cut for r in shown] == [r["hidden"] for r in shown]
    assert 0 < len(hidden) < len(scores)
    assert driver.find_element(By.ID, "min-score-value").text == f"{cut:.3f}"
    assert f"{len(hidden)} hidden below" in status.text
    _slide(driver, "min-score", 1)
    assert "no match above 1.000" in status.text
    _slide(driver, "min-score", 0)  # the left end: every hit, even a negative cosine
    assert not any(r["hidden"] for r in _results(driver)) and "hidden" not in status.text
    assert driver.find_element(By.ID, "min-score-value").text == "all"


def test_folder_and_tag_filters(driver, site):  # noqa: F811
    from selenium.webdriver.common.by import By

    status = _page(driver, site)
    _slide(driver, "min-score", 0)
    _text_search(driver, status, "a shape")
    assert {r["title"].split("/")[-2] for r in _results(driver)} >= {"indoor", "dogs"}
    folder = driver.find_element(By.ID, "where-folder")
    folder.send_keys("indoor")
    _text_search(driver, status, "a shape")
    got = _results(driver)
    assert len(got) == 4 and all("/cats/indoor/" in r["title"] for r in got)
    folder.clear()
    driver.find_element(By.ID, "where-tag").send_keys("pet=dog")
    _text_search(driver, status, "a shape")
    got = _results(driver)
    assert len(got) == 4 and all("/dogs/" in r["title"] for r in got)
    driver.find_element(By.ID, "where-tag").clear()
    driver.find_element(By.ID, "where-tag").send_keys("colour=red")
    drv_search = driver.find_element(By.ID, "search")
    drv_search.click()
    _wait(lambda: "no entry has a tag 'colour'" in status.text, what="the refused filter",
          seen=lambda: status.text)


def test_sketch_weight_slider_moves_between_the_sketch_and_the_text(driver, site):  # noqa: F811
    from selenium.webdriver.common.by import By

    status = _page(driver, site)
    _slide(driver, "min-score", 0)
    driver.find_element(By.ID, "auto").click()  # no live search: one query per Search press
    _draw(driver, driver.find_element(By.ID, "sketch"), [STAR])
    driver.find_element(By.ID, "search").click()
    _wait(lambda: "by sketch ·" in status.text, what="the sketch search", seen=lambda: status.text)
    sketch_only = [(r["name"], round(r["score"], 3)) for r in _results(driver)]
    _text_search(driver, status, "a green circle", by="sketch + text")
    fused = [(r["name"], round(r["score"], 3)) for r in _results(driver)]
    _slide(driver, "sketch-weight", 1)
    assert driver.find_element(By.ID, "sketch-weight-value").text == "1.00"
    driver.find_element(By.ID, "search").click()
    _wait(lambda: [(r["name"], round(r["score"], 3)) for r in _results(driver)] == sketch_only,
          what="weight 1: the sketch-only ranking", seen=lambda: status.text)
    _slide(driver, "sketch-weight", 0)
    driver.find_element(By.ID, "search").click()
    text_only = site["searcher"].query(text="a green circle", top_k=12)
    want = [(h.path.rsplit("/", 1)[-1], round(h.score, 3)) for h in text_only]
    _wait(lambda: [(r["name"], round(r["score"], 3)) for r in _results(driver)] == want,
          what="weight 0: the text-only ranking", seen=lambda: status.text)
    assert fused not in (sketch_only, want)


def test_every_input_has_a_label(driver, site):  # noqa: F811
    _page(driver, site)
    unlabelled = driver.execute_script("""
        return [...document.querySelectorAll('input, button')].filter(el =>
            !(el.labels && el.labels.length) && !el.getAttribute('aria-label') &&
            !el.textContent.trim()).map(el => el.id);""")
    assert unlabelled == []


def test_a_photo_dropped_on_the_page_is_the_query(driver, site):  # noqa: F811
    from selenium.webdriver.common.by import By

    status = _page(driver, site)
    _slide(driver, "min-score", 0)
    photo = (site["root"] / "cats" / "outdoor" / "p05.png").read_bytes()
    driver.execute_script("""
        const bytes = Uint8Array.from(atob(arguments[0]), c => c.charCodeAt(0));
        const dt = new DataTransfer();
        dt.items.add(new File([bytes], 'dropped.png', {type: 'image/png'}));
        document.querySelector('.results-panel').dispatchEvent(
            new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true}));""",
                          base64.b64encode(photo).decode())
    _wait(lambda: driver.find_element(By.ID, "photo-name").text == "like: dropped.png",
          what="the dropped photo")
    _wait(lambda: "by photo ·" in status.text and _results(driver)[0]["name"] == "p05.png",
          what="the dropped photo's search", seen=lambda: status.text)
    assert _results(driver)[0]["same"]  # the same bytes as the enrolled file
