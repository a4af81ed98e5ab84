"""``stbir-infer export-vectors``: the index's vectors and entries in standard files, for a vector
database or a sharded service when one machine no longer holds the gallery.

    OUT/
      vectors.npy     float32 [N, D] unit vectors (cosine = dot product), row i = line i below
      entries.jsonl   one JSON object a line: id (the index's label), sha256 of the content, and
                      files: [{path, folder, tags}] (path in display form, plus path_bytes_b64
                      where the name is not printable UTF-8)
      manifest.json   format "stbir-vectors" version 1, count, dim, space, the model record (the
                      export that made the vectors) and the index generation they came from

Files are written into a temporary dir beside OUT, which is renamed to OUT once complete: OUT
either does not exist or holds a whole export. ``load_vectors`` reads one back (no pickle).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from stbir_infer.contract import fsync_dir
from stbir_infer.errors import IndexEditError, IndexFormatError
from stbir_infer.gallery import SPACE, GalleryIndex
from stbir_infer.paths import display, path_bytes_b64
from stbir_infer.roots import folder_of

FORMAT = "stbir-vectors"
VERSION = 1
VECTORS, ENTRIES, MANIFEST = "vectors.npy", "entries.jsonl", "manifest.json"


def _file_entry(path: str, rec: dict, roots: list[str]) -> dict:
    d = {"path": display(path), "folder": display(folder_of(path, roots)),
         "tags": rec.get("tags") or {}}
    if d["path"] != path:
        d["path_bytes_b64"] = path_bytes_b64(path)
    return d


def export_vectors(index_dir: str | Path, out_dir: str | Path) -> dict:
    """Write the live generation's vectors and entries to ``out_dir`` (which must not exist, or
    be an empty dir); returns the manifest."""
    out_dir = Path(out_dir).expanduser()
    if out_dir.is_symlink():  # rmdir / replace below would act on the link, not the folder
        raise IndexEditError(f"{display(out_dir)}: is a symbolic link; give a new or empty folder")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise IndexEditError(f"{display(out_dir)}: exists and is not an empty dir")
    idx = GalleryIndex.load(Path(index_dir).expanduser())
    labels = sorted(idx.items)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with open(tmp / VECTORS, "wb") as f:
            np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False,
                                                     "shape": (len(labels), idx.dim)})
            for _, block in idx.live_vectors():  # streamed: the index may be large
                f.write(np.ascontiguousarray(block, "<f4").tobytes())
            os.fsync(f.fileno())
        with open(tmp / ENTRIES, "w", encoding="utf-8") as f:
            for label in labels:
                files = [_file_entry(p, idx.files[p], idx.roots) for p in idx.paths.get(label, [])]
                f.write(json.dumps({"id": label, "sha256": idx.items[label], "files": files},
                                   ensure_ascii=False) + "\n")
            os.fsync(f.fileno())
        manifest = {"format": FORMAT, "format_version": VERSION, "count": int(len(labels)),
                    "dim": idx.dim, "space": SPACE, "dtype": "float32",
                    "files": {"vectors": VECTORS, "entries": ENTRIES}, "model": idx.model,
                    "index_generation": idx.generation}
        with open(tmp / MANIFEST, "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2, ensure_ascii=False)
            os.fsync(f.fileno())
        fsync_dir(tmp)
        if out_dir.is_dir():
            out_dir.rmdir()  # empty (checked above); os.replace needs the name free
        os.replace(tmp, out_dir)
        fsync_dir(out_dir.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def load_vectors(out_dir: str | Path) -> tuple[np.ndarray, list[dict], dict]:
    """(vectors [N, D] float32, entries, manifest) of an export-vectors dir (no pickle)."""
    out_dir = Path(out_dir)
    try:
        manifest = json.loads((out_dir / MANIFEST).read_text(encoding="utf-8"))
        vectors = np.load(out_dir / VECTORS, allow_pickle=False, mmap_mode="r")
        with open(out_dir / ENTRIES, encoding="utf-8") as f:
            entries = [json.loads(line) for line in f]
    except (OSError, ValueError) as exc:
        raise IndexFormatError(f"{out_dir}: not a readable vectors export ({exc})") from None
    if manifest.get("format") != FORMAT or vectors.shape != (manifest.get("count"), manifest.get("dim")) \
            or len(entries) != len(vectors):
        raise IndexFormatError(f"{out_dir}: vectors, entries and manifest do not agree")
    return vectors, entries, manifest


__all__ = ["ENTRIES", "FORMAT", "MANIFEST", "VECTORS", "export_vectors", "load_vectors"]
