"""What the exporter, the trainer and the runtime agree on, in one torch-free module.

This is the bottom layer of the project (docs/ARCHITECTURE.md): ``stbir_export`` and ``models``
import it; it imports nothing of ours. It holds the export dir's file names and ``export.json``
format, the branch names, the HNSW defaults, and the two file helpers every writer needs
(``file_sha256``, ``atomic_write``).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

# -- branches ------------------------------------------------------------------------------------
BRANCHES = ("sketch", "image", "text")
QUERY_NEEDS_INPUT = "a query needs a sketch, a text or both"

# -- the export dir ------------------------------------------------------------------------------
EXPORT_FORMAT = "stbir-export"
EXPORT_FORMAT_VERSION = 1
# Version 2: the export has a learned fusion graph (COMBINER_FILE) that a version-1 runtime would
# ignore; exports without one are still written as version 1. The runtime reads both.
COMBINER_FORMAT_VERSION = 2
SUPPORTED_EXPORT_VERSIONS = (1, 2)
COMBINER_FILE = "combiner.onnx"   # [B,D] sketch + [B,D] text -> [B,D] query (optional)
COMBINER_INPUTS = ("sketch", "text")
FUSION_METHODS = ("weighted_mean", "combiner")
MANIFEST = "export.json"
TOKEN_EMBEDDING = "token_embedding.npy"
GRAPH_FILES = {branch: f"{branch}_encoder.onnx" for branch in BRANCHES}
GRAPH_OUTPUT = "embedding"
# The sketch graph's second output: the drawing descriptor the edge gallery compares drawings
# with (models.towers.DRAWING_GRID); export.json's encoders.sketch.drawing names it and its size.
DRAWING_OUTPUT = "drawing"
# Keys every export.json has (docs/ARCHITECTURE.md lists what each means).
MANIFEST_KEYS = ("format", "format_version", "embed_dim", "fusion_weight", "encoders", "tokenizer",
                 "files", "fingerprint")

# -- the index dir -------------------------------------------------------------------------------
HNSW_SPACE = "cosine"
HNSW_M = 16
HNSW_EF_CONSTRUCTION = 200
HNSW_EF_SEARCH = 64


def fingerprint(files: dict[str, str]) -> str:
    """An export's identity: sha256 of the canonical JSON of its ``files`` {name: sha256} map."""
    canonical = json.dumps(files, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def embedding_space(record: dict) -> str | None:
    """The embedding space of an ``export.json`` or of an index's model record: vectors of two
    exports in the same space can be compared (a student distilled into its teacher's space
    queries an index the teacher enrolled). Older exports and indexes carry no ``space``; theirs
    is their own export (its ``fingerprint``), so only that export matches."""
    space = record.get("space")
    return space if isinstance(space, str) and space else record.get("fingerprint")


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename inside ``path`` durable (best effort: some filesystems refuse)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write, *, mode: str = "wb", durable: bool = True) -> Path:
    """Write ``path`` so a reader sees the old file or the new one, never half of one.

    ``write(f)`` fills a temp file beside ``path`` (opened with ``mode``); it is fsynced and
    renamed over ``path``. On any failure the temp file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        encoding = None if "b" in mode else "utf-8"
        with os.fdopen(fd, mode, encoding=encoding) as f:
            write(f)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str, **kw) -> Path:
    return atomic_write(path, lambda f: f.write(text), mode="w", **kw)


__all__ = [
    "BRANCHES", "COMBINER_FILE", "COMBINER_FORMAT_VERSION", "COMBINER_INPUTS", "EXPORT_FORMAT",
    "EXPORT_FORMAT_VERSION", "FUSION_METHODS", "GRAPH_FILES", "GRAPH_OUTPUT", "DRAWING_OUTPUT",
    "HNSW_EF_CONSTRUCTION", "HNSW_EF_SEARCH", "HNSW_M", "HNSW_SPACE", "MANIFEST", "MANIFEST_KEYS",
    "QUERY_NEEDS_INPUT", "SUPPORTED_EXPORT_VERSIONS", "TOKEN_EMBEDDING", "atomic_write",
    "atomic_write_text", "embedding_space", "file_sha256", "fingerprint", "fsync_dir",
]
