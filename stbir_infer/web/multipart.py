"""multipart/form-data bodies of ``POST /api/query``, parsed in one linear pass with caps.

The stdlib's MIME parser (``email.parser``) cost about 3.6 s of CPU per MB on a body of 40,000
tiny parts (issue 26; 8 such requests held every worker thread and a normal query waited 68.6 s).
A query has at most ``MAX_PARTS`` fields, so this parser walks the body once with ``bytes.find``
for the delimiter, refuses the body as soon as it holds more parts than that, and reads at most
``MAX_PART_HEADERS`` header lines of at most ``MAX_HEADER_BYTES`` bytes per part. Part bodies are
kept byte-exact (RFC 7578: no transfer encoding; CRLF before each delimiter belongs to it).
"""

from __future__ import annotations

import re

MAX_PARTS = 8            # a query has five fields (requests.FIELDS); a few more are refused there
MAX_PART_HEADERS = 8     # header lines in one part
MAX_HEADER_BYTES = 4096  # bytes of one part's headers
_BOUNDARY = re.compile(r"""boundary\s*=\s*(?:"([^"]{1,70})"|([^\s;,"]{1,70}))""", re.I)
_PARAM = re.compile(r"""\s*([A-Za-z*]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^;]*))\s*(?:;|$)""")


class MultipartError(ValueError):
    """A body this parser refuses; the message is short and safe to show."""


def boundary_of(content_type: str) -> bytes:
    m = _BOUNDARY.search(content_type)
    if m is None:
        raise MultipartError("multipart body without a boundary")
    try:
        return (m.group(1) or m.group(2)).encode("ascii")
    except UnicodeEncodeError:
        raise MultipartError("multipart boundary is not ASCII") from None


def _disposition(value: str) -> tuple[str | None, str | None]:
    """(name, filename) of a ``Content-Disposition: form-data; ...`` header value."""
    kind, _, rest = value.partition(";")
    if kind.strip().lower() != "form-data":
        raise MultipartError("multipart part that is not form-data")
    params: dict[str, str] = {}
    pos = 0
    while pos < len(rest):
        m = _PARAM.match(rest, pos)
        if m is None or m.end() == pos:
            raise MultipartError("malformed Content-Disposition in a multipart part")
        quoted = m.group(2)
        params[m.group(1).lower()] = (re.sub(r"\\(.)", r"\1", quoted) if quoted is not None
                                      else m.group(3).strip())
        pos = m.end()
    return params.get("name"), params.get("filename")


def _headers(block: bytes) -> tuple[str | None, str | None]:
    if len(block) > MAX_HEADER_BYTES:
        raise MultipartError(f"multipart part headers over {MAX_HEADER_BYTES} bytes")
    lines = block.split(b"\r\n")
    if len(lines) > MAX_PART_HEADERS:
        raise MultipartError(f"more than {MAX_PART_HEADERS} headers in a multipart part")
    disposition = None
    for line in lines:
        key, sep, value = line.partition(b":")
        if not sep:
            raise MultipartError("malformed header in a multipart part")
        key = key.strip().lower()
        if key == b"content-disposition":
            disposition = value.decode("utf-8", "replace").strip()
        elif key == b"content-transfer-encoding" and value.strip().lower() not in (
                b"binary", b"8bit", b"7bit"):
            raise MultipartError("multipart part with a transfer encoding (not supported)")
    if disposition is None:
        raise MultipartError("multipart part without a Content-Disposition")
    return _disposition(disposition)


def parse(body: bytes, content_type: str) -> list[tuple[str | None, str | None, bytes]]:
    """[(field name, filename, bytes)] of each part, in order (see the module docstring)."""
    delimiter = b"--" + boundary_of(content_type)
    if body.startswith(delimiter):
        pos = len(delimiter)
    else:  # a preamble: the first delimiter starts a line
        at = body.find(b"\r\n" + delimiter)
        if at < 0:
            raise MultipartError("malformed multipart body (no boundary line)")
        pos = at + 2 + len(delimiter)
    parts: list[tuple[str | None, str | None, bytes]] = []
    while True:
        if body.startswith(b"--", pos):
            return parts  # the close delimiter (an epilogue after it is ignored)
        eol = body.find(b"\r\n", pos, pos + 256)  # transport padding, then CRLF
        if eol < 0 or body[pos:eol].strip(b" \t"):
            raise MultipartError("malformed multipart body (bad boundary line)")
        if len(parts) == MAX_PARTS:
            raise MultipartError(f"multipart body with more than {MAX_PARTS} parts")
        head_end = body.find(b"\r\n\r\n", eol + 2, eol + 2 + MAX_HEADER_BYTES + 4)
        if head_end < 0:
            raise MultipartError("malformed multipart body (part headers do not end)")
        name, filename = _headers(body[eol + 2:head_end])
        end = body.find(b"\r\n" + delimiter, head_end + 4)
        if end < 0:
            raise MultipartError("malformed multipart body (no closing boundary)")
        parts.append((name, filename, body[head_end + 4:end]))
        pos = end + 2 + len(delimiter)


__all__ = ["MAX_PARTS", "MultipartError", "boundary_of", "parse"]
