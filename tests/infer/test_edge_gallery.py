"""The edge gallery (issue 27): enroll stores each photo's pseudo-sketch row (embedding and drawing
descriptor) beside its photo vector, a sketch-only query scores against both, an index without
them (or with embeddings only) answers as before, and a tampered edges.npy is one clear error."""

from __future__ import annotations

import hashlib
import io
import json

import numpy as np
import pytest
from infer_helpers import make_photos, make_sketch, one_error_line, run_cli
from PIL import Image

from stbir_infer.edge_gallery import DEFAULT_FUSED_WEIGHT, EDGE_FILE, uses_drawing
from stbir_infer.edges import gallery_sketch
from stbir_infer.errors import IndexFormatError, ParameterError
from stbir_infer.gallery import GalleryIndex
from stbir_infer.searcher import Searcher

NAMES = ["a.png", "b.png", "c.png", "d.png", "e.png"]


@pytest.fixture()
def photos(tmp_path):
    items = make_photos(tmp_path / "photos", NAMES)
    return tmp_path / "photos", items


def _live(idx_dir):
    return idx_dir / (idx_dir / "CURRENT").read_text().strip()


def _by_name(hits):
    return {h.path.rsplit("/", 1)[-1]: h.score for h in hits}


def _rows(searcher, images):
    """The sketch graph's rows (embedding, then drawing descriptor) of sketch files / images."""
    return searcher.encoders.encode_sketch_drawings(searcher.encoders.preprocess("sketch", images))


def test_enroll_stores_the_pseudo_sketch_vectors_and_sketch_queries_use_them(export_dir, photos,
                                                                            tmp_path):
    folder, items = photos
    s = Searcher(export_dir, tmp_path / "idx", threads=1)
    s.enroll(folder, edge_gallery=True)
    idx = s.current_index()
    assert idx.edges is not None and s.info()["edge_gallery"] is True
    meta = json.loads((_live(tmp_path / "idx") / "meta.json").read_text())
    dim, drawing_dim = s.encoders.embed_dim, s.encoders.drawing_dim
    assert drawing_dim == json.loads((export_dir / "export.json").read_text())[
        "encoders"]["sketch"]["drawing"]["dim"] > 0
    assert meta["edges"] == {"file": EDGE_FILE, "method": "canny", "drawing_dim": drawing_dim}
    assert EDGE_FILE in meta["checksums"]
    assert uses_drawing(idx, s.encoders)

    # each stored row is the sketch graph's embedding and drawing descriptor of gallery_sketch
    labels, vecs = idx.edges.matrix()
    assert vecs.shape == (len(NAMES), dim + drawing_dim)
    label_b = idx.files[str((folder / "b.png").resolve())]["label"]
    drawing_b = gallery_sketch(Image.open(folder / "b.png").convert("RGB"))
    want = _rows(s, [drawing_b])[0]
    assert np.allclose(vecs[list(labels).index(label_b)], want, atol=1e-5)
    assert np.allclose(want[:dim], s.encoders.sketch([drawing_b])[0], atol=1e-5)

    # a sketch-only query scores (1 - w) * photo + w * drawing descriptors, exactly
    sketch = make_sketch(tmp_path / "q.png", items["c.png"])
    q = _rows(s, [str(sketch)])[0]
    photo_vecs = np.asarray(idx.hnsw.get_items(labels), np.float32)
    photo_vecs /= np.linalg.norm(photo_vecs, axis=1, keepdims=True)
    w = s.edge_weight
    want = {label: (1 - w) * float(p @ q[:dim]) + w * float(e[dim:] @ q[dim:])
            for label, p, e in zip(labels, photo_vecs, vecs)}
    hits = s.query(sketch=str(sketch), top_k=len(NAMES))
    got = {idx.files[h.path]["label"]: h.score for h in hits}
    assert got.keys() == want.keys()
    assert all(abs(got[k] - want[k]) < 1e-4 for k in want)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)

    # all weight on the edge gallery: a photo's own pseudo-sketch finds that photo first
    edge_only = Searcher(export_dir, tmp_path / "idx", threads=1, edge_weight=1.0)
    own = gallery_sketch(Image.open(folder / "d.png").convert("RGB"))
    top = edge_only.query(sketch=own, top_k=1)[0]
    assert top.path.endswith("d.png") and top.score == pytest.approx(1.0, abs=1e-4)

    # weight 0, text and sketch+text queries: exactly the photo vectors, as without the gallery
    plain = Searcher(export_dir, tmp_path / "plain", threads=1)
    plain.enroll(folder, edge_gallery=False)
    off = Searcher(export_dir, tmp_path / "idx", threads=1, edge_weight=0.0, fused_edge_weight=0.0)
    for kw in ({"sketch": str(sketch)}, {"text": "a red star"},
               {"sketch": str(sketch), "text": "a red star"}):
        base = _by_name(plain.query(**kw, top_k=5))
        assert _by_name(off.query(**kw, top_k=5)) == pytest.approx(base, abs=1e-5)
    assert _by_name(s.query(text="a red star", top_k=5)) == pytest.approx(  # text: never edges
        _by_name(plain.query(text="a red star", top_k=5)), abs=1e-5)
    batch = s.query_many([{"sketch": str(sketch), "top_k": 5}])[0]
    assert _by_name(batch) == pytest.approx(_by_name(hits), abs=1e-5)


def test_edges_follow_remove_enroll_and_reindex(export_dir, photos, tmp_path):
    folder, _ = photos
    idx_dir = tmp_path / "idx"
    s = Searcher(export_dir, idx_dir, threads=1)
    s.enroll(folder, edge_gallery=True)
    s.remove([folder / "a.png"], yes=True)
    idx = GalleryIndex.load(idx_dir)
    assert len(idx.edges) == len(idx.items) == len(NAMES) - 1
    make_photos(folder / "more", ["x.png"], seed=3)
    s.enroll(folder)  # an existing index keeps its edge gallery
    idx = GalleryIndex.load(idx_dir)
    assert len(idx.edges) == len(idx.items) == len(NAMES)
    before = idx.edges.matrix()[1].copy()
    assert run_cli("reindex", "--index", idx_dir, "--model", export_dir).exit_code == 0
    after = GalleryIndex.load(idx_dir).edges.matrix()[1]
    assert after.shape == before.shape and np.allclose(after, before, atol=1e-5)


def test_an_index_without_edge_vectors_keeps_working(export_dir, photos, tmp_path):
    folder, items = photos
    s = Searcher(export_dir, tmp_path / "idx", threads=1, edge_weight=0.7)
    s.enroll(folder, edge_gallery=False)  # as every index before issue 27
    gen = _live(tmp_path / "idx")
    assert not (gen / EDGE_FILE).exists() and "edges" not in json.loads((gen / "meta.json").read_text())
    assert s.current_index().edges is None and s.info()["edge_gallery"] is False
    sketch = make_sketch(tmp_path / "q.png", items["a.png"])
    hits = s.query(sketch=str(sketch), top_k=3)
    direct = s.current_index().search(s.encoders.sketch([str(sketch)])[0], 3)
    assert [round(h.score, 5) for h in hits] == [round(sc, 5) for _, sc in direct]
    with pytest.raises(ParameterError, match="without an edge gallery"):
        s.enroll(folder, edge_gallery=True)
    with pytest.raises(ParameterError, match="edge weight"):
        Searcher(export_dir, tmp_path / "idx", edge_weight=1.5)


def _tamper(idx_dir, data: bytes | None = None, edges_meta=None) -> None:
    """Rewrite edges.npy (and/or meta.json's ``edges``) with the checksum recomputed, as someone
    who can write the index dir would."""
    gen = _live(idx_dir)
    meta = json.loads((gen / "meta.json").read_text())
    if data is not None:
        (gen / EDGE_FILE).write_bytes(data)
        meta["checksums"][EDGE_FILE] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    if edges_meta is not None:
        meta["edges"] = edges_meta
    (gen / "meta.json").write_text(json.dumps(meta))


def _npy(array) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=True)
    return buf.getvalue()


@pytest.mark.parametrize("case", ["nan", "shape", "dtype", "norm", "drawing_norm", "pickle",
                                  "garbage", "meta", "drawing_dim"])
def test_a_tampered_edge_array_is_one_clear_error(export_dir, photos, tmp_path, case):
    folder, items = photos
    idx_dir = tmp_path / "idx"
    Searcher(export_dir, idx_dir, threads=1).enroll(folder, edge_gallery=True)
    good = np.load(_live(idx_dir) / EDGE_FILE)
    dim = json.loads((export_dir / "export.json").read_text())["embed_dim"]
    bad = {"nan": lambda: np.where(np.arange(good.size).reshape(good.shape) == 3, np.nan, good)
                              .astype(np.float32),
           "shape": lambda: good[:-1],
           "dtype": lambda: good.astype(np.float64),
           "norm": lambda: good * 3,
           "drawing_norm": lambda: np.concatenate([good[:, :dim], good[:, dim:] * 2], axis=1),
           "pickle": lambda: np.array([{"x": 1}] * len(good), dtype=object)}
    if case == "garbage":
        _tamper(idx_dir, b"\x93NUMPY not really")
    elif case == "meta":
        _tamper(idx_dir, edges_meta={"file": "../../etc/passwd", "method": "canny"})
    elif case == "drawing_dim":  # a width that does not add up to the array's
        _tamper(idx_dir, edges_meta={"file": EDGE_FILE, "method": "canny", "drawing_dim": 7})
    else:
        _tamper(idx_dir, _npy(bad[case]()))
    with pytest.raises(IndexFormatError, match="edges"):
        GalleryIndex.load(idx_dir)
    sketch = make_sketch(tmp_path / "q.png", items["a.png"])
    r = run_cli("query", "--model", export_dir, "--index", idx_dir, "--sketch", sketch)
    assert r.exit_code == 2 and one_error_line(r.stderr) and "edges" in r.stderr
    assert "Traceback" not in r.output + r.stderr


def test_an_index_with_embedding_only_edges_scores_by_embeddings(export_dir, photos, tmp_path):
    """An edge gallery written before the drawing descriptor (embeddings only) loads and scores
    sketch against drawing by embeddings; so does any index queried by another export (a student
    in the same space), whose descriptors would be another network's."""
    folder, items = photos
    idx_dir = tmp_path / "idx"
    s = Searcher(export_dir, idx_dir, threads=1)
    s.enroll(folder, edge_gallery=True)
    dim = s.encoders.embed_dim
    full = np.load(_live(idx_dir) / EDGE_FILE)
    _tamper(idx_dir, _npy(np.ascontiguousarray(full[:, :dim])),
            edges_meta={"file": EDGE_FILE, "method": "canny"})
    s = Searcher(export_dir, idx_dir, threads=1)
    idx = s.current_index()
    assert idx.edges.drawing_dim == 0 and not uses_drawing(idx, s.encoders)
    sketch = make_sketch(tmp_path / "q.png", items["d.png"])
    q = s.encoders.sketch([str(sketch)])[0]
    labels, edges = idx.edges.matrix()
    photo_vecs = np.asarray(idx.hnsw.get_items(labels), np.float32)
    photo_vecs /= np.linalg.norm(photo_vecs, axis=1, keepdims=True)
    w = s.edge_weight
    want = {int(lab): (1 - w) * float(p @ q) + w * float(e @ q)
            for lab, p, e in zip(labels, photo_vecs, edges)}
    got = {idx.files[h.path]["label"]: h.score for h in s.query(sketch=str(sketch), top_k=len(NAMES))}
    assert got == pytest.approx(want, abs=1e-4)

    class OtherExport:  # same sizes, another export: its descriptors are not comparable
        embed_dim, drawing_dim, fingerprint = dim, s.encoders.drawing_dim, "f" * 64

    fresh = Searcher(export_dir, tmp_path / "fresh", threads=1)
    fresh.enroll(folder, edge_gallery=True)
    assert uses_drawing(fresh.current_index(), fresh.encoders)
    assert not uses_drawing(fresh.current_index(), OtherExport())


def test_the_cli_chooses_the_edge_gallery_when_the_index_is_created(export_dir, photos, tmp_path):
    folder, _ = photos
    r = run_cli("enroll", "--images", folder, "--model", export_dir, "--index", tmp_path / "e",
                "--edge-gallery", "-q")
    assert r.exit_code == 0, r.output
    assert (_live(tmp_path / "e") / EDGE_FILE).is_file()
    r = run_cli("enroll", "--images", folder, "--model", export_dir, "--index", tmp_path / "p",
                "--no-edge-gallery", "-q")
    assert r.exit_code == 0 and not (_live(tmp_path / "p") / EDGE_FILE).exists()
    r = run_cli("enroll", "--images", folder, "--model", export_dir, "--index", tmp_path / "d", "-q")
    assert r.exit_code == 0 and (_live(tmp_path / "d") / EDGE_FILE).is_file()  # on by default
    r = run_cli("enroll", "--images", folder, "--model", export_dir, "--index", tmp_path / "p",
                "--edge-gallery")
    assert r.exit_code == 2 and one_error_line(r.stderr) and "edge gallery" in r.stderr


def test_a_photo_whose_drawing_fails_is_indexed_with_a_zero_edge_row(export_dir, photos, tmp_path,
                                                                      monkeypatch):
    from stbir_infer import enroll_pipeline

    folder, _ = photos
    real = enroll_pipeline.gallery_sketch

    def flaky(img):
        if img.size == Image.open(folder / "c.png").size and \
                np.array_equal(np.asarray(img), np.asarray(Image.open(folder / "c.png").convert("RGB"))):
            raise MemoryError("no room for the drawing")
        return real(img)

    monkeypatch.setattr(enroll_pipeline, "gallery_sketch", flaky)
    s = Searcher(export_dir, tmp_path / "idx", threads=1)
    report = s.enroll(folder, edge_gallery=True)
    assert report.total == len(NAMES) and not report.skipped_files
    idx = GalleryIndex.load(tmp_path / "idx")  # a zero row passes the load checks
    labels, vecs = idx.edges.matrix()
    zero = [int(lab) for lab, v in zip(labels, vecs) if not v.any()]
    assert zero == [idx.files[str((folder / "c.png").resolve())]["label"]]


def test_a_fused_query_uses_the_edge_gallery_only_when_asked(export_dir, photos, tmp_path):
    folder, items = photos
    idx_dir = tmp_path / "idx"
    Searcher(export_dir, idx_dir, threads=1).enroll(folder, edge_gallery=True)
    s = Searcher(export_dir, idx_dir, threads=1, fused_edge_weight=0.5)
    idx = s.current_index()
    sketch = make_sketch(tmp_path / "q.png", items["e.png"])
    row, tv = _rows(s, [str(sketch)])[0], s.encoders.text(["a red star"])[0]
    dim = s.encoders.embed_dim
    fused = s.fusion.combine(row[:dim], tv)
    fused = fused / np.linalg.norm(fused)
    labels, edges = idx.edges.matrix()
    photo_vecs = np.asarray(idx.hnsw.get_items(labels), np.float32)
    photo_vecs /= np.linalg.norm(photo_vecs, axis=1, keepdims=True)
    want = {int(lab): 0.5 * float(p @ fused) + 0.5 * float(e[dim:] @ row[dim:])
            for lab, p, e in zip(labels, photo_vecs, edges)}
    got = {idx.files[h.path]["label"]: h.score
           for h in s.query(sketch=str(sketch), text="a red star", top_k=len(NAMES))}
    assert got == pytest.approx(want, abs=1e-4)
    # at sketch_weight 0 (the text alone) the drawing does not count either
    text_only = {idx.files[h.path]["label"]: h.score for h in s.query(
        sketch=str(sketch), text="a red star", sketch_weight=0, top_k=len(NAMES))}
    tv_unit = tv / np.linalg.norm(tv)
    assert text_only == pytest.approx({int(lab): float(p @ tv_unit)
                                       for lab, p in zip(labels, photo_vecs)}, abs=1e-4)
    # the default (off): a fused query scores its fused vector against the photos alone
    default = Searcher(export_dir, idx_dir, threads=1)
    assert default.fused_edge_weight == DEFAULT_FUSED_WEIGHT == 0
    plain = {idx.files[h.path]["label"]: h.score
             for h in default.query(sketch=str(sketch), text="a red star", top_k=len(NAMES))}
    assert plain == pytest.approx({int(lab): float(p @ fused) for lab, p in zip(labels, photo_vecs)},
                                  abs=1e-4)


def test_auto_min_score_is_carried_over_to_edge_gallery_scores(combiner_export, photos, tmp_path):
    """The export's sketch threshold is a false-accept rate of photo scores; on edge-gallery
    scores "auto" uses the same rate, measured on the gallery's own pseudo-sketches."""
    export = combiner_export[0]
    folder, items = photos
    s = Searcher(export, tmp_path / "idx", threads=1)
    s.enroll(folder, edge_gallery=True)
    idx = s.current_index()
    photo_t = s.fusion.thresholds["modes"]["sketch"]
    t = s.score_thresholds()["sketch"]
    assert s.score_thresholds()["text"] == s.fusion.thresholds["modes"]["text"]  # not its mode
    labels, rows = idx.edges.matrix()
    dim, w = s.encoders.embed_dim, s.edge_weight
    edges, drawings = rows[:, :dim], rows[:, dim:]
    photo_vecs = np.asarray(idx.hnsw.get_items(labels), np.float32)
    photo_vecs /= np.linalg.norm(photo_vecs, axis=1, keepdims=True)
    other = ~np.eye(len(labels), dtype=bool)
    photo_scores = (edges @ photo_vecs.T)[other]
    mixed = ((1 - w) * (edges @ photo_vecs.T) + w * (drawings @ drawings.T))[other]
    rate = (photo_scores >= photo_t).mean()
    assert t == pytest.approx(np.quantile(mixed, 1 - rate) if rate else max(mixed.max(), photo_t))
    sketch = make_sketch(tmp_path / "q.png", items["b.png"])
    every = s.query(sketch=str(sketch), top_k=len(NAMES))
    kept = s.query(sketch=str(sketch), top_k=len(NAMES), min_score="auto")
    assert [h.path for h in kept] == [h.path for h in every if h.score >= t]
    # without an edge gallery the export's own threshold applies, unchanged
    plain = Searcher(export, tmp_path / "plain", threads=1)
    plain.enroll(folder, edge_gallery=False)
    assert plain.score_thresholds()["sketch"] == photo_t
