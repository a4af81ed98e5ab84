"""``GET /api/image/<id>`` thumbnails, bounded per request and served only to this server's page.

Three rules (issue 26: a 49 MP 16-bit PNG cost +530 MB a request and 4.08 GB with 8 at once; a
page elsewhere could make the server decode with ``<img>``; a link swapped in after enroll was
served, and a FIFO blocked a worker):

- the file is served only while it still holds the content the index enrolled: it is opened once
  (a regular file, O_NONBLOCK: a FIFO or device is refused without blocking), hashed as a stream
  through that descriptor and decoded from it; a file whose sha256 differs is not shown;
- the decode is ``preprocess.open_image``'s: the size is read from the header first (more than
  ``preprocess.MAX_PIXELS`` is refused), a large JPEG decodes at reduced scale, a large or wide-mode image
  is converted in bands and box-reduced towards the thumbnail size; one decode at a time, on one
  thread, so the worst case is one decoded image, not one per worker thread;
- a browser request from another site is refused (``check_same_site``): ``Sec-Fetch-Site``
  other than same-origin / none, or an ``Origin`` / ``Referer`` naming another host. A request
  without those headers (curl, scripts) is not a browser's and is served.
"""

from __future__ import annotations

import io
import os
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

from PIL import Image

from stbir_infer import preprocess
from stbir_infer.scan import opened_if_sha, stamp
from stbir_infer.web.requests import HTTPError, check_origin, one_line

# Thumbnails are decoded one at a time, all on one thread: a decoded image of up to MAX_PIXELS
# at once, and its memory reused by the next (decoded on each worker thread, 8 thumbnails of a
# 49 MP 16-bit PNG grew the process by 554 MB even one at a time: each thread's malloc arena
# kept its own freed image).
_decoder = ThreadPoolExecutor(1, thread_name_prefix="stbir-thumbnail")


def check_same_site(headers) -> None:
    """403 for a browser's request made by a page of another site (see the module docstring)."""
    site = headers.get("Sec-Fetch-Site")
    if site is not None and site.strip().lower() not in ("same-origin", "none"):
        raise HTTPError(403, f"image requested by another site (Sec-Fetch-Site "
                             f"{one_line(site, 40)!r}): images are shown only on this server's page")
    check_origin(headers)
    referer = headers.get("Referer")
    if referer is not None:
        try:
            origin = "{0.scheme}://{0.netloc}".format(urlsplit(referer.strip()))
        except ValueError:
            origin = "null"
        check_origin({"Origin": origin, "Host": headers.get("Host")})


def thumbnail(paths: list[str], sha: str, size: int, label) -> bytes:
    """A JPEG, longest side ``size``, of the first of ``paths`` that still holds content ``sha``;
    HTTPError 404 when none does."""
    for path in paths:  # the same content may sit at several paths; any that still holds it
        with opened_if_sha(path, sha) as (f, before):
            if f is None:
                continue
            try:
                im = _decoder.submit(_decode, f, size).result()
            except (preprocess.ImageDecodeError, OSError, ValueError):
                continue
            if stamp(os.fstat(f.fileno())) != before:  # written to while we read it
                continue
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=85)
        return buf.getvalue()
    raise HTTPError(404, f"image {label} is in the index but no file holds its content any more "
                         "(changed, gone or unreadable: run enroll again)")


def _decode(f, size: int) -> Image.Image:
    """RGB, upright, alpha on white; short side kept >= ``size`` by the reduced decodes."""
    im = preprocess.open_image(f, 3, target=max(1, size // 2))
    im.thumbnail((size, size), Image.Resampling.LANCZOS)
    return im


__all__ = ["check_same_site", "thumbnail"]
