"""stbir_infer.gallery: the in-memory index (labels, duplicates, deletions, search, save/load)."""

from __future__ import annotations

import numpy as np
import pytest

from stbir_infer import contract, gallery, store
from stbir_infer.errors import ModelMismatchError, ParameterError
from stbir_infer.gallery import GalleryIndex, HnswParams

MODEL = {"fingerprint": "a" * 64, "embed_dim": 8, "model_dir": "/x", "clip_model": "m"}


def _unit(rng, n, d=8):
    v = rng.normal(size=(n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_params_come_from_the_contract_and_are_checked():
    p = HnswParams()
    assert (p.M, p.ef_construction, p.ef_search) == (
        contract.HNSW_M, contract.HNSW_EF_CONSTRUCTION, contract.HNSW_EF_SEARCH)
    assert HnswParams.with_defaults(ef_search=5) == HnswParams(ef_search=5)
    for bad in ({"M": 1}, {"M": 513}, {"ef_search": 0}, {"ef_construction": True}, {"M": 2.5}):
        with pytest.raises(ParameterError):
            HnswParams(**bad)


def test_files_items_paths_stay_consistent_through_edits_and_a_save(tmp_path, monkeypatch):
    monkeypatch.setattr(gallery, "MAX_DELETED_SHARE", 1.0)  # no compaction (test_lifecycle.py)
    rng = np.random.default_rng(0)
    g = GalleryIndex.create(dim=8, model=MODEL)
    assert g.unsaved  # a new index is worth writing
    vecs = _unit(rng, 3)
    labels = g.add_vectors(vecs, ["h0", "h1", "h2"])
    for i, path in enumerate(["/p/a", "/p/b", "/p/c"]):
        g.set_file(path, f"h{i}", 10, 20)
    g.set_file("/p/a_copy", "h0", 10, 20)
    assert g.paths[labels[0]] == ["/p/a", "/p/a_copy"] and len(g) == 3
    assert g.search(vecs[1], 1)[0][0] == labels[1]
    g.remove_file("/p/a")
    assert labels[0] in g.items  # the copy still shows it
    g.remove_file("/p/a_copy")
    assert labels[0] not in g.items and g.deleted_labels() == [labels[0]]
    assert [label for label, _ in g.search(vecs[0], 5)] != [] and len(g.search(vecs[0], 5)) == 2
    g.mark_skipped("/p/notes.txt", 3, 4, "not an image")
    g.save(tmp_path / "idx")
    assert g.unsaved == 0 and g.generation == 1
    h = GalleryIndex.load(tmp_path / "idx")
    assert (h.files, h.items, h.paths, h.skipped) == (g.files, g.items, g.paths, g.skipped)
    assert h.unsaved == 0 and h.deleted_labels() == [labels[0]]
    with pytest.raises(ModelMismatchError):
        h.check_model({**MODEL, "fingerprint": "b" * 64})
    h.set_ef_search(h.params.ef_search)
    assert h.unsaved == 0  # not a change
    h.set_ef_search(7)
    assert h.unsaved and h.params.ef_search == 7
    assert store.current_generation(tmp_path / "idx") == "gen-000001"
