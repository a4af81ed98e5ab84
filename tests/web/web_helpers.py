"""Helpers shared by the tests of ``stbir-infer serve`` (tests/web/): a gallery builder, a raw
HTTP client, a multipart encoder and a fake searcher for App-level tests without models."""

from __future__ import annotations

import http.client
import io
import json
import threading
import uuid
from pathlib import Path

import numpy as np

from stbir_infer.hits import Hit

N_PHOTOS = 10
MAX_BODY = 256 * 1024


def build_gallery(export_dir: Path, root: Path, n: int = N_PHOTOS):
    """``n`` synthetic photos enrolled into ``root/index``; returns (index dir, photos dir, sketches)."""
    from stbir_infer.searcher import Searcher
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
            return resp.status, resp.headers, data  # case-insensitive, as HTTP header names are
        finally:
            conn.close()

    def get(self, target: str, headers=None):
        return self.request("GET", target, headers=headers)

    def json(self, method: str, target: str, **kw):
        status, headers, data = self.request(method, target, **kw)
        return status, json.loads(data)

    def query_form(self, fields: dict, files: dict | None = None, headers=None):
        ctype, body = multipart(fields, files or {})
        return self.json("POST", "/api/query", body=body,
                         headers={"Content-Type": ctype, **(headers or {})})

    def query_json(self, payload, headers=None):
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        return self.json("POST", "/api/query", body=body,
                         headers={"Content-Type": "application/json", **(headers or {})})


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


def png_bytes(width: int, height: int, mode: str = "L", colour=255) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, (width, height), colour).save(buf, "PNG")
    return buf.getvalue()


def start_server(app, **limits):
    """``app`` served on a free loopback port in a daemon thread; returns the server."""
    from stbir_infer.web import Limits, make_server

    srv = make_server(app, "127.0.0.1", 0, Limits(**limits) if limits else None)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def stop_server(srv):
    srv.shutdown()
    srv.server_close()


def sketch_file(gallery, name="photo_03.png"):
    return {"sketch": ("sketch.png", gallery[3][name], "image/png")}


# -- a searcher without models: App-level tests of routing, encoding and caching --------------

class FakeGallery:
    """``files`` {path: {sha256, size, mtime_ns, label}}; ``items`` and ``paths`` derived."""

    def __init__(self, files: dict[str, dict]):
        self.files = files
        self.items = {int(r["label"]): r["sha256"] for r in files.values()}
        self.paths: dict[int, list[str]] = {}
        for p, r in sorted(files.items()):
            self.paths.setdefault(int(r["label"]), []).append(p)

    def __len__(self):
        return len(self.items)


class FakeEncoders:
    fingerprint = "f" * 64
    clip_model = "fake"
    embed_dim = 4
    fusion_weight = 0.5
    precision = "fp32"



class FakeSearcher:
    """Answers every query with every file of ``gallery`` in path order."""

    index_dir = Path("/nonexistent/index")
    fusion_weight = 0.5

    def __init__(self, gallery: FakeGallery):
        self.gallery = gallery
        self.encoders = FakeEncoders()
        self.queries = []

    def warm_up(self):
        pass

    def score_thresholds(self):
        return {}

    def current_index(self):
        return self.gallery

    def query(self, sketch=None, text=None, top_k=10):
        self.queries.append((sketch, text, top_k))
        hits = []
        for rank, (_label, paths) in enumerate(sorted(self.gallery.paths.items())[:top_k], 1):
            hits.append(Hit(paths[0], 1.0 / rank, rank, tuple(paths[1:])))
        return hits

    def query_many(self, queries, errors="raise", batch_size=32):  # what the App calls
        return [self.query(**q) if isinstance(q, dict) else self.query(q.sketch, q.text, q.top_k)
                for q in queries]
