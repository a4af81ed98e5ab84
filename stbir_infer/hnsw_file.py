"""index.bin, hnswlib's file, parsed and checked in Python before hnswlib is allowed to read it.

hnswlib (0.8, ``hnswalg.h``: ``saveIndex`` / ``loadIndex``) trusts every byte of its file: a
header field or a neighbour id out of range makes it read or write outside its buffers (a
crafted file with a recomputed checksum crashed ``info``, ``query`` and ``serve``). The checksum
in meta.json proves only that index.bin is the file meta.json describes, not that either was
written by us, so the file is checked here against its own size and against meta.json, in full:

    header (96 bytes, little-endian, x86-64 sizes)
      offsetLevel0 Q, max_elements Q, cur_element_count Q, size_data_per_element Q,
      label_offset Q, offsetData Q, maxlevel i, enterpoint_node I, maxM Q, maxM0 Q, M Q,
      mult d, ef_construction Q
    level 0, cur_element_count records of size_data_per_element bytes:
      link count (uint16) + flags (uint8, 1 = deleted) + 1 spare byte, maxM0 neighbour ids
      (uint32), the vector (dim float32), the label (uint64)
    then per element: linkListSize (uint32) + that many bytes, one block of
      4 + maxM * 4 bytes (count + ids) per level above 0

Checked: every header field against what hnswlib itself would have written for ``dim`` and M
(sizes, offsets, maxM = M, maxM0 = 2M, mult = 1/ln M), the element count against meta.json and
the file's size, every link count and neighbour id (a neighbour at level L must itself reach
level L), the entry point and top level, labels (unique, exactly meta.json's items and deleted
labels, deleted flags as meta.json says) and vectors (finite, unit length: the cosine space stores
them normalised). Anything else is an IndexFormatError naming the field. ``max_elements`` from
the header is never used: the caller loads with the element count (``load_capacity``).
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass

import numpy as np

from stbir_infer.errors import IndexFormatError

HEADER = struct.Struct("<QQQQQQiIQQQdQ")  # 96 bytes, the order saveIndex writes them in
_LINK_COUNT = struct.Struct("<I")
_TABLEINT = 4  # sizeof(tableint), sizeof(linklistsizeint)
_LABEL = 8  # sizeof(labeltype)
MAX_LEVEL = 64  # far above any level hnswlib draws (about ln(N) / ln(M))
_UNIT_TOLERANCE = 1e-3


@dataclass(frozen=True)
class Header:
    offset_level0: int
    max_elements: int
    count: int
    size_data_per_element: int
    label_offset: int
    offset_data: int
    maxlevel: int
    enterpoint: int
    maxM: int
    maxM0: int
    M: int
    mult: float
    ef_construction: int


def load_capacity(header: Header) -> int:
    """The max_elements to hand hnswlib's load_index, so the header's own value is never used."""
    return max(header.count, 1)


def _fail(path, what: str) -> None:
    raise IndexFormatError(f"{path}: not a valid index file ({what})")


def check(path: str, *, dim: int, M: int, ef_construction: int, labels: set[int],
          deleted: set[int], shown_as=None) -> Header:
    """Parse and check the index.bin at ``path`` (see the module docstring); returns its header.
    ``labels``: the live labels meta.json lists (items), ``deleted``: its deleted labels."""
    shown = shown_as or path
    with open(path, "rb") as f:
        size = _file_size(f)
        if size < HEADER.size:
            _fail(shown, f"{size} bytes, shorter than the header")
        head = Header(*HEADER.unpack(f.read(HEADER.size)))
        _check_header(shown, head, size, dim=dim, M=M, ef_construction=ef_construction,
                      n_labels=len(labels) + len(deleted))
        if head.count == 0:
            return head
    try:
        buf = np.memmap(path, np.uint8, mode="r", shape=(size,))  # unmapped when dropped
    except (OSError, ValueError) as exc:
        _fail(shown, f"cannot map it: {exc}")
    levels = _check_upper_levels(shown, buf, head, size)
    _check_level0(shown, buf, head, levels, labels, deleted)
    return head


def _file_size(f) -> int:
    return os.fstat(f.fileno()).st_size


def _check_header(shown, h: Header, size: int, *, dim: int, M: int, ef_construction: int,
                  n_labels: int) -> None:
    links0 = 2 * M * _TABLEINT + _TABLEINT
    want = {
        "offsetLevel0": (h.offset_level0, 0),
        "M": (h.M, M),
        "maxM": (h.maxM, M),
        "maxM0": (h.maxM0, 2 * M),
        "size_data_per_element": (h.size_data_per_element, links0 + 4 * dim + _LABEL),
        "offsetData": (h.offset_data, links0),
        "label_offset": (h.label_offset, links0 + 4 * dim),
        "ef_construction": (h.ef_construction, max(ef_construction, M)),
        "cur_element_count": (h.count, n_labels),
    }
    for name, (got, expected) in want.items():
        if got != expected:
            _fail(shown, f"header {name} is {got}, expected {expected} for dim {dim}, M {M}")
    if not (math.isfinite(h.mult) and math.isclose(h.mult, 1 / math.log(M), rel_tol=1e-9)):
        _fail(shown, f"header mult is {h.mult!r}, expected 1/ln({M})")
    if h.max_elements < h.count:
        _fail(shown, f"header max_elements {h.max_elements} is below the element count {h.count}")
    level0_end = HEADER.size + h.count * h.size_data_per_element
    if level0_end + 4 * h.count > size:
        _fail(shown, f"{size} bytes cannot hold {h.count} elements")
    if h.count == 0:
        if h.maxlevel != -1 or h.enterpoint != 0xFFFFFFFF or size != HEADER.size:
            _fail(shown, "an empty index with an entry point or data")
    elif not (0 <= h.maxlevel <= MAX_LEVEL and h.enterpoint < h.count):
        _fail(shown, f"entry point {h.enterpoint} or top level {h.maxlevel} out of range")


def _check_upper_levels(shown, buf: np.ndarray, h: Header, size: int) -> np.ndarray:
    """Walk the per-element link lists above level 0; returns every element's level."""
    per_level = h.maxM * _TABLEINT + _TABLEINT
    levels = np.zeros(h.count, np.int64)
    rows: list[tuple[int, int, int]] = []  # (offset of one level's list, element, its level)
    pos = HEADER.size + h.count * h.size_data_per_element
    for i in range(h.count):
        if pos + 4 > size:
            _fail(shown, f"truncated at element {i}'s link lists")
        n = _LINK_COUNT.unpack_from(buf, pos)[0]  # type: ignore[arg-type] # an ndarray is a buffer
        pos += 4
        if n:
            if n % per_level or n // per_level > h.maxlevel or pos + n > size:
                _fail(shown, f"element {i}: link list size {n} out of range")
            levels[i] = n // per_level
            rows += [(pos + k * per_level, i, k + 1) for k in range(n // per_level)]
            pos += n
    if pos != size:
        _fail(shown, f"{size - pos} bytes after the last link list")
    if levels[h.enterpoint] != h.maxlevel:
        _fail(shown, f"entry point {h.enterpoint} is at level {levels[h.enterpoint]}, "
                     f"the top level is {h.maxlevel}")
    if rows:  # every upper-level list at once: [count word, maxM ids] per row
        at, elements, level = (np.asarray(col, np.int64) for col in zip(*rows))
        lists = buf[at[:, None] + np.arange(per_level)].view(np.uint32)
        _check_links(shown, elements, lists, h.maxM, h.count, levels, level)
    return levels


def _check_links(shown, elements: np.ndarray, lists: np.ndarray, max_links: int, count: int,
                 levels: np.ndarray, level: np.ndarray | None) -> None:
    """``lists``: rows of [count word, max_links ids], one per ``elements``; ``level``: each
    row's level (None: level 0), which each of its neighbours must also reach."""
    n = (lists[:, 0] & 0xFFFF).astype(np.int64)
    used = np.arange(max_links)[None, :] < n[:, None]
    ids = np.where(used, lists[:, 1:1 + max_links], 0).astype(np.int64)
    for bad, what in ((n > max_links, f"a link count above {max_links}"),
                      ((ids >= count).any(axis=1), "a neighbour id out of range"),
                      ((used & (levels[np.minimum(ids, count - 1)] < level[:, None])).any(axis=1)
                       if level is not None else None, "a neighbour below its link's level")):
        if bad is not None and bad.any():
            _fail(shown, f"{what} (element {int(elements[np.flatnonzero(bad)[0]])})")


def _check_level0(shown, buf: np.ndarray, h: Header, levels: np.ndarray,
                  labels: set[int], deleted: set[int], chunk: int = 16384) -> None:
    found = np.empty(h.count, np.uint64)
    is_deleted = np.empty(h.count, bool)
    for s in range(0, h.count, chunk):
        e = min(s + chunk, h.count)
        rows = buf[HEADER.size + s * h.size_data_per_element:
                   HEADER.size + e * h.size_data_per_element].reshape(e - s, -1)
        flags = rows[:, 2:4]
        if (flags[:, 0] > 1).any() or (flags[:, 1] != 0).any():
            _fail(shown, f"unknown element flags (elements {s}-{e - 1})")
        is_deleted[s:e] = flags[:, 0] == 1
        links = np.ascontiguousarray(rows[:, :h.offset_data]).view(np.uint32)
        _check_links(shown, np.arange(s, e), links, h.maxM0, h.count, levels, None)
        vectors = np.ascontiguousarray(rows[:, h.offset_data:h.label_offset]).view(np.float32)
        with np.errstate(all="ignore"):
            norms = np.sqrt(np.einsum("ij,ij->i", vectors, vectors, dtype=np.float64))
        if not (np.isfinite(vectors).all() and (abs(norms - 1) < _UNIT_TOLERANCE).all()):
            _fail(shown, f"a vector that is not finite or not of unit length (elements {s}-{e - 1})")
        found[s:e] = np.ascontiguousarray(rows[:, h.label_offset:h.label_offset + _LABEL]).view(
            np.uint64).ravel()
    if len(np.unique(found)) != h.count:
        _fail(shown, "a label appears twice")
    if set(found[~is_deleted].tolist()) != labels or set(found[is_deleted].tolist()) != deleted:
        _fail(shown, "its labels or deleted marks differ from the metadata's")


__all__ = ["HEADER", "Header", "check", "load_capacity"]
