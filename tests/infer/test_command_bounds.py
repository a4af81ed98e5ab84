"""Issue 26, items 9 and 10: commands do what they are asked and no more. ``--threads`` is
capped at a sane multiple of the cores (``reindex --threads 100000`` took 16.9 GB and a load
average over 1,000 on 2 cores); an empty or whitespace path is refused (``remove ""`` removed
every photo under the current directory); remove and prune say what they will remove and refuse
more than ``lifecycle.CONFIRM_OVER`` photos, or a whole root, without ``--yes``."""

from __future__ import annotations

import os
import time

import pytest
from infer_helpers import make_photos, make_sketch, one_error_line, paths_in, run_cli

from stbir_infer.errors import ProviderError
from stbir_infer.session import SessionSettings, max_threads


def test_threads_over_the_cap_are_refused_by_the_library():
    SessionSettings(threads=max_threads())
    with pytest.raises(ProviderError, match="threads must be between 1 and"):
        SessionSettings(threads=100_000)


@pytest.fixture()
def small_index(tmp_path, export_dir):
    photos = tmp_path / "photos"
    items = make_photos(photos, ["a.png", "b.png", "c.png", "sub/d.png"])
    r = run_cli("enroll", "--images", photos, "--model", export_dir, "--index", tmp_path / "idx")
    assert r.exit_code == 0, r.stderr
    return tmp_path / "idx", photos, make_sketch(tmp_path / "s.png", items["a.png"])


def test_threads_over_the_cap_are_one_line_exit_2_on_every_command(small_index, export_dir):
    idx, photos, sketch = small_index
    for args in (["reindex", "--model", export_dir, "--index", idx],
                 ["query", "--model", export_dir, "--index", idx, "--sketch", sketch],
                 ["enroll", "--images", photos, "--model", export_dir, "--index", idx]):
        t0 = time.perf_counter()
        r = run_cli(*args, "--threads", "100000")
        assert r.exit_code == 2 and one_error_line(r.stderr), (args, r.stderr)
        assert "threads" in r.stderr and time.perf_counter() - t0 < 30


@pytest.mark.parametrize("path", ["", " ", "\t\n"])
def test_an_empty_or_blank_path_is_refused_and_nothing_is_removed(small_index, path, tmp_path,
                                                                   monkeypatch, export_dir):
    idx, photos, _ = small_index
    monkeypatch.chdir(photos)  # "" used to mean here: every photo of the index
    before = paths_in(idx)
    for args in (["remove", "--index", idx, path], ["relocate", "--index", idx, photos, path],
                 ["enroll", "--images", path, "--model", export_dir, "--index", idx]):
        r = run_cli(*args)
        assert r.exit_code == 2 and one_error_line(r.stderr) and "empty" in r.stderr, (args, r.stderr)
    assert paths_in(idx) == before and len(before) == 4


def test_remove_lists_what_it_removes_and_a_whole_folder_takes_yes(small_index):
    idx, photos, _ = small_index
    r = run_cli("remove", "--index", idx, photos / "sub")
    assert r.exit_code == 0 and f"remove: {photos.resolve() / 'sub' / 'd.png'}" in r.stdout
    assert len(paths_in(idx)) == 3
    r = run_cli("remove", "--index", idx, photos)  # every photo of the enrolled folder
    assert r.exit_code == 2 and one_error_line(r.stderr) and "--yes" in r.stderr, r.stderr
    assert r.stdout.count("remove: ") == 3 and len(paths_in(idx)) == 3  # listed, not removed
    r = run_cli("remove", "--index", idx, photos, "--yes")
    assert r.exit_code == 0 and paths_in(idx) == set()


def test_more_than_the_limit_takes_yes_for_remove_and_prune(small_index):
    from stbir_infer import lifecycle
    from stbir_infer.errors import IndexEditError

    idx, photos, _ = small_index
    files = sorted(p for p in paths_in(idx) if "/sub/" not in p)
    with pytest.raises(IndexEditError, match="more than 1 photos"):
        lifecycle.remove(idx, files[:2], limit=1)
    assert len(paths_in(idx)) == 4
    for f in files[:2]:
        os.unlink(f)
    shown = []
    with pytest.raises(IndexEditError, match="--yes"):
        lifecycle.prune(idx, limit=1, echo=shown.append)
    assert shown == [f"prune: {f}" for f in files[:2]] and len(paths_in(idx)) == 4
    assert lifecycle.prune(idx, limit=1, yes=True).removed == 2 and len(paths_in(idx)) == 2
