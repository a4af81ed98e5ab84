"""Screenshots of the web page answering real queries (the pictures of README.md and docs/real-photos.md).

    python benchmarks/web_screenshot.py --model runs/real8k/export --index runs/real8k/index-fp32 \
        --text "a dog running on grass" --sketch SKETCH.png --sketch-text "a black dog" \
        --out docs/

Serves the export and index on a loopback port (the same App and waitress server as
`stbir-infer serve`), drives Debian's headless chromium through Selenium (as
tests/web/test_browser.py does): a text query, then an uploaded sketch with a caption. Writes
OUT/web_text.png and OUT/web_sketch_text.png. With ``--more-like-this TEXT`` instead: a text
query, then "More like this" on its second hit, the min-score slider at ``--min-score``; writes
OUT/web_more_like_this.png (docs/search-features.md).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1280,1000", "--hide-scrollbars")


def _wait(predicate, what: str, timeout: float = 60.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.2)
    raise SystemExit(f"timed out waiting for {what}")


def _settle(drv, n: int) -> None:
    _wait(lambda: drv.execute_script("""
        return [...document.querySelectorAll('#results .result img')]
            .filter(img => img.complete && img.naturalWidth > 0).length;""") >= n, "thumbnails")


def main(argv=None) -> int:
    import tempfile

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    from stbir_infer.searcher import Searcher
    from stbir_infer.web import App, make_server

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--index", type=Path, required=True)
    ap.add_argument("--text", help="the text-only query")
    ap.add_argument("--sketch", type=Path, help="a sketch file to upload")
    ap.add_argument("--more-like-this", metavar="TEXT",
                    help="only the more-like-this screenshot, starting from this text query")
    ap.add_argument("--min-score", type=float, default=0.7,
                    help="the slider's value in the more-like-this screenshot")
    ap.add_argument("--sketch-text", default="", help="the caption typed with the sketch")
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--out", type=Path, default=REPO / "docs")
    args = ap.parse_args(argv)
    if not args.more_like_this and (not args.text or not args.sketch):
        ap.error("give --text and --sketch, or --more-like-this TEXT")

    app = App(Searcher(args.model, args.index, threads=2))
    app.warm_up()
    srv = make_server(app, "127.0.0.1", 0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}/"
    os.environ.setdefault("SE_OFFLINE", "true")
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or shutil.which("chromium-browser")
    for flag in FLAGS:
        options.add_argument(flag)
    profile = tempfile.mkdtemp(prefix="stbir-shot-")
    options.add_argument(f"--user-data-dir={profile}")
    drv = webdriver.Chrome(service=Service(executable_path=shutil.which("chromedriver")),
                           options=options)
    try:
        drv.get(url)
        if args.more_like_this:
            _more_like_this(drv, args)
            return 0
        status = drv.find_element(By.ID, "status")
        # every hit shown (the slider would hide those below the export's threshold)
        drv.execute_script("const s = document.getElementById('min-score'); s.value = '0';"
                           "s.dispatchEvent(new Event('input'));")
        _search_text(drv, status, args.top_k, args.text, "results by text")
        _settle(drv, args.top_k)
        args.out.mkdir(parents=True, exist_ok=True)
        drv.save_screenshot(str(args.out / "web_text.png"))
        text = drv.find_element(By.ID, "text")
        text.clear()
        text.send_keys(args.sketch_text)
        drv.find_element(By.ID, "upload").send_keys(str(args.sketch.resolve()))
        want = "results by sketch + text" if args.sketch_text else "results by sketch"
        _wait(lambda: want in status.text, "the sketch results")
        _settle(drv, args.top_k)
        drv.save_screenshot(str(args.out / "web_sketch_text.png"))
    finally:
        drv.quit()
        srv.shutdown()
        shutil.rmtree(profile, ignore_errors=True)
    _lighten(args.out, "web_text.png", "web_sketch_text.png")
    return 0


def _lighten(folder: Path, *names: str) -> None:
    from PIL import Image

    for name in names:  # a palette keeps the README light
        path = folder / name
        Image.open(path).convert("RGB").quantize(192).save(path, optimize=True)
        print(f"{path} ({path.stat().st_size // 1024} KB)")


def _search_text(drv, status, top_k: int, text: str, want: str) -> None:
    """Type ``text`` with ``top_k`` results, search, wait until the status says ``want``."""
    from selenium.webdriver.common.by import By

    box = drv.find_element(By.ID, "top-k")
    box.clear()
    box.send_keys(str(top_k))
    drv.find_element(By.ID, "text").send_keys(text)
    drv.find_element(By.ID, "search").click()
    _wait(lambda: want in status.text, "the text results")


def _more_like_this(drv, args) -> None:
    from selenium.webdriver.common.by import By

    status = drv.find_element(By.ID, "status")
    _wait(lambda: "images" in drv.find_element(By.ID, "gallery-info").text, "the gallery info")
    _search_text(drv, status, args.top_k, args.more_like_this, "by text")
    drv.find_elements(By.CSS_SELECTOR, "#results .result .more")[1].click()
    _wait(lambda: "by photo" in status.text, "the more-like-this results")
    drv.execute_script("const s = document.getElementById('min-score'); s.value = arguments[0];"
                       "s.dispatchEvent(new Event('input'));", str(args.min_score))
    visible = drv.execute_script(
        "return [...document.querySelectorAll('#results .result')].filter(li => !li.hidden).length;")
    _settle(drv, visible)
    args.out.mkdir(parents=True, exist_ok=True)
    drv.save_screenshot(str(args.out / "web_more_like_this.png"))
    _lighten(args.out, "web_more_like_this.png")


if __name__ == "__main__":
    sys.exit(main())
