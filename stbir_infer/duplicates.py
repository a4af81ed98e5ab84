"""``stbir-infer duplicates``: groups of near-identical photos in an index. It only lists.

Each photo's vector asks the HNSW graph for its ``NEIGHBOURS`` nearest vectors (one batched
``knn_query``, so about n log n work, not the n^2 of comparing every pair); a pair scoring at
least ``threshold`` joins its two photos (union-find), so a chain of edits of one photo ends up in
one group. Files with byte-identical content are one entry of the index already and always form a
group. The vectors come from the index, so no model is loaded and nothing is decoded but the
headers that give each member's pixel size.

The default threshold is measured by ``benchmarks/duplicates.py`` on Flickr8k validation photos
and edited copies of them (re-encoded, resized, cropped, brightened, EXIF-rotated): see
docs/search-features.md. Each group suggests a keeper: the most pixels, then the oldest file.
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from stbir_infer.errors import IndexNotFoundError, QueryError, StbirInferError
from stbir_infer.gallery import GalleryIndex
from stbir_infer.paths import display

DEFAULT_THRESHOLD = 0.92  # benchmarks/duplicates.py: precision 0.995, recall 0.967 (docs/search-features.md)
NEIGHBOURS = 8            # graph neighbours asked per photo (a group larger than this still joins
                          # up through its members' own neighbours)
CHUNK = 4096


class FilesGoneError(StbirInferError):
    """None of the index's files exist any more (a moved or unmounted gallery)."""


@dataclass
class Member:
    path: str
    label: int
    size: int | None = None
    width: int | None = None
    height: int | None = None
    mtime_ns: int | None = None
    missing: bool = False

    @property
    def pixels(self) -> int:
        return (self.width or 0) * (self.height or 0)

    def to_dict(self) -> dict:
        return {"path": display(self.path), "id": self.label, "size": self.size,
                "width": self.width, "height": self.height, "missing": self.missing}


@dataclass
class Group:
    members: list[Member]
    score: float                 # the lowest pair score that joined the group (1.0: same bytes)
    keeper: Member | None = field(default=None)

    def to_dict(self) -> dict:
        return {"score": round(self.score, 4), "keeper": None if self.keeper is None
                else display(self.keeper.path), "members": [m.to_dict() for m in self.members]}


@dataclass
class Report:
    threshold: float
    photos: int
    groups: list[Group]
    missing: int
    seconds: float

    def to_dict(self) -> dict:
        return {"threshold": self.threshold, "photos": self.photos, "missing_files": self.missing,
                "groups": [g.to_dict() for g in self.groups], "seconds": round(self.seconds, 3)}


def check_threshold(value) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value <= 1:
        raise QueryError(f"threshold must be a number above 0 and at most 1, not {value!r}")
    return float(value)


def similar_pairs(idx: GalleryIndex, threshold: float, k: int = NEIGHBOURS,
                  ef: int | None = None) -> list[tuple[int, int, float]]:
    """(label a, label b, cosine) with a < b for every graph neighbour pair at or above
    ``threshold``."""
    n = len(idx)
    k = min(k + 1, n)  # the first neighbour of a vector is itself
    if k < 2:
        return []
    idx.hnsw.set_ef(max(int(ef or idx.params.ef_search), 2 * k))
    found: dict[tuple[int, int], float] = {}
    for labels, vectors in idx.live_vectors(CHUNK):
        try:
            near, dist = idx.hnsw.knn_query(vectors, k=k)
        except RuntimeError:  # fewer than k reachable (many deleted slots): exact per row
            near, dist = _exact(idx, vectors, k)
        sims = 1.0 - dist
        rows, cols = np.nonzero(sims >= threshold)
        for r, c in zip(rows, cols):
            a, b = int(labels[r]), int(near[r, c])
            if a != b:
                key = (a, b) if a < b else (b, a)
                found[key] = max(found.get(key, -1.0), float(sims[r, c]))
    return [(a, b, s) for (a, b), s in sorted(found.items())]


def _exact(idx: GalleryIndex, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    labels = np.fromiter(sorted(idx.items), np.int64, len(idx.items))
    every = np.asarray(idx.hnsw.get_items(labels), np.float32)
    sims = vectors @ every.T
    order = np.argsort(-sims, axis=1)[:, :k]
    return labels[order], 1.0 - np.take_along_axis(sims, order, axis=1)


def components(pairs: list[tuple[int, int, float]]) -> list[tuple[list[int], float]]:
    """Union-find over the pairs: (sorted labels, lowest joining score) per group."""
    parent: dict[int, int] = {}

    def root(x: int) -> int:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b, _ in pairs:
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    groups: dict[int, list[int]] = {}
    lowest: dict[int, float] = {}
    for x in parent:
        groups.setdefault(root(x), []).append(x)
    for a, _, score in pairs:
        r = root(a)
        lowest[r] = min(lowest.get(r, 1.0), score)
    return [(sorted(m), lowest[r]) for r, m in sorted(groups.items())]


def _member(path: str, label: int) -> Member:
    m = Member(path=path, label=label)
    try:
        st = os.stat(path)
    except OSError:
        m.missing = True
        return m
    m.size, m.mtime_ns = st.st_size, st.st_mtime_ns
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as img:  # the header only: no pixel is decoded
                m.width, m.height = img.size
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        pass
    return m


def keeper(members: list[Member]) -> Member | None:
    """The copy to keep: most pixels, then the oldest file (then the shortest path)."""
    present = [m for m in members if not m.missing]
    if not present:
        return None
    return min(present, key=lambda m: (-m.pixels, m.mtime_ns or 0, len(m.path), m.path))


def find(index_dir: str | Path, threshold: float = DEFAULT_THRESHOLD, *,
         threads: int | None = None) -> Report:
    """The duplicate groups of the index at ``index_dir`` (largest groups first)."""
    t0 = time.perf_counter()
    threshold = check_threshold(threshold)
    try:
        idx = GalleryIndex.load(index_dir, threads=threads)
    except IndexNotFoundError:
        raise IndexNotFoundError(f"{display(index_dir)}: no index here (run `stbir-infer enroll "
                                 "--images DIR` first)") from None
    if idx.files and not any(os.path.exists(p) for p in idx.files):
        raise FilesGoneError(f"{display(index_dir)}: none of its {len(idx.files)} files exist "
                             "any more (moved? `stbir-infer relocate OLD NEW`; deleted? "
                             "`stbir-infer prune`)")
    joined = components(similar_pairs(idx, threshold))
    grouped = {label for labels, _ in joined for label in labels}
    same_bytes = [([label], 1.0) for label, paths in sorted(idx.paths.items())
                  if len(paths) > 1 and label not in grouped]
    groups = []
    for labels, score in joined + same_bytes:
        members = [_member(p, label) for label in labels for p in idx.paths.get(label) or []]
        if len(members) > 1:
            groups.append(Group(members, score, keeper(members)))
    groups.sort(key=lambda g: (-len(g.members), -g.score))
    missing = sum(m.missing for g in groups for m in g.members)
    return Report(threshold, len(idx), groups, missing, time.perf_counter() - t0)


__all__ = ["DEFAULT_THRESHOLD", "FilesGoneError", "Group", "Member", "NEIGHBOURS", "Report",
           "components", "find", "keeper", "similar_pairs"]
