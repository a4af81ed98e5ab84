"""The runtime's public face: load an export and an index once, then query and enroll many times.

    from stbir_infer import Searcher
    s = Searcher("runs/demo/export", "runs/demo/index")
    s.enroll("photos/")                                  # incremental
    for hit in s.query(sketch="cat.png", text="a ginger cat", top_k=5):
        print(hit.rank, round(hit.score, 3), hit.path)
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from stbir_infer import edge_gallery, store
from stbir_infer.contract import file_sha256
from stbir_infer.encoders import Encoders
from stbir_infer.enroll import EnrollReport, enroll
from stbir_infer.errors import (
    IndexFormatError,
    IndexNotFoundError,
    ModelMismatchError,
    NonFiniteEmbeddingError,
    ParameterError,
    QueryError,
)
from stbir_infer.filters import parse_where
from stbir_infer.fusion import Fusion
from stbir_infer.gallery import SPACE, GalleryIndex, HnswParams
from stbir_infer.hits import Hit, hits_of
from stbir_infer.index_meta import MAX_EF
from stbir_infer.paths import display
from stbir_infer.query_spec import AUTO, QuerySpec, mode_of
from stbir_infer.session import DEFAULT_PROVIDER

log = logging.getLogger("stbir_infer")


def _content_hash(source) -> str:
    """sha256 of an example photo's file ("" for a decoded image: its file is unknown)."""
    return file_sha256(source) if isinstance(source, (str, os.PathLike)) else ""


def _check_positive(name: str, value, error=ParameterError) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise error(f"{name} must be an integer >= 1, not {value!r}")
    return int(value)


def _positive_or_none(name: str, value) -> int | None:
    """None (the library's default) or an integer >= 1."""
    return None if value is None else _check_positive(name, value)


class Searcher:
    """An export dir (the encoders) plus an index dir (the gallery).

    ``threads``: onnxruntime intra-op threads and hnswlib threads (None: library defaults).
    ``ef_search``: HNSW search breadth (None: the value stored in the index, 64 by default);
    ``enroll`` stores it in the index as the new default.
    ``M`` / ``ef_construction``: used only when ``enroll`` creates the index.
    ``precision``: "fp32" or "int8" (the export's quantised graphs).
    ``provider``: onnxruntime execution provider (``cpu``, ``cuda``...; ``stbir_infer.session``).
    ``edge_weight``: the share of the edge gallery in a sketch-only query's score, where the
    index has one (``stbir_infer.edge_gallery``; None: its default, 0: photo vectors only);
    ``fused_edge_weight``: the same for a sketch+text query (None: its default, 0: the fused
    vector against photo vectors only).
    An index built with another export is refused (ModelMismatchError) here, not at first query.

    A long-lived Searcher (the web server) follows new generations as writers commit them; one
    that fails to load (a corrupt file, a checksum mismatch) is not served: the last good one
    stays, and ``load_error`` says why (logged once, on logger "stbir_infer").
    """

    def __init__(self, model_dir: str | Path, index_dir: str | Path, *, threads: int | None = None,
                 ef_search: int | None = None, M: int | None = None,
                 ef_construction: int | None = None, precision: str = "fp32",
                 provider: str = DEFAULT_PROVIDER, edge_weight: float | None = None,
                 fused_edge_weight: float | None = None):
        self.threads = _positive_or_none("threads", threads)
        self.edge_weight = edge_gallery.check_weight(edge_weight)
        self.fused_edge_weight = edge_gallery.check_weight(fused_edge_weight,
                                                           edge_gallery.DEFAULT_FUSED_WEIGHT)
        self.ef_search = _positive_or_none("ef_search", ef_search)
        if (self.ef_search or 0) > MAX_EF:  # hnswlib's set_ef overflowed on 1e23
            raise ParameterError(f"ef_search must be at most {MAX_EF}, not {self.ef_search}")
        self._M = M
        self._ef_construction = ef_construction
        if M is not None or ef_construction is not None:  # validate early
            HnswParams.with_defaults(M, ef_construction)
        self.encoders = Encoders(model_dir, threads=threads, precision=precision, provider=provider)
        self.fusion = Fusion(self.encoders)  # weighted mean or combiner.onnx; score thresholds
        self.index_dir = Path(index_dir).expanduser()
        self._index: GalleryIndex | None = None
        self._stamp = None
        self.load_error: str | None = None  # why the newest generation is not the one served
        self._lock = threading.Lock()
        self.current_index()

    # -- index state -------------------------------------------------------------------------------
    def current_index(self) -> GalleryIndex | None:
        """The index as last committed (reloaded when another process or our own enroll has
        committed a new generation); None before the first enroll.

        Attributes the web layer reads: ``files`` (path -> {sha256, size, mtime_ns, label}),
        ``items`` (label -> sha256), ``paths`` (label -> sorted paths), ``len(idx)``.
        A newly committed generation that cannot be loaded raises only when there is no good one
        to keep serving; otherwise the good one is returned and ``load_error`` is set."""
        stamp = store.current_stamp(self.index_dir)
        if stamp is None:
            return self._index
        if stamp != self._stamp or self._index is None:
            with self._lock:
                if stamp != self._stamp or self._index is None:
                    try:
                        idx = GalleryIndex.load(self.index_dir, threads=self.threads)
                        idx.check_model(self.encoders.model_record(), self.index_dir,
                                        query=True)  # same embedding space suffices
                    except (IndexFormatError, ModelMismatchError, IndexNotFoundError) as exc:
                        if self._index is None:
                            raise
                        if self.load_error != str(exc):
                            log.warning("keeping generation %s: the newest cannot be loaded: %s",
                                        self._index.generation, exc)
                        self.load_error, self._stamp = str(exc), stamp  # not retried per query
                        return self._index
                    self._index, self._stamp, self.load_error = idx, stamp, None
        return self._index

    def reload(self) -> None:
        self._stamp = None
        self.current_index()

    @property
    def fusion_weight(self) -> float:
        return self.fusion.default_weight

    # -- enroll ---------------------------------------------------------------------------------------
    def enroll(self, images_dir: str | Path, batch_size: int = 32, progress: bool = False, *,
               checkpoint_seconds: float = 300.0,
               follow_external_links: bool = False, tags=None,
               edge_gallery: bool | None = None) -> EnrollReport:
        """Add new / changed images under ``images_dir``, drop removed ones (see EnrollReport).
        ``follow_external_links``: also index files that symbolic links reach outside
        ``images_dir`` (off: such links are reported as skipped). ``tags`` ({key: value}):
        set on every photo of the folder, for ``query(where=...)``. ``edge_gallery``: a new
        index also stores each photo's pseudo-sketch vector (None: the default)."""
        report = enroll(self.encoders, self.index_dir, images_dir, batch_size=batch_size,
                        progress=progress, M=self._M, ef_construction=self._ef_construction,
                        ef_search=self.ef_search, threads=self.threads,
                        checkpoint_seconds=checkpoint_seconds,
                        follow_external_links=follow_external_links, tags=tags,
                        edge_gallery=edge_gallery)
        self.reload()
        return report

    def remove(self, paths, *, yes: bool = False):
        """Take files or folders out of the index (``stbir_infer.lifecycle.remove``)."""
        from stbir_infer.lifecycle import remove

        report = remove(self.index_dir, paths, yes=yes)
        self.reload()
        return report

    def prune(self, *, yes: bool = False):
        """Drop entries whose files are gone (``stbir_infer.lifecycle.prune``)."""
        from stbir_infer.lifecycle import prune

        report = prune(self.index_dir, yes=yes)
        self.reload()
        return report

    # -- query ------------------------------------------------------------------------------------
    def warm_up(self) -> None:
        """Open every session a query uses (sketch, text, the combiner where the export has one),
        so that the first real query is not the slow one."""
        sketch = self.encoders.sketch([Image.new("L", (64, 64), 255)])[0]
        self.fusion.combine(sketch, self.encoders.text(["warm up"])[0])

    def query(self, sketch=None, text: str | None = None, top_k: int = 10, *,
              sketch_weight: float | None = None, min_score=None, where=None, image=None,
              image_weight: float | None = None, like: int | None = None) -> list[Hit]:
        """Top-k images for a sketch (path or PIL image), a text, an example photo (``image``: a
        path or PIL image; ``like``: the id of a photo in the index), or several of them (fused
        as ``stbir_infer.fusion`` says). ``sketch_weight`` in [0, 1] replaces the default weight
        of the sketch (1: sketch only, 0: text only), ``image_weight`` the example photo's share.
        ``min_score`` (a number or "auto": the export's validation threshold for the query's
        mode) drops weaker hits: an empty list means no match. ``where`` ({key: value} or
        ["key=value"]: ``folder`` or an enroll tag) keeps only matching photos
        (``stbir_infer.filters``). With an example photo each hit says whether it holds the
        same file content (``same_file``). QueryError when no input is given or a value is
        out of range (``stbir_infer.query_spec``)."""
        return self.answer(QuerySpec.parse(
            sketch=sketch, text=text, top_k=top_k, sketch_weight=sketch_weight,
            min_score=min_score, where=where, image=image, image_weight=image_weight, like=like))

    def answer(self, spec: QuerySpec) -> list[Hit]:
        """``query`` for a checked ``QuerySpec``."""
        return self.query_many([spec])[0]

    def query_many(self, queries: Sequence[dict | QuerySpec], *, errors: str = "raise",
                   batch_size: int = 32) -> list:
        """``query`` for many queries at once: each a ``QuerySpec`` or a dict of ``query``'s
        keyword arguments. Sketches, photos and texts are encoded in batches of ``batch_size``,
        so this answers many more queries a second than one ``query`` call each. Returns one list
        of hits per query, in order. ``errors="return"``: a query that cannot run gets its
        QueryError in its place instead of raising it."""
        if errors not in ("raise", "return"):
            raise ValueError(f"errors must be 'raise' or 'return', not {errors!r}")
        batch_size = _check_positive("batch_size", batch_size, QueryError)
        out: list = [None] * len(queries)
        specs: dict[int, QuerySpec] = {}
        for i, q in enumerate(queries):
            try:
                specs[i] = QuerySpec.from_dict(q)
            except QueryError as exc:
                out[i] = exc
        if specs:
            self._answer_many(self._require_index(), specs, out, batch_size)
        if errors == "raise":
            first = next((r for r in out if isinstance(r, QueryError)), None)
            if first is not None:
                raise first
        return out

    def _answer_many(self, idx: GalleryIndex, specs: dict[int, QuerySpec], out: list,
                     batch_size: int) -> None:
        """``out[i]``: the hits of query ``specs[i]``, or its QueryError."""
        floors: dict[int, float | None] = {}
        for i, q in specs.items():
            try:
                floors[i] = self.min_score_for(q.min_score, mode=q.mode)
                if q.where:
                    idx.labels_where(q.where)  # an unknown key fails before any encoding
            except QueryError as exc:
                out[i] = exc
        # a sketch's row: its embedding, then (for the edge gallery) its drawing descriptor
        drawing = edge_gallery.uses_drawing(idx, self.encoders)
        sketches = self._encode_many(specs, "sketch", out, batch_size, drawing=drawing)
        images = self._encode_many(specs, "image", out, batch_size)
        texts = self._encode_many(specs, "text", out, batch_size)
        dim = self.encoders.embed_dim
        for i, q in specs.items():
            if out[i] is None:
                try:
                    image, sha = images.get(i, (None, None))
                    if q.like is not None:
                        image, sha = self._stored(idx, q.like)
                    row = sketches.get(i)
                    vector = self.fusion.query(None if row is None else row[:dim], texts.get(i),
                                               image, q.sketch_weight, q.image_weight)
                    share = edge_gallery.share(q, self.edge_weight, self.fused_edge_weight)
                    hits = self._search(idx, vector, q.top_k, q.where,
                                        same=sha if q.has_image else None,
                                        sketch=row, edge_weight=share, drawing=drawing)
                    floor = floors[i]
                    if floor is not None and q.min_score == AUTO and idx.edges is not None:
                        floor = idx.edges.threshold(idx, floor, share, drawing)
                    out[i] = hits if floor is None else [h for h in hits if h.score >= floor]
                except QueryError as exc:
                    out[i] = exc

    @staticmethod
    def _stored(idx: GalleryIndex, label: int) -> tuple[np.ndarray, str]:
        """The stored vector and sha256 of an enrolled photo ("more like this")."""
        if label not in idx.items:
            raise QueryError(f"like: no photo with id {label} in the index")
        return np.asarray(idx.hnsw.get_items([label]), np.float32)[0], idx.items[label]

    def _encode_many(self, specs: dict, branch: str, out: list, batch_size: int, *,
                     drawing: bool = False) -> dict:
        """{query number: vector} for the queries that have a ``branch`` input (for ``image``:
        (vector, sha256 of the file or None); for ``sketch`` with ``drawing``: the embedding
        followed by the drawing descriptor, ``Encoders.encode_sketch_drawings``), encoded in
        batches; a query whose input cannot be read or encoded gets its QueryError in ``out``."""
        todo = [(i, getattr(q, branch)) for i, q in specs.items()
                if getattr(q, branch) is not None and out[i] is None]
        vectors: dict[int, np.ndarray] = {}
        shas: dict[int, str | None] = {}
        if branch != "text":  # decode one by one: a bad file fails only its own query
            pixels = []
            for i, source in todo:
                try:
                    pixels.append((i, self.encoders.preprocess(branch, [source])[0]))
                    if branch == "image":
                        shas[i] = specs[i].image_sha256 or _content_hash(source)
                except (ValueError, OSError) as exc:  # ImageDecodeError, a shape that resizes to nothing
                    out[i] = QueryError(f"{branch}: {exc}")
            todo = pixels
        for start in range(0, len(todo), batch_size):
            part = todo[start:start + batch_size]
            inputs = [x for _, x in part]
            try:
                if branch == "text":
                    got = self.encoders.text(inputs)
                elif drawing:
                    got = self.encoders.encode_sketch_drawings(np.stack(inputs))
                else:
                    got = self.encoders.encode_pixels(branch, np.stack(inputs))
                bad = set()
            except NonFiniteEmbeddingError as exc:
                got, bad = exc.vectors, set(exc.rows)
                for row in bad:
                    out[part[row][0]] = exc
            vectors.update((i, got[row]) for row, (i, _) in enumerate(part) if row not in bad)
        if branch == "image":
            return {i: (v, shas.get(i)) for i, v in vectors.items()}
        return vectors

    def score_thresholds(self) -> dict[str, float]:
        """The export's score threshold per query mode ("auto"); a mode the edge gallery scores
        gets it mapped onto those scores (``EdgeVectors.threshold``)."""
        modes = dict((self.fusion.thresholds or {}).get("modes") or {})
        idx = self.current_index()
        if idx is None or idx.edges is None:
            return modes
        drawing = edge_gallery.uses_drawing(idx, self.encoders)
        for mode, share in (("sketch", self.edge_weight), ("sketch+text", self.fused_edge_weight)):
            if mode in modes:
                modes[mode] = idx.edges.threshold(idx, modes[mode], share, drawing)
        return modes

    def min_score_for(self, min_score, sketch=None, text: str | None = None, *, image=None,
                      mode: str | None = None) -> float | None:
        """The score threshold a query with these inputs (or of this ``QuerySpec.mode``) uses
        (None: none)."""
        if mode is None:
            mode = mode_of(sketch is not None, image is not None,
                           text is not None and bool(str(text).strip()))
        return self.fusion.min_score(min_score, mode)

    def search(self, vector: np.ndarray, top_k: int = 10, where=None) -> list[Hit]:
        """Top-k images for a precomputed query vector [D] (e.g. from ``fusion.Fusion.query``)."""
        top_k = _check_positive("top_k", top_k, QueryError)
        vector = np.asarray(vector, np.float32).reshape(-1)
        if vector.shape[0] != self.encoders.embed_dim:
            raise QueryError(f"query vector has {vector.shape[0]} dims, the index "
                             f"{self.encoders.embed_dim}")
        return self._search(self._require_index(), vector, top_k, parse_where(where))

    def _require_index(self) -> GalleryIndex:
        idx = self.current_index()
        if idx is None:
            raise IndexNotFoundError(f"{self.index_dir}: no index here yet "
                                     "(run `stbir-infer enroll --images DIR` first)")
        return idx

    def _search(self, idx: GalleryIndex, vector: np.ndarray, top_k: int, where=None, *,
                same: str | None = None, sketch: np.ndarray | None = None,
                edge_weight: float = 0.0, drawing: bool = False) -> list[Hit]:
        """``same``: the example photo's sha256 (hits holding it get ``same_file`` True); ""
        when it is not known (every hit False); None for a query without a photo. ``sketch``:
        the query's sketch row, scored against the edge gallery at ``edge_weight`` where the
        index has one (by drawing descriptors with ``drawing``)."""
        allowed = idx.labels_where(where) if where else None
        ef = self.ef_search or idx.params.ef_search
        with self._lock:  # hnswlib's ef is index-wide state
            if sketch is not None and idx.edges is not None and edge_weight > 0:
                found = edge_gallery.search(idx, vector, sketch, top_k, weight=edge_weight, ef=ef,
                                            allowed=allowed, drawing=drawing)
            else:
                found = idx.search(vector, top_k, ef=ef, allowed=allowed)
        return hits_of(idx, found, where, same)

    # -- info ---------------------------------------------------------------------------------------
    def info(self) -> dict:
        """Index size, the model it was built with, HNSW parameters (JSON-safe: paths in
        ``paths.display`` form). ``load_error`` is present when a newer generation than the one
        served could not be loaded."""
        idx = self.current_index()
        out = {"index_dir": display(self.index_dir.resolve()), "exists": idx is not None,
               "export": {**self.encoders.describe(), "fusion": self.fusion.describe()}}
        if idx is None:
            return out
        out.update({
            "images": len(idx), "files": len(idx.files), "skipped_files": len(idx.skipped),
            "generation": idx.generation, "created": idx.created, "updated": idx.updated,
            "roots": [display(r) for r in idx.roots], "space": SPACE, "dim": idx.dim,
            "format_version": idx.format_version, "edge_gallery": idx.edges is not None,
            "hnsw": {**idx.params.to_dict(),
                     "ef_search_effective": self.ef_search or idx.params.ef_search},
            "model": dict(idx.model),
        })
        if self.load_error:
            out["load_error"] = self.load_error
        return out
