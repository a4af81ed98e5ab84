"""Issue 13: hostile or odd input to ``stbir-infer serve`` is a 4xx with a one-line message, never a
500, a stall or hundreds of MB; answers stay valid UTF-8 JSON; thumbnails follow the content.

Most tests call ``App.handle`` with a fake searcher (no model, no socket); the last ones go through
the real server and the real index.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import time

import pytest
from PIL import Image
from web_helpers import FakeGallery, FakeSearcher, png_bytes

from stbir_infer.web import App
from stbir_infer.web.requests import MAX_TEXT_CHARS

RED, BLUE = (220, 20, 20), (20, 20, 220)


def _png(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (80, 60), colour).save(buf, "PNG")
    return buf.getvalue()


# The photos' real content hashes: a thumbnail is served only while the file still holds them.
SHA_A, SHA_B = (hashlib.sha256(_png(c)).hexdigest() for c in (RED, BLUE))


def call(app, body, *, ctype="application/json", headers=None, method="POST", target="/api/query"):
    """One request through ``App.handle``: (status, decoded JSON or raw bytes)."""
    body = body if isinstance(body, bytes) else json.dumps(body).encode()
    hdrs = {"Host": "127.0.0.1:8000", "Content-Type": ctype, "Content-Length": str(len(body)),
            **(headers or {})}
    stream = io.BytesIO(body)
    resp = app.handle(method, target, hdrs, stream.read)
    if not resp.content_type.startswith("application/json"):
        return resp.status, resp.body
    return resp.status, json.loads(resp.body.decode("utf-8"))  # strict: valid UTF-8 JSON


def assert_400(status, data, fragment=""):
    assert status == 400, data
    assert "\n" not in data["error"] and len(data["error"]) <= 300
    assert fragment in data["error"]


@pytest.fixture
def photos(tmp_path):
    paths = {}
    for name, colour in (("red.png", RED), ("blue.png", BLUE)):
        (tmp_path / name).write_bytes(_png(colour))
        paths[name] = str(tmp_path / name)
    return paths


@pytest.fixture
def fake(photos):
    files = {photos["red.png"]: {"sha256": SHA_A, "size": 100, "mtime_ns": 1, "label": 0},
             photos["blue.png"]: {"sha256": SHA_B, "size": 100, "mtime_ns": 1, "label": 1}}
    return FakeSearcher(FakeGallery(files))


@pytest.fixture
def app(fake):
    return App(fake, allowed_hosts={"127.0.0.1", "localhost", "::1"})


# -- (a) text length, Origin ----------------------------------------------------------------------

def test_text_is_capped(app, fake):
    status, data = call(app, {"text": "x" * MAX_TEXT_CHARS})
    assert status == 200
    t0 = time.perf_counter()
    status, data = call(app, {"text": "a red star " * 900_000})  # 9.9 MB of text
    assert_400(status, data, f"at most {MAX_TEXT_CHARS:,}")
    assert time.perf_counter() - t0 < 2
    from web_helpers import multipart

    ctype, body = multipart({"text": "y" * (MAX_TEXT_CHARS + 1)}, {})
    assert_400(*call(app, body, ctype=ctype), "characters long")
    assert len(fake.queries) == 1  # the refused ones never reached the searcher


def test_post_from_another_origin_is_403(app):
    for origin in ("http://evil.example", "null", "http://127.0.0.1:9999"):
        status, data = call(app, {"text": "a red star"}, headers={"Origin": origin})
        assert status == 403 and "cross-origin" in data["error"], (origin, data)
    assert call(app, {"text": "a red star"}, headers={"Origin": "http://127.0.0.1:8000"})[0] == 200
    assert call(app, {"text": "a red star"})[0] == 200  # curl sends no Origin


# -- (b) deep JSON, lone surrogates, wrong types --------------------------------------------------

@pytest.mark.parametrize("body, fragment", [
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b'{"text": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
    (b'{"text": "\\ud800"}', "surrogate"),
    (b'{"text": "a\\udfff red star"}', "surrogate"),
    (b'{"text": "x", "top_k": [5]}', "top_k must be an integer"),
    (b'{"text": "x", "top_k": ' + b"[" * 900 + b"]" * 900 + b"}", "top_k must be an integer"),
    (b'{"text": "x", "top_k": [' + b"1," * 100_000 + b"1]}", "top_k must be an integer"),
    (b'{"text": "x", "top_k": {"n": 5}}', "top_k must be an integer"),
    (b'{"text": "x", "top_k": 5.5}', "top_k must be an integer"),
    (b'{"text": "x", "top_k": 1e400}', "top_k must be an integer"),
    (b'{"text": 12}', "text must be a string"),
    (b'{"text": ["a", "b"]}', "text must be a string"),
    (b'{"text": {"a": 1}}', "text must be a string"),
    (b'{"sketch": {"png": "AAAA"}}', "sketch must be a base64 string"),
    (b'{"sketch": [1, 2]}', "sketch must be a base64 string"),
    (b'{"sketch": "\\ud800"}', "sketch is not valid base64"),
    (b'{"\\ud800": 1, "text": "x"}', "unknown key"),
    (b'{"a\\nb": 1, "text": "x"}', "unknown key"),
    (b'{"text": "x", "top_k": "' + b"9" * 5000 + b'"}', "top_k must be an integer"),
    (b'{"text": "x", "top_k": ' + b"9" * 5000 + b"}", "not valid JSON"),
    (b"\xff\xfe{}", "not valid JSON"),
])
def test_hostile_json_is_400_with_one_line(app, body, fragment):
    assert_400(*call(app, body), fragment)


def test_hostile_form_fields_are_400(app):
    assert_400(*call(app, b"text=%ED%A0%80", ctype="application/x-www-form-urlencoded"), "UTF-8")
    assert_400(*call(app, b"&".join(b"f%d=1" % i for i in range(1000)),
                     ctype="application/x-www-form-urlencoded"))


# -- (c) file names that are not UTF-8 ---------------------------------------------------------------

def test_results_carry_display_names(photos):
    weird = "/gallery/caf\udce9 \x1b[31m.png"  # os.fsdecode of b"caf\xe9 ESC[31m.png"
    files = {weird: {"sha256": SHA_A, "size": 1, "mtime_ns": 1, "label": 0},
             "/gallery/copy\udcff.png": {"sha256": SHA_A, "size": 1, "mtime_ns": 1, "label": 0},
             photos["blue.png"]: {"sha256": SHA_B, "size": 100, "mtime_ns": 1, "label": 1}}
    app = App(FakeSearcher(FakeGallery(files)))
    status, data = call(app, {"text": "a cafe"})
    assert status == 200, data
    first = data["results"][0]
    assert first["name"] == "caf\\xe9 \\x1b[31m.png"
    assert first["path"] == "/gallery/caf\\xe9 \\x1b[31m.png"
    assert first["duplicates"] == ["/gallery/copy\\xff.png"] and first["id"] == 0


def test_a_real_non_utf8_file_name_is_served(small_export, tmp_path):
    """The real index and searcher: a photo whose name is not UTF-8 is found, shown escaped, and
    its thumbnail is served (the raw name is still what opens the file)."""
    from stbir_infer.searcher import Searcher

    photos = tmp_path / "photos"
    photos.mkdir()
    try:
        with open(os.path.join(os.fsencode(photos), b"caf\xe9.png"), "wb") as f:
            Image.new("RGB", (64, 48), (200, 30, 30)).save(f, "PNG")
    except OSError:
        pytest.skip("this filesystem refuses file names that are not UTF-8")
    Image.new("RGB", (64, 48), (30, 30, 200)).save(photos / "plain.png")
    searcher = Searcher(small_export, tmp_path / "index", threads=1)
    searcher.enroll(photos)
    app = App(searcher)
    status, data = call(app, {"text": "a red square", "top_k": 2})
    assert status == 200, data
    names = sorted(r["name"] for r in data["results"])
    assert names == ["caf\\xe9.png", "plain.png"]
    weird = next(r for r in data["results"] if r["name"] == "caf\\xe9.png")
    status, thumb = call(app, b"", method="GET", target=weird["image"])
    assert status == 200 and Image.open(io.BytesIO(thumb)).format == "JPEG"


# -- (d) thumbnails follow the content, not the label -------------------------------------------------

def test_thumbnail_cache_is_keyed_by_content(photos, fake, app):
    def colour(label):
        status, body = call(app, b"", method="GET", target=f"/api/image/{label}?size=32")
        assert status == 200
        return Image.open(io.BytesIO(body)).convert("RGB").getpixel((16, 16))

    red = colour(0)
    assert red[0] > 150 and red[2] < 100
    # The index is rebuilt: label 0 is now the blue photo (another sha256).
    fake.gallery = FakeGallery({
        photos["blue.png"]: {"sha256": SHA_B, "size": 100, "mtime_ns": 1, "label": 0}})
    blue = colour(0)
    assert blue[2] > 150 and blue[0] < 100, "a rebuilt index was answered with the old thumbnail"


# -- (e) extreme sketch shapes -----------------------------------------------------------------------

def test_elongated_sketch_is_refused_before_it_costs_memory(app, fake):
    import tracemalloc

    strip = base64.b64encode(png_bytes(1, 100_000)).decode()
    tracemalloc.start()
    try:
        status, data = call(app, {"sketch": strip, "text": "x"})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert_400(status, data, "too elongated")
    assert peak < 50 << 20, f"{peak / 2**20:.0f} MB"
    assert not fake.queries


def test_huge_sketch_is_refused_from_its_header(app):
    big = base64.b64encode(png_bytes(6000, 5000, "1", 1)).decode()
    assert_400(*call(app, {"sketch": big}), "too large")


def test_elongated_sketch_through_the_server(client):
    from web_helpers import multipart

    ctype, body = multipart({"text": "x"}, {"sketch": ("strip.png", png_bytes(100_000, 1), "image/png")})
    status, _, raw = client.request("POST", "/api/query", body=body, headers={"Content-Type": ctype})
    assert status == 400 and "too elongated" in json.loads(raw)["error"]
