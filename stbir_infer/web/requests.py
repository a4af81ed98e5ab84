"""Request parsing for ``stbir-infer serve``: bytes and headers in, a ``Query`` or an ``HTTPError``.

Nothing here knows about sockets, WSGI or the searcher. Every refusal is an ``HTTPError`` with a
status and a one-line message that is safe to show (short, printable, valid UTF-8): hostile input
(deep JSON, lone surrogates, wrong types, megabytes of text, extreme image shapes) is a 4xx here,
never a 500 further down.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import re
import warnings
from urllib.parse import parse_qs, urlsplit

from PIL import Image, UnidentifiedImageError

from stbir_infer.errors import QueryError
from stbir_infer.query_spec import KEYS, MAX_TEXT_CHARS, QuerySpec, check_text, check_top_k
from stbir_infer.web import multipart

DEFAULT_MAX_BODY = 10 << 20          # bytes of a request body (a photographed paper sketch fits)
DEFAULT_MAX_TOP_K = 200
MAX_SKETCH_PIXELS = 25_000_000       # a sketch larger than this is refused before it is decoded
MAX_SKETCH_ASPECT = 20               # longest side / shortest side: a 1x100000 strip is refused
FIELDS = KEYS                        # the query's parts (``query_spec``), nothing else


class HTTPError(Exception):
    """A request the server refuses: ``status`` and a one-line ``message`` for the client."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status = int(status)
        self.message = one_line(message, 300)
        self.headers = dict(headers or {})


Query = QuerySpec  # what read_query returns


def one_line(text: str, limit: int = 80) -> str:
    """``text`` on one printable line of at most ``limit`` characters (lone surrogates as \\uXXXX)."""
    text = str(text).encode("utf-8", "backslashreplace").decode("utf-8")
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def short_repr(value, limit: int = 40) -> str:
    """A client's value in an error message: strings and numbers as written, containers by type
    (the repr of a 100,000-deep list is itself a RecursionError)."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return one_line(repr(value), limit)
    return f"a JSON {'array' if isinstance(value, list) else 'object'}"


def media_type(content_type: str) -> str:
    return content_type.split(";", 1)[0].strip().lower()


# -- headers ------------------------------------------------------------------------------------

def content_length(headers, max_body: int) -> int:
    """The body size the headers announce; 411 without one, 413 over ``max_body``."""
    if (headers.get("Transfer-Encoding") or "").lower() not in ("", "identity"):
        raise HTTPError(411, "send the body with a Content-Length (chunked is not supported)")
    length = headers.get("Content-Length")
    if length is None or not re.fullmatch(r"[0-9]{1,15}", length.strip()):
        raise HTTPError(411 if length is None else 400,
                        "a query needs one Content-Length header with a byte count")
    length = int(length)
    if length > max_body:
        raise HTTPError(413, f"request body of {length:,} bytes is over the {max_body:,}-byte limit")
    return length


def _host_port(netloc: str, default_port: int) -> tuple[str, int] | None:
    """("host", port) of a Host header or an origin's netloc; None when malformed."""
    try:
        parts = urlsplit("//" + netloc.strip())
        return (parts.hostname or "").lower(), parts.port or default_port
    except ValueError:
        return None


def check_origin(headers) -> None:
    """A POST from a browser page must come from a page of this server: its ``Origin`` must name
    the host the request was sent to (the ``Host`` header). No Origin header: not a browser's
    cross-origin request (curl, scripts), allowed. ``Origin: null`` (a sandboxed frame or a
    file:// page) and any other site are 403: a page elsewhere cannot make this server work."""
    origin = headers.get("Origin")
    if origin is None:
        return
    host = headers.get("Host")
    try:
        parts = urlsplit(origin.strip())
    except ValueError:
        parts = None
    if parts is not None and parts.scheme in ("http", "https") and parts.netloc and host:
        default = 443 if parts.scheme == "https" else 80
        ours = _host_port(host, default)
        theirs = _host_port(parts.netloc, default)
        if ours is not None and ours == theirs and ours[0]:
            return
    raise HTTPError(403, f"cross-origin request from {one_line(origin, 80)!r} refused: "
                         "queries are accepted only from this server's own page")


# -- bodies -------------------------------------------------------------------------------------

def parse_multipart(body: bytes, content_type: str) -> dict[str, tuple[str | None, bytes]]:
    """multipart/form-data -> {field: (filename or None, bytes)} (``web.multipart``: one linear
    pass, at most ``multipart.MAX_PARTS`` parts, parts byte-exact)."""
    try:
        parts = multipart.parse(body, content_type)
    except multipart.MultipartError as exc:
        raise HTTPError(400, str(exc)) from None
    fields: dict[str, tuple[str | None, bytes]] = {}
    for name, filename, data in parts:
        if not name:
            raise HTTPError(400, "multipart part without a field name")
        if name in fields:
            raise HTTPError(400, f"field {short_repr(name)} given twice")
        fields[name] = (filename, data)
    return fields


def decode_image(data: bytes, name: str = "sketch") -> Image.Image:
    """Image file bytes -> a decoded PIL image; 400 for empty, unreadable, huge or extreme-shaped
    images. The size is read from the file's header and checked *before* the pixels are decoded;
    the shape check keeps a 1 x 100,000 strip from costing hundreds of MB in the resize."""
    if not data:
        raise HTTPError(400, f"{name}: empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w < 1 or h < 1 or w * h > MAX_SKETCH_PIXELS:
                raise HTTPError(400, f"{name}: {w}x{h} pixels is too large "
                                     f"(at most {MAX_SKETCH_PIXELS:,} pixels)")
            if max(w, h) > MAX_SKETCH_ASPECT * min(w, h):
                raise HTTPError(400, f"{name}: {w}x{h} pixels is too elongated (the longer side "
                                     f"may be at most {MAX_SKETCH_ASPECT}x the shorter)")
            img.load()
    except HTTPError:
        raise
    except UnidentifiedImageError:
        raise HTTPError(400, f"{name}: not an image (PNG, JPEG, WebP... expected)") from None
    except (OSError, SyntaxError, ValueError, TypeError, EOFError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as exc:
        detail = str(exc).splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise HTTPError(400, f"{name}: not a readable image ({detail})") from None
    return img


def decode_sketch(data: bytes) -> Image.Image:
    return decode_image(data, "sketch")


def _spec(**parts) -> QuerySpec:
    """The query checked by ``QuerySpec`` (its one-line refusal as a 400)."""
    try:
        return QuerySpec.parse(**parts)
    except QueryError as exc:
        raise HTTPError(400, str(exc)) from None


def _from_form(value: str | None, pattern: str, convert):
    """A form field's string as the number it spells (other strings as they are, for
    ``QuerySpec`` to refuse); blank or absent: None."""
    if value is None or value.strip() == "":
        return None
    if re.fullmatch(pattern, value.strip()):
        try:
            return convert(value.strip())
        except ValueError:
            return value
    return value


_INT = r"[0-9]{1,9}"
_FLOAT = r"[-+]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?"


def parse_top_k(value, max_top_k: int, default: int = 10) -> int:
    if value is None or (isinstance(value, str) and value == ""):
        return default
    if isinstance(value, str):
        value = _from_form(value, _INT, int)
    try:
        return check_top_k(value, max_top_k)
    except QueryError as exc:
        raise HTTPError(400, str(exc)) from None


def parse_text(value) -> str | None:
    """The query text (``query_spec.check_text``); blank is None."""
    try:
        return check_text(value)
    except QueryError as exc:
        raise HTTPError(400, str(exc)) from None


def parse_where(value) -> list[str] | dict | None:
    """``where``: "key=value" lines (a form field) or a JSON list / object, as ``--where``."""
    if isinstance(value, str):
        return [line for line in value.splitlines() if line.strip()]
    return value


def _utf8(name: str, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise HTTPError(400, f"{name}: not UTF-8 text") from None


def _unknown(names, what: str) -> None:
    unknown = sorted(set(names) - set(FIELDS))
    if unknown:
        listed = ", ".join(n if re.fullmatch(r"[\w.-]{1,30}", n, re.ASCII) else short_repr(n, 30)
                           for n in unknown[:5])
        raise HTTPError(400, f"unknown {what}(s) {listed} (expected {', '.join(FIELDS)})")


def query_from_form(fields: dict[str, tuple[str | None, bytes]], max_top_k: int) -> QuerySpec:
    _unknown(fields, "field")
    images, sha = {}, None
    for name in ("sketch", "image"):
        if name in fields:
            filename, data = fields[name]
            if data or filename:  # an empty file input sends a part with no filename and no data
                images[name] = decode_image(data, name)
                if name == "image":
                    sha = hashlib.sha256(data).hexdigest()
    text = {k: _utf8(k, fields[k][1]) if k in fields else None
            for k in ("text", "top_k", "sketch_weight", "image_weight", "min_score", "like",
                      "where")}
    return _spec(**images, image_sha256=sha, text=parse_text(text["text"]),
                 top_k=parse_top_k(text["top_k"], max_top_k),
                 sketch_weight=_from_form(text["sketch_weight"], _FLOAT, float),
                 image_weight=_from_form(text["image_weight"], _FLOAT, float),
                 min_score=text["min_score"] or None, like=_from_form(text["like"], _INT, int),
                 where=parse_where(text["where"]), max_top_k=max_top_k)


def query_from_urlencoded(body: bytes, max_top_k: int) -> Query:
    try:
        pairs = parse_qs(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False,
                         errors="strict", max_num_fields=16)
    except UnicodeDecodeError:
        raise HTTPError(400, "form body is not UTF-8") from None
    except ValueError:
        raise HTTPError(400, "form body has too many fields") from None
    if "sketch" in pairs:
        raise HTTPError(400, "send a sketch as multipart/form-data or as base64 in JSON")
    fields: dict[str, tuple[str | None, bytes]] = {}
    for k, v in pairs.items():
        if len(v) > 1:
            raise HTTPError(400, f"field {short_repr(k)} given twice")
        try:
            fields[k] = (None, v[0].encode("utf-8"))
        except UnicodeEncodeError:  # %ED%A0%80: a percent-encoded lone surrogate
            raise HTTPError(400, f"field {short_repr(k)} is not valid UTF-8") from None
    return query_from_form(fields, max_top_k)


def _base64_image(value, name: str) -> tuple[Image.Image, bytes]:
    if not isinstance(value, str):
        raise HTTPError(400, f"{name} must be a base64 string (PNG or JPEG bytes, or a data: URL)")
    if value.startswith("data:"):
        value = value.split(",", 1)[1] if "," in value else ""
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise HTTPError(400, f"{name} is not valid base64") from None
    return decode_image(raw, name), raw


def query_from_json(body: bytes, max_top_k: int) -> QuerySpec:
    try:
        data = json.loads(body.decode("utf-8"))
    except RecursionError:
        raise HTTPError(400, "body is not valid JSON (nested too deeply)") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise HTTPError(400, f"body is not valid JSON ({one_line(str(exc), 120)})") from None
    if not isinstance(data, dict):
        raise HTTPError(400, 'JSON body must be an object: {"text": ..., "sketch": ..., "top_k": ...}')
    _unknown(data, "key")
    parts = {k: data.get(k) for k in KEYS}
    parts["text"] = parse_text(parts["text"])
    parts["top_k"] = parse_top_k(parts["top_k"], max_top_k)
    parts["where"] = parse_where(parts["where"])
    sha = None
    for name in ("sketch", "image"):
        if parts[name] is not None:
            parts[name], raw = _base64_image(parts[name], name)
            if name == "image":
                sha = hashlib.sha256(raw).hexdigest()
    return _spec(**parts, image_sha256=sha, max_top_k=max_top_k)


def read_query(headers, read_body, *, max_body: int = DEFAULT_MAX_BODY,
               max_top_k: int = DEFAULT_MAX_TOP_K) -> Query:
    """The whole POST /api/query parse: Origin, Content-Length, body, Content-Type, fields.
    ``read_body(n)`` returns up to n bytes of the body (OSError: the client went away)."""
    check_origin(headers)
    length = content_length(headers, max_body)
    try:
        body = read_body(length)
    except OSError:  # the client went away or stalled (socket timeout)
        raise HTTPError(400, "the request body did not arrive") from None
    if len(body) != length:
        raise HTTPError(400, "request body shorter than its Content-Length")
    ctype = headers.get("Content-Type") or ""
    media = media_type(ctype)
    if media == "multipart/form-data":
        q = query_from_form(parse_multipart(body, ctype), max_top_k)
    elif media == "application/json":
        q = query_from_json(body, max_top_k)
    elif media == "application/x-www-form-urlencoded":
        q = query_from_urlencoded(body, max_top_k)
    else:
        raise HTTPError(415, f"Content-Type {one_line(media or '(none)', 60)!r} is not supported: "
                             "send multipart/form-data or application/json")
    return q


__all__ = ["DEFAULT_MAX_BODY", "DEFAULT_MAX_TOP_K", "HTTPError", "MAX_SKETCH_ASPECT",
           "MAX_SKETCH_PIXELS", "MAX_TEXT_CHARS", "Query", "check_origin", "content_length",
           "decode_image", "decode_sketch", "one_line", "parse_multipart", "parse_text",
           "parse_top_k", "read_query"]
