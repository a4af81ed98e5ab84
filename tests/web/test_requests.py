"""stbir_infer.web.requests: request parsing without a server or a model (multipart, sketches,
top_k, text, Origin)."""

from __future__ import annotations

import numpy as np
import pytest
from web_helpers import multipart, png_bytes

from stbir_infer.web.requests import (
    MAX_TEXT_CHARS,
    HTTPError,
    check_origin,
    decode_sketch,
    parse_multipart,
    parse_text,
    parse_top_k,
)


def test_multipart_keeps_binary_parts_exact():
    rng = np.random.default_rng(0)
    for n in (0, 1, 2, 100, 4096):
        data = rng.bytes(n) + b"\r\n--\r\n\r\n\n\r" + rng.bytes(n)
        ctype, body = multipart({"text": "héllo\r\nwörld"}, {"sketch": ("s.png", data, "image/png")})
        fields = parse_multipart(body, ctype)
        assert fields["sketch"] == ("s.png", data)
        assert fields["text"] == (None, "héllo\r\nwörld".encode())


def test_decode_sketch_checks_the_size_before_decoding():
    assert decode_sketch(png_bytes(40, 30)).size == (40, 30)
    for w, h in ((1, 100_000), (100_000, 1), (2000, 50)):
        with pytest.raises(HTTPError, match="too elongated") as err:
            decode_sketch(png_bytes(w, h))
        assert err.value.status == 400
    with pytest.raises(HTTPError, match="too large"):
        decode_sketch(png_bytes(6000, 5000, "1", 1))
    for data in (b"", b"not an image", png_bytes(10, 10)[:40]):
        with pytest.raises(HTTPError) as err:
            decode_sketch(data)
        assert err.value.status == 400 and err.value.message.startswith("sketch: ")


@pytest.mark.parametrize("value, expected", [(None, 10), ("", 10), ("7", 7), (" 12 ", 12), (200, 200)])
def test_top_k_accepted(value, expected):
    assert parse_top_k(value, 200) == expected


@pytest.mark.parametrize("value", [0, 201, -1, "x", "1e3", 2.0, True, [5], {"k": 5}, [[[]]], "9" * 50])
def test_top_k_refused(value):
    with pytest.raises(HTTPError) as err:
        parse_top_k(value, 200)
    assert err.value.status == 400 and "\n" not in err.value.message
    assert len(err.value.message) < 120


def test_text_rules():
    assert parse_text(None) is None and parse_text("   ") is None
    assert parse_text("a red star") == "a red star"
    assert parse_text("x" * MAX_TEXT_CHARS) == "x" * MAX_TEXT_CHARS
    for bad, message in (("x" * (MAX_TEXT_CHARS + 1), "at most"), ("a\ud800b", "surrogate"),
                         (5, "must be a string"), (["a"], "must be a string"),
                         ({"a": 1}, "must be a string")):
        with pytest.raises(HTTPError, match=message):
            parse_text(bad)


@pytest.mark.parametrize("origin, host", [
    (None, "127.0.0.1:8000"),
    ("http://127.0.0.1:8000", "127.0.0.1:8000"),
    ("http://LOCALHOST:8000", "localhost:8000"),
    ("http://[::1]:8000", "[::1]:8000"),
    ("http://photos.lan", "photos.lan:80"),
    ("https://photos.example", "photos.example"),
])
def test_same_origin_is_allowed(origin, host):
    headers = {"Host": host} if origin is None else {"Host": host, "Origin": origin}
    check_origin(headers)


@pytest.mark.parametrize("origin, host", [
    ("http://evil.example", "127.0.0.1:8000"),
    ("http://127.0.0.1:9999", "127.0.0.1:8000"),
    ("http://localhost:8000", "127.0.0.1:8000"),
    ("null", "127.0.0.1:8000"),
    ("file://", "127.0.0.1:8000"),
    ("http://127.0.0.1:8000", None),
    ("http://[::1", "127.0.0.1:8000"),
    ("\x00\ud800", "127.0.0.1:8000"),
])
def test_cross_origin_is_403(origin, host):
    headers = {"Origin": origin} if host is None else {"Host": host, "Origin": origin}
    with pytest.raises(HTTPError) as err:
        check_origin(headers)
    assert err.value.status == 403 and "\n" not in err.value.message
    err.value.message.encode("utf-8")
