"""stbir-infer serve: the JSON API (query by sketch / text / both / neither, limits, bad input),
the image route (enrolled images only, no traversal), the page's files, and the CLI command.

The server runs for real on a free loopback port in a thread; requests go through http.client so
the raw request target (``..``, ``%2F``) reaches the server as written.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import subprocess
import sys
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from stbir_infer.cli import main
from stbir_infer.searcher import Searcher
from stbir_infer.serve import App, make_server, parse_multipart

REPO = Path(__file__).resolve().parents[1]
N_PHOTOS = 10
MAX_BODY = 256 * 1024


# -- fixtures -----------------------------------------------------------------------------------------

def build_gallery(export_dir: Path, root: Path, n: int = N_PHOTOS):
    """``n`` synthetic photos enrolled into ``root/index``; returns (index dir, photos dir, sketches)."""
    from stbir_train.synth import render_photo, render_sketch, sample_item

    photos, sketches = root / "photos", {}
    photos.mkdir(parents=True)
    for i in range(n):
        rng = np.random.default_rng(i)
        item = sample_item(rng, f"item{i}")
        render_photo(item, rng).save(photos / f"photo_{i:02d}.png")
        buf = io.BytesIO()
        render_sketch(item, np.random.default_rng(100 + i)).save(buf, "PNG")
        sketches[f"photo_{i:02d}.png"] = buf.getvalue()
    index_dir = root / "index"
    Searcher(export_dir, index_dir, threads=1).enroll(photos)
    return index_dir, photos, sketches


class Client:
    """Tiny HTTP client over http.client: one connection per request, raw targets."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port

    def request(self, method: str, target: str, body: bytes | None = None, headers=None):
        conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
        try:
            conn.request(method, target, body=body, headers=headers or {})
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, dict(resp.getheaders()), data
        finally:
            conn.close()

    def get(self, target: str, headers=None):
        return self.request("GET", target, headers=headers)

    def json(self, method: str, target: str, **kw):
        status, headers, data = self.request(method, target, **kw)
        return status, json.loads(data)

    def query_form(self, fields: dict, files: dict | None = None):
        ctype, body = multipart(fields, files or {})
        return self.json("POST", "/api/query", body=body, headers={"Content-Type": ctype})

    def query_json(self, payload):
        body = json.dumps(payload).encode()
        return self.json("POST", "/api/query", body=body,
                         headers={"Content-Type": "application/json"})


def multipart(fields: dict, files: dict) -> tuple[str, bytes]:
    """(content type, body) of a multipart/form-data request, as a browser builds it."""
    boundary = "----stbir" + uuid.uuid4().hex
    out = io.BytesIO()
    for name, value in fields.items():
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode())
        out.write(str(value).encode("utf-8") + b"\r\n")
    for name, (filename, data, ctype) in files.items():
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; '
                  f'filename="{filename}"\r\nContent-Type: {ctype}\r\n\r\n'.encode())
        out.write(data + b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return f"multipart/form-data; boundary={boundary}", out.getvalue()


@pytest.fixture(scope="module")
def gallery(small_export, tmp_path_factory):
    index_dir, photos, sketches = build_gallery(small_export, tmp_path_factory.mktemp("serve"))
    return small_export, index_dir, photos, sketches


@pytest.fixture(scope="module")
def searcher(gallery):
    export_dir, index_dir, _, _ = gallery
    return Searcher(export_dir, index_dir, threads=1)


@pytest.fixture(scope="module")
def server(searcher):
    app = App(searcher, max_body=MAX_BODY)
    app.warm_up()
    srv = make_server(app, "127.0.0.1", 0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="module")
def client(server):
    return Client(*server.server_address[:2])


def sketch_file(gallery, name="photo_03.png"):
    return {"sketch": ("sketch.png", gallery[3][name], "image/png")}


# -- health and the page ---------------------------------------------------------------------------------

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


# -- queries ----------------------------------------------------------------------------------------------

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


def test_oversized_body_is_413(client):
    big = os.urandom(MAX_BODY + 1)
    status, data = client.query_form({"text": "x"}, {"sketch": ("big.png", big, "image/png")})
    assert status == 413
    assert "limit" in data["error"]
    # the server goes on answering
    assert client.json("GET", "/api/health")[0] == 200


def test_oversized_body_is_refused_before_it_is_sent(server):
    """The 413 comes from the headers alone: the client may stop sending."""
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=10)
    conn.putrequest("POST", "/api/query")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(50 << 20))
    conn.endheaders()
    resp = conn.getresponse()
    assert resp.status == 413 and resp.getheader("Connection") == "close"
    conn.close()


def test_a_client_that_hangs_up_mid_body(server, client):
    import socket

    with socket.create_connection(server.server_address[:2], timeout=10) as sock:
        sock.sendall(b"POST /api/query HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"text\": ")
        sock.shutdown(socket.SHUT_WR)
        reply = sock.recv(4096)
    assert reply.startswith(b"HTTP/1.1 400")
    assert client.json("GET", "/api/health")[0] == 200


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


# -- images -----------------------------------------------------------------------------------------------

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


# -- multipart parsing ------------------------------------------------------------------------------------

def test_multipart_keeps_binary_parts_exact():
    rng = np.random.default_rng(0)
    for n in (0, 1, 2, 100, 4096):
        data = rng.bytes(n) + b"\r\n--\r\n\r\n\n\r" + rng.bytes(n)
        ctype, body = multipart({"text": "héllo\r\nwörld"}, {"sketch": ("s.png", data, "image/png")})
        fields = parse_multipart(body, ctype)
        assert fields["sketch"] == ("s.png", data)
        assert fields["text"] == (None, "héllo\r\nwörld".encode())


# -- the command ----------------------------------------------------------------------------------------

def test_serve_command_errors_are_one_line_exit_2(tmp_path, small_export):
    result = CliRunner().invoke(main, ["serve", "--model", str(small_export),
                                       "--index", str(tmp_path / "none")])
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and "no index here yet" in result.output
    result = CliRunner().invoke(main, ["serve", "--model", str(tmp_path / "noexport"),
                                       "--index", str(tmp_path / "none")])
    assert result.exit_code == 2 and result.output.startswith("stbir-infer: error:")
    result = CliRunner().invoke(main, ["serve", "--port", "70000"])
    assert result.exit_code == 2


def test_serve_command_port_in_use(server, gallery):
    export_dir, index_dir, _, _ = gallery
    port = server.server_address[1]
    result = CliRunner().invoke(main, ["serve", "--model", str(export_dir), "--index", str(index_dir),
                                       "--port", str(port), "--threads", "1"])
    assert result.exit_code == 2
    assert f"cannot listen on 127.0.0.1:{port}" in result.output


def test_serve_command_runs(gallery):
    """The real command in a subprocess: port 0, the URL on stderr, health, Ctrl+C stops it."""
    import signal

    export_dir, index_dir, _, _ = gallery
    proc = subprocess.Popen([sys.executable, "-m", "stbir_infer", "serve", "--model", str(export_dir),
                             "--index", str(index_dir), "--port", "0", "--threads", "1"],
                            stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        line = proc.stderr.readline()
        assert "serving" in line and "http://127.0.0.1:" in line, line
        port = int(line.split("http://127.0.0.1:")[1].split("/")[0])
        status, data = Client("127.0.0.1", port).json("GET", "/api/health")
        assert status == 200 and data["images"] == N_PHOTOS
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 0
        rest = proc.stderr.read()
        assert "stopped" in rest and "Traceback" not in rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_imports_no_torch_and_cli_stays_cheap():
    code = ("import sys, stbir_infer.cli; assert 'stbir_infer.serve' not in sys.modules; "
            "import stbir_infer.serve; "
            "bad = [m for m in ('torch', 'torchvision', 'open_clip', 'models', 'stbir_train', "
            "'stbir_export') if m in sys.modules]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
