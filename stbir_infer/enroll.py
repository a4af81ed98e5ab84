"""Enroll a photo folder into an index dir: incremental, deduplicated by content, crash-safe.

Unchanged files (same size and mtime, or same content) are not encoded again; a file whose
content is already in the index (a duplicate) is not encoded at all; files that are gone from the
folder leave the index; unreadable and non-image files are skipped and counted.

An enroll runs in named, timed phases (``EnrollReport.timings``)::

    open          take the writer lock, clean a crashed writer's leftovers, load or create
    scan          walk the folder; sort files into unchanged / known non-image / to examine
    drop_missing  files gone from the folder leave the index (not those under a folder that
                  could not be listed: they are kept, and the folder is reported)
    hash          read and hash what changed (worker threads); group by content, so each
                  content is encoded once
    decode        read each new content's bytes once, check they still hash to the group's sha256,
                  decode those same bytes (worker threads decode the next batches while this one
                  encodes: ``enroll_pipeline``; this is the time the encoder waited for them)
    encode        the image graph, plus adding vectors and file records to the gallery
    commit        writing generations (checkpoints while encoding, then the final one)

Symbolic links whose target lies outside the images dir are not indexed (nor are such directory
links walked) unless ``follow_external_links`` is set; they are reported as skipped.
"""

from __future__ import annotations

import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stbir_infer import edge_gallery as _edge
from stbir_infer import enroll_pipeline as _pipe
from stbir_infer import store
from stbir_infer.encoders import Encoders
from stbir_infer.enroll_report import EnrollReport
from stbir_infer.errors import EnrollError, ExportDirError, ParameterError
from stbir_infer.filters import parse_tags
from stbir_infer.gallery import GalleryIndex, HnswParams
from stbir_infer.lifecycle import REMOVED
from stbir_infer.scan import ScanResult, hash_file, scan_tree

CHANGED = "changed while enrolling (enroll again)"


@dataclass
class _Candidate:
    path: str
    size: int
    mtime_ns: int
    was_indexed: bool


def open_or_create(encoders: Encoders, index_dir: Path, *, M: int | None = None,
                   ef_construction: int | None = None, ef_search: int | None = None,
                   threads: int | None = None, edge_gallery: bool | None = None) -> GalleryIndex:
    """The live index (checked against the export and the requested params), or a new one
    (with an edge gallery when ``edge_gallery``, None: ``edge_gallery.DEFAULT_ON``).
    ``unsaved`` is non-zero where it differs from what is on disk (new, new ef_search, or an
    older format that the next commit upgrades)."""
    model = encoders.model_record()
    if store.exists(index_dir):
        idx = GalleryIndex.load(index_dir, threads=threads)
        idx.check_model(model, index_dir)
        for name, want in (("M", M), ("ef_construction", ef_construction)):
            have = getattr(idx.params, name)
            if want is not None and int(want) != have:
                raise ParameterError(f"{index_dir}: index was built with {name}={have}; it cannot "
                                     f"change on an existing index (enroll into a new --index)")
        if edge_gallery is not None and edge_gallery != (idx.edges is not None):
            raise ParameterError(f"{index_dir}: index was built {'with' if idx.edges else 'without'}"
                                 " an edge gallery; that is chosen when an index is created "
                                 "(enroll into a new --index)")
        if ef_search is not None:
            idx.set_ef_search(int(ef_search))
        if idx.format_version < store.INDEX_FORMAT_VERSION:
            idx.unsaved += 1  # rewrite with checksums
        return idx
    params = HnswParams.with_defaults(M, ef_construction, ef_search)
    idx = GalleryIndex.create(dim=encoders.embed_dim, model=model, params=params)
    if _edge.DEFAULT_ON if edge_gallery is None else edge_gallery:
        idx.edges = _edge.EdgeVectors(idx.dim, drawing_dim=encoders.drawing_dim)
    if threads:
        idx.hnsw.set_num_threads(int(threads))
    return idx


def enroll(encoders: Encoders, index_dir: str | Path, images_dir: str | Path, *,
           batch_size: int = 32, progress: bool = False, M: int | None = None,
           ef_construction: int | None = None, ef_search: int | None = None,
           threads: int | None = None, checkpoint_seconds: float = 300.0,
           follow_external_links: bool = False, tags=None,
           edge_gallery: bool | None = None) -> EnrollReport:
    """Add / refresh ``images_dir`` in the index at ``index_dir`` (created if missing).
    ``tags`` ({key: value} or ["key=value"]): set on every file of the folder (``filters``).
    ``edge_gallery``: a new index stores each photo's pseudo-sketch vector too
    (``stbir_infer.edge_gallery``; None: the default); an existing one keeps what it has.

    Holds the writer lock throughout (a second writer gets IndexLockedError). Commits a new
    generation at the end, and every ``checkpoint_seconds`` while encoding a large folder, so a
    crash loses at most that much work and never the previous index.
    """
    t0 = time.perf_counter()
    tags = parse_tags(tags)
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise EnrollError(f"batch size must be an integer >= 1, not {batch_size!r}")
    if not os.fsdecode(images_dir).strip():  # Path("") is the current directory
        raise EnrollError(f"an empty images path ({os.fsdecode(images_dir)!r}); give a folder")
    root = Path(images_dir).expanduser()
    if not root.is_dir():
        raise EnrollError(f"{images_dir}: images dir not found" if not root.exists()
                          else f"{images_dir}: not a directory")
    root = root.resolve()
    index_dir = Path(index_dir).expanduser()
    store.check_index_dir(index_dir)
    report = EnrollReport()
    with store.writer_lock(index_dir):
        with _timed(report, "open"):
            store.cleanup(index_dir)  # leftovers of a crashed writer
            idx = open_or_create(encoders, index_dir, M=M, ef_construction=ef_construction,
                                 ef_search=ef_search, threads=threads, edge_gallery=edge_gallery)
            idx.add_root(str(root))  # before any checkpoint: entries are stored relative to it
        run = _Enrollment(encoders, idx, index_dir, root, report, batch_size=batch_size,
                          threads=threads, checkpoint_seconds=checkpoint_seconds)
        with _timed(report, "scan"):
            scanned = scan_tree(root, exclude=index_dir, follow_external_links=follow_external_links)
            candidates = run.sort_scanned(scanned)
        with _timed(report, "drop_missing"):
            run.drop_missing(scanned)
        with _timed(report, "hash"):
            groups = run.hash_and_group(candidates)
        run.decode_and_encode(groups, progress)  # times decode, encode and checkpoint commits
        with _timed(report, "commit"):
            idx.tag_under(str(root), tags)
            if idx.unsaved:
                idx.save(index_dir)
        report.total = len(idx)
    report.seconds = time.perf_counter() - t0
    return report


@contextmanager
def _timed(report: EnrollReport, phase: str):
    t = time.perf_counter()
    try:
        yield
    finally:
        report.timings[phase] += time.perf_counter() - t


class _Enrollment:
    """The state one enroll threads through its phases."""

    def __init__(self, encoders: Encoders, idx: GalleryIndex, index_dir: Path, root: Path,
                 report: EnrollReport, *, batch_size: int, threads: int | None,
                 checkpoint_seconds: float):
        self.encoders, self.idx, self.index_dir, self.root = encoders, idx, index_dir, root
        self.report, self.batch_size = report, batch_size
        self.workers = _pipe.default_workers(threads)  # hashing and decoding threads
        self.checkpoint_seconds = checkpoint_seconds

    # -- scan ---------------------------------------------------------------------------------------
    def sort_scanned(self, scanned: ScanResult) -> list[_Candidate]:
        """What the index knows against what is on disk: unchanged files and known non-images
        are settled here; the rest are candidates to hash."""
        idx, report = self.idx, self.report
        for folder, reason in scanned.unreadable:
            report.skip(folder, reason)
        for path in scanned.external_links:
            report.skip(path, "a link to outside the images dir (not followed; "
                              "--follow-external-links to include it)")
        candidates = []
        for path, st in scanned.files:
            rec = idx.files.get(path)
            if rec is not None and rec["size"] == st.st_size and rec["mtime_ns"] == st.st_mtime_ns:
                report.unchanged += 1
                continue
            skip = idx.skipped.get(path)
            if rec is None and skip and skip["size"] == st.st_size \
                    and skip["mtime_ns"] == st.st_mtime_ns and self._still_skipped(skip):
                report.skip(path, skip["reason"])
                continue
            candidates.append(_Candidate(path, st.st_size, st.st_mtime_ns, rec is not None))
        return candidates

    def _still_skipped(self, skip: dict) -> bool:
        """A remembered skip holds while the export that judged it is the one enrolling (older
        records, which carry no export, are tried once more); a removed file stays out."""
        return skip.get("reason") == REMOVED or (
            skip.get("export") is not None and skip.get("export") == self.idx.model.get("fingerprint"))

    # -- drop missing ---------------------------------------------------------------------------------
    def drop_missing(self, scanned: ScanResult) -> None:
        """Files under the root that the scan did not see leave the index, except those under a
        folder (or at a path) the scan could not read: absence there proves nothing."""
        idx, report = self.idx, self.report
        prefix = os.path.join(str(self.root), "")
        seen = {path for path, _ in scanned.files}
        keep = tuple(os.path.join(folder, "") for folder, _ in scanned.unreadable)

        def gone(path: str) -> bool:
            return path.startswith(prefix) and path not in seen and path not in scanned.unstatable \
                and not path.startswith(keep)

        for path in [p for p in idx.files if gone(p)]:
            idx.remove_file(path)
            report.removed += 1
        for path in [p for p in idx.skipped if gone(p)]:
            idx.forget_skipped(path)

    # -- hash and group ---------------------------------------------------------------------------------
    def hash_and_group(self, candidates: list[_Candidate]) -> dict[str, list[_Candidate]]:
        """Hash new / changed files; settle touched files and duplicates of indexed content;
        return the rest grouped by content (sha256 -> files), in scan order."""
        idx, report = self.idx, self.report
        groups: dict[str, list[_Candidate]] = {}
        for c, sha, st in _hashed(candidates, self.workers):
            if isinstance(st, OSError):
                report.skip(c.path, f"unreadable ({st.strerror or type(st).__name__})")
                if c.was_indexed:
                    idx.remove_file(c.path)
                    report.removed += 1
                continue
            c.size, c.mtime_ns = st.st_size, st.st_mtime_ns  # of the bytes hashed
            old = idx.files.get(c.path)
            if old is not None and old["sha256"] == sha:  # touched, same bytes
                idx.set_file(c.path, sha, c.size, c.mtime_ns)
                report.unchanged += 1
            elif sha in idx.by_hash:
                idx.set_file(c.path, sha, c.size, c.mtime_ns)
                report.duplicates += 1
                report.updated += c.was_indexed
                report.added += not c.was_indexed
            else:
                groups.setdefault(sha, []).append(c)
        return groups

    # -- decode and encode ------------------------------------------------------------------------------
    def decode_and_encode(self, groups: dict[str, list[_Candidate]], progress: bool) -> None:
        """Batches of new contents through ``enroll_pipeline`` (worker threads decode ahead),
        encoded and added here, with a checkpoint commit every ``checkpoint_seconds``."""
        report, stages = self.report, self.report.stages
        spec = self.encoders.spec("image")
        sketch_spec = self.encoders.spec("sketch") if self.idx.edges is not None else None
        todo = list(groups.items())
        batches = [todo[i:i + self.batch_size] for i in range(0, len(todo), self.batch_size)]
        last_commit = time.monotonic()
        bar = _progress(len(todo), progress)
        try:
            for n, (batch, decoded) in enumerate(_pipe.decoded_batches(
                    batches, spec, stages, workers=self.workers, sketch_spec=sketch_spec)):
                with _timed(report, "encode"):
                    self._encode_batch(batch, decoded)
                if bar is not None:
                    bar.update(len(batch))
                if self.idx.unsaved and n + 1 < len(batches) \
                        and time.monotonic() - last_commit >= self.checkpoint_seconds:
                    with _timed(report, "commit"):
                        self.idx.save(self.index_dir)
                    last_commit = time.monotonic()
        finally:
            report.timings["decode"] = stages.wait  # the encoder's wait for decoded images
            if bar is not None:
                bar.render_finish()

    def _encode_batch(self, batch, decoded) -> None:
        idx, report, stages = self.idx, self.report, self.report.stages
        arrays, ready, sketches = [], [], []  # ready: (sha, files decoded or matching them)
        for (sha, group), (result, changed, sketch) in zip(batch, decoded):
            for c in changed:
                report.skip(c.path, CHANGED)
            group = [c for c in group if all(c is not x for x in changed)]
            if isinstance(result, np.ndarray):
                arrays.append(result)
                ready.append((sha, group))
                sketches.append(sketch)
            elif isinstance(result, ExportDirError):  # the export cannot preprocess: exit 2
                raise result
            elif result is not None:
                self._reject(group, _pipe.reason(result), remember=_pipe.remembered(result))
        if not arrays:
            return
        t0 = time.perf_counter()
        vectors, bad_rows = _pipe.encode(self.encoders, np.stack(arrays))
        edges = _edge.encode(self.encoders, sketches) if idx.edges is not None else None
        t1 = time.perf_counter()
        for row in sorted(bad_rows, reverse=True):
            self._reject(ready.pop(row)[1], "the image encoder gave a non-finite vector")
        if bad_rows:
            vectors = np.delete(vectors, sorted(bad_rows), axis=0)
            edges = None if edges is None else np.delete(edges, sorted(bad_rows), axis=0)
        idx.add_vectors(vectors, [sha for sha, _ in ready], edges)
        report.encoded += len(ready)
        for sha, group in ready:
            report.duplicates += len(group) - 1
            for c in group:
                idx.set_file(c.path, sha, c.size, c.mtime_ns)
                report.updated += c.was_indexed
                report.added += not c.was_indexed
        stages.encode += t1 - t0
        stages.index += time.perf_counter() - t1

    def _reject(self, group: list[_Candidate], reason: str, remember: bool = True) -> None:
        """Files whose content is not an image: skipped, out of the index, and remembered with
        the export that judged them (``remember`` False: a failure that may pass another time,
        e.g. out of memory, is never remembered)."""
        for c in group:
            self.report.skip(c.path, reason)
            if c.was_indexed:
                self.idx.remove_file(c.path)
                self.report.removed += 1
            if remember:
                self.idx.mark_skipped(c.path, c.size, c.mtime_ns, reason,
                                      export=self.idx.model.get("fingerprint"))


def _hashed(candidates: list[_Candidate], workers: int, chunk: int = 1024):
    """(candidate, sha256, stat) in order, hashed by worker threads (hashlib releases the GIL);
    the stat is the OSError instead when the file could not be read."""
    def one(c: _Candidate):
        try:
            return (c, *hash_file(c.path))
        except OSError as exc:
            return c, None, exc

    with ThreadPoolExecutor(workers, thread_name_prefix="enroll-hash") as pool:
        for i in range(0, len(candidates), chunk):  # bounded: a chunk of futures at a time
            yield from pool.map(one, candidates[i:i + chunk])


def _progress(n: int, enabled: bool):
    if not enabled or n == 0:
        return None
    import click

    bar = click.progressbar(length=n, label="encoding", file=sys.stderr, show_pos=True,
                            show_eta=True)
    bar.render_progress()
    return bar
