"""meta.json of a generation, every field checked before anything is built from it.

meta.json is as untrusted as index.bin (whoever can write one can write the other, and its
checksum of index.bin proves only that the two agree). A field of the wrong type or out of range
used to reach native code or the next commit: ``dim`` 4096 made export-vectors copy heap bytes
out of bounds, ``generation`` 999999999999 made the next commit write an unreadable CURRENT,
``next_label`` 0 made the next enroll overwrite live vectors. So every field is checked here, and
so are the relations between them (labels, counts, the generation's own name); what index.bin
must then hold is checked by ``stbir_infer.hnsw_file``. Anything wrong is an IndexFormatError
naming the field. meta.json itself must be a regular file (not a link, FIFO or device) of at
most ``MAX_META_BYTES``.
"""

from __future__ import annotations

import json
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stbir_infer.contract import HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH, HNSW_M, HNSW_SPACE
from stbir_infer.edge_gallery import check_meta as check_edges
from stbir_infer.errors import IndexFormatError, ParameterError

INDEX_FORMAT = "stbir-index"
INDEX_FORMAT_VERSION = 3
# 1: no checksums (read unverified); 2: absolute paths; 3: paths relative to their roots. Older
# versions load as they are and are written as the current one by the next writer.
READABLE_VERSIONS = (1, 2, 3)
META_FILE = "meta.json"
MAX_META_BYTES = 1 << 30  # about 4 million files' records
MAX_DIM = 65536
MAX_LABEL = 2**62  # labels are int64 on the way into hnswlib
MAX_GENERATION = 10**11  # gen-N names hold up to 12 digits; leave room for many commits
MAX_EF = 100_000


@dataclass(frozen=True)
class HnswParams:
    """HNSW build/search settings. M and ef_construction are fixed when an index is created;
    ef_search is a query-time setting (raised to top_k when a query asks for more)."""

    M: int = HNSW_M
    ef_construction: int = HNSW_EF_CONSTRUCTION
    ef_search: int = HNSW_EF_SEARCH

    def __post_init__(self):
        for name, lo in (("M", 2), ("ef_construction", 1), ("ef_search", 1)):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < lo:
                raise ParameterError(f"HNSW {name} must be an integer >= {lo}, not {v!r}")
        if self.M > 512 or max(self.ef_construction, self.ef_search) > MAX_EF:
            raise ParameterError(f"HNSW M must be <= 512 and ef <= {MAX_EF}")

    @classmethod
    def with_defaults(cls, M=None, ef_construction=None, ef_search=None) -> HnswParams:
        """The contract defaults, overridden where a value is given (None: the default)."""
        d = cls()
        return cls(M=d.M if M is None else M,
                   ef_construction=d.ef_construction if ef_construction is None else ef_construction,
                   ef_search=d.ef_search if ef_search is None else ef_search)

    def to_dict(self) -> dict:
        return {"M": int(self.M), "ef_construction": int(self.ef_construction),
                "ef_search": int(self.ef_search)}


class _Bad(Exception):
    pass


def _read_regular(path: Path, limit: int) -> bytes:
    """The bytes of ``path`` if it is a regular file (not a link, FIFO or device) of at most
    ``limit`` bytes; OSError otherwise (FileNotFoundError passes through as it is)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError("not a regular file")
        if st.st_size > limit:
            raise OSError(f"{st.st_size} bytes, more than the {limit} allowed")
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise OSError(f"more than the {limit} bytes allowed")
        return data
    finally:
        os.close(fd)


def read_meta(gen_dir: Path, generation: int | None = None) -> dict:
    """meta.json of a generation, every field checked (``validate``); ``generation``: the number
    in the generation dir's name. FileNotFoundError passes through: the generation may have just
    been removed by a writer."""
    meta_path = gen_dir / META_FILE
    try:
        meta = json.loads(_read_regular(meta_path, MAX_META_BYTES).decode("utf-8"))
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise IndexFormatError(f"{meta_path}: unreadable metadata ({type(exc).__name__}: "
                               f"{str(exc).splitlines()[0][:200] if str(exc) else ''})") from None
    if not isinstance(meta, dict) or meta.get("format") != INDEX_FORMAT:
        raise IndexFormatError(f"{meta_path}: not an STBIR index")
    version = meta.get("format_version")
    if version not in READABLE_VERSIONS or isinstance(version, bool):
        raise IndexFormatError(f"{meta_path}: index format version {str(version)[:20]!r} is not "
                               f"supported (this build reads {', '.join(map(str, READABLE_VERSIONS))})")
    if meta.get("space") != HNSW_SPACE:
        raise IndexFormatError(f"{meta_path}: index space {str(meta.get('space'))[:20]!r} is not "
                               f"{HNSW_SPACE!r}")
    if version >= 2:
        sums = meta.get("checksums")
        if not isinstance(sums, dict) or not all(
                isinstance(v, dict) and isinstance(v.get("sha256"), str)
                and re.fullmatch(r"[0-9a-f]{64}", v["sha256"]) and isinstance(v.get("bytes"), int)
                for v in sums.values()):
            raise IndexFormatError(f"{meta_path}: bad or missing checksums")
    validate(meta, meta_path, generation)
    return meta


def _int(value, name: str, lo: int = 0, hi: int = MAX_LABEL) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise _Bad(f"{name} must be an integer in [{lo}, {hi}], not {str(value)[:40]!r}")
    return value


def _type(value, kind, name: str):
    if not isinstance(value, kind):
        raise _Bad(f"{name} must be a {getattr(kind, '__name__', 'value')}, "
                   f"not {type(value).__name__}")
    return value


def _sha(value, name: str) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= 128:
        raise _Bad(f"{name} must be a content hash (a string)")
    return value


def _label(key, name: str) -> int:
    if not isinstance(key, str) or not key.isdigit() or not key.isascii() or len(key) > 19:
        raise _Bad(f"{name}: label {str(key)[:40]!r} is not a decimal integer")
    return _int(int(key), name)


def _path_maps(meta: dict, key: str, version: int, roots: list[str]) -> list[dict]:
    """``files`` / ``skipped`` as a list of {path: record} maps (one per root from version 3)."""
    value = meta.get(key)
    if value is None:
        return []
    if version >= 3:
        _type(value, list, key)
        if len(value) > max(len(roots), 0) and any(value[len(roots):]):
            raise _Bad(f"{key} has more maps than there are roots")
        maps = value
    else:
        maps = [value]
    for m in maps:
        _type(m, dict, key)
        for path in m:
            if version < 3 and not os.path.isabs(path):
                raise _Bad(f"{key}: a path that is not absolute")
            if "\x00" in path:
                raise _Bad(f"{key}: a path with a NUL character")
    return maps


def _check_file_record(rec, items: dict[int, str]) -> None:
    _type(rec, dict, "a files record")
    label = _int(rec.get("label"), "a file's label")
    if items.get(label) != _sha(rec.get("sha256"), "a file's sha256"):
        raise _Bad(f"a file points at label {label}, which does not hold its sha256")
    _int(rec.get("size"), "a file's size", 0, 2**63 - 1)
    _int(rec.get("mtime_ns"), "a file's mtime_ns", -2**63, 2**63 - 1)
    tags = rec.get("tags")
    if tags is not None and not (isinstance(tags, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in tags.items())):
        raise _Bad("a file's tags must map strings to strings")


def _check_skipped_record(rec) -> None:
    _type(rec, dict, "a skipped record")
    _int(rec.get("size"), "a skipped file's size", 0, 2**63 - 1)
    _int(rec.get("mtime_ns"), "a skipped file's mtime_ns", -2**63, 2**63 - 1)
    _type(rec.get("reason", ""), str, "a skipped file's reason")
    if rec.get("export") is not None:
        _type(rec["export"], str, "a skipped file's export")


def _check(meta: dict, generation: int | None) -> None:
    version = meta["format_version"]  # read_meta checked it
    if "generation" in meta or version >= 2:
        number = _int(meta.get("generation"), "generation", 0, MAX_GENERATION)
        if generation is not None and number != generation:
            raise _Bad(f"generation {number} is not the generation dir's ({generation})")
    for key in ("created", "updated"):
        if meta.get(key) is not None:
            _type(meta[key], str, key)
    model = _type(meta.get("model"), dict, "model")
    for key in ("fingerprint", "space", "clip_model", "model_dir"):
        if model.get(key) is not None:
            _type(model[key], str, f"model.{key}")
    _int(meta.get("dim"), "dim", 1, MAX_DIM)
    hnsw = _type(meta.get("hnsw"), dict, "hnsw")
    if set(hnsw) != {"M", "ef_construction", "ef_search"}:
        raise _Bad("hnsw must hold M, ef_construction and ef_search")
    _int(hnsw.get("M"), "hnsw.M", 2, 512)
    _int(hnsw.get("ef_construction"), "hnsw.ef_construction", 1, MAX_EF)
    _int(hnsw.get("ef_search"), "hnsw.ef_search", 1, MAX_EF)

    items = {}
    for key, rec in _type(meta.get("items") or {}, dict, "items").items():
        label = _label(key, "items")
        items[label] = _sha(_type(rec, dict, "an items record").get("sha256"), "an item's sha256")
    if len(set(items.values())) != len(items):
        raise _Bad("two items hold the same sha256")
    deleted = _type(meta.get("deleted") or [], list, "deleted")
    labels_deleted = {_int(x, "a deleted label") for x in deleted}
    if len(labels_deleted) != len(deleted) or labels_deleted & items.keys():
        raise _Bad("deleted labels repeat, or are also live items")
    if "count" in meta and _int(meta["count"], "count") != len(items):
        raise _Bad(f"count {meta['count']} is not the number of items ({len(items)})")
    top = max(items.keys() | labels_deleted, default=-1)
    if "next_label" in meta or version >= 2:
        next_label = _int(meta.get("next_label"), "next_label")
        if next_label <= top:
            raise _Bad(f"next_label {next_label} is not above every label in use ({top})")

    roots = _type(meta.get("roots") or [], list, "roots")
    for root in roots:
        if not isinstance(root, str) or not os.path.isabs(root) or "\x00" in root:
            raise _Bad("roots must be absolute paths")
    if len(set(roots)) != len(roots):
        raise _Bad("a root is listed twice")
    used = set()
    for m in _path_maps(meta, "files", version, roots):
        for rec in m.values():
            _check_file_record(rec, items)
            used.add(rec["label"])
    if used != items.keys():
        raise _Bad(f"{len(items.keys() - used)} items have no file")
    for m in _path_maps(meta, "skipped", version, roots):
        for rec in m.values():
            _check_skipped_record(rec)
    if meta.get("index_bytes") is not None:
        _int(meta["index_bytes"], "index_bytes", 0, 2**63 - 1)
    if meta.get("edges") is not None:  # the edge gallery (edges.npy is checked when it loads)
        try:
            check_edges(meta["edges"])
        except ValueError as exc:
            raise _Bad(str(exc)) from None


def validate(meta: dict, meta_path, generation: int | None = None) -> None:
    """Every field of ``meta`` (``read_meta`` has checked format, version, space and checksums);
    ``generation``: the number in the generation dir's name, which meta.json must repeat."""
    try:
        _check(meta, generation)
    except _Bad as exc:
        raise IndexFormatError(f"{meta_path}: bad metadata: {exc}") from None


__all__ = ["HnswParams", "INDEX_FORMAT", "INDEX_FORMAT_VERSION", "MAX_DIM", "MAX_EF", "MAX_GENERATION",
           "META_FILE", "READABLE_VERSIONS", "read_meta", "validate"]
