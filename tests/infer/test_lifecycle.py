"""The index over its life: remove, prune, relocate, tags and --where filters, reindex,
export-vectors, and index format 3 (paths relative to the enrolled roots)."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from infer_helpers import another_identity, make_photos, one_error_line, run_cli

from stbir_infer import filters, gallery, lifecycle, store
from stbir_infer.errors import IndexEditError, ModelMismatchError, QueryError
from stbir_infer.gallery import GalleryIndex
from stbir_infer.roots import join_roots
from stbir_infer.searcher import Searcher
from stbir_infer.vectors_export import load_vectors


@pytest.fixture()
def two_folders(export_dir, tmp_path):
    """photos/{shoes,hats}/ (3 + 3 photos) enrolled with --tag season=summer, and others/ (2) with
    season=winter: (searcher, photos dir, others dir, index dir)."""
    photos, others = tmp_path / "photos", tmp_path / "others"
    make_photos(photos, [f"shoes/s{i}.png" for i in range(3)] + [f"hats/h{i}.png" for i in range(3)])
    make_photos(others, ["o0.png", "o1.png"], seed=5)
    idx = tmp_path / "idx"
    s = Searcher(export_dir, idx, threads=1)
    s.enroll(photos, tags={"season": "summer"})
    s.enroll(others, tags=["season=winter"])
    return s, photos.resolve(), others.resolve(), idx


def _all_hits(s: Searcher, **kw) -> list[str]:
    return [h.path for h in s.query(text="a photo", top_k=50, **kw)]


def _state(idx) -> tuple:
    g = GalleryIndex.load(idx)
    return store.current_generation(idx), dict(g.files), dict(g.items)


def test_a_removed_photo_never_appears_again(two_folders, export_dir):
    s, photos, others, idx = two_folders
    r = s.remove([photos / "shoes" / "s0.png", photos / "hats"])
    assert r.removed == 4 and r.total == 4
    gone = {str(photos / "shoes" / "s0.png")} | {str(photos / "hats" / f"h{i}.png") for i in range(3)}
    assert not gone & set(_all_hits(s))
    assert len(_all_hits(s)) == 4
    # Enrolling the folder again does not bring the removed (unchanged) files back ...
    rep = s.enroll(photos, tags={"season": "summer"})
    assert rep.added == 0 and rep.encoded == 0
    assert not gone & set(_all_hits(Searcher(export_dir, idx)))
    # ... and a file that is gone for good is simply forgotten.
    (photos / "shoes" / "s0.png").unlink()
    assert s.prune().removed == 0


def test_prune_drops_gone_files_and_keeps_a_missing_root(two_folders):
    s, photos, others, idx = two_folders
    (photos / "shoes" / "s1.png").unlink()
    r = lifecycle.prune(idx)
    assert (r.removed, r.kept, r.total) == (1, 0, 7) and r.missing_roots == []
    shutil.move(others, others.with_name("moved"))  # the whole root is missing: not proof
    r = lifecycle.prune(idx)
    assert (r.removed, r.kept) == (0, 2) and r.missing_roots == [str(others)]
    assert len(GalleryIndex.load(idx)) == 7


def test_relocate_keeps_ids_tags_and_vectors_and_enroll_finds_nothing_new(two_folders, tmp_path):
    s, photos, others, idx = two_folders
    before = GalleryIndex.load(idx)
    new = tmp_path / "disk2" / "gallery"
    new.parent.mkdir()
    shutil.move(photos, new)
    res = run_cli("relocate", "--index", idx, photos, new)
    assert res.exit_code == 0, res.output
    after = GalleryIndex.load(idx)
    assert after.roots == [str(new), str(others)]
    moved = {p.replace(str(photos), str(new), 1): rec for p, rec in before.files.items()}
    assert after.files == moved and after.items == before.items
    assert all(os.path.exists(p) for p in after.files)
    labels = np.array(sorted(after.items))
    assert np.array_equal(after.hnsw.get_items(labels), before.hnsw.get_items(labels))
    rep = s.enroll(new)
    assert (rep.added, rep.removed, rep.encoded, rep.unchanged) == (0, 0, 0, 6)
    assert {h for h in _all_hits(s, where={"season": "summer"})} == {
        p for p in after.files if p.startswith(str(new))}


def test_format_3_stores_paths_relative_to_roots_and_a_version_2_index_migrates(two_folders, export_dir):
    s, photos, others, idx = two_folders
    gen = idx / store.current_generation(idx)
    meta = json.loads((gen / "meta.json").read_text())
    assert meta["format_version"] == 3 and meta["roots"] == [str(photos), str(others)]
    assert set(meta["files"][0]) == {f"shoes/s{i}.png" for i in range(3)} | {
        f"hats/h{i}.png" for i in range(3)}
    assert str(photos) not in json.dumps(meta["files"])
    files = GalleryIndex.load(idx).files
    # The same generation as format 2 wrote it: absolute paths.
    meta.update(format_version=2, files=join_roots(meta["roots"], meta["files"]),
                skipped=join_roots(meta["roots"], meta["skipped"]))
    (gen / "meta.json").write_text(json.dumps(meta))
    old = GalleryIndex.load(idx)
    assert old.format_version == 2 and old.files == files
    assert len(_all_hits(Searcher(export_dir, idx), where={"folder": "hats"})) == 3
    lifecycle.prune(idx)  # nothing to prune, but an old format is rewritten
    assert GalleryIndex.load(idx).format_version == 3 and GalleryIndex.load(idx).files == files


def test_filtered_queries_return_only_matching_entries(two_folders, monkeypatch):
    s, photos, others, idx = two_folders
    cases = {("folder=shoes",): lambda p: "/shoes/" in p,
             ("folder=hats", "folder=shoes"): lambda p: p.startswith(str(photos)),
             ("season=winter",): lambda p: p.startswith(str(others)),
             ("season=summer", "folder=hats"): lambda p: "/hats/" in p,
             ("season=winter", "folder=hats"): lambda p: False}
    # A few matches are searched exactly; at a million photos a 10% filter takes the graph
    assert filters.use_exact(8, 8, 128) and filters.use_exact(1_000, 1_000_000, 512)
    assert not filters.use_exact(100_000, 1_000_000, 512)
    for exact in (True, False):  # exact search of the matches, and hnswlib's filter callback
        if not exact:
            monkeypatch.setattr(filters, "FILTER_CROSSOVER", 0.0)
        for where, want in cases.items():
            hits = _all_hits(s, where=list(where))
            assert hits == [p for p in _all_hits(s) if want(p)], (where, exact)
    # Top-k among the matches, not matches among the top-k
    assert len(s.query(text="a photo", top_k=2, where={"folder": "hats"})) == 2


def test_bad_where_is_one_line_exit_2(two_folders, export_dir):
    s, photos, others, idx = two_folders
    with pytest.raises(QueryError, match="no entry has a tag 'colour'"):
        s.query(text="a", where={"colour": "red"})
    for where in ("colour=red", "nokeyvalue", "=x", "folder="):
        res = run_cli("query", "--text", "a", "--model", export_dir, "--index", idx, "--where", where)
        assert res.exit_code == 2 and one_error_line(res.stderr), (where, res.stderr)
    res = run_cli("query", "--text", "a", "--model", export_dir, "--index", idx, "--json",
                  "--where", "folder=shoes")
    assert res.exit_code == 0 and len(json.loads(res.stdout)["results"]) == 3
    res = run_cli("enroll", "--images", photos, "--model", export_dir, "--index", idx,
                  "--tag", "folder=x")
    assert res.exit_code == 2 and one_error_line(res.stderr)


def test_bad_edits_are_one_line_exit_2_and_leave_the_index_unchanged(two_folders, export_dir, tmp_path):
    s, photos, others, idx = two_folders
    before = _state(idx)
    outside = tmp_path / "elsewhere.png"
    outside.write_bytes(b"x")
    small = tmp_path / "export-64d"
    shutil.copytree(export_dir, small)
    manifest = json.loads((small / "export.json").read_text())
    (small / "export.json").write_text(json.dumps({**manifest, "embed_dim": 64}))
    for args in (("remove", photos / "shoes" / "s0.png", outside),   # one path is not in the index
                 ("remove", photos / "shoes" / "nope.png"),
                 ("relocate", tmp_path / "not-a-root", tmp_path),
                 ("reindex", "--model", small)):
        res = run_cli(*args, "--index", idx)
        assert res.exit_code == 2 and one_error_line(res.stderr), (args, res.stderr)
        assert _state(idx) == before, args
    assert "index dim 128 != export embed_dim 64" in res.stderr
    with pytest.raises(IndexEditError):
        lifecycle.remove(idx, [outside])
    with pytest.raises(ModelMismatchError):
        lifecycle.reindex(idx, small)


def test_reindex_keeps_ids_files_and_tags_and_hands_the_index_to_the_new_export(
        two_folders, export_dir, tmp_path):
    s, photos, others, idx = two_folders
    new = tmp_path / "new_export"  # the same graphs under another identity (as a new export has)
    shutil.copytree(export_dir, new)
    new_fingerprint = another_identity(new)
    before = GalleryIndex.load(idx)
    labels = np.array(sorted(before.items))
    vectors = before.hnsw.get_items(labels)
    (others / "o1.png").unlink()  # gone: its content leaves the index
    res = run_cli("reindex", "--index", idx, "--model", new, "--batch-size", 3)
    assert res.exit_code == 0 and "7 encoded, 1 dropped" in res.stdout, res.output
    after = GalleryIndex.load(idx)
    assert after.generation == before.generation + 1
    assert after.model["fingerprint"] == new_fingerprint
    with pytest.raises(ModelMismatchError):  # writing now takes the new export
        Searcher(export_dir, idx).enroll(others)
    assert Searcher(new, idx).enroll(others).unchanged == 1
    assert {p: rec for p, rec in after.files.items()} == {
        p: rec for p, rec in before.files.items() if not p.endswith("o1.png")}
    kept = np.array(sorted(after.items))
    assert set(kept) < set(labels)
    np.testing.assert_allclose(after.hnsw.get_items(kept), vectors[np.isin(labels, kept)], atol=1e-5)
    assert len(_all_hits(Searcher(export_dir, idx), where={"season": "winter"})) == 1


def test_past_the_deleted_share_save_rebuilds_the_graph(tmp_path):
    rng = np.random.default_rng(0)
    g = GalleryIndex.create(dim=8, model={"fingerprint": "a" * 64, "embed_dim": 8})
    vecs = rng.normal(size=(20, 8)).astype(np.float32)
    labels = g.add_vectors(vecs, [f"h{i}" for i in range(20)])
    for i in range(20):
        g.set_file(f"/p/{i}.png", f"h{i}", 1, 1)
    for i in range(int(20 * gallery.MAX_DELETED_SHARE)):  # at the share: kept as marked slots
        g.remove_file(f"/p/{i}.png")
    g.save(tmp_path / "a")
    assert GalleryIndex.load(tmp_path / "a").hnsw.element_count == 20
    g.remove_file("/p/19.png")  # past it: rebuilt from the live vectors, same labels
    g.save(tmp_path / "a")
    h = GalleryIndex.load(tmp_path / "a")
    assert h.hnsw.element_count == len(h) == 13 and h.deleted_labels() == []
    live = np.array(sorted(h.items))
    np.testing.assert_allclose(h.hnsw.get_items(live), g.hnsw.get_items(live))
    assert h.search(vecs[10], 1)[0][0] == labels[10]


def test_export_vectors_round_trips(two_folders, tmp_path):
    s, photos, others, idx = two_folders
    (photos / "shoes" / "dup.png").write_bytes((photos / "shoes" / "s0.png").read_bytes())
    s.enroll(photos, tags={"season": "summer"})
    out = tmp_path / "vectors"
    res = run_cli("export-vectors", "--index", idx, out)
    assert res.exit_code == 0, res.output
    vectors, entries, manifest = load_vectors(out)
    g = GalleryIndex.load(idx)
    assert manifest["count"] == len(g) == 8 and manifest["dim"] == 128
    assert manifest["model"] == g.model
    labels = [e["id"] for e in entries]
    np.testing.assert_array_equal(vectors, g.hnsw.get_items(labels))
    for e in entries:
        assert [f["path"] for f in e["files"]] == g.paths[e["id"]] and e["sha256"] == g.items[e["id"]]
        for f in e["files"]:
            assert f["tags"] == g.files[f["path"]].get("tags", {})
    dup = next(e for e in entries if len(e["files"]) == 2)
    assert {f["folder"] for f in dup["files"]} == {"shoes"}
    # Exported vectors answer a query like the index does
    q = vectors[3]
    assert labels[int(np.argmax(vectors @ q))] == g.search(q, 1)[0][0]
    res = run_cli("export-vectors", "--index", idx, out)  # not over an existing export
    assert res.exit_code == 2 and one_error_line(res.stderr)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".vectors")]
