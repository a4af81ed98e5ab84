"""stbir-infer serve, the App's routes: queries by sketch / text / both / neither, bad input, the
image route (enrolled images only, no traversal), the page's files, a new enroll seen live.

The server runs for real on a free loopback port (tests/web/conftest.py); requests go through
http.client so the raw request target (``..``, ``%2F``) reaches the server as written.
"""

from __future__ import annotations

import base64
import io
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image
from web_helpers import MAX_BODY, N_PHOTOS, build_gallery, sketch_file

from stbir_infer.searcher import Searcher
from stbir_infer.web import App


def test_health(client, searcher):
    status, data = client.json("GET", "/api/health")
    assert status == 200
    assert data["status"] == "ok" and data["images"] == N_PHOTOS
    assert data["model"]["fingerprint"] == searcher.encoders.fingerprint
    assert data["limits"]["max_body"] == MAX_BODY


def test_page_and_its_files_are_served(client):
    status, headers, body = client.get("/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    html = body.decode()
    for ref in ("/static/app.js", "/static/style.css", 'id="sketch"', 'id="text"', 'id="top-k"'):
        assert ref in html
    assert "http://" not in html and "https://" not in html  # nothing from outside
    for name, ctype in (("app.js", "text/javascript"), ("style.css", "text/css"),
                        ("favicon.svg", "image/svg+xml")):
        status, headers, body = client.get(f"/static/{name}")
        assert status == 200 and headers["Content-Type"].startswith(ctype) and body
    assert client.get("/static/nope.js")[0] == 404
    assert client.get("/nowhere")[0] == 404


def _check_results(data, top_k, photos: Path):
    results = data["results"]
    assert data["count"] == len(results) == top_k
    assert [r["rank"] for r in results] == list(range(1, top_k + 1))
    scores = [r["score"] for r in results]
    assert scores == sorted(scores, reverse=True)
    for r in results:
        assert Path(r["path"]).parent == photos.resolve() and r["name"] == Path(r["path"]).name
        assert r["image"] == f"/api/image/{r['id']}"


def test_query_by_sketch(client, gallery, searcher):
    status, data = client.query_form({"top_k": 5}, sketch_file(gallery))
    assert status == 200, data
    assert data["query"] == {"text": None, "sketch": True, "top_k": 5, "fusion_weight": None}
    _check_results(data, 5, gallery[2])
    # the same ranking as the library gives for the same file
    img = Image.open(io.BytesIO(gallery[3]["photo_03.png"]))
    expected = [h.path for h in searcher.query(sketch=img, top_k=5)]
    assert [r["path"] for r in data["results"]] == expected


def test_query_by_text(client, gallery, searcher):
    status, data = client.query_form({"text": "a red striped star", "top_k": 4})
    assert status == 200, data
    assert data["query"]["text"] == "a red striped star" and data["query"]["sketch"] is False
    _check_results(data, 4, gallery[2])
    expected = [h.path for h in searcher.query(text="a red striped star", top_k=4)]
    assert [r["path"] for r in data["results"]] == expected
    # the same query as JSON and as a urlencoded form
    status, as_json = client.query_json({"text": "a red striped star", "top_k": 4})
    assert status == 200 and as_json["results"] == data["results"]
    status, _, body = client.request("POST", "/api/query", body=b"text=a+red+striped+star&top_k=4",
                                     headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 200 and json.loads(body)["results"] == data["results"]


def test_query_by_sketch_and_text(client, gallery, searcher):
    status, data = client.query_form({"text": "a blue dotted circle", "top_k": 6}, sketch_file(gallery))
    assert status == 200, data
    assert data["query"]["sketch"] is True and data["query"]["text"] == "a blue dotted circle"
    assert data["query"]["fusion_weight"] == pytest.approx(searcher.fusion_weight)
    _check_results(data, 6, gallery[2])
    img = Image.open(io.BytesIO(gallery[3]["photo_03.png"]))
    expected = searcher.query(sketch=img, text="a blue dotted circle", top_k=6)
    assert [r["path"] for r in data["results"]] == [h.path for h in expected]
    # JSON with a base64 PNG (plain, and as a data: URL) gives the same answer
    b64 = base64.b64encode(gallery[3]["photo_03.png"]).decode()
    for sketch in (b64, "data:image/png;base64," + b64):
        status, as_json = client.query_json({"text": "a blue dotted circle", "sketch": sketch, "top_k": 6})
        assert status == 200 and as_json["results"] == data["results"]


def test_query_with_neither_is_400(client):
    for status, data in (client.query_form({"top_k": 3}),
                         client.query_form({"text": "   "}),
                         client.query_json({}),
                         client.query_json({"text": "", "sketch": None}),
                         client.query_form({"text": ""}, {"sketch": ("", b"", "application/octet-stream")})):
        assert status == 400
        assert data["error"] == "a query needs a sketch, a text or both"


@pytest.mark.parametrize("kind, payload, message", [
    ("form", ({"text": "x"}, {"sketch": ("a.png", b"not an image", "image/png")}), "sketch: not an image"),
    ("form", ({"text": "x", "top_k": "many"}, None), "top_k must be an integer"),
    ("form", ({"text": "x", "top_k": "0"}, None), "top_k must be an integer"),
    ("form", ({"text": "x", "colour": "red"}, None), "unknown field(s) colour"),
    ("json", {"text": "x", "top_k": 1000000}, "top_k must be an integer"),
    ("json", {"text": "x", "top_k": True}, "top_k must be an integer"),
    ("json", {"text": 5}, "text must be a string"),
    ("json", {"sketch": "%%% not base64"}, "sketch is not valid base64"),
    ("json", {"sketch": base64.b64encode(b"GIF89a broken").decode()}, "sketch: "),
    ("json", {"text": "x", "query": "y"}, "unknown key(s) query"),
    ("json", ["text"], "JSON body must be an object"),
])
def test_bad_input_is_400_with_a_message(client, kind, payload, message):
    if kind == "form":
        status, data = client.query_form(*payload)
    else:
        status, data = client.query_json(payload)
    assert status == 400
    assert message in data["error"]


def test_thumbnails_of_results(client, gallery):
    _, data = client.query_form({"text": "a shape", "top_k": N_PHOTOS})
    assert {r["name"] for r in data["results"]} == {p.name for p in gallery[2].iterdir()}
    r = data["results"][0]
    status, headers, body = client.get(r["image"])
    assert status == 200 and headers["Content-Type"] == "image/jpeg"
    thumb = Image.open(io.BytesIO(body))
    original = Image.open(r["path"])
    assert thumb.format == "JPEG" and max(thumb.size) == min(256, max(original.size))
    status, _, body = client.get(r["image"] + "?size=32")
    assert status == 200 and max(Image.open(io.BytesIO(body)).size) == 32
    assert client.get(r["image"] + "?size=5000")[0] == 400
    assert client.get(r["image"] + "?size=abc")[0] == 400
    assert client.get(r["image"] + "?size=%C2%B2")[0] == 400
    # conditional request
    status, _, body = client.get(r["image"], headers={"If-None-Match": headers["ETag"]})
    assert status == 304 and body == b""


@pytest.mark.parametrize("target", [
    "/api/image/..%2F..%2Fetc%2Fpasswd",
    "/api/image/../../etc/passwd",
    "/api/image/%2Fetc%2Fpasswd",
    "/api/image/3/../../../pyproject.toml",
    "/api/image/-1",
    "/api/image/%C2%B2",
    "/api/image/999999",
    "/api/image/",
    "/static/../../pyproject.toml",
    "/static/..%2F..%2Fpyproject.toml",
    "/static/%2E%2E/%2E%2E/pyproject.toml",
    "/static/../serve.py",
    "/static//etc/passwd",
    "/../../pyproject.toml",
])
def test_path_traversal_is_refused(client, target):
    status, _, body = client.get(target)
    assert status == 404
    assert b"[project]" not in body and b"root:" not in body and b"import" not in body
    assert json.loads(body)["error"]


def test_image_of_a_removed_file_is_404(tmp_path, small_export):
    index_dir, photos, _ = build_gallery(small_export, tmp_path, n=2)
    app = App(Searcher(small_export, index_dir, threads=1))
    label = next(iter(app._gallery().paths))
    headers = {"Host": "127.0.0.1"}
    assert app.handle("GET", f"/api/image/{label}", headers, None).status == 200
    for p in photos.iterdir():
        p.unlink()
    resp = app.handle("GET", f"/api/image/{label}?size=64", headers, None)
    assert resp.status == 404 and b"enroll" in resp.body


def test_server_sees_a_new_enroll(tmp_path, small_export):
    index_dir, photos, _ = build_gallery(small_export, tmp_path, n=2)
    app = App(Searcher(small_export, index_dir, threads=1))
    health = lambda: json.loads(app.handle("GET", "/api/health", {}, None).body)["images"]
    assert health() == 2
    Image.new("RGB", (40, 40), (10, 200, 30)).save(photos / "green.png")
    Searcher(small_export, index_dir, threads=1).enroll(photos)  # another writer, e.g. the CLI
    assert health() == 3


def test_concurrent_queries(client, gallery):
    def one(i):
        if i % 2:
            return client.query_form({"text": "a green square", "top_k": 3})
        return client.query_form({"top_k": 3}, sketch_file(gallery))

    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(one, range(12)))
    assert all(status == 200 for status, _ in answers)
    assert len({json.dumps(d["results"]) for i, (_, d) in enumerate(answers) if i % 2}) == 1
    assert len({json.dumps(d["results"]) for i, (_, d) in enumerate(answers) if not i % 2}) == 1


def test_bad_requests(client):
    status, _, body = client.request("POST", "/api/query", body=b"{not json",
                                     headers={"Content-Type": "application/json"})
    assert status == 400 and "not valid JSON" in json.loads(body)["error"]
    status, _, body = client.request("POST", "/api/query", body=b"text",
                                     headers={"Content-Type": "text/plain"})
    assert status == 415
    status, _, body = client.request("POST", "/api/query", body=b"--x--\r\n",
                                     headers={"Content-Type": "multipart/form-data"})
    assert status == 400 and "boundary" in json.loads(body)["error"]
    status, headers, _ = client.get("/api/query")
    assert status == 405 and headers["Allow"] == "POST"
    status, headers, _ = client.request("DELETE", "/api/health")
    assert status == 405


def test_host_header_must_be_loopback(client):
    assert client.get("/api/health", headers={"Host": "localhost:8000"})[0] == 200
    status, _, body = client.get("/api/health", headers={"Host": "attacker.example:8000"})
    assert status == 403 and "localhost" in json.loads(body)["error"]
