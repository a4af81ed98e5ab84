"""stbir_infer.enroll: incremental, deduplicated, phases timed; what it refuses to index."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from infer_helpers import make_photos, paths_in, run_cli

import stbir_infer
from stbir_infer import store
from stbir_infer.encoders import Encoders
from stbir_infer.enroll import CHANGED
from stbir_infer.enroll_report import PHASES
from stbir_infer.errors import EnrollError, ParameterError
from stbir_infer.gallery import GalleryIndex, HnswParams
from stbir_infer.searcher import Searcher


def test_enroll_skips_bad_files_and_encodes_duplicates_once(export_dir, gallery, tmp_path):
    photos, _ = gallery
    idx = tmp_path / "idx"
    s = Searcher(export_dir, idx, threads=1)
    r = s.enroll(photos, batch_size=4)
    assert (r.added, r.updated, r.removed, r.unchanged) == (7, 0, 0, 0)
    assert r.duplicates == 1 and r.encoded == 6 and r.total == 6
    assert r.skipped == 2
    reasons = {Path(p).name: why for p, why in r.skipped_files}
    assert set(reasons) == {"corrupt.jpg", "notes.txt"} and reasons["notes.txt"] == "not an image"
    assert "not a readable image" in reasons["corrupt.jpg"]
    info = s.info()
    assert info["images"] == 6 and info["files"] == 7
    assert info["hnsw"] == {"M": 16, "ef_construction": 200, "ef_search": 64, "ef_search_effective": 64}
    assert info["model"]["fingerprint"] == s.encoders.fingerprint
    # The duplicate is one result that names both paths.
    hits = s.query(text="anything", top_k=10)
    assert len(hits) == 6 and [h.rank for h in hits] == list(range(1, 7))
    dup = [h for h in hits if h.duplicates]
    assert len(dup) == 1 and {Path(dup[0].path).name, Path(dup[0].duplicates[0]).name} == {"a.png", "a_copy.png"}
    assert all(-1.0001 <= h.score <= 1.0001 for h in hits)
    assert hits == sorted(hits, key=lambda h: -h.score)
    # Stored paths are absolute; metadata holds hash, size and mtime.
    meta = GalleryIndex.load(idx)
    rec = meta.files[str((photos / "b.png").resolve())]
    st = os.stat(photos / "b.png")
    assert rec["size"] == st.st_size and rec["mtime_ns"] == st.st_mtime_ns and len(rec["sha256"]) == 64
    # Nothing changed: nothing is encoded or even re-read.
    r2 = s.enroll(photos)
    assert (r2.added, r2.updated, r2.removed, r2.unchanged, r2.encoded, r2.skipped) == (0, 0, 0, 7, 0, 2)
    assert store.current_generation(idx) == "gen-000001"  # no change, no new generation


def test_incremental_enroll_after_add_change_delete(export_dir, gallery, tmp_path):
    photos, items = gallery
    idx = tmp_path / "idx"
    s = Searcher(export_dir, idx, threads=1)
    s.enroll(photos, batch_size=4)
    before = paths_in(idx)
    # Add two, change one, delete one, touch one without changing it, delete the duplicate.
    make_photos(photos, ["new1.png", "sub/deeper/new2.png"], seed=7)
    make_photos(photos, ["c.png"], seed=8)  # new content at c.png
    (photos / "d.png").unlink()
    os.utime(photos / "b.png", ns=(1, 1))
    (photos / "sub" / "a_copy.png").unlink()
    r = s.enroll(photos, batch_size=2)
    assert (r.added, r.updated, r.removed) == (2, 1, 2)
    assert r.encoded == 3 and r.duplicates == 0 and r.skipped == 2
    assert r.unchanged == 4  # a, b (touched, same bytes), e, f
    after = paths_in(idx)
    root = photos.resolve()
    assert after == (before - {str(root / "d.png"), str(root / "sub" / "a_copy.png")}) | {
        str(root / "new1.png"), str(root / "sub" / "deeper" / "new2.png")}
    assert r.total == 7 == s.info()["images"]
    # The changed file's old vector is gone: querying with its new content finds it first.
    vec = s.encoders.image([photos / "c.png"])[0]
    top = s.search(vec, top_k=1)[0]
    assert top.path == str(root / "c.png") and top.score > 0.9999
    # A copy of an indexed photo under a new name is not encoded again.
    shutil.copy(photos / "new1.png", photos / "again.png")
    r = s.enroll(photos)
    assert (r.added, r.duplicates, r.encoded) == (1, 1, 0)
    # Removing every copy of a content drops its vector; the slot is reused by the next add.
    (photos / "new1.png").unlink()
    (photos / "again.png").unlink()
    r = s.enroll(photos)
    assert r.removed == 2 and r.total == 6
    g = GalleryIndex.load(idx)
    assert len(g.deleted_labels()) == 1
    make_photos(photos, ["z.png"], seed=9)
    assert s.enroll(photos).total == 7
    g = GalleryIndex.load(idx)
    assert g.deleted_labels() == [] and g.hnsw.element_count == 7
    assert len(s.query(text="x", top_k=50)) == 7
    # A text file that becomes an image is picked up; an image that breaks leaves the index.
    shutil.copy(photos / "a.png", photos / "notes.txt")
    (photos / "b.png").write_bytes(b"truncated")
    r = s.enroll(photos)
    assert r.added == 1 and r.removed == 1 and r.skipped == 2 and r.duplicates == 1


def test_enroll_into_two_roots_and_bad_inputs(export_dir, tmp_path):
    make_photos(tmp_path / "one", ["a.png", "b.png"])
    make_photos(tmp_path / "two", ["c.png"], seed=4)
    idx = tmp_path / "idx"
    s = Searcher(export_dir, idx)
    s.enroll(tmp_path / "one")
    assert s.enroll(tmp_path / "two").total == 3  # another root does not remove the first
    assert len(s.info()["roots"]) == 2
    with pytest.raises(EnrollError, match="not found"):
        s.enroll(tmp_path / "missing")
    with pytest.raises(EnrollError, match="batch size"):
        s.enroll(tmp_path / "one", batch_size=0)
    # An index is never created inside a folder that holds other things.
    with pytest.raises(stbir_infer.IndexFormatError, match="its own dir"):
        Searcher(export_dir, tmp_path / "one").enroll(tmp_path / "two")
    # The index dir inside the photo folder is not enrolled.
    inner = Searcher(export_dir, tmp_path / "two" / ".." / "two" / "idx")
    assert inner.enroll(tmp_path / "two").total == 1
    res = run_cli("enroll", "--images", tmp_path / "missing", "--model", export_dir, "--index", idx)
    assert res.exit_code == 2 and "images dir not found" in res.stderr


def test_hnsw_parameters(export_dir, tmp_path):
    assert HnswParams() == HnswParams(16, 200, 64)  # the contract's defaults
    make_photos(tmp_path / "p", [f"{i}.png" for i in range(5)])
    idx = tmp_path / "idx"
    res = run_cli("enroll", "--images", tmp_path / "p", "--model", export_dir, "--index", idx,
                  "--hnsw-m", 8, "--ef-construction", 50, "--ef-search", 20, "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["encoded"] == 5
    s = Searcher(export_dir, idx)
    assert {k: s.info()["hnsw"][k] for k in ("M", "ef_construction", "ef_search")} == {
        "M": 8, "ef_construction": 50, "ef_search": 20}
    g = GalleryIndex.load(idx)
    assert g.hnsw.M == 8 and g.hnsw.ef_construction == 50
    # M cannot change on an existing index; ef_search can (it is a query-time setting).
    with pytest.raises(ParameterError, match="M=8"):
        Searcher(export_dir, idx, M=16).enroll(tmp_path / "p")
    res = run_cli("enroll", "--images", tmp_path / "p", "--model", export_dir, "--index", idx,
                  "--hnsw-m", 32)
    assert res.exit_code == 2 and "cannot change" in res.stderr
    assert Searcher(export_dir, idx, ef_search=3).query(text="a", top_k=5)  # ef raised to top_k
    assert len(Searcher(export_dir, idx, ef_search=1).query(text="a", top_k=5)) == 5
    with pytest.raises(ParameterError):
        Searcher(export_dir, idx, ef_search=0)
    with pytest.raises(ParameterError):
        HnswParams(M=1)
    res = run_cli("query", "--text", "a", "--model", export_dir, "--index", idx, "--top-k", 0)
    assert res.exit_code == 2


def test_phases_are_timed_in_the_report_and_the_json(export_dir, gallery, tmp_path):
    photos, _ = gallery
    idx = tmp_path / "idx"
    res = run_cli("enroll", "--images", photos, "--model", export_dir, "--index", idx, "--json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert tuple(data["timings"]) == PHASES
    assert all(v >= 0 for v in data["timings"].values())
    assert data["timings"]["encode"] > 0 and data["timings"]["commit"] > 0
    assert sum(data["timings"].values()) <= data["seconds"] + 0.01


def test_a_file_changed_between_hash_and_decode_is_not_stored_with_a_mismatched_vector(
        export_dir, tmp_path, monkeypatch):
    """The bytes decoded are the bytes hashed: a file rewritten in between is not indexed under
    its old hash with its new picture's vector (it is skipped, and the next enroll takes it)."""
    photos = tmp_path / "p"
    make_photos(photos, ["a.png", "b.png"])
    old_bytes = (photos / "b.png").read_bytes()
    make_photos(tmp_path / "other", ["b.png"], seed=42)
    new_bytes = (tmp_path / "other" / "b.png").read_bytes()
    real_spec = Encoders.spec

    def spec_then_rewrite(self, branch):  # enroll asks for the spec after hashing, before decoding
        if branch == "image":
            (photos / "b.png").write_bytes(new_bytes)
        return real_spec(self, branch)

    idx = tmp_path / "idx"
    s = Searcher(export_dir, idx, threads=1)
    monkeypatch.setattr(Encoders, "spec", spec_then_rewrite)
    r = s.enroll(photos)
    monkeypatch.undo()
    g = GalleryIndex.load(idx)
    b = str((photos / "b.png").resolve())
    if b in g.files:  # must hold the vector of the bytes its sha256 names
        import hashlib

        assert g.files[b]["sha256"] == hashlib.sha256(old_bytes).hexdigest()
        stored = g.hnsw.get_items([g.files[b]["label"]])[0]
        (tmp_path / "old.png").write_bytes(old_bytes)
        want = s.encoders.image([tmp_path / "old.png"])[0]
        assert float(np.dot(stored, want) / np.linalg.norm(stored)) > 0.9999
    else:
        assert (b, CHANGED) in r.skipped_files and r.added == 1
    r = s.enroll(photos)
    vec = s.encoders.image([photos / "b.png"])[0]
    top = s.search(vec, top_k=1)[0]
    assert top.path == b and top.score > 0.9999


def test_an_unreadable_folder_keeps_its_photos_in_the_index(export_dir, tmp_path, monkeypatch):
    photos = tmp_path / "p"
    make_photos(photos, ["a.png", "sub/b.png", "sub/c.png"])
    idx = tmp_path / "idx"
    s = Searcher(export_dir, idx, threads=1)
    assert s.enroll(photos).total == 3
    sub = str((photos / "sub").resolve())
    real_scandir = os.scandir

    def scandir(path="."):
        if os.fspath(path) == sub:
            raise PermissionError(13, "Permission denied", sub)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)  # as root, chmod 000 would not stop us
    r = s.enroll(photos)
    monkeypatch.undo()
    assert r.removed == 0 and r.total == 3
    assert len(paths_in(idx)) == 3
    assert [(p, why.split(" (")[0]) for p, why in r.skipped_files] == [(sub, "unreadable folder")]
    res = run_cli("enroll", "--images", photos, "--model", export_dir, "--index", idx)
    assert res.exit_code == 0 and "skipped:" not in res.stderr  # readable again: nothing to say
    (photos / "sub" / "c.png").unlink()
    assert s.enroll(photos).removed == 1  # a folder that lists fine still drops what is gone


def test_links_leaving_the_images_dir_are_not_indexed_unless_asked(export_dir, tmp_path):
    photos, outside = tmp_path.resolve() / "p", tmp_path.resolve() / "secret"
    make_photos(photos, ["a.png", "b.png"])
    make_photos(outside, ["x.png", "dir/y.png"], seed=3)
    os.symlink(outside / "x.png", photos / "x_link.png")
    os.symlink(outside / "dir", photos / "dir_link")
    os.symlink(photos / "a.png", photos / "a_link.png")  # inside: fine (a duplicate of a.png)
    idx = tmp_path / "idx"
    s = Searcher(export_dir, idx, threads=1)
    r = s.enroll(photos)
    assert r.total == 2 and r.duplicates == 1
    assert paths_in(idx) == {str(photos / n) for n in ("a.png", "b.png", "a_link.png")}
    why = dict(r.skipped_files)
    assert set(why) == {str(photos / "x_link.png"), str(photos / "dir_link")}
    assert all("outside the images dir" in v for v in why.values())
    res = run_cli("enroll", "--images", photos, "--model", export_dir, "--index", idx)
    assert "x_link.png: a link to outside the images dir" in res.stderr
    # Asked for: followed, and a later enroll without the flag drops them again.
    r = s.enroll(photos, follow_external_links=True)
    assert r.added == 2 and r.total == 4
    assert str(photos / "dir_link" / "y.png") in paths_in(idx)
    res = run_cli("enroll", "--images", photos, "--model", export_dir, "--index", idx,
                  "--follow-external-links", "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)["unchanged"] == 5
    r = s.enroll(photos)
    assert r.removed == 2 and r.total == 2


def test_a_photo_the_encoder_cannot_embed_is_skipped_not_fatal(export_dir, tmp_path, monkeypatch):
    from stbir_infer.errors import NonFiniteEmbeddingError

    make_photos(tmp_path / "p", ["a.png", "b.png", "c.png"])
    real = Encoders.encode_pixels

    def encode(self, branch, pixels):  # row 1 of the batch comes out NaN
        v = real(self, branch, pixels)
        v[1] = np.nan
        raise NonFiniteEmbeddingError("not finite", branch=branch, rows=[1], vectors=v)

    monkeypatch.setattr(Encoders, "encode_pixels", encode)
    s = Searcher(export_dir, tmp_path / "idx", threads=1)
    r = s.enroll(tmp_path / "p")
    assert (r.added, r.encoded, r.total, r.skipped) == (2, 2, 2, 1)
    assert r.skipped_files == [(str((tmp_path / "p" / "b.png").resolve()),
                                "the image encoder gave a non-finite vector")]
