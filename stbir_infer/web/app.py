"""The App of ``stbir-infer serve``: routes over one ``Searcher``, independent of any server.

``App.handle(method, target, headers, read_body)`` takes the request method, the raw request
target, a header mapping (``.get(name)``, case as sent or any case) and a function that reads n
body bytes, and returns a ``Response``. ``stbir_infer.web.server`` puts it behind a WSGI server;
tests can call it directly.

Routes::

    GET  /                      the page (stbir_infer/static/index.html)
    GET  /static/<name>         the page's JS / CSS (only the files shipped in stbir_infer/static/)
    GET  /api/health            {"status": "ok", "images": N, "model": {...}, limits}
    POST /api/query             multipart/form-data  fields: sketch, image (files), text, top_k,
                                                     like, where ("key=value" lines), weights
                                application/json     {"text": str, "sketch": base64 PNG, "image":
                                                      base64, "like": id, "top_k": int, ...}
                                application/x-www-form-urlencoded  the fields without files
                                (every part checked by ``query_spec.QuerySpec``)
                                -> {"query": {...}, "results": [{rank, score, path, name, id,
                                    image, duplicates}], "took_ms": ...}
    GET  /api/image/<id>[?size=N]   a JPEG thumbnail (longest side N, 16..1024, default 256) of
                                the enrolled image with that index label, while its file still
                                holds the enrolled content; anything else is a 404; another
                                site's page is refused (``web.thumbnails``)

Images are addressed by index label, never by a path the client sends, so only files the index
holds can be read. Paths in answers are display forms (``stbir_infer.paths.display``): a file name
that is not UTF-8 comes back with ``\\xNN`` escapes, so every answer is valid UTF-8 JSON. Bound to
loopback, the server also refuses requests whose Host header names another machine (DNS
rebinding); a POST whose Origin is another site is refused too (``requests.check_origin``).
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
import traceback
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from stbir_infer.errors import ImageDecodeError, IndexNotFoundError, QueryError, StbirInferError
from stbir_infer.paths import display
from stbir_infer.query_spec import QuerySpec, limits
from stbir_infer.web.batcher import QueryBatcher
from stbir_infer.web.requests import (
    DEFAULT_MAX_BODY,
    DEFAULT_MAX_TOP_K,
    HTTPError,
    one_line,
    read_query,
)
from stbir_infer.web.thumbnails import check_same_site, thumbnail

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
THUMB_DEFAULT, THUMB_MIN, THUMB_MAX = 256, 16, 1024
THUMB_CACHE = 512                    # thumbnails kept in memory (a few MB)
_LABEL = re.compile(r"[0-9]{1,18}")
_SIZE = re.compile(r"[0-9]{1,5}")
_CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                  ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml",
                  ".png": "image/png", ".ico": "image/x-icon", ".json": "application/json"}
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": ("default-src 'self'; img-src 'self' data: blob:; "
                                "style-src 'self'; script-src 'self'; frame-ancestors 'none'"),
}


class ServeError(StbirInferError):
    """The server cannot start (address in use, no index yet, extra not installed). Exit status 2."""


@dataclass
class Response:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: dict = field(default_factory=dict)
    close: bool = False  # close the connection afterwards (the request body was not read)


def json_response(data, status: int = 200, **kw) -> Response:
    # Every string put in here is already valid Unicode (display forms, checked query text);
    # "replace" is the backstop that keeps a missed lone surrogate from turning into a 500.
    body = json.dumps(data, ensure_ascii=False).encode("utf-8", "replace")
    return Response(status, body, "application/json; charset=utf-8", **kw)


def error_response(status: int, message: str, **kw) -> Response:
    return json_response({"error": one_line(message, 300), "status": int(status)}, status, **kw)


class App:
    """Routes requests to a ``Searcher`` (see the module's docstring)."""

    def __init__(self, searcher, *, max_body: int = DEFAULT_MAX_BODY,
                 max_top_k: int = DEFAULT_MAX_TOP_K, static_dir: str | Path = STATIC_DIR,
                 max_batch: int = 32, allowed_hosts: set[str] | None = None, log=None):
        self.searcher = searcher
        self.max_body = int(max_body)
        self.max_top_k = int(max_top_k)
        self.allowed_hosts = allowed_hosts  # None: any Host header
        self.log = log or (lambda line: None)
        self.static = self._load_static(Path(static_dir))
        self._thumbs: OrderedDict = OrderedDict()  # (sha256, size) -> JPEG bytes
        self._thumbs_lock = threading.Lock()
        # Concurrent queries share encoder runs (one at a time: onnxruntime spreads each over the
        # cores, and two at once only fight for them).
        self._batcher = QueryBatcher(searcher, max_batch)

    @staticmethod
    def _load_static(folder: Path) -> dict[str, tuple[bytes, str]]:
        """The page's files, read once: a request can name only these (no path is ever joined)."""
        files = {}
        for p in sorted(folder.iterdir()) if folder.is_dir() else ():
            if p.is_file() and p.suffix in _CONTENT_TYPES:
                files[p.name] = (p.read_bytes(), _CONTENT_TYPES[p.suffix])
        if "index.html" not in files:
            raise ServeError(f"{folder}: the web page (index.html) is missing from this install")
        return files

    def warm_up(self) -> None:
        """Open every session once (so the first query is not slow and sessions open in one thread)."""
        self.searcher.warm_up()

    # -- dispatch ---------------------------------------------------------------------------------
    def handle(self, method: str, target: str, headers, read_body) -> Response:
        try:
            return self._route(method, target, headers, read_body)
        except HTTPError as exc:
            return error_response(exc.status, exc.message, headers=exc.headers,
                                  close=exc.status in (411, 413))
        except (QueryError, ImageDecodeError) as exc:
            return error_response(400, str(exc))
        except IndexNotFoundError as exc:
            return error_response(503, str(exc))
        except StbirInferError as exc:
            return error_response(500, str(exc))
        except Exception as exc:  # a bug: answer, and keep the traceback for the operator
            self.log("".join(traceback.format_exception(exc)).rstrip())
            return error_response(500, f"internal error: {type(exc).__name__}")

    def _route(self, method: str, target: str, headers, read_body) -> Response:
        self._check_host(headers.get("Host"))
        parts = urlsplit(target)
        path = parts.path
        if path == "/api/query":
            self._allow(method, "POST")
            with self._batcher.arriving():  # a run about to start waits for this query
                q = read_query(headers, read_body, max_body=self.max_body,
                               max_top_k=self.max_top_k)
            return self.query(q)
        if path == "/api/health":
            self._allow(method, "GET", "HEAD")
            return self.health()
        if path.startswith("/api/image/"):
            self._allow(method, "GET", "HEAD")
            check_same_site(headers)  # an <img> on another site cannot make us decode
            return self.image(path[len("/api/image/"):], parse_qs(parts.query).get("size", [None])[-1],
                              headers.get("If-None-Match"))
        if path in ("/", "/index.html"):
            self._allow(method, "GET", "HEAD")
            return self._static("index.html")
        if path.startswith("/static/"):
            self._allow(method, "GET", "HEAD")
            return self._static(unquote(path[len("/static/"):]))
        raise HTTPError(404, f"not found: {path[:200]}")

    @staticmethod
    def _allow(method: str, *allowed: str) -> None:
        if method not in allowed:
            raise HTTPError(405, f"{method} is not allowed here (use {' or '.join(allowed)})",
                            {"Allow": ", ".join(allowed)})

    def _check_host(self, host: str | None) -> None:
        if self.allowed_hosts is None or host is None:  # no Host header: not a browser
            return
        name = host.strip().lower()
        if name.startswith("["):
            name = name[1:].split("]", 1)[0]
        elif name.count(":") == 1:
            name = name.split(":", 1)[0]
        if name not in self.allowed_hosts:
            raise HTTPError(403, f"Host {one_line(host, 80)!r} is not served here (this server "
                                 "answers only to localhost; start it with --host to change that)")

    # -- routes -----------------------------------------------------------------------------------
    def _static(self, name: str) -> Response:
        entry = self.static.get(name)
        if entry is None:
            raise HTTPError(404, f"not found: /static/{name[:200]}")
        body, ctype = entry
        return Response(200, body, ctype, {"Cache-Control": "no-cache"})

    def _gallery(self):
        # The live gallery (the Searcher reloads it when an enroll has committed a new one).
        idx = self.searcher.current_index()
        if idx is None:
            raise IndexNotFoundError(f"{display(self.searcher.index_dir)}: no index here yet")
        return idx

    def health(self) -> Response:
        idx = self._gallery()
        enc = self.searcher.encoders
        fusion = getattr(self.searcher, "fusion", None)
        return json_response({
            "status": "ok", "images": len(idx.items), "files": len(idx.files),
            "model": {"fingerprint": enc.fingerprint, "clip_model": enc.clip_model,
                      "embed_dim": enc.embed_dim, "fusion_weight": self.searcher.fusion_weight,
                      "precision": enc.precision,
                      "fusion": getattr(fusion, "method", "weighted_mean"),
                      "score_threshold": getattr(fusion, "thresholds", None) is not None},
            # What a query may hold (``query_spec.limits``: the page sets its inputs from it)
            # and the export's score threshold per query mode (the page's slider default).
            "limits": {**limits(self.max_top_k), "max_body": self.max_body,
                       "thumbnail_max": THUMB_MAX},
            "score_thresholds": self.searcher.score_thresholds(),  # edge gallery: mapped
            # Encoder runs so far and the queries they answered (``web.batcher``).
            "batching": {"runs": self._batcher.runs, "queries": self._batcher.answered},
        }, headers={"Cache-Control": "no-store"})

    def query(self, q: QuerySpec) -> Response:
        t0 = time.perf_counter()
        floor = None
        if q.min_score is not None:  # resolved once: "auto" -> the export's threshold
            floor = self.searcher.min_score_for(q.min_score, mode=q.mode)
            q = replace(q, min_score=floor)
        hits = self._batcher(q)
        took = (time.perf_counter() - t0) * 1000
        files = self._gallery().files
        results = []
        for h in hits:
            rec = files.get(h.path)
            label = int(rec["label"]) if rec is not None else None
            # to_dict gives names in display form (valid UTF-8; the index keeps them as
            # os.fsdecode gives them, lone surrogates for bytes that are not UTF-8).
            d = h.to_dict()
            d.update(name=os.path.basename(d["path"]), id=label,
                     image=f"/api/image/{label}" if label is not None else None)
            results.append(d)
        fused = q.sketch is not None and q.text is not None
        extra = {"min_score": floor} if floor is not None else {}
        if q.has_image:
            extra.update(image=q.image is not None, like=q.like, mode=q.mode)
        if q.where:
            extra["where"] = {k: sorted(v) for k, v in q.where.items()}
        return json_response({
            "query": {"text": q.text, "sketch": q.sketch is not None, "top_k": q.top_k,
                      "fusion_weight": ((self.searcher.fusion_weight if q.sketch_weight is None
                                         else q.sketch_weight) if fused else None),
                      **extra},
            "model": self.searcher.encoders.fingerprint,
            "count": len(results), "took_ms": round(took, 2), "results": results,
            "no_match": bool(floor is not None and not results),
        }, headers={"Cache-Control": "no-store"})

    def image(self, label: str, size: str | None, if_none_match: str | None = None) -> Response:
        if not _LABEL.fullmatch(label):
            raise HTTPError(404, "no such image (images are addressed by their index id)")
        if size is None:
            px = THUMB_DEFAULT
        elif _SIZE.fullmatch(size) and THUMB_MIN <= int(size) <= THUMB_MAX:
            px = int(size)
        else:
            raise HTTPError(400, f"size must be an integer between {THUMB_MIN} and {THUMB_MAX}")
        idx = self._gallery()
        label_i = int(label)
        sha = idx.items.get(label_i)
        paths = idx.paths.get(label_i) or []
        if sha is None or not paths:
            raise HTTPError(404, f"no image with id {label} in the index")
        etag = f'"{sha[:32]}-{px}"'
        headers = {"ETag": etag, "Cache-Control": "private, max-age=3600"}
        if if_none_match and etag in if_none_match:
            return Response(304, b"", "image/jpeg", headers)
        # Keyed by content (sha256) and byte size, not by label: a rebuilt index reuses labels
        # for other photos, and must not be answered with the old photos' thumbnails.
        file_size = next((rec.get("size") for p in paths
                          if (rec := idx.files.get(p)) is not None), None)
        key = (sha, file_size, px)
        with self._thumbs_lock:
            body = self._thumbs.get(key)
            if body is not None:
                self._thumbs.move_to_end(key)
        if body is None:
            body = thumbnail(paths, sha, px, label)  # only a file that still holds ``sha``
            with self._thumbs_lock:
                self._thumbs[key] = body
                while len(self._thumbs) > THUMB_CACHE:
                    self._thumbs.popitem(last=False)
        return Response(200, body, "image/jpeg", headers)


__all__ = ["App", "Response", "SECURITY_HEADERS", "STATIC_DIR", "ServeError", "error_response",
           "json_response"]
