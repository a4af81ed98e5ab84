"""Issue 26, item 4: multipart bodies parse in one linear pass with caps (the stdlib's MIME parser
took about 3.6 s of CPU per MB of a 40,000-part body; 8 such requests starved every query)."""

from __future__ import annotations

import time

import pytest
from web_helpers import multipart

from stbir_infer.web.multipart import MAX_PARTS, MultipartError, parse
from stbir_infer.web.requests import HTTPError, parse_multipart

CTYPE = "multipart/form-data; boundary=xyz"


def _many_parts(n: int) -> bytes:
    part = b'--xyz\r\nContent-Disposition: form-data; name="text"\r\n\r\na\r\n'
    return part * n + b"--xyz--\r\n"


def test_a_40000_part_body_is_refused_at_once():
    body = _many_parts(40_000)
    assert len(body) > 2_000_000
    t0 = time.process_time()
    with pytest.raises(HTTPError, match=f"more than {MAX_PARTS} parts") as err:
        parse_multipart(body, CTYPE)
    assert err.value.status == 400
    assert time.process_time() - t0 < 0.05  # was about 7 s of CPU


def test_a_large_part_full_of_near_boundaries_is_linear():
    data = (b"\r\n--xy\r\n--x" * 800_000)[:9_000_000]
    body = (b'--xyz\r\nContent-Disposition: form-data; name="sketch"; filename="s.png"\r\n\r\n'
            + data + b"\r\n--xyz--\r\n")
    t0 = time.process_time()
    fields = parse_multipart(body, CTYPE)
    assert fields["sketch"] == ("s.png", data)
    assert time.process_time() - t0 < 0.5


def test_fields_names_filenames_and_a_preamble():
    body = (b"preamble\r\n--xyz\r\nContent-Disposition: form-data; name=\"a\\\"b\"; "
            b"filename=\"x;y.png\"\r\nContent-Type: image/png\r\n\r\nDATA\r\n"
            b"--xyz  \r\nContent-Disposition: form-data; name=top_k\r\n\r\n5\r\n--xyz--epilogue")
    assert parse(body, 'multipart/form-data; boundary="xyz"') == [
        ('a"b', "x;y.png", b"DATA"), ("top_k", None, b"5")]


@pytest.mark.parametrize("body, words", [
    (b"--xyz\r\nContent-Disposition: form-data; name=a\r\n\r\nno end", "no closing boundary"),
    (b"--xyz\r\nContent-Disposition: form-data; name=a\r\nno blank line", "do not end"),
    (b"nothing here", "no boundary line"),
    (b"--xyz\r\nX-A: 1\r\n\r\nv\r\n--xyz--", "without a Content-Disposition"),
    (b"--xyz\r\nContent-Disposition: attachment; name=a\r\n\r\nv\r\n--xyz--", "not form-data"),
    (b"--xyz\r\n" + b"X: y\r\n" * 20 + b"Content-Disposition: form-data; name=a\r\n\r\nv\r\n--xyz--",
     "more than 8 headers"),
    (b"--xyz\r\nContent-Disposition: form-data; name=a\r\nContent-Transfer-Encoding: base64\r\n"
     b"\r\nv\r\n--xyz--", "transfer encoding"),
    (b"--xyzjunk\r\nContent-Disposition: form-data; name=a\r\n\r\nv\r\n--xyz--", "bad boundary"),
])
def test_malformed_bodies_are_refused_in_one_line(body, words):
    with pytest.raises(MultipartError, match=words):
        parse(body, CTYPE)


def test_a_browser_form_round_trips():
    ctype, body = multipart({"text": "a red star", "top_k": 3}, {"sketch": ("s.png", b"\x89PNG", "image/png")})
    assert parse_multipart(body, ctype) == {"text": (None, b"a red star"), "top_k": (None, b"3"),
                                            "sketch": ("s.png", b"\x89PNG")}
