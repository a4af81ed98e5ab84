"""The edge gallery: each enrolled photo's pseudo-sketch, as a sketch-tower vector beside its photo
vector, so that a hand-drawn query is also compared with a line drawing (issue 27).

At enroll, ``stbir_infer.edges.gallery_sketch`` draws the photo's edges (Canny, no jitter) and the
sketch tower encodes the drawing. A sketch-only query then scores every candidate photo as

    (1 - w) * cos(sketch, photo vector) + w * cos(sketch, edge vector)

with ``w`` the edge weight (``DEFAULT_WEIGHT``, or ``Searcher(edge_weight=...)``; 0 turns it off).
Candidates: hnswlib's top ``CANDIDATES`` by photo vector plus the exact top ``CANDIDATES`` by edge
vector (one matrix product over the edge vectors, kept in memory), rescored exactly. Text,
photo and fused queries do not use it.

On disk: ``edges.npy`` in the generation (float32 [N, D], one row per live item in label order,
its size and sha256 in meta.json's ``checksums`` like index.bin) and ``edges`` in meta.json
(``{"file": "edges.npy", "method": "canny"}``). An index without them has no edge gallery and
answers as before. The file is untrusted: loaded with ``allow_pickle=False`` after its checksum,
and its dtype, shape (the index's items x dim), finiteness and row norms (1, or 0 for a photo the
sketch tower could not embed) are checked; anything else is one IndexFormatError.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from stbir_infer.edges import METHODS
from stbir_infer.errors import IndexFormatError, ParameterError

EDGE_FILE = "edges.npy"
METHOD = "canny"
# benchmarks/human_sketches.py, the real-photo model: 5-fold cross-validation over sketchy-dev25's
# classes picked 0.8, 0.9, 0.8, 0.9, 0.8 (each on the other 20 classes); docs/human-sketches.md
DEFAULT_WEIGHT = 0.8
# New indexes get an edge gallery unless enroll --no-edge-gallery: on human sketches it doubles
# the real-photo model's class P@1 (0.102 -> 0.230, held-out weights) for ~25 ms a photo at enroll
DEFAULT_ON = True
CANDIDATES = 50
CALIBRATION_SAMPLE = 512  # gallery items whose pseudo-sketches calibrate the "auto" threshold
_NORM_TOLERANCE = 1e-3


def check_weight(weight) -> float:
    """The edge weight in [0, 1] (None: DEFAULT_WEIGHT)."""
    if weight is None:
        return DEFAULT_WEIGHT
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) \
            or not math.isfinite(weight) or not 0 <= weight <= 1:
        raise ParameterError(f"edge weight must be a number in [0, 1], not {weight!r}")
    return float(weight)


def share(q, alone: float, fused: float) -> float:
    """The edge gallery's share of a query's score (``q``: a QuerySpec): ``alone`` when the
    sketch is the whole query (no other input, or a text at sketch_weight 1), ``fused`` for
    sketch+text, else 0."""
    if q.mode == "sketch" or (q.mode == "sketch+text" and q.sketch_weight == 1):
        return alone
    return fused if q.mode == "sketch+text" else 0.0


def check_meta(value) -> None:
    """meta.json's ``edges`` (``index_meta`` calls this; ValueError names what is wrong)."""
    if not isinstance(value, dict) or set(value) != {"file", "method"}:
        raise ValueError("edges must hold exactly file and method")
    if value["file"] != EDGE_FILE or value["method"] not in METHODS:
        raise ValueError(f"edges must name {EDGE_FILE} and a method of {', '.join(METHODS)}")


class EdgeVectors:
    """label -> the sketch-tower vector of that photo's pseudo-sketch (float32 [D])."""

    def __init__(self, dim: int, rows: dict[int, np.ndarray] | None = None, method: str = METHOD):
        self.dim, self.method = int(dim), method
        self.rows: dict[int, np.ndarray] = dict(rows or {})
        self._matrix: tuple[np.ndarray, np.ndarray] | None = None
        self._threshold: tuple[tuple, float] = ((), 0.0)  # (photo threshold, weight, N), value

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, labels, vectors: np.ndarray) -> None:
        vectors = np.asarray(vectors, np.float32)
        if vectors.shape != (len(labels), self.dim):
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
                    else np.zeros((0, self.dim), np.float32))
            self._matrix = (labels, np.ascontiguousarray(vecs, np.float32))
        return self._matrix

    def meta(self) -> dict:
        return {"file": EDGE_FILE, "method": self.method}

    def threshold(self, idx, photo_threshold: float, weight: float) -> float:
        """The export's score threshold for photo scores (a false-accept rate on its validation
        split) carried over to edge-gallery scores: the gallery's own pseudo-sketch vectors
        query the other items (up to CALIBRATION_SAMPLE of them), the share of those pairs whose
        photo score passes ``photo_threshold`` is the rate, and the same quantile of their
        edge-gallery scores is returned (cached). On sketchy-dev25 (real-photo model, weight
        0.8) the export's 0.399 passes 28% of human sketches' other-class pairs when applied to
        edge-gallery scores as it is; this mapping (0.613) passes 0.2% (0.1% for photo scores
        at 0.399), and 4.8% of same-class pairs instead of 1.0%."""
        key = (float(photo_threshold), float(weight), len(self.rows))
        if self._threshold[0] != key:
            labels, vecs = self.matrix()
            pick = np.linspace(0, len(labels) - 1, min(len(labels), CALIBRATION_SAMPLE)).astype(int)
            labels, vecs = labels[pick], vecs[pick]
            photos = _unit(np.asarray(idx.hnsw.get_items(labels), np.float32))
            other = ~np.eye(len(labels), dtype=bool)
            photo_scores = (vecs @ photos.T)[other]
            scores = (1 - weight) * photo_scores + weight * (vecs @ vecs.T)[other]
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
        if vecs.dtype != np.dtype("<f4") or vecs.shape != (len(labels), dim):
            raise IndexFormatError(f"{shown_as}: holds {vecs.dtype} {vecs.shape}, the index needs "
                                   f"float32 ({len(labels)}, {dim})")
        norms = np.linalg.norm(vecs, axis=1) if len(vecs) else np.zeros(0)
        if not np.isfinite(vecs).all() or not (
                (np.abs(norms - 1) < _NORM_TOLERANCE) | (norms == 0)).all():
            raise IndexFormatError(f"{shown_as}: rows must be finite unit vectors (or zero)")
        out = cls(dim, dict(zip(labels, vecs)), method=meta["edges"]["method"])
        out._matrix = (np.asarray(labels, np.int64), vecs)  # the rows are views of it: no copy
        return out


def encode(encoders, pixels: list) -> np.ndarray:
    """Sketch-tower vectors of preprocessed pseudo-sketches; a row that could not be drawn (None)
    or that the tower cannot embed (non-finite) is zero: that photo then scores by its photo
    vector alone."""
    from stbir_infer.errors import NonFiniteEmbeddingError

    out = np.zeros((len(pixels), encoders.embed_dim), np.float32)
    rows = [i for i, p in enumerate(pixels) if p is not None]
    if not rows:
        return out
    try:
        out[rows] = encoders.encode_pixels("sketch", np.stack([pixels[i] for i in rows]))
    except NonFiniteEmbeddingError as exc:
        vecs = np.asarray(exc.vectors, np.float32).copy()
        vecs[sorted(int(r) for r in exc.rows)] = 0.0
        out[rows] = vecs
    return out


def _unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)


def search(idx, query: np.ndarray, sketch: np.ndarray, k: int, *, weight: float, ef: int,
           allowed: set[int] | None = None) -> list[tuple[int, float]]:
    """Top-k (label, score) of a sketch-only query over photo and edge vectors (see the module's
    docstring); ``query`` is the photo-side query vector, ``sketch`` the sketch's own vector."""
    query = np.asarray(query, np.float32)
    labels, vecs = idx.edges.matrix()
    if allowed is not None:
        keep = np.isin(labels, np.fromiter(allowed, np.int64, len(allowed)))
        labels, vecs = labels[keep], vecs[keep]
    k = min(int(k), len(labels))
    if k <= 0:
        return []
    # einsum, not BLAS: a matrix-vector product gains nothing from BLAS threads, whose wake-up
    # cost 5-10 ms a query on a busy 2-core machine (benchmarks/edge_gallery.py)
    edge_scores = np.einsum("nd,d->n", vecs, _unit(np.asarray(sketch, np.float32).reshape(1, -1))[0])
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


__all__ = ["CANDIDATES", "DEFAULT_ON", "DEFAULT_WEIGHT", "EDGE_FILE", "EdgeVectors", "check_meta",
           "check_weight", "encode", "search", "share"]
