"""File names that are not valid UTF-8, or hold control characters: indexed and opened by their
real bytes, shown escaped (``paths.display``) in every CLI line and in JSON."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys

import pytest
from infer_helpers import make_photos

from stbir_infer.gallery import GalleryIndex
from stbir_infer.paths import display
from stbir_infer.searcher import Searcher

RAW = b"\xff\xfe.png"  # not UTF-8
CONTROL = "red\x1b[31m\nstar.png"  # an escape sequence and a newline


@pytest.fixture()
def odd_gallery(export_dir, tmp_path):
    photos = tmp_path.resolve() / "p"
    make_photos(photos, ["a.png", "b.png"])
    make_photos(tmp_path / "src", ["odd.png", "ctl.png"], seed=21)
    raw_path = os.path.join(os.fsencode(photos), RAW)
    try:
        shutil.copy(tmp_path / "src" / "odd.png", raw_path)
        shutil.copy(tmp_path / "src" / "ctl.png", photos / CONTROL)
    except (OSError, UnicodeError):
        pytest.skip("this file system refuses such names")
    (photos / "bad\x07name.txt").write_text("not a photo")
    idx = tmp_path / "idx"
    s = Searcher(export_dir, idx, threads=1)
    return s, photos, os.fsdecode(raw_path), str(photos / CONTROL)


def _cli(*args):
    """The CLI as a user runs it: stdout / stderr as bytes, which must be valid UTF-8."""
    proc = subprocess.run([sys.executable, "-m", "stbir_infer", *map(str, args)],
                          capture_output=True, timeout=120)
    return proc.returncode, proc.stdout.decode("utf-8"), proc.stderr.decode("utf-8")


def test_non_utf8_and_control_names_round_trip_and_print_safely(odd_gallery, export_dir):
    s, photos, raw, ctl = odd_gallery
    r = s.enroll(photos)
    assert r.total == 4 and r.skipped == 1
    # meta.json keeps the exact name (a lone surrogate, escaped as ASCII JSON) and gives it back.
    g = GalleryIndex.load(s.index_dir)
    assert raw in g.files and ctl in g.files
    meta = next(s.index_dir.glob("gen-*/meta.json")).read_bytes()
    assert meta.isascii()
    # Python API: Hit.path opens the right file.
    vec = s.encoders.image([raw])[0]
    hit = s.search(vec, top_k=1)[0]
    assert hit.path == raw and hit.score > 0.9999
    with open(hit.path, "rb") as f, open(os.path.join(os.fsencode(photos), RAW), "rb") as g:
        assert f.read() == g.read()
    d = hit.to_dict()
    assert d["path"] == display(raw) and d["path"].endswith("\\xff\\xfe.png")
    assert base64.b64decode(d["path_bytes_b64"]) == os.fsencode(raw)
    json.dumps(d).encode("utf-8")
    assert "path_bytes_b64" not in s.search(s.encoders.image([photos / "a.png"])[0], 1)[0].to_dict()
    # CLI text: every line valid UTF-8, names escaped, no raw control characters.
    common = ["--model", export_dir, "--index", s.index_dir]
    rc, out, err = _cli("query", "--text", "a red star", "--top-k", 4, *common)
    assert rc == 0, err
    lines = out.splitlines()
    assert len(lines) == 4 and not any(c in out for c in "\x1b\x07")
    shown = {line.split(maxsplit=2)[2] for line in lines}
    assert display(raw) in shown and display(ctl) in shown
    # --json: valid UTF-8 JSON; path in display form plus the exact bytes.
    rc, out, err = _cli("query", "--text", "a red star", "--top-k", 4, "--json", *common)
    assert rc == 0, err
    results = json.loads(out)["results"]
    by_bytes = {base64.b64decode(x["path_bytes_b64"]) if "path_bytes_b64" in x
                else x["path"].encode(): x for x in results}
    assert os.fsencode(raw) in by_bytes and os.fsencode(ctl) in by_bytes
    assert by_bytes[os.fsencode(raw)]["path"] == display(raw)
    # enroll: the skipped list and the JSON report escape names too.
    (photos / "bad\x07name.txt").write_text("changed, still not a photo")
    rc, out, err = _cli("enroll", "--images", photos, *common)
    assert rc == 0 and "\x07" not in err and "bad\\x07name.txt: not an image" in err
    rc, out, err = _cli("enroll", "--images", photos, "--json", *common)
    assert rc == 0 and json.loads(out)["skipped_files"][0]["path"].endswith("bad\\x07name.txt")
    # info prints the roots in display form.
    rc, out, err = _cli("info", *common)
    assert rc == 0 and "\x1b" not in out
