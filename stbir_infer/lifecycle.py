"""The index over its life: remove, prune, relocate and reindex.

Each takes the writer lock (a second writer gets IndexLockedError), loads the live generation,
edits it in memory and commits one new generation, like enroll: a crash at any point leaves the
previous generation live, and a refused request (IndexEditError, ModelMismatchError) writes
nothing. None of them needs the export except reindex, which encodes every photo again with a
new one.

    from stbir_infer import lifecycle
    lifecycle.remove("index/", ["photos/2019/blurry.jpg", "photos/tmp/"])
    lifecycle.prune("index/")                            # files that are gone leave the index
    lifecycle.relocate("index/", "/mnt/old/photos", "/data/photos")
    lifecycle.reindex("index/", "export-v2/")            # same ids and tags, new vectors
"""

from __future__ import annotations

import bisect
import os
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from stbir_infer import store
from stbir_infer.errors import IndexEditError, IndexNotFoundError
from stbir_infer.gallery import GalleryIndex
from stbir_infer.paths import display
from stbir_infer.roots import is_within

# The reason kept for a removed file that still exists, so that enrolling its folder again does
# not bring it back while it is unchanged (enroll skips it, like a known non-image).
REMOVED = "removed from the index (stbir-infer remove); enroll adds it again once it changes"


# remove and prune take --yes to remove more than this many photos, or all of an enrolled folder
CONFIRM_OVER = 100
SHOWN = 50  # files listed by remove / prune before "... and N more"


class _File(NamedTuple):  # what enroll_pipeline reads of a file
    path: str


@dataclass
class EditReport:
    """What one remove / prune / relocate / reindex did (counts are of files unless named)."""

    action: str
    removed: int = 0          # files that left the index
    kept: int = 0             # prune: files kept because their root is missing (not mounted?)
    missing_roots: list[str] = field(default_factory=list)
    moved_roots: list[tuple[str, str]] = field(default_factory=list)
    encoded: int = 0          # reindex: contents encoded with the new export
    dropped: int = 0          # reindex: contents whose files are gone or changed (left the index)
    total: int = 0            # distinct images in the index afterwards
    generation: str | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ("action", "removed", "kept", "encoded", "dropped",
                                           "total", "generation")}
        d.update(seconds=round(self.seconds, 3), missing_roots=[display(r) for r in self.missing_roots],
                 moved_roots=[[display(a), display(b)] for a, b in self.moved_roots],
                 notes=[display(n) for n in self.notes])
        return d

    def summary(self) -> str:
        if self.action == "relocate":
            what = "; ".join(f"{display(a)} -> {display(b)}" for a, b in self.moved_roots)
            head = f"moved {len(self.moved_roots)} root(s): {what}"
        elif self.action == "reindex":
            head = f"{self.encoded} encoded, {self.dropped} dropped (file gone or changed)"
        else:
            head = f"{self.removed} removed"
            if self.action == "prune" and self.missing_roots:
                head += (f", {self.kept} kept under {len(self.missing_roots)} missing root(s) "
                         f"({', '.join(display(r) for r in self.missing_roots)}; relocate them?)")
        return f"{head}; {self.total} images in the index"


@contextmanager
def _editing(index_dir: str | Path, report: EditReport, threads: int | None = None
             ) -> Iterator[GalleryIndex]:
    """The live index under the writer lock; committed afterwards when it changed (or was of an
    older format). An exception inside commits nothing."""
    t0 = time.perf_counter()
    index_dir = Path(index_dir).expanduser()
    if not store.exists(index_dir):  # before the lock, which would create the dir
        raise IndexNotFoundError(f"{index_dir}: no index here (run `stbir-infer enroll` first)")
    with store.writer_lock(index_dir):
        store.cleanup(index_dir)  # leftovers of a crashed writer
        idx = GalleryIndex.load(index_dir, threads=threads)
        yield idx
        if idx.unsaved or idx.format_version < store.INDEX_FORMAT_VERSION:
            report.generation = idx.save(index_dir)
        report.total = len(idx)
    report.seconds = time.perf_counter() - t0


def _candidates(path: str | os.PathLike) -> list[str]:
    """The absolute forms a user's path may have in the index (as given, and links resolved)."""
    given = os.path.abspath(os.path.expanduser(checked_path(path)))
    return list(dict.fromkeys([given, os.path.realpath(given)]))


def checked_path(path: str | os.PathLike) -> str:
    """``path`` as a string; an empty or whitespace-only one is an IndexEditError (``remove ""``
    used to mean the current directory, and removed every photo under it)."""
    text = os.fsdecode(path)
    if not text.strip():
        raise IndexEditError(f"an empty path ({text!r}) is not a file or folder; give one")
    return text


def _confirm(idx: GalleryIndex, targets: list[str], action: str, yes: bool, echo, limit: int
             ) -> None:
    """Show what ``action`` would remove (``echo``, one line a file, at most SHOWN of them) and
    refuse, before anything is written, more than ``limit`` files or every file of a root
    unless ``yes``."""
    if echo is not None:
        for path in targets[:SHOWN]:
            echo(f"{action}: {display(path)}")
        if len(targets) > SHOWN:
            echo(f"{action}: ... and {len(targets) - SHOWN} more")
    if yes or not targets:
        return
    chosen = set(targets)
    whole = [r for r in idx.roots if any(is_within(p, r) for p in chosen)
             and all(p in chosen for p in idx.files if is_within(p, r))]
    if len(targets) > limit or whole:
        why = (f"every photo of the enrolled folder {display(whole[0])}" if whole
               else f"more than {limit} photos")
        raise IndexEditError(f"{action} would remove {len(targets)} photo(s), {why}; nothing was "
                             "removed (run it again with --yes to remove them)")


def _under(sorted_paths: list[str], folder: str) -> Iterator[str]:
    """The paths at or under ``folder`` (``roots.is_within``), from a sorted list."""
    i = bisect.bisect_left(sorted_paths, folder)
    while i < len(sorted_paths) and sorted_paths[i].startswith(folder):
        if is_within(sorted_paths[i], folder):
            yield sorted_paths[i]
        i += 1


def remove(index_dir: str | Path, paths: Iterable[str | os.PathLike], *, yes: bool = False,
           echo=None, limit: int | None = None) -> EditReport:
    """Take files, or every file under folders, out of the index. A path the index holds no file
    at or under is an IndexEditError and nothing is removed. A removed file that still exists is
    remembered (``REMOVED``), so enrolling its folder again does not bring it back unchanged.
    ``echo`` is shown each file to remove; more than ``limit`` (``CONFIRM_OVER``) files, or every
    file of an enrolled folder, takes ``yes``."""
    report = EditReport("remove")
    paths = [checked_path(p) for p in paths]
    if not paths:
        raise IndexEditError("remove: give at least one file or folder")
    with _editing(index_dir, report) as idx:
        targets: dict[str, None] = {}
        files = sorted(idx.files)  # the paths under a folder are one run of it: no scan per path
        for given in paths:
            found = [p for c in _candidates(given) for p in _under(files, c)]
            if not found:
                raise IndexEditError(f"{display(os.fsdecode(given))}: no file of the index is "
                                     "there (nothing was removed)")
            targets.update(dict.fromkeys(found))
        _confirm(idx, list(targets), "remove", yes, echo, CONFIRM_OVER if limit is None else limit)
        for path in targets:
            idx.remove_file(path)
            try:
                st = os.stat(path)
                idx.mark_skipped(path, st.st_size, st.st_mtime_ns, REMOVED)
            except OSError:
                pass  # gone already: nothing to keep out
        report.removed = len(targets)
    return report


def prune(index_dir: str | Path, *, yes: bool = False, echo=None,
          limit: int | None = None) -> EditReport:
    """Drop the entries whose files are gone. Files under a root that is itself missing (a disk
    not mounted, a folder moved: see ``relocate``) are kept and reported, not dropped. ``echo``,
    ``yes``, ``limit``: as for ``remove``."""
    report = EditReport("prune")
    with _editing(index_dir, report) as idx:
        report.missing_roots = [r for r in idx.roots if not os.path.isdir(r)]

        def gone(path: str) -> bool | None:  # None: cannot tell (under a missing root)
            if any(is_within(path, r) for r in report.missing_roots):
                return None
            try:
                os.stat(path)
                return False
            except (FileNotFoundError, NotADirectoryError):
                return True
            except OSError:  # no permission, I/O error: absence is not proven
                return False

        doomed = []
        for path in list(idx.files):
            state = gone(path)
            report.kept += state is None
            if state:
                doomed.append(path)
        _confirm(idx, doomed, "prune", yes, echo, CONFIRM_OVER if limit is None else limit)
        for path in doomed:
            idx.remove_file(path)
            report.removed += 1
        for path in [p for p in idx.skipped if gone(p)]:
            idx.forget_skipped(path)
    return report


def relocate(index_dir: str | Path, old: str | os.PathLike, new: str | os.PathLike) -> EditReport:
    """Every enrolled root at or under ``old`` now lives under ``new`` (the gallery was moved or
    copied there); entries keep their ids, tags and vectors. ``old`` holding no root is an
    IndexEditError."""
    report = EditReport("relocate")
    new_abs = os.path.abspath(os.path.expanduser(checked_path(new)))
    if os.path.isdir(new_abs):
        new_abs = os.path.realpath(new_abs)  # as enroll records a root
    elif os.path.lexists(new_abs):
        raise IndexEditError(f"{display(new_abs)}: exists and is not a folder (nothing was moved)")
    else:
        report.notes.append(f"{new_abs} does not exist (yet): enroll and prune need it there")
    with _editing(index_dir, report) as idx:
        for candidate in _candidates(old):
            report.moved_roots = idx.relocate(candidate, new_abs)
            if report.moved_roots:
                break
        else:
            raise IndexEditError(f"{display(os.fsdecode(old))}: no enrolled root is there (roots: "
                                 f"{', '.join(display(r) for r in idx.roots) or 'none'})")
    return report


def reindex(index_dir: str | Path, model_dir: str | Path, *, batch_size: int = 32,
            threads: int | None = None, precision: str = "fp32") -> EditReport:
    """Encode every photo of the index again with the export at ``model_dir``, into a new
    generation with the same ids, files and tags; the index then belongs to that export. The old
    generation stays live until the new one is complete. Contents whose files are all gone or
    changed leave the index (``dropped``; enroll adds changed files back). An export of another
    embedding size is a ModelMismatchError and nothing is written. An edge gallery is drawn and
    encoded again too (the sketch tower changed with the export)."""
    from stbir_infer import edge_gallery
    from stbir_infer import enroll_pipeline as pipe
    from stbir_infer.encoders import Encoders

    report = EditReport("reindex")
    encoders = Encoders(model_dir, threads=threads, precision=precision)

    with _editing(index_dir, report, threads=threads) as idx:
        idx.check_dim(encoders.embed_dim, index_dir)
        labels = sorted(idx.items)
        graph = idx.empty_graph(len(labels))
        if threads:
            graph.set_num_threads(int(threads))
        dropped: list[int] = []
        edges = (None if idx.edges is None
                 else edge_gallery.EdgeVectors(idx.dim, drawing_dim=encoders.drawing_dim))
        sketch_spec = None if edges is None else encoders.spec("sketch")
        # enroll's decode pipeline: (content, its files) pairs, decoded ahead on worker threads
        batches = ([(idx.items[label], [_File(p) for p in idx.paths.get(label, [])])
                    for label in labels[s:s + batch_size]]
                   for s in range(0, len(labels), batch_size))
        for batch, outcomes in pipe.decoded_batches(batches, encoders.spec("image"), pipe.Stages(),
                                                    workers=pipe.default_workers(threads),
                                                    sketch_spec=sketch_spec):
            ready = []
            for (sha, _), (pixels, _, sketch) in zip(batch, outcomes):
                if isinstance(pixels, np.ndarray):
                    ready.append((idx.by_hash[sha], pixels, sketch))
                else:  # every file of it gone, changed or undecodable
                    dropped.append(idx.by_hash[sha])
            if not ready:
                continue
            vectors, bad = pipe.encode(encoders, np.stack([px for _, px, _ in ready]))
            dropped += [ready[r][0] for r in bad]
            bad_rows = set(bad)
            good = [i for i in range(len(ready)) if i not in bad_rows]
            graph.add_items(vectors[good], np.asarray([ready[i][0] for i in good], np.int64))
            if edges is not None and good:
                edges.add([ready[i][0] for i in good],
                          edge_gallery.encode(encoders, [ready[i][2] for i in good]))
            report.encoded += len(good)
        idx.edges = edges  # dropped labels have none: remove_file below finds nothing to drop
        for label in dropped:  # out of the old graph's records before the new graph replaces it
            for path in list(idx.paths.get(label, [])):
                idx.remove_file(path)
        report.dropped = len(dropped)
        idx.hnsw, idx.model = graph, encoders.model_record()
        idx.unsaved += 1
    return report


__all__ = ["EditReport", "REMOVED", "prune", "reindex", "relocate", "remove"]
