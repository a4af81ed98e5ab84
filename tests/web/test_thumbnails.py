"""Issue 26, item 6: ``/api/image`` thumbnails come from a bounded decode, only from a file that
still holds the enrolled content, and only for this server's own page (a 49 MP 16-bit PNG cost
+530 MB a request; any web page could trigger it with ``<img>``; a link swapped in after enroll
was served; a FIFO blocked a worker thread)."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from PIL import Image
from web_helpers import FakeGallery, FakeSearcher

from stbir_infer.web import App

REPO = Path(__file__).resolve().parents[2]


def _png(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (80, 60), colour).save(buf, "PNG")
    return buf.getvalue()


def get(app, target, **headers):
    resp = app.handle("GET", target, {"Host": "127.0.0.1:8000", **headers}, lambda n: b"")
    return resp.status, resp.body


@pytest.fixture
def red(tmp_path):
    path = tmp_path / "red.png"
    path.write_bytes(_png((220, 20, 20)))
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    app = App(FakeSearcher(FakeGallery({str(path): {"sha256": sha, "size": 100, "mtime_ns": 1,
                                                    "label": 0}})))
    return app, path


def test_a_file_that_no_longer_holds_its_content_is_not_served(red, tmp_path):
    app, path = red
    other = tmp_path / "secret.png"
    other.write_bytes(_png((1, 2, 3)))
    path.unlink()
    path.symlink_to(other)  # swapped in after enroll
    status, _ = get(app, "/api/image/0?size=32")
    assert status == 404
    path.unlink()
    path.write_bytes(_png((220, 20, 20)))
    assert get(app, "/api/image/0?size=33")[0] == 200


def test_a_fifo_in_place_of_the_file_does_not_block(red):
    app, path = red
    path.unlink()
    os.mkfifo(path)
    t0 = time.perf_counter()
    assert get(app, "/api/image/0?size=32")[0] == 404
    assert time.perf_counter() - t0 < 2


@pytest.mark.parametrize("headers", [{"Sec-Fetch-Site": "cross-site"},
                                     {"Sec-Fetch-Site": "same-site"},
                                     {"Referer": "https://evil.example/page"},
                                     {"Origin": "https://evil.example"},
                                     {"Origin": "null"}])
def test_another_sites_page_cannot_fetch_thumbnails(red, headers):
    app, _ = red
    status, body = get(app, "/api/image/0?size=32", **headers)
    assert status == 403, body


@pytest.mark.parametrize("headers", [{}, {"Sec-Fetch-Site": "same-origin"},
                                     {"Sec-Fetch-Site": "none"},
                                     {"Referer": "http://127.0.0.1:8000/"}])
def test_this_servers_page_and_scripts_get_thumbnails(red, headers):
    app, _ = red
    status, body = get(app, "/api/image/0?size=32", **headers)
    assert status == 200 and Image.open(io.BytesIO(body)).size == (32, 24)


CHILD = textwrap.dedent("""
    import hashlib, resource, sys, threading
    sys.path.insert(0, {helpers!r})
    from web_helpers import FakeGallery, FakeSearcher
    from stbir_infer.web import App
    path, n = sys.argv[1], int(sys.argv[2])
    sha = hashlib.sha256(open(path, "rb").read()).hexdigest()
    app = App(FakeSearcher(FakeGallery({{path: {{"sha256": sha, "size": 1, "mtime_ns": 1,
                                                 "label": 0}}}})))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = []
    def one(i):
        r = app.handle("GET", f"/api/image/0?size={{100 + i}}", {{"Host": "127.0.0.1"}}, None)
        out.append(r.status)
    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(sorted(out), (peak - base) // 1024)
""")


@pytest.mark.slow
def test_eight_thumbnails_of_a_49_mp_16_bit_png_at_once_stay_bounded(tmp_path):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import fuzz
    finally:
        sys.path.pop(0)
    path = tmp_path / "big16.png"
    path.write_bytes(fuzz.png_bomb(7000, 7000, color_type=0, bit_depth=16))
    proc = subprocess.run([sys.executable, "-c", CHILD.format(helpers=str(Path(__file__).parent)),
                           str(path), "8"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    statuses, grown_mb = proc.stdout.split("] ")
    assert statuses == "[" + ", ".join(["200"] * 8)
    assert int(grown_mb) < 300, f"+{grown_mb} MB for 8 at once (4.08 GB before; 140 MB measured)"
