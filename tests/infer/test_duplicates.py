"""``stbir-infer duplicates`` (issue 28): groups through the HNSW graph equal the connected
components of every pair above the threshold; keeper = most pixels, then oldest; lists only;
an empty index, a one-photo index and an index whose files are gone get an honest answer."""

from __future__ import annotations

import json
import os
import shutil
import time

import numpy as np
from infer_helpers import make_photos, one_error_line, run_cli
from PIL import Image

from stbir_infer.duplicates import Member, components, find, keeper
from stbir_infer.gallery import GalleryIndex
from stbir_infer.searcher import Searcher

NAMES = [f"p{i}.png" for i in range(10)]


def _gallery(export_dir, root):
    photos = root / "photos"
    make_photos(photos, NAMES, seed=5)
    img = Image.open(photos / "p1.png").convert("RGB")
    img.resize((img.width // 2, img.height // 2)).save(photos / "p1_small.jpg", quality=80)
    shutil.copy(photos / "p2.png", photos / "p2_same.png")  # the same bytes: one index entry
    later = time.time_ns() + 86_400 * 10**9
    os.utime(photos / "p2_same.png", ns=(later, later))  # newer than every other photo
    Searcher(export_dir, root / "idx", threads=1).enroll(photos, batch_size=8)
    return photos, root / "idx"


def _exact_groups(idx_dir, threshold):
    idx = GalleryIndex.load(idx_dir)
    labels = sorted(idx.items)
    v = np.asarray(idx.hnsw.get_items(labels), np.float32)
    sims = v @ v.T
    pairs = [(labels[i], labels[j], float(sims[i, j])) for i in range(len(labels))
             for j in range(i + 1, len(labels)) if sims[i, j] >= threshold]
    return idx, {tuple(m) for m, _ in components(pairs)}, sims, labels


def test_groups_are_the_components_of_every_close_pair(export_dir, tmp_path):
    photos, idx_dir = _gallery(export_dir, tmp_path)
    idx = GalleryIndex.load(idx_dir)
    a, b = (int(idx.files[str(photos / n)]["label"]) for n in ("p1.png", "p1_small.jpg"))
    va, vb = np.asarray(idx.hnsw.get_items([a, b]), np.float32)
    threshold = float(va @ vb) - 1e-4  # the edited copy is in by construction
    idx, exact, _, _ = _exact_groups(idx_dir, threshold)
    report = find(idx_dir, threshold)
    found = {tuple(sorted({m.label for m in g.members})) for g in report.groups if g.score < 1.0}
    assert found == exact
    copy = next(g for g in report.groups if {m.path for m in g.members} >= {
        str(photos / "p1.png"), str(photos / "p1_small.jpg")})
    assert copy.keeper.path != str(photos / "p1_small.jpg")  # the half-size copy is never kept
    assert copy.keeper.pixels == max(m.pixels for m in copy.members)
    twins = {str(photos / "p2.png"), str(photos / "p2_same.png")}
    same = next(g for g in report.groups if {m.path for m in g.members} >= twins)
    assert same.keeper.path != str(photos / "p2_same.png")  # equal pixels: the older one
    assert all(m.width and m.height and m.size for g in report.groups for m in g.members)


def test_the_command_lists_and_deletes_nothing(export_dir, tmp_path):
    photos, idx_dir = _gallery(export_dir, tmp_path)
    before = sorted(os.listdir(photos))
    res = run_cli("duplicates", "--index", idx_dir, "--threshold", "0.999", "--json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["threshold"] == 0.999 and data["photos"] == len(NAMES) + 1
    twins = next(g for g in data["groups"] if {"p2.png", "p2_same.png"} <= {
        os.path.basename(m["path"]) for m in g["members"]})
    assert not twins["keeper"].endswith("p2_same.png")  # the newest of equal photos
    text = run_cli("duplicates", "--index", idx_dir, "--threshold", "0.999").stdout
    assert "nothing was deleted" in text and "keep" in text
    assert sorted(os.listdir(photos)) == before


def test_honest_answers_for_empty_single_and_gone(export_dir, tmp_path):
    res = run_cli("duplicates", "--index", tmp_path / "none")
    assert res.exit_code == 2 and one_error_line(res.stderr) and "no index" in res.stderr
    one = tmp_path / "one"
    make_photos(one, ["only.png"])
    Searcher(export_dir, tmp_path / "idx1", threads=1).enroll(one)
    res = run_cli("duplicates", "--index", tmp_path / "idx1")
    assert res.exit_code == 0 and res.stdout.startswith("0 group(s), 0 photos, among 1")
    shutil.rmtree(one)
    res = run_cli("duplicates", "--index", tmp_path / "idx1")
    assert res.exit_code == 2 and one_error_line(res.stderr) and "prune" in res.stderr
    for bad in ("0", "1.5", "nan"):
        res = run_cli("duplicates", "--index", tmp_path / "idx1", "--threshold", bad)
        assert res.exit_code == 2 and "Traceback" not in res.output


def test_union_find_and_keeper_rules():
    groups = components([(1, 2, 0.97), (2, 3, 0.96), (7, 8, 0.99)])
    assert groups == [([1, 2, 3], 0.96), ([7, 8], 0.99)]
    old = Member("b.jpg", 1, width=100, height=100, mtime_ns=1)
    new = Member("a.jpg", 2, width=100, height=100, mtime_ns=2)
    big = Member("c.jpg", 3, width=200, height=100, mtime_ns=3)
    gone = Member("d.jpg", 4, missing=True)
    assert keeper([new, old]) is old and keeper([old, big, gone]) is big
    assert keeper([gone]) is None
