"""stbir_infer.store: the CURRENT pointer, the writer lock, checksums of a generation."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from infer_helpers import make_photos, one_error_line, run_cli

from stbir_infer import store
from stbir_infer.errors import IndexFormatError, IndexLockedError
from stbir_infer.gallery import GalleryIndex
from stbir_infer.roots import join_roots
from stbir_infer.searcher import Searcher


@pytest.fixture()
def small_index(export_dir, tmp_path):
    make_photos(tmp_path / "p", ["a.png", "b.png"])
    idx = tmp_path / "idx"
    Searcher(export_dir, idx, threads=1).enroll(tmp_path / "p")
    return idx


def test_a_generation_records_the_sha256_of_its_files(small_index):
    gen = small_index / store.current_generation(small_index)
    meta = json.loads((gen / "meta.json").read_text())
    assert meta["format_version"] == store.INDEX_FORMAT_VERSION == 3
    assert set(meta["checksums"]) == {"index.bin", "edges.npy"}  # (the edge gallery: default)
    assert meta["checksums"]["index.bin"] == store._checksum(gen / "index.bin")
    assert meta["checksums"]["edges.npy"] == store._checksum(gen / "edges.npy")
    assert meta["index_bytes"] == (gen / "index.bin").stat().st_size


def test_a_flipped_byte_in_index_bin_is_a_format_error(small_index):
    gen = small_index / store.current_generation(small_index)
    data = bytearray((gen / "index.bin").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (gen / "index.bin").write_bytes(bytes(data))
    with pytest.raises(IndexFormatError, match="do not match the checksum"):
        GalleryIndex.load(small_index)
    (gen / "index.bin").write_bytes(bytes(data[:-1]))
    with pytest.raises(IndexFormatError, match="bytes, metadata says"):
        GalleryIndex.load(small_index)


def test_a_version_1_generation_still_loads_and_the_next_enroll_upgrades_it(export_dir, small_index, tmp_path):
    gen = small_index / store.current_generation(small_index)
    meta = json.loads((gen / "meta.json").read_text())
    del meta["checksums"]
    meta["format_version"] = 1
    meta["files"] = join_roots(meta["roots"], meta["files"])  # version 1 paths were absolute
    meta["skipped"] = join_roots(meta["roots"], meta["skipped"])
    (gen / "meta.json").write_text(json.dumps(meta))
    assert len(GalleryIndex.load(small_index)) == 2
    r = Searcher(export_dir, small_index).enroll(tmp_path / "p")
    assert r.unchanged == 2
    assert GalleryIndex.load(small_index).format_version == store.INDEX_FORMAT_VERSION
    assert store.current_generation(small_index) == "gen-000002"


def test_corrupt_metadata_is_one_line(export_dir, small_index):
    gen = small_index / store.current_generation(small_index)
    for text in ("{not json", json.dumps({"format": "other"}), "[" * 100000):
        (gen / "meta.json").write_text(text)
        res = run_cli("query", "--text", "a", "--model", export_dir, "--index", small_index)
        assert res.exit_code == 2 and one_error_line(res.stderr), res.stderr
        assert "meta.json" in res.stderr


@pytest.mark.parametrize("content", ["link", "secret", "long", "binary", "dir"])
def test_a_bad_current_pointer_never_echoes_what_it_holds(export_dir, small_index, tmp_path, content):
    secret = tmp_path / "secret.txt"
    secret.write_text("gen-000001 root:x:0:0:TOPSECRET\n")
    current = small_index / "CURRENT"
    current.unlink()
    if content == "link":
        os.symlink(secret, current)
    elif content == "secret":
        current.write_text("TOPSECRET\n")
    elif content == "long":
        current.write_text("gen-000001" + " " * 100 + "TOPSECRET")
    elif content == "binary":
        current.write_bytes(b"\xffTOPSECRET\x1b[31m")
    else:
        current.mkdir()
    with pytest.raises(IndexFormatError) as err:
        store.current_generation(small_index)
    assert "TOPSECRET" not in str(err.value) and "CURRENT" in str(err.value)
    res = run_cli("query", "--text", "a", "--model", export_dir, "--index", small_index)
    assert res.exit_code == 2 and one_error_line(res.stderr)
    assert "TOPSECRET" not in res.output + res.stderr


def test_second_writer_is_refused(export_dir, small_index, tmp_path):
    idx = small_index
    s = Searcher(export_dir, idx)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from stbir_infer.store import WriterLock; "
         f"WriterLock({str(idx)!r}).acquire(); print('locked', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(IndexLockedError, match=f"pid {holder.pid}"):
            s.enroll(tmp_path / "p")
        res = run_cli("enroll", "--images", tmp_path / "p", "--model", export_dir, "--index", idx)
        assert res.exit_code == 2 and "another process" in res.stderr
        assert len(s.query(text="a")) == 2  # readers take no lock
    finally:
        holder.kill()
        holder.wait()
    assert s.enroll(tmp_path / "p").unchanged == 2  # the OS released the dead holder's lock
    # In-process too: a writer that holds the lock refuses a second.
    with store.writer_lock(idx), pytest.raises(IndexLockedError):
        store.WriterLock(idx).acquire()


def test_cleanup_keeps_the_live_generation_and_the_one_before(tmp_path):
    idx = tmp_path / "idx"
    idx.mkdir()
    for n in (1, 2, 3, 4):
        (idx / store.gen_name(n)).mkdir()
    (idx / ".tmp-gen-000005-123").mkdir()
    (idx / ".CURRENT.abc.tmp").write_text("x")
    (idx / "CURRENT").write_text("gen-000003\n")
    store.cleanup(idx)
    assert sorted(p.name for p in idx.iterdir()) == ["CURRENT", "gen-000002", "gen-000003"]
