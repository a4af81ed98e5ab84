"""Crashes and corruption: a failed or killed writer leaves the last good index; a corrupt
index.bin is a one-line error, never a crashed process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
from infer_helpers import leftovers, make_photos

from stbir_infer import store
from stbir_infer.gallery import GalleryIndex
from stbir_infer.searcher import Searcher


class Boom(RuntimeError):
    pass


@pytest.mark.parametrize("point", ["meta_write", "meta_fsync", "gen_rename", "current_swap"])
def test_failure_mid_save_leaves_the_old_index(export_dir, gallery, tmp_path, monkeypatch, point):
    photos, _ = gallery
    idx = tmp_path / "idx"
    s = Searcher(export_dir, idx)
    s.enroll(photos)
    old_gen = store.current_generation(idx)
    make_photos(photos, ["n1.png", "n2.png"], seed=11)

    real_replace = os.replace
    calls = {"replace": 0}

    def failing_replace(src, dst, *a, **k):
        calls["replace"] += 1
        if (point == "gen_rename" and calls["replace"] == 1) or (point == "current_swap" and calls["replace"] == 2):
            raise Boom(point)
        return real_replace(src, dst, *a, **k)

    if point == "meta_write":
        monkeypatch.setattr(GalleryIndex, "meta", lambda self: (_ for _ in ()).throw(Boom()))
    elif point == "meta_fsync":
        monkeypatch.setattr(store, "_fsync_file", lambda p: (_ for _ in ()).throw(Boom()))
    else:
        monkeypatch.setattr(store.os, "replace", failing_replace)
    with pytest.raises(Boom):
        s.enroll(photos)
    monkeypatch.undo()
    assert store.current_generation(idx) == old_gen
    assert len(Searcher(export_dir, idx).query(text="a", top_k=50)) == 6
    assert len(s.query(text="a", top_k=50)) == 6  # the live Searcher kept the old state too
    r = s.enroll(photos)  # the lock was released; leftovers are cleaned
    assert r.added == 2 and r.total == 8
    assert not leftovers(idx)


@pytest.mark.parametrize("when", ["mid_encode", "before_commit"])
def test_killed_enroll_leaves_a_loadable_index(export_dir, tmp_path, when):
    """SIGKILL during an enroll that checkpoints after every batch: the index left behind loads,
    holds the last committed state, and the next enroll finishes the job."""
    photos = tmp_path / "p"
    make_photos(photos, [f"old{i}.png" for i in range(3)])
    idx = tmp_path / "idx"
    Searcher(export_dir, idx).enroll(photos)
    make_photos(photos, [f"new{i}.png" for i in range(8)], seed=12)
    script = textwrap.dedent(f"""
        import os, signal
        from stbir_infer import Searcher, encoders
        when = {when!r}
        s = Searcher({str(export_dir)!r}, {str(idx)!r}, threads=1)
        calls = {{"encode": 0, "replace": 0}}
        real_encode, real_replace = encoders.Encoders.encode_pixels, os.replace
        def encode(self, branch, px):
            calls["encode"] += branch == "image"  # (the edge gallery's sketch batches not counted)
            if when == "mid_encode" and calls["encode"] == 3:
                os.kill(os.getpid(), signal.SIGKILL)
            return real_encode(self, branch, px)
        def replace(src, dst):
            calls["replace"] += 1
            if when == "before_commit" and calls["replace"] == 4:  # 2nd checkpoint's CURRENT swap
                os.kill(os.getpid(), signal.SIGKILL)
            return real_replace(src, dst)
        encoders.Encoders.encode_pixels = encode
        os.replace = replace
        s.enroll({str(photos)!r}, batch_size=2, checkpoint_seconds=0)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    g = GalleryIndex.load(idx)
    # Two batches (4 new photos) were committed before the kill; the third was not.
    assert len(g) == 3 + (4 if when == "mid_encode" else 2)
    s = Searcher(export_dir, idx)
    assert len(s.query(text="a", top_k=50)) == len(g)
    r = s.enroll(photos)
    assert r.total == 11 and r.added == 11 - len(g) and r.encoded == r.added
    assert not leftovers(idx)


def test_corrupt_index_bin_of_the_same_size_is_exit_2_not_a_crash(export_dir, tmp_path):
    """hnswlib trusts index.bin's bytes: a flipped byte used to crash the process (SIGSEGV)."""
    make_photos(tmp_path / "p", [f"{i}.png" for i in range(6)])
    idx = tmp_path / "idx"
    Searcher(export_dir, idx, threads=1).enroll(tmp_path / "p")
    bin_path = idx / store.current_generation(idx) / "index.bin"
    data = bytearray(bin_path.read_bytes())
    size = len(data)
    for i in range(64, size, 97):  # links, levels and vectors alike
        data[i] ^= 0xA5
    bin_path.write_bytes(bytes(data))
    assert bin_path.stat().st_size == size
    proc = subprocess.run([sys.executable, "-m", "stbir_infer", "query", "--model", str(export_dir),
                           "--index", str(idx), "--text", "a red star", "--top-k", "5"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert proc.returncode != -signal.SIGSEGV
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("stbir-infer: error: ") and "checksum" in lines[0]
    assert proc.stdout == ""
