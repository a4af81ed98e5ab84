"""``stbir-infer serve``: a local web page and JSON API over one ``Searcher``.

One process loads the export and the index once and answers many queries. Python's standard
library only (``http.server`` with a thread per connection): nothing to install beyond the runtime.

Routes::

    GET  /                      the page (stbir_infer/static/index.html)
    GET  /static/<name>         the page's JS / CSS (only the files shipped in stbir_infer/static/)
    GET  /api/health            {"status": "ok", "images": N, "model": {...}, limits}
    POST /api/query             multipart/form-data  fields: sketch (file), text, top_k
                                application/json     {"text": str, "sketch": base64 PNG, "top_k": int}
                                application/x-www-form-urlencoded  text, top_k
                                -> {"query": {...}, "results": [{rank, score, path, name, id,
                                    image, duplicates}], "took_ms": ...}
    GET  /api/image/<id>[?size=N]   a JPEG thumbnail (longest side N, 16..1024, default 256) of
                                the enrolled image with that index label; anything else is a 404

Images are addressed by index label, never by a path the client sends, so only files the index
holds can be read. Bodies over ``max_body`` bytes are refused (413) before they are read; bad input
is a 400 with ``{"error": "..."}``. Bound to loopback, the server also refuses requests whose Host
header names another machine (DNS rebinding); anything but loopback is the caller's decision.

    from stbir_infer.searcher import Searcher
    from stbir_infer.serve import App, make_server
    server = make_server(App(Searcher("export", "index")), "127.0.0.1", 8000)
    server.serve_forever()
"""

from __future__ import annotations

import base64
import binascii
import io
import ipaddress
import json
import re
import socket
import socketserver
import sys
import threading
import time
import traceback
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from PIL import Image, UnidentifiedImageError

from stbir_infer.errors import IndexNotFoundError, QueryError, StbirInferError

STATIC_DIR = Path(__file__).with_name("static")
DEFAULT_MAX_BODY = 10 << 20          # bytes of a request body (a photographed paper sketch fits)
DEFAULT_MAX_TOP_K = 200
MAX_SKETCH_PIXELS = 25_000_000       # a decoded sketch larger than this is refused (400)
THUMB_DEFAULT, THUMB_MIN, THUMB_MAX = 256, 16, 1024
THUMB_CACHE = 512                    # thumbnails kept in memory (a few MB)
_LABEL = re.compile(r"[0-9]{1,18}")
_SIZE = re.compile(r"[0-9]{1,5}")
_CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                  ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml",
                  ".png": "image/png", ".ico": "image/x-icon", ".json": "application/json"}
_SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": ("default-src 'self'; img-src 'self' data: blob:; "
                                "style-src 'self'; script-src 'self'; frame-ancestors 'none'"),
}


class ServeError(StbirInferError):
    """The server cannot start (address in use, no index yet...). Exit status 2."""


class HTTPError(Exception):
    """A request the server refuses: ``status`` and a one-line ``message`` for the client."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status = int(status)
        self.message = message
        self.headers = dict(headers or {})


@dataclass
class Response:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: dict = field(default_factory=dict)
    close: bool = False  # close the connection afterwards (the request body was not read)


def json_response(data, status: int = 200, **kw) -> Response:
    body = json.dumps(data, ensure_ascii=False).encode("utf-8")
    return Response(status, body, "application/json; charset=utf-8", **kw)


def error_response(status: int, message: str, **kw) -> Response:
    return json_response({"error": message, "status": int(status)}, status, **kw)


# -- request bodies -----------------------------------------------------------------------------

def _media_type(content_type: str) -> str:
    return content_type.split(";", 1)[0].strip().lower()


def parse_multipart(body: bytes, content_type: str) -> dict[str, tuple[str | None, bytes]]:
    """multipart/form-data -> {field: (filename or None, bytes)} (email.parser: the stdlib's
    MIME parser, which keeps binary parts byte-exact)."""
    from email import policy
    from email.parser import BytesParser

    if "boundary=" not in content_type.lower():
        raise HTTPError(400, "multipart body without a boundary")
    try:
        head = b"Content-Type: " + content_type.encode("latin-1") + b"\r\nMIME-Version: 1.0\r\n\r\n"
    except UnicodeEncodeError:
        raise HTTPError(400, "bad Content-Type header") from None
    msg = BytesParser(policy=policy.HTTP).parsebytes(head + body)
    if not msg.is_multipart() or msg.defects:
        raise HTTPError(400, "malformed multipart body")
    fields: dict[str, tuple[str | None, bytes]] = {}
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not name:
            raise HTTPError(400, "multipart part without a field name")
        if name in fields:
            raise HTTPError(400, f"field {name!r} given twice")
        fields[str(name)] = (part.get_filename(), part.get_payload(decode=True) or b"")
    return fields


def decode_sketch(data: bytes) -> Image.Image:
    """Image file bytes -> a decoded PIL image; 400 for empty, unreadable or huge images."""
    if not data:
        raise HTTPError(400, "sketch: empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if img.width * img.height > MAX_SKETCH_PIXELS:
                raise HTTPError(400, f"sketch: {img.width}x{img.height} pixels is too large "
                                     f"(at most {MAX_SKETCH_PIXELS:,} pixels)")
            img.load()
    except HTTPError:
        raise
    except UnidentifiedImageError:
        raise HTTPError(400, "sketch: not an image (PNG, JPEG, WebP... expected)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as exc:
        detail = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise HTTPError(400, f"sketch: not a readable image ({detail})") from None
    return img


def _parse_top_k(value, max_top_k: int, default: int = 10) -> int:
    if value is None or value == "":
        return default
    if isinstance(value, str):
        if not re.fullmatch(r"\s*[0-9]{1,9}\s*", value):
            raise HTTPError(400, f"top_k must be an integer between 1 and {max_top_k}, not {value!r}")
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= max_top_k:
        raise HTTPError(400, f"top_k must be an integer between 1 and {max_top_k}, not {value!r}")
    return value


def _utf8(name: str, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise HTTPError(400, f"{name}: not UTF-8 text") from None


@dataclass
class Query:
    sketch: Image.Image | None
    text: str | None
    top_k: int


# -- the application ----------------------------------------------------------------------------

class App:
    """Routes requests to a ``Searcher``; independent of the socket layer (``handle`` takes the
    method, the raw request target, the headers and a function that reads n body bytes)."""

    def __init__(self, searcher, *, max_body: int = DEFAULT_MAX_BODY,
                 max_top_k: int = DEFAULT_MAX_TOP_K, static_dir: str | Path = STATIC_DIR,
                 max_concurrent: int = 2, allowed_hosts: set[str] | None = None, log=None):
        self.searcher = searcher
        self.max_body = int(max_body)
        self.max_top_k = int(max_top_k)
        self.allowed_hosts = allowed_hosts  # None: any Host header
        self.log = log or (lambda line: None)
        self.static = self._load_static(Path(static_dir))
        self._thumbs: OrderedDict = OrderedDict()
        self._thumbs_lock = threading.Lock()
        # Encoder runs at once: more only oversubscribe the cores (onnxruntime threads each run).
        self._query_slots = threading.BoundedSemaphore(max(1, int(max_concurrent)))

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
        """Open every encoder once (so the first query is not slow and sessions open in one thread)."""
        enc = self.searcher.encoders
        enc.query_vector(sketch=Image.new("L", (64, 64), 255), text="warm up")

    # -- dispatch ---------------------------------------------------------------------------------
    def handle(self, method: str, target: str, headers, read_body) -> Response:
        try:
            return self._route(method, target, headers, read_body)
        except HTTPError as exc:
            return error_response(exc.status, exc.message, headers=exc.headers,
                                  close=exc.status in (411, 413))
        except QueryError as exc:
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
            return self.query(self._read_query(headers, read_body))
        if path == "/api/health":
            self._allow(method, "GET", "HEAD")
            return self.health()
        if path.startswith("/api/image/"):
            self._allow(method, "GET", "HEAD")
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
        name = (host or "").strip().lower()
        if name.startswith("["):
            name = name[1:].split("]", 1)[0]
        elif name.count(":") == 1:
            name = name.split(":", 1)[0]
        if name not in self.allowed_hosts:
            raise HTTPError(403, f"Host {host!r} is not served here (this server answers "
                                 "only to localhost; start it with --host to change that)")

    # -- routes -----------------------------------------------------------------------------------
    def _static(self, name: str) -> Response:
        entry = self.static.get(name)
        if entry is None:
            raise HTTPError(404, f"not found: /static/{name[:200]}")
        body, ctype = entry
        return Response(200, body, ctype, {"Cache-Control": "no-cache"})

    def _gallery(self):
        # The live GalleryIndex (Searcher reloads it when an enroll has committed a new one).
        idx = self.searcher.current_index()
        if idx is None:
            raise IndexNotFoundError(f"{self.searcher.index_dir}: no index here yet")
        return idx

    def health(self) -> Response:
        idx = self._gallery()
        enc = self.searcher.encoders
        return json_response({
            "status": "ok", "images": len(idx), "files": len(idx.files),
            "model": {"fingerprint": enc.fingerprint, "clip_model": enc.clip_model,
                      "embed_dim": enc.embed_dim, "fusion_weight": enc.fusion_weight,
                      "precision": enc.precision},
            "limits": {"max_body": self.max_body, "max_top_k": self.max_top_k,
                       "thumbnail_max": THUMB_MAX},
        }, headers={"Cache-Control": "no-store"})

    def _read_query(self, headers, read_body) -> Query:
        if (headers.get("Transfer-Encoding") or "").lower() not in ("", "identity"):
            raise HTTPError(411, "send the body with a Content-Length (chunked is not supported)")
        length = headers.get("Content-Length")
        if length is None or not re.fullmatch(r"[0-9]{1,15}", length.strip()):
            raise HTTPError(411, "a query needs a Content-Length header")
        length = int(length)
        if length > self.max_body:
            raise HTTPError(413, f"request body of {length:,} bytes is over the "
                                 f"{self.max_body:,}-byte limit")
        try:
            body = read_body(length)
        except OSError:  # the client went away or stalled (socket timeout)
            raise HTTPError(400, "the request body did not arrive") from None
        if len(body) != length:
            raise HTTPError(400, "request body shorter than its Content-Length")
        ctype = headers.get("Content-Type") or ""
        media = _media_type(ctype)
        if media == "multipart/form-data":
            return self._query_from_form(parse_multipart(body, ctype))
        if media == "application/json":
            return self._query_from_json(body)
        if media == "application/x-www-form-urlencoded":
            try:
                pairs = parse_qs(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False)
            except UnicodeDecodeError:
                raise HTTPError(400, "form body is not UTF-8") from None
            if "sketch" in pairs:
                raise HTTPError(400, "send a sketch as multipart/form-data or as base64 in JSON")
            fields = {}
            for k, v in pairs.items():
                if len(v) > 1:
                    raise HTTPError(400, f"field {k!r} given twice")
                fields[k] = (None, v[0].encode("utf-8"))
            return self._query_from_form(fields)
        raise HTTPError(415, f"Content-Type {media or '(none)'!r} is not supported: send "
                             "multipart/form-data or application/json")

    def _query_from_form(self, fields: dict[str, tuple[str | None, bytes]]) -> Query:
        unknown = sorted(set(fields) - {"sketch", "text", "top_k"})
        if unknown:
            raise HTTPError(400, f"unknown field(s) {', '.join(unknown)} (expected sketch, text, top_k)")
        sketch = None
        if "sketch" in fields:
            filename, data = fields["sketch"]
            if data or filename:  # an empty file input sends a part with no filename and no data
                sketch = decode_sketch(data)
        text = _utf8("text", fields["text"][1]) if "text" in fields else None
        top_k = _parse_top_k(_utf8("top_k", fields["top_k"][1]) if "top_k" in fields else None,
                             self.max_top_k)
        return Query(sketch, text, top_k)

    def _query_from_json(self, body: bytes) -> Query:
        try:
            data = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise HTTPError(400, f"body is not valid JSON ({str(exc).splitlines()[0][:120]})") from None
        if not isinstance(data, dict):
            raise HTTPError(400, 'JSON body must be an object: {"text": ..., "sketch": ..., "top_k": ...}')
        unknown = sorted(set(data) - {"sketch", "text", "top_k"})
        if unknown:
            raise HTTPError(400, f"unknown key(s) {', '.join(unknown)} (expected sketch, text, top_k)")
        text = data.get("text")
        if text is not None and not isinstance(text, str):
            raise HTTPError(400, f"text must be a string, not {type(text).__name__}")
        sketch = data.get("sketch")
        if sketch is not None:
            if not isinstance(sketch, str):
                raise HTTPError(400, "sketch must be a base64 string (PNG or JPEG bytes, or a data: URL)")
            if sketch.startswith("data:"):
                sketch = sketch.split(",", 1)[1] if "," in sketch else ""
            try:
                raw = base64.b64decode(sketch, validate=True)
            except (binascii.Error, ValueError):
                raise HTTPError(400, "sketch is not valid base64") from None
            sketch = decode_sketch(raw)
        return Query(sketch, text, _parse_top_k(data.get("top_k"), self.max_top_k))

    def query(self, q: Query) -> Response:
        has_text = q.text is not None and bool(q.text.strip())
        if q.sketch is None and not has_text:
            raise HTTPError(400, "a query needs a sketch, a text or both")
        with self._query_slots:
            t0 = time.perf_counter()
            hits = self.searcher.query(sketch=q.sketch, text=q.text if has_text else None,
                                       top_k=q.top_k)
            took = (time.perf_counter() - t0) * 1000
        files = self._gallery().files
        results = []
        for h in hits:
            rec = files.get(h.path)
            label = int(rec["label"]) if rec is not None else None
            d = h.to_dict()
            d.update(name=Path(h.path).name, id=label,
                     image=f"/api/image/{label}" if label is not None else None)
            results.append(d)
        fused = q.sketch is not None and has_text
        return json_response({
            "query": {"text": q.text if has_text else None, "sketch": q.sketch is not None,
                      "top_k": q.top_k,
                      "fusion_weight": self.searcher.fusion_weight if fused else None},
            "model": self.searcher.encoders.fingerprint,
            "count": len(results), "took_ms": round(took, 2), "results": results,
        }, headers={"Cache-Control": "no-store"})

    def image(self, label: str, size: str | None, if_none_match: str | None = None) -> Response:
        if not _LABEL.fullmatch(label):
            raise HTTPError(404, "no such image (images are addressed by their index id)")
        if size is None:
            size = THUMB_DEFAULT
        elif _SIZE.fullmatch(size) and THUMB_MIN <= int(size) <= THUMB_MAX:
            size = int(size)
        else:
            raise HTTPError(400, f"size must be an integer between {THUMB_MIN} and {THUMB_MAX}")
        idx = self._gallery()
        label_i = int(label)
        sha = idx.items.get(label_i)
        paths = idx.paths.get(label_i) or []
        if sha is None or not paths:
            raise HTTPError(404, f"no image with id {label} in the index")
        etag = f'"{sha[:32]}-{size}"'
        headers = {"ETag": etag, "Cache-Control": "private, max-age=3600"}
        if if_none_match and etag in if_none_match:
            return Response(304, b"", "image/jpeg", headers)
        key = (label_i, size)
        with self._thumbs_lock:
            body = self._thumbs.get(key)
            if body is not None:
                self._thumbs.move_to_end(key)
        if body is None:
            body = self._thumbnail(paths, size, label)
            with self._thumbs_lock:
                self._thumbs[key] = body
                while len(self._thumbs) > THUMB_CACHE:
                    self._thumbs.popitem(last=False)
        return Response(200, body, "image/jpeg", headers)

    @staticmethod
    def _thumbnail(paths: list[str], size: int, label: str) -> bytes:
        from PIL import ImageOps

        for p in paths:  # the same content may sit at several paths; any readable one will do
            try:
                with Image.open(p) as im:
                    im.draft("RGB", (size, size))  # JPEG: decode at reduced scale
                    im = ImageOps.exif_transpose(im)
                    im.thumbnail((size, size), Image.Resampling.LANCZOS)
                    if im.mode in ("RGBA", "LA", "P") or "transparency" in im.info:
                        rgba = im.convert("RGBA")
                        im = Image.new("RGB", rgba.size, (255, 255, 255))
                        im.paste(rgba, mask=rgba.getchannel("A"))
                    else:
                        im = im.convert("RGB")
                    buf = io.BytesIO()
                    im.save(buf, "JPEG", quality=85)
                    return buf.getvalue()
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
                continue
        raise HTTPError(404, f"image {label} is in the index but its file is gone or unreadable "
                             "(run enroll again)")


# -- the socket layer ---------------------------------------------------------------------------

class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 60  # seconds a connection may sit idle (or stall mid-request) before it is closed

    def version_string(self) -> str:
        return "stbir-infer"

    def _dispatch(self, method: str, send_body: bool = True) -> None:
        app: App = self.server.app
        consumed = 0

        def read_body(n: int) -> bytes:
            nonlocal consumed
            data = self.rfile.read(n)
            consumed += len(data)
            return data

        resp = app.handle(method, self.path, self.headers, read_body)
        length = self.headers.get("Content-Length", "0").strip()
        if (self.headers.get("Transfer-Encoding") or not re.fullmatch(r"[0-9]{1,15}", length)
                or int(length) > consumed):
            resp.close = True  # a body we did not read may still be on the wire
        try:
            self.send_response(resp.status)
            self.send_header("Content-Type", resp.content_type)
            self.send_header("Content-Length", str(len(resp.body)))
            for k, v in {**_SECURITY_HEADERS, **resp.headers}.items():
                self.send_header(k, v)
            if resp.close:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            if send_body and resp.status not in (204, 304):
                self.wfile.write(resp.body)
        except OSError:  # the client closed the connection (e.g. the page aborted a search)
            self.close_connection = True

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD", send_body=False)

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_DELETE(self):
        self._dispatch("DELETE")

    def log_message(self, format, *args):
        self.server.app.log(f"{self.address_string()} - {format % args}")


class Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, address, app: App):
        self.app = app
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)

    def handle_error(self, request, client_address):
        # One line, not socketserver's traceback: a client that drops a connection is routine.
        exc = sys.exc_info()[1]
        self.app.log(f"{client_address[0]} - connection error: {type(exc).__name__}: {exc}")

    def server_bind(self):
        # HTTPServer.server_bind looks up the host's FQDN, which can hang without DNS.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{port}/"


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


LOOPBACK_HOSTS = {"localhost", "127.0.0.1", "::1"}


def make_server(app: App, host: str = "127.0.0.1", port: int = 8000) -> Server:
    """Bind (port 0: any free port). On a loopback address, requests must name a loopback Host."""
    if is_loopback(host) and app.allowed_hosts is None:
        app.allowed_hosts = set(LOOPBACK_HOSTS)
    try:
        return Server((host, port), app)
    except OSError as exc:
        raise ServeError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def serve(model_dir, index_dir, *, host: str = "127.0.0.1", port: int = 8000,
          threads: int | None = None, precision: str = "fp32", max_body: int = DEFAULT_MAX_BODY,
          quiet: bool = False, echo=None) -> None:
    """Load the export and the index once, then answer until interrupted (the CLI's ``serve``)."""
    from stbir_infer import index as _index
    from stbir_infer.searcher import Searcher

    echo = echo or (lambda line: print(line, file=sys.stderr, flush=True))
    searcher = Searcher(model_dir, index_dir, threads=threads, precision=precision)
    if not _index.exists(index_dir):
        raise ServeError(f"{index_dir}: no index here yet (run `stbir-infer enroll --images DIR "
                         f"--index {index_dir}` first)")
    app = App(searcher, max_body=max_body, log=None if quiet else echo)
    app.warm_up()
    server = make_server(app, host, port)
    if not is_loopback(host):
        echo(f"stbir-infer: warning: listening on {host}: anyone who can reach this machine can "
             "search the gallery and view its photos")
    n = len(app._gallery())
    echo(f"stbir-infer: serving {n} image{'s' if n != 1 else ''} at {server.url} (Ctrl+C to stop)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        echo("stbir-infer: stopped")
    finally:
        server.server_close()


__all__ = ["App", "DEFAULT_MAX_BODY", "HTTPError", "Response", "ServeError", "Server",
           "make_server", "parse_multipart", "serve"]
