"""Enroll a photo folder into an index dir: incremental, deduplicated by content, crash-safe.

Unchanged files (same size and mtime, or same content) are not encoded again; a file whose
content is already in the index (a duplicate) is not encoded at all; files that are gone from the
folder leave the index; unreadable and non-image files are skipped and counted.
"""

from __future__ import annotations

import hashlib
import os
import stat
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from stbir_infer import index as _index
from stbir_infer import preprocess as _pre
from stbir_infer.encoders import Encoders
from stbir_infer.errors import EnrollError, ParameterError


@dataclass
class EnrollReport:
    """What one enroll did (counts are of files).

    added      files new to the index
    updated    files already indexed whose content changed
    removed    files that left the index (deleted, or no longer a readable image)
    unchanged  files already indexed with the same content
    duplicates of the added/updated files, those whose content was already indexed or appeared
               earlier in this run, so they were not encoded again
    skipped    files not in the index: unreadable or not images (see ``skipped_files``)
    encoded    images run through the image encoder
    """

    added: int = 0
    updated: int = 0
    removed: int = 0
    unchanged: int = 0
    duplicates: int = 0
    skipped: int = 0
    encoded: int = 0
    total: int = 0  # distinct images in the index afterwards
    seconds: float = 0.0
    skipped_files: list[tuple[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ("added", "updated", "removed", "unchanged", "duplicates",
                                           "skipped", "encoded", "total")}
        d["seconds"] = round(self.seconds, 3)
        d["skipped_files"] = [{"path": p, "reason": r} for p, r in self.skipped_files]
        return d

    def summary(self) -> str:
        return (f"{self.added} added, {self.updated} updated, {self.removed} removed, "
                f"{self.unchanged} unchanged, {self.duplicates} duplicates, {self.skipped} skipped; "
                f"{self.encoded} encoded; {self.total} images in the index")


def iter_files(root: Path, exclude: Path | None = None) -> Iterator[tuple[str, os.stat_result]]:
    """Regular files under ``root`` (recursively, sorted, not following directory links,
    skipping hidden names and ``exclude``), as (absolute path, stat)."""
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        keep = []
        for d in sorted(dirnames):
            if d.startswith("."):
                continue
            if exclude is not None and Path(dirpath, d).resolve() == exclude:
                continue
            keep.append(d)
        dirnames[:] = keep
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            path = os.path.join(dirpath, name)
            try:
                st = os.stat(path)
            except OSError:
                continue  # a dangling link: nothing to index
            if stat.S_ISREG(st.st_mode):
                yield path, st


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def open_or_create(encoders: Encoders, index_dir: Path, *, M: int | None = None,
                   ef_construction: int | None = None, ef_search: int | None = None,
                   threads: int | None = None) -> tuple[_index.GalleryIndex, bool]:
    """The live index (checked against the export and the requested params), or a new one;
    the flag says whether it differs from what is on disk (new, or a new ef_search)."""
    model = encoders.model_record()
    if _index.exists(index_dir):
        idx = _index.GalleryIndex.load(index_dir, threads=threads)
        idx.check_model(model, index_dir)
        for name, want in (("M", M), ("ef_construction", ef_construction)):
            have = getattr(idx.params, name)
            if want is not None and int(want) != have:
                raise ParameterError(f"{index_dir}: index was built with {name}={have}; it cannot "
                                     f"change on an existing index (enroll into a new --index)")
        if ef_search is not None and int(ef_search) != idx.params.ef_search:
            idx.params = _index.HnswParams(idx.params.M, idx.params.ef_construction, int(ef_search))
            idx.hnsw.set_ef(idx.params.ef_search)
            return idx, True
        return idx, False
    defaults = _index.HnswParams()
    params = _index.HnswParams(M=defaults.M if M is None else M,
                               ef_construction=defaults.ef_construction if ef_construction is None else ef_construction,
                               ef_search=defaults.ef_search if ef_search is None else ef_search)
    idx = _index.GalleryIndex.create(dim=encoders.embed_dim, model=model, params=params)
    if threads:
        idx.hnsw.set_num_threads(int(threads))
    return idx, True


def enroll(encoders: Encoders, index_dir: str | Path, images_dir: str | Path, *,
           batch_size: int = 32, progress: bool = False, M: int | None = None,
           ef_construction: int | None = None, ef_search: int | None = None,
           threads: int | None = None, checkpoint_seconds: float = 300.0) -> EnrollReport:
    """Add / refresh ``images_dir`` in the index at ``index_dir`` (created if missing).

    Holds the writer lock throughout (a second writer gets IndexLockedError). Commits a new
    generation at the end, and every ``checkpoint_seconds`` while encoding a large folder, so a
    crash loses at most that much work and never the previous index.
    """
    t0 = time.perf_counter()
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise EnrollError(f"batch size must be an integer >= 1, not {batch_size!r}")
    root = Path(images_dir).expanduser()
    if not root.is_dir():
        raise EnrollError(f"{images_dir}: images dir not found" if not root.exists()
                          else f"{images_dir}: not a directory")
    root = root.resolve()
    index_dir = Path(index_dir).expanduser()
    _index.check_index_dir(index_dir)
    report = EnrollReport()
    with _index.writer_lock(index_dir):
        _index.cleanup(index_dir)  # leftovers of a crashed writer
        idx, dirty = open_or_create(encoders, index_dir, M=M, ef_construction=ef_construction,
                                    ef_search=ef_search, threads=threads)
        exclude = index_dir.resolve()
        prefix = str(root) + os.sep

        # 1. What is on disk now, against what the index knows.
        seen: set[str] = set()
        candidates: list[tuple[str, os.stat_result, bool]] = []  # (path, stat, was_indexed)
        for path, st in iter_files(root, exclude=exclude):
            seen.add(path)
            rec = idx.files.get(path)
            if rec is not None and rec["size"] == st.st_size and rec["mtime_ns"] == st.st_mtime_ns:
                report.unchanged += 1
                continue
            skip = idx.skipped.get(path)
            if rec is None and skip and skip["size"] == st.st_size and skip["mtime_ns"] == st.st_mtime_ns:
                report.skipped += 1
                report.skipped_files.append((path, skip["reason"]))
                continue
            candidates.append((path, st, rec is not None))

        # 2. Files gone from the folder leave the index.
        for path in [p for p in idx.files if p.startswith(prefix) and p not in seen]:
            idx.remove_file(path)
            report.removed += 1
            dirty = True
        for path in [p for p in idx.skipped if p.startswith(prefix) and p not in seen]:
            del idx.skipped[path]
            dirty = True

        # 3. Hash new/changed files; group by content so each content is encoded once.
        to_encode: dict[str, list[tuple[str, os.stat_result, bool]]] = {}
        for path, st, was_indexed in candidates:
            try:
                sha = file_sha256(path)
            except OSError as exc:
                report.skipped += 1
                report.skipped_files.append((path, f"unreadable ({exc.strerror or exc})"))
                if was_indexed:
                    idx.remove_file(path)
                    report.removed += 1
                    dirty = True
                continue
            old = idx.files.get(path)
            if old is not None and old["sha256"] == sha:  # touched, same bytes
                idx.set_file(path, sha, st.st_size, st.st_mtime_ns)
                report.unchanged += 1
                dirty = True
            elif sha in idx.by_hash:
                idx.set_file(path, sha, st.st_size, st.st_mtime_ns)
                report.duplicates += 1
                report.updated += was_indexed
                report.added += not was_indexed
                dirty = True
            else:
                to_encode.setdefault(sha, []).append((path, st, was_indexed))

        # 4. Encode in batches: decode (skip bad files), run the image graph, add, commit now and then.
        spec = encoders.spec("image")
        todo = list(to_encode.items())
        last_commit = time.monotonic()
        bar = _progress(len(todo), progress)
        pool = ThreadPoolExecutor(max_workers=max(1, min(threads or os.cpu_count() or 1, 8)))
        try:
            batches = [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)]

            def decode(batch):  # PIL releases the GIL while decoding and resizing: use threads
                return pool.map(lambda item: _decode(item[1][0][0], spec), batch)

            upcoming = decode(batches[0]) if batches else None
            for n, batch in enumerate(batches):
                decoded = list(upcoming)
                # Start decoding the next batch now, so it overlaps this batch's encoding.
                upcoming = decode(batches[n + 1]) if n + 1 < len(batches) else None
                arrays, hashes = [], []
                for (sha, group), result in zip(batch, decoded):
                    if isinstance(result, np.ndarray):
                        arrays.append(result)
                        hashes.append(sha)
                    else:
                        reason = _reason(result)
                        for path, st, was_indexed in group:
                            report.skipped += 1
                            report.skipped_files.append((path, reason))
                            if was_indexed:
                                idx.remove_file(path)
                                report.removed += 1
                            idx.skipped[path] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns,
                                                 "reason": reason}
                        dirty = True
                if arrays:
                    vectors = encoders.encode_pixels("image", np.stack(arrays))
                    idx.add_vectors(vectors, hashes)
                    report.encoded += len(hashes)
                    for sha in hashes:
                        report.duplicates += len(to_encode[sha]) - 1
                        for path, st, was_indexed in to_encode[sha]:
                            idx.set_file(path, sha, st.st_size, st.st_mtime_ns)
                            report.updated += was_indexed
                            report.added += not was_indexed
                    dirty = True
                if bar is not None:
                    bar.update(len(batch))
                if dirty and time.monotonic() - last_commit >= checkpoint_seconds \
                        and n + 1 < len(batches):
                    idx.save(index_dir)
                    last_commit = time.monotonic()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            if bar is not None:
                bar.render_finish()

        if str(root) not in idx.roots:
            idx.roots.append(str(root))
            dirty = True
        if dirty:
            idx.save(index_dir)
        report.total = len(idx)
    report.seconds = time.perf_counter() - t0
    return report


def _decode(path: str, spec: dict):
    """The preprocessed array, or the exception that says why not (a bad file never stops an
    enroll: e.g. ImageDecodeError, or ValueError for a 10000 x 1 strip that resizes to nothing)."""
    try:
        return _pre.load(path, spec)
    except Exception as exc:  # noqa: BLE001
        return exc


def _reason(exc: Exception) -> str:
    if not isinstance(exc, _pre.ImageDecodeError):
        return f"cannot preprocess ({type(exc).__name__}: {exc})"
    msg = str(exc)
    if "cannot identify image file" in msg:
        return "not an image"
    return msg.split(": ", 1)[-1] if ": " in msg else msg


def _progress(n: int, enabled: bool):
    if not enabled or n == 0:
        return None
    import click

    bar = click.progressbar(length=n, label="encoding", file=sys.stderr, show_pos=True,
                            show_eta=True)
    bar.render_progress()
    return bar
