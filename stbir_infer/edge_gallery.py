"""The edge gallery: each enrolled photo's pseudo-sketch, run through the sketch graph and kept
beside its photo vector, so that a hand-drawn query is also compared with a line drawing (issue 27).

At enroll, ``stbir_infer.edges.gallery_sketch`` draws the photo's edges (Canny, no jitter) and the
sketch graph encodes the drawing: its embedding and, where the export has one, its **drawing
descriptor** (``Encoders.drawing_dim``: the layout of the sketch tower's mid-level features,
``models.towers.DRAWING_GRID``). A sketch-only query then scores every candidate photo as

    (1 - w) * cos(sketch, photo vector) + w * cos(sketch drawing, photo's drawing)

with ``w`` the edge weight (``DEFAULT_WEIGHT``, or ``Searcher(edge_weight=...)``; 0 turns it off)
and the drawing descriptors compared where both sides have them from the same export
(``uses_drawing``), else the two embeddings (an index from before the descriptor). Candidates:
hnswlib's top ``CANDIDATES`` by photo vector plus the exact top ``CANDIDATES`` by edge score (one
matrix product over the edge rows, kept in memory), rescored exactly. Text, photo and fused
queries do not use it; a sketch+text query can, with its own weight (``DEFAULT_FUSED_WEIGHT``,
off; ``Searcher(fused_edge_weight=...)``): ``(1 - w) * cos(fused query, photo vector) + w *
cos(sketch drawing, photo's drawing)``.

On disk: ``edges.npy`` in the generation (float32 [N, D + drawing_dim], one row per live item in
label order: the embedding, then the drawing descriptor; its size and sha256 in meta.json's
``checksums`` like index.bin) and ``edges`` in meta.json (``{"file": "edges.npy", "method":
"canny", "drawing_dim": 1024}``; no ``drawing_dim`` in an index from before it). An index without
them has no edge gallery and answers as before. The file is untrusted: loaded with
``allow_pickle=False`` after its checksum, and its dtype, shape (the index's items x width),
finiteness and the norms of both parts of each row (1, or 0 for a photo the sketch graph could
not encode) are checked; anything else is one IndexFormatError.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from stbir_infer.edges import METHODS
from stbir_infer.errors import IndexFormatError, ParameterError
from stbir_infer.export_dir import MAX_DRAWING_DIM

EDGE_FILE = "edges.npy"
METHOD = "canny"
# benchmarks/human_sketches.py, the real-photo model: 5-fold cross-validation over sketchy-dev25's
# classes (each fold's weight picked on the other 20 classes) picked 1.0 for a sketch alone in
# all five folds; docs/human-sketches.md
DEFAULT_WEIGHT = 1.0
# Sketch+text: the same cross-validation picked 0.7 (instance R@1 0.054 -> 0.200, class P@1 0.243
# -> 0.430), but only with class names for texts; a user's caption says more, and nothing here
# measures human sketches with free text, so a fused query uses it only when asked
# (Searcher(fused_edge_weight=0.7)).
DEFAULT_FUSED_WEIGHT = 0.0
# New indexes get an edge gallery unless enroll --no-edge-gallery: on human sketches it lifts the
# real-photo model's instance R@1 0.03 -> 0.18 and class P@1 0.10 -> 0.39 (held-out weights)
DEFAULT_ON = True
CANDIDATES = 50
CALIBRATION_SAMPLE = 512  # gallery items whose pseudo-sketches calibrate the "auto" threshold
_NORM_TOLERANCE = 1e-3


def check_weight(weight, default: float = DEFAULT_WEIGHT) -> float:
    """An edge weight in [0, 1] (None: ``default``)."""
    if weight is None:
        return default
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) \
            or not math.isfinite(weight) or not 0 <= weight <= 1:
        raise ParameterError(f"edge weight must be a number in [0, 1], not {weight!r}")
    return float(weight)


def share(q, alone: float, fused: float) -> float:
    """The edge gallery's share of a query's score (``q``: a QuerySpec): ``alone`` when the
    sketch is the whole query (no other input, or a text at sketch_weight 1), ``fused`` for
    sketch+text (0 at sketch_weight 0: the text alone), else 0."""
    if q.mode == "sketch" or (q.mode == "sketch+text" and q.sketch_weight == 1):
        return alone
    # at sketch_weight 0 the user asked for the text alone: the drawing must not count either
    return fused if q.mode == "sketch+text" and q.sketch_weight != 0 else 0.0


def check_meta(value) -> None:
    """meta.json's ``edges`` (``index_meta`` calls this; ValueError names what is wrong)."""
    if not isinstance(value, dict) or not {"file", "method"} <= set(value) <= {
            "file", "method", "drawing_dim"}:
        raise ValueError("edges must hold file, method and (optionally) drawing_dim")
    if value["file"] != EDGE_FILE or value["method"] not in METHODS:
        raise ValueError(f"edges must name {EDGE_FILE} and a method of {', '.join(METHODS)}")
    dim = value.get("drawing_dim", 1)
    if type(dim) is not int or not 0 < dim <= MAX_DRAWING_DIM:
        raise ValueError(f"edges.drawing_dim must be an integer in 1..{MAX_DRAWING_DIM}")


def uses_drawing(idx, encoders) -> bool:
    """Whether a sketch query scores ``idx``'s edge gallery by drawing descriptors: the index has
    them and they come from this very export (a student distilled into the same space may query
    the index, but its descriptors are another network's); else by embeddings."""
    edges = idx.edges
    return bool(edges is not None and edges.drawing_dim and edges.drawing_dim == encoders.drawing_dim
                and idx.model.get("fingerprint") == encoders.fingerprint)


class EdgeVectors:
    """label -> the sketch graph's row for that photo's pseudo-sketch: its embedding (float32
    [dim]) followed by its drawing descriptor ([drawing_dim], none in an older index)."""

    def __init__(self, dim: int, rows: dict[int, np.ndarray] | None = None, method: str = METHOD,
                 drawing_dim: int = 0):
        self.dim, self.method, self.drawing_dim = int(dim), method, int(drawing_dim)
        self.width = self.dim + self.drawing_dim
        self.rows: dict[int, np.ndarray] = dict(rows or {})
        self._matrix: tuple[np.ndarray, np.ndarray] | None = None
        self._threshold: tuple[tuple, float] = ((), 0.0)  # (photo threshold, weight, N, kind), value

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, labels, vectors: np.ndarray) -> None:
        vectors = np.asarray(vectors, np.float32)
        if vectors.shape != (len(labels), self.width):
            raise ValueError(f"edge vectors of shape {vectors.shape} for {len(labels)} labels")
        self.rows.update((int(label), v) for label, v in zip(labels, vectors))
        self._matrix = None

    def drop(self, label: int) -> None:
        if self.rows.pop(int(label), None) is not None:
            self._matrix = None

    def matrix(self) -> tuple[np.ndarray, np.ndarray]:
        """(labels int64 [N] ascending, vectors float32 [N, D]), cached until the next edit."""
        if self._matrix is None:
            labels = np.fromiter(sorted(self.rows), np.int64, len(self.rows))
            vecs = (np.stack([self.rows[int(x)] for x in labels]) if len(labels)
                    else np.zeros((0, self.width), np.float32))
            self._matrix = (labels, np.ascontiguousarray(vecs, np.float32))
        return self._matrix

    def meta(self) -> dict:
        return {"file": EDGE_FILE, "method": self.method,
                **({"drawing_dim": self.drawing_dim} if self.drawing_dim else {})}

    def part(self, rows: np.ndarray, drawing: bool) -> np.ndarray:
        """The columns of ``rows`` a query compares: drawing descriptors or embeddings."""
        return rows[..., self.dim:] if drawing else rows[..., :self.dim]

    def threshold(self, idx, photo_threshold: float, weight: float, drawing: bool = False) -> float:
        """The export's score threshold for photo scores (a false-accept rate on its validation
        split) carried over to edge-gallery scores: the gallery's own pseudo-sketch vectors
        query the other items (up to CALIBRATION_SAMPLE of them), the share of those pairs whose
        photo score passes ``photo_threshold`` is the rate, and the same quantile of their
        edge-gallery scores is returned (cached). On sketchy-dev25 (real-photo model, drawing
        descriptors, weight 1.0) the export's 0.399 passes 25% of human sketches' other-class
        pairs when applied to edge-gallery scores as it is; this mapping (0.567) passes 0.5%
        (0.1% for photo scores at 0.399), and 11% of same-class pairs instead of 1.0%. At
        weight 0 (photo scores only) it is ``photo_threshold`` as it is."""
        if not weight:
            return float(photo_threshold)
        key = (float(photo_threshold), float(weight), len(self.rows), drawing)
        if self._threshold[0] != key:
            labels, rows = self.matrix()
            pick = np.linspace(0, len(labels) - 1, min(len(labels), CALIBRATION_SAMPLE)).astype(int)
            labels, rows = labels[pick], rows[pick]
            photos = _unit(np.asarray(idx.hnsw.get_items(labels), np.float32))
            other = ~np.eye(len(labels), dtype=bool)
            photo_scores = (self.part(rows, False) @ photos.T)[other]
            edge = self.part(rows, drawing)
            scores = (1 - weight) * photo_scores + weight * (edge @ edge.T)[other]
            if not len(scores):
                return float(photo_threshold)
            rate = float((photo_scores >= photo_threshold).mean())
            self._threshold = (key, float(np.quantile(scores, 1 - rate)) if rate > 0
                               else float(max(scores.max(), photo_threshold)))
        return self._threshold[1]

    def write(self, folder: Path, live: set[int]) -> None:
        """edges.npy: one row per live label, in label order (the caller keeps them in step)."""
        labels, vecs = self.matrix()
        if set(labels.tolist()) != live:
            raise ValueError("the edge gallery is out of step with the index's items")
        with open(folder / EDGE_FILE, "wb") as f:
            np.save(f, vecs, allow_pickle=False)

    @classmethod
    def read(cls, path: str, shown_as: Path, meta: dict, dim: int) -> EdgeVectors:
        """edges.npy (a verified path) for the live items of ``meta``, every value checked."""
        labels = sorted(int(k) for k in meta.get("items") or {})
        try:
            with open(path, "rb") as f:
                vecs = np.load(f, allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            raise IndexFormatError(f"{shown_as}: not a readable .npy array ({exc})") from None
        drawing_dim = int(meta["edges"].get("drawing_dim", 0))
        if vecs.dtype != np.dtype("<f4") or vecs.shape != (len(labels), dim + drawing_dim):
            raise IndexFormatError(f"{shown_as}: holds {vecs.dtype} {vecs.shape}, the index needs "
                                   f"float32 ({len(labels)}, {dim + drawing_dim})")
        if not np.isfinite(vecs).all() or not all(
                ((np.abs(n - 1) < _NORM_TOLERANCE) | (n == 0)).all()
                for n in (np.linalg.norm(vecs[:, :dim], axis=1),
                          np.linalg.norm(vecs[:, dim:], axis=1) if drawing_dim else np.zeros(0))):
            raise IndexFormatError(f"{shown_as}: rows must be finite unit vectors (or zero)")
        out = cls(dim, dict(zip(labels, vecs)), method=meta["edges"]["method"],
                  drawing_dim=drawing_dim)
        out._matrix = (np.asarray(labels, np.int64), vecs)  # the rows are views of it: no copy
        return out


def encode(encoders, pixels: list) -> np.ndarray:
    """Edge rows (``Encoders.encode_sketch_drawings``) of preprocessed pseudo-sketches; a row
    that could not be drawn (None) or that the graph cannot encode (non-finite) is zero: that
    photo then scores by its photo vector alone."""
    from stbir_infer.errors import NonFiniteEmbeddingError

    out = np.zeros((len(pixels), encoders.embed_dim + encoders.drawing_dim), np.float32)
    rows = [i for i, p in enumerate(pixels) if p is not None]
    if not rows:
        return out
    try:
        out[rows] = encoders.encode_sketch_drawings(np.stack([pixels[i] for i in rows]))
    except NonFiniteEmbeddingError as exc:
        vecs = np.asarray(exc.vectors, np.float32).copy()
        vecs[sorted(int(r) for r in exc.rows)] = 0.0
        out[rows] = vecs
    return out


def _unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)


def search(idx, query: np.ndarray, sketch: np.ndarray, k: int, *, weight: float, ef: int,
           allowed: set[int] | None = None, drawing: bool = False) -> list[tuple[int, float]]:
    """Top-k (label, score) of a sketch-only query over photo and edge vectors (see the module's
    docstring); ``query`` is the photo-side query vector, ``sketch`` the sketch's own row
    (``Encoders.encode_sketch_drawings``); ``drawing``: compare drawing descriptors
    (``uses_drawing``), else embeddings."""
    query = np.asarray(query, np.float32)
    labels, rows = idx.edges.matrix()
    vecs = idx.edges.part(rows, drawing)
    if allowed is not None:
        keep = np.isin(labels, np.fromiter(allowed, np.int64, len(allowed)))
        labels, vecs = labels[keep], vecs[keep]
    k = min(int(k), len(labels))
    if k <= 0:
        return []
    # 256-d embeddings: einsum, not BLAS (BLAS threads' wake-up cost 5-10 ms a query on a busy
    # 2-core machine); 1,024-d drawing descriptors: BLAS, 2 ms against einsum's 11 ms at 20,000
    # photos (benchmarks/edge_gallery.py)
    drawn = _unit(idx.edges.part(np.asarray(sketch, np.float32).reshape(1, -1), drawing))[0]
    edge_scores = vecs @ drawn if drawing else np.einsum("nd,d->n", vecs, drawn)
    n = min(len(labels), max(k, CANDIDATES))
    top = np.argpartition(-edge_scores, n - 1)[:n]
    # photo scores: hnswlib's (exact for what it returns); only the edge gallery's candidates it
    # did not return are read back (hnswlib's get_items costs about 20 us a vector)
    photo = dict(idx.search(query, n, ef=ef, allowed=allowed))
    missing = np.setdiff1d(labels[top], np.fromiter(photo, np.int64, len(photo)))
    if len(missing):
        got = _unit(np.asarray(idx.hnsw.get_items(missing), np.float32))
        q = _unit(query.reshape(1, -1))[0]
        photo.update(zip(missing.tolist(), np.einsum("nd,d->n", got, q).tolist()))
    cand = np.fromiter(photo, np.int64, len(photo))
    photo_scores = np.fromiter(photo.values(), np.float64, len(photo))
    scores = (1 - weight) * photo_scores + weight * edge_scores[np.searchsorted(labels, cand)]
    order = np.argsort(-scores, kind="stable")[:k]
    return [(int(cand[i]), float(scores[i])) for i in order]


__all__ = ["CANDIDATES", "DEFAULT_FUSED_WEIGHT", "DEFAULT_ON", "DEFAULT_WEIGHT", "EDGE_FILE",
           "EdgeVectors", "check_meta", "check_weight", "encode", "search", "share", "uses_drawing"]
