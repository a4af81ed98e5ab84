"""Issue 26, items 7, 8 and 11: bounded memory per file, and skips that are remembered only for
the reason and the export that caused them.

7: enroll hashes and decodes a file as a stream (a 2 GB sparse file cost 2.26 GB of memory);
8: a thin 16-bit PNG (190 x 263,000) goes through the banded conversion (1.33 GB a query);
11: an export that cannot preprocess stops the enroll (exit 2) instead of skipping every photo for
good, a transient failure (out of memory) is never remembered, and a remembered skip carries the
export that judged it, so another export tries the file again."""

from __future__ import annotations

import json
import os
import tracemalloc
from pathlib import Path

import pytest
from infer_helpers import linked_export, make_photos, one_error_line, run_cli

from stbir_infer import enroll_pipeline, preprocess, store
from stbir_infer.contract import MANIFEST
from stbir_infer.enroll import _Candidate
from stbir_infer.errors import ImageDecodeError
from stbir_infer.gallery import GalleryIndex
from stbir_infer.scan import hash_file

REPO = Path(__file__).resolve().parents[2]


def _fuzz():
    import importlib.util

    spec = importlib.util.spec_from_file_location("stbir_bench_fuzz_b", REPO / "benchmarks" / "fuzz.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_big_file_is_hashed_and_decoded_as_a_stream(tmp_path):
    big = tmp_path / "big.png"
    with open(big, "wb") as f:
        f.truncate(300 << 20)  # sparse: no disk, 300 MB of zeros to read
    sha, st = hash_file(str(big))
    c = _Candidate(str(big), st.st_size, st.st_mtime_ns, False)
    tracemalloc.start()
    try:
        result, changed = enroll_pipeline._read_and_decode(sha, [c], 3, 64)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert isinstance(result, ImageDecodeError) and changed == []
    assert peak < 32 << 20, f"{peak / 2**20:.0f} MB traced"  # was the whole file


def test_a_file_rewritten_between_hash_and_decode_counts_as_changed(tmp_path, monkeypatch):
    photo = tmp_path / "p.png"
    make_photos(tmp_path, ["p.png"])
    sha, st = hash_file(str(photo))
    c = _Candidate(str(photo), st.st_size, st.st_mtime_ns, False)
    real = preprocess.open_image

    def open_and_touch(f, *a, **kw):
        img = real(f, *a, **kw)
        os.utime(photo, ns=(1, 1))  # moves ctime, as any write does
        return img

    monkeypatch.setattr(preprocess, "open_image", open_and_touch)
    assert enroll_pipeline._read_and_decode(sha, [c], 3, 64) == (None, [c])


def test_a_thin_16_bit_png_is_converted_in_bands(tmp_path):
    data = _fuzz().png_bomb(190, 263_000, color_type=0, bit_depth=16)
    path = tmp_path / "thin16.png"
    path.write_bytes(data)
    spec = {"size": 64, "channels": 3, "mean": [0.5] * 3, "std": [0.5] * 3,
            "interpolation": "bicubic"}
    tracemalloc.start()
    try:
        arr = preprocess.load(path, spec)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert arr.shape == (3, 64, 64)
    assert peak < 64 << 20, f"{peak / 2**20:.0f} MB traced"  # was 1.3 GB of float64 copies


def test_banded_16_bit_conversion_gives_the_full_paths_pixels():
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    arr = rng.integers(0, 65535, (3000, 3000), dtype=np.uint16)
    img = Image.fromarray(arr)
    assert img.mode == "I;16"
    full = preprocess._convert(img, 3)
    banded = preprocess._reduce_in_bands(img, 3, 1)
    assert np.array_equal(np.asarray(full), np.asarray(banded))


@pytest.fixture()
def photos(tmp_path):
    folder = tmp_path / "photos"
    make_photos(folder, ["a.png", "b.png", "c.png"])
    (folder / "notes.png").write_text("not a photo\n")
    return folder


def test_an_export_that_cannot_preprocess_stops_enroll_and_remembers_nothing(photos, tmp_path,
                                                                              export_dir):
    idx = tmp_path / "idx"
    bad = linked_export(export_dir, tmp_path / "bad-export")
    m = json.loads((bad / MANIFEST).read_text())
    m["encoders"]["image"]["preprocess"]["interpolation"] = "lanczos9"
    (bad / MANIFEST).write_text(json.dumps(m))
    r = run_cli("enroll", "--images", photos, "--model", bad, "--index", idx)
    assert r.exit_code == 2 and one_error_line(r.stderr) and "interpolation" in r.stderr, r.stderr
    r = run_cli("enroll", "--images", photos, "--model", export_dir, "--index", idx, "--json")
    assert r.exit_code == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["added"] == 3 and report["skipped"] == 1, report  # notes.png only


def test_a_transient_failure_is_not_remembered(photos, tmp_path, export_dir, monkeypatch):
    idx = tmp_path / "idx"
    real = preprocess._convert

    def out_of_memory(img, *a, **kw):
        if img.size == (1, 1):
            return real(img, *a, **kw)
        raise MemoryError

    monkeypatch.setattr(preprocess, "_convert", out_of_memory)
    r = run_cli("enroll", "--images", photos, "--model", export_dir, "--index", idx, "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["added"] == 0, r.stderr
    assert set(GalleryIndex.load(idx).skipped) == {str(photos.resolve() / "notes.png")}
    monkeypatch.undo()
    r = run_cli("enroll", "--images", photos, "--model", export_dir, "--index", idx, "--json")
    assert json.loads(r.stdout)["added"] == 3, r.stdout


def test_a_skip_is_remembered_with_its_export_and_retried_under_another(photos, tmp_path,
                                                                         export_dir, monkeypatch):
    idx = tmp_path / "idx"
    run_cli("enroll", "--images", photos, "--model", export_dir, "--index", idx)
    g = GalleryIndex.load(idx)
    (rec,) = g.skipped.values()
    assert rec["export"] == g.model["fingerprint"] and rec["reason"] == "not an image"
    opened = []
    real = enroll_pipeline.opened_if_sha

    def counting(path, sha):
        opened.append(path)
        return real(path, sha)

    monkeypatch.setattr(enroll_pipeline, "opened_if_sha", counting)
    run_cli("enroll", "--images", photos, "--model", export_dir, "--index", idx)
    assert opened == []  # same export, same file: not read again
    gen = idx / store.current_generation(idx)
    meta = json.loads((gen / "meta.json").read_text())
    for record in meta["skipped"][0].values():
        record.pop("export")  # as an older runtime wrote it (or another export judged it)
    (gen / "meta.json").write_text(json.dumps(meta))
    run_cli("enroll", "--images", photos, "--model", export_dir, "--index", idx)
    assert opened == [str(photos.resolve() / "notes.png")]
