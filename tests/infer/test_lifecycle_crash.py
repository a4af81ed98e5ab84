"""remove / prune / relocate / reindex killed (SIGKILL) at every step of their commit: the index
left behind loads and holds either the whole old state or the whole new one; the next writer
cleans up. (test_crash.py's pattern; the edits run in a forked child, reindex in a subprocess
because it runs onnxruntime.)"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest
from infer_helpers import leftovers, make_photos

from stbir_infer import lifecycle, store
from stbir_infer.gallery import GalleryIndex
from stbir_infer.searcher import Searcher

# Where the child dies: building the metadata (nothing written), after index.bin is written,
# at the rename of the new generation, at the CURRENT swap (the commit point), and after it
# (removing the generation before the previous one).
POINTS = ("meta", "index_bin", "gen_rename", "current_swap", "after_swap")


def _die():
    os.kill(os.getpid(), signal.SIGKILL)


def _arm(point: str) -> None:
    """In the child: make the step named ``point`` kill the process."""
    calls = {"replace": 0, "cleanup": 0}
    if point == "meta":
        GalleryIndex.meta = lambda self: _die()
    elif point == "index_bin":
        store._checksum = lambda path: _die()
    elif point in ("gen_rename", "current_swap"):
        real = os.replace

        def replace(src, dst, *a, **k):
            calls["replace"] += 1
            if calls["replace"] == (1 if point == "gen_rename" else 2):
                _die()
            return real(src, dst, *a, **k)

        os.replace = replace
    else:
        real_cleanup = store.cleanup

        def cleanup(*a, **k):
            calls["cleanup"] += 1  # 1: the writer's own start, 2: after its commit
            if calls["cleanup"] == 2:
                _die()
            return real_cleanup(*a, **k)

        store.cleanup = cleanup


def _killed_in_child(run, point: str) -> bool:
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            _arm(point)
            run()
        finally:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


@pytest.fixture(scope="module")
def enrolled(export_dir, tmp_path_factory):
    base = tmp_path_factory.mktemp("crash")
    photos = base / "photos"
    make_photos(photos, [f"a/{i}.png" for i in range(3)] + [f"b/{i}.png" for i in range(3)])
    Searcher(export_dir, base / "idx", threads=1).enroll(photos)
    return base / "idx", photos.resolve()


@pytest.mark.parametrize("point", POINTS)
@pytest.mark.parametrize("op", ["remove", "prune", "relocate"])
def test_a_killed_edit_leaves_the_old_or_the_new_index(enrolled, tmp_path, op, point):
    src_idx, src_photos = enrolled
    idx, photos = tmp_path / "idx", tmp_path / "photos"
    shutil.copytree(src_idx, idx)
    shutil.copytree(src_photos, photos)
    # This copy's entries point at the original photos: move them here first (not killed).
    lifecycle.relocate(idx, src_photos, photos)
    if op == "prune":
        (photos / "a" / "1.png").unlink()
    run = {"remove": lambda: lifecycle.remove(idx, [photos / "b"]),
           "prune": lambda: lifecycle.prune(idx),
           "relocate": lambda: lifecycle.relocate(idx, photos, tmp_path / "moved")}[op]
    old = GalleryIndex.load(idx)
    assert _killed_in_child(run, point)
    now = GalleryIndex.load(idx)  # loads, whatever the point
    if point == "after_swap":
        assert now.generation == old.generation + 1 and now.files != old.files
    else:
        assert (now.generation, now.files, now.roots) == (old.generation, old.files, old.roots)
    if point == "after_swap":
        lifecycle.prune(idx)  # the job was done: any next writer cleans up
    else:
        run()  # the next writer does the job and cleans up
    done = GalleryIndex.load(idx)
    want = {"remove": 3, "prune": 5, "relocate": 6}[op]
    assert len(done.files) == want and not leftovers(idx)
    if op == "relocate":
        assert all(p.startswith(str(tmp_path / "moved")) for p in done.files)


@pytest.mark.parametrize("when", ["mid_encode", "current_swap"])
def test_a_killed_reindex_leaves_a_loadable_index(export_dir, enrolled, tmp_path, when):
    src_idx, src_photos = enrolled
    idx = tmp_path / "idx"
    shutil.copytree(src_idx, idx)
    old = GalleryIndex.load(idx)
    script = textwrap.dedent(f"""
        import os, signal
        from stbir_infer import encoders, lifecycle
        calls = {{"encode": 0, "replace": 0}}
        real_encode, real_replace = encoders.Encoders.encode_pixels, os.replace
        def encode(self, branch, px):
            calls["encode"] += 1
            if {when!r} == "mid_encode" and calls["encode"] == 2:
                os.kill(os.getpid(), signal.SIGKILL)
            return real_encode(self, branch, px)
        def replace(src, dst):
            calls["replace"] += 1
            if {when!r} == "current_swap" and calls["replace"] == 2:
                os.kill(os.getpid(), signal.SIGKILL)
            return real_replace(src, dst)
        encoders.Encoders.encode_pixels = encode
        os.replace = replace
        lifecycle.reindex({str(idx)!r}, {str(export_dir)!r}, batch_size=2, threads=1)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    now = GalleryIndex.load(idx)
    assert (now.generation, now.files, now.items) == (old.generation, old.files, old.items)
    assert len(Searcher(export_dir, idx).query(text="a", top_k=50)) == 6
    r = lifecycle.reindex(idx, export_dir)
    assert r.encoded == 6 and not leftovers(idx)
