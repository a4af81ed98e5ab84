"""The index dir: an HNSW index (hnswlib, cosine) plus a metadata store, written atomically.

Layout::

    IDX/
      CURRENT              one line: the name of the live generation ("gen-000007")
      gen-000007/          the live generation, never modified once written
        index.bin          hnswlib index of unit vectors (label -> vector)
        meta.json          format, model fingerprint, HNSW params, items, files
      gen-000006/          the one before, kept so a reader that has just read CURRENT can finish
      .lock                a single writer holds fcntl.flock on it (the pid is written inside)

A save writes ``IDX/.tmp-gen-N-PID/`` (index.bin + meta.json, fsynced), renames it to
``gen-N/``, then replaces ``CURRENT`` by writing ``.CURRENT.tmp-PID`` and ``os.replace``-ing it
(the commit point), then removes generations older than the previous one. A crash before the
``os.replace`` leaves ``CURRENT`` naming the old, complete generation; a crash after it leaves the
new one; half-written temp dirs and generations newer than ``CURRENT`` are removed by the next
writer. Readers take no lock: they follow ``CURRENT``.

In meta.json, ``items`` maps HNSW label -> content sha256 (one vector per distinct content) and
``files`` maps absolute path -> {sha256, size, mtime_ns, label}; ``skipped`` remembers files that
were not images, so an unchanged one is not read again.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stbir_infer.errors import (IndexFormatError, IndexLockedError, IndexNotFoundError,
                                ModelMismatchError, ParameterError)

INDEX_FORMAT = "stbir-index"
INDEX_FORMAT_VERSION = 1
SPACE = "cosine"
CURRENT = "CURRENT"
LOCK = ".lock"
INDEX_FILE = "index.bin"
META_FILE = "meta.json"
_GEN_PREFIX = "gen-"
_TMP_PREFIX = ".tmp-"


@dataclass(frozen=True)
class HnswParams:
    """HNSW build/search settings. M and ef_construction are fixed when an index is created;
    ef_search is a query-time setting (raised to top_k when a query asks for more)."""

    M: int = 16
    ef_construction: int = 200
    ef_search: int = 64

    def __post_init__(self):
        for name, lo in (("M", 2), ("ef_construction", 1), ("ef_search", 1)):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < lo:
                raise ParameterError(f"HNSW {name} must be an integer >= {lo}, not {v!r}")
        if self.M > 512:
            raise ParameterError(f"HNSW M must be <= 512, not {self.M}")

    def to_dict(self) -> dict:
        return {"M": int(self.M), "ef_construction": int(self.ef_construction),
                "ef_search": int(self.ef_search)}


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _fsync_dir(path: Path) -> None:
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


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _gen_number(name: str) -> int | None:
    if name.startswith(_GEN_PREFIX) and name[len(_GEN_PREFIX):].isdigit():
        return int(name[len(_GEN_PREFIX):])
    return None


def current_generation(index_dir: str | Path) -> str | None:
    """Name of the live generation dir, or None where nothing has been committed."""
    try:
        name = (Path(index_dir) / CURRENT).read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise IndexFormatError(f"{index_dir}: unreadable {CURRENT} file ({exc})") from None
    if _gen_number(name) is None:
        raise IndexFormatError(f"{index_dir}: {CURRENT} names {name!r}, not a generation")
    return name


def exists(index_dir: str | Path) -> bool:
    return current_generation(index_dir) is not None


def current_stamp(index_dir: str | Path):
    """Something that changes whenever a writer commits (to notice another process's enroll)."""
    try:
        st = os.stat(Path(index_dir) / CURRENT)
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


class WriterLock:
    """Exclusive writer lock on IDX/.lock (fcntl.flock: released by the OS if the holder dies)."""

    def __init__(self, index_dir: str | Path):
        self.index_dir = Path(index_dir)
        self._fd: int | None = None

    def acquire(self) -> "WriterLock":
        import fcntl

        self.index_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.index_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
            except OSError:
                holder = ""
            os.close(fd)
            who = f" (pid {holder})" if holder.isdigit() else ""
            raise IndexLockedError(f"{self.index_dir}: another process{who} is writing this "
                                   "index; try again when it has finished") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            import fcntl

            try:
                os.ftruncate(self._fd, 0)
            except OSError:
                pass
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "WriterLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


@contextmanager
def writer_lock(index_dir: str | Path):
    lock = WriterLock(index_dir).acquire()
    try:
        yield lock
    finally:
        lock.release()


class GalleryIndex:
    """One generation of the index, in memory: hnswlib vectors + the metadata store."""

    def __init__(self, *, dim: int, model: dict, params: HnswParams, meta: dict | None = None,
                 hnsw=None):
        import hnswlib

        self.dim = int(dim)
        self.model = dict(model)
        self.params = params
        meta = meta or {}
        self.generation = int(meta.get("generation", 0))
        self.created = meta.get("created") or _now()
        self.updated = meta.get("updated")
        self.next_label = int(meta.get("next_label", 0))
        self.items: dict[int, str] = {int(k): v["sha256"] for k, v in (meta.get("items") or {}).items()}
        self.files: dict[str, dict] = dict(meta.get("files") or {})
        self.skipped: dict[str, dict] = dict(meta.get("skipped") or {})
        self.roots: list[str] = list(meta.get("roots") or [])
        if hnsw is None:
            hnsw = hnswlib.Index(space=SPACE, dim=self.dim)
            hnsw.init_index(max_elements=64, M=params.M, ef_construction=params.ef_construction,
                            random_seed=100, allow_replace_deleted=True)
        self.hnsw = hnsw
        self.hnsw.set_ef(params.ef_search)
        self._rebuild_maps()

    # -- derived maps ------------------------------------------------------------------------------
    def _rebuild_maps(self) -> None:
        self.by_hash: dict[str, int] = {sha: label for label, sha in self.items.items()}
        self.paths: dict[int, list[str]] = {label: [] for label in self.items}
        for path, rec in self.files.items():
            self.paths.setdefault(int(rec["label"]), []).append(path)
        for lst in self.paths.values():
            lst.sort()

    def __len__(self) -> int:
        return len(self.items)

    # -- load / create -------------------------------------------------------------------------
    @classmethod
    def create(cls, *, dim: int, model: dict, params: HnswParams | None = None) -> "GalleryIndex":
        return cls(dim=dim, model=model, params=params or HnswParams())

    @classmethod
    def load(cls, index_dir: str | Path, *, threads: int | None = None) -> "GalleryIndex":
        """Load the live generation; retries if a writer swaps generations while we read."""
        index_dir = Path(index_dir)
        for attempt in range(5):
            name = current_generation(index_dir)
            if name is None:
                raise IndexNotFoundError(f"{index_dir}: no index here yet "
                                         "(run `stbir-infer enroll --images DIR` first)")
            try:
                return cls._load_generation(index_dir / name, threads=threads)
            except FileNotFoundError:
                if current_generation(index_dir) == name or attempt == 4:
                    raise IndexFormatError(f"{index_dir}: generation {name} is incomplete") from None
        raise AssertionError("unreachable")

    @classmethod
    def _load_generation(cls, gen_dir: Path, *, threads: int | None = None) -> "GalleryIndex":
        import hnswlib

        meta_path = gen_dir / META_FILE
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise IndexFormatError(f"{meta_path}: unreadable metadata ({exc})") from None
        if not isinstance(meta, dict) or meta.get("format") != INDEX_FORMAT:
            raise IndexFormatError(f"{meta_path}: not an STBIR index")
        if meta.get("format_version") != INDEX_FORMAT_VERSION:
            raise IndexFormatError(f"{meta_path}: index format version {meta.get('format_version')} "
                                   f"is not supported (this build reads {INDEX_FORMAT_VERSION})")
        if meta.get("space") != SPACE:
            raise IndexFormatError(f"{meta_path}: index space {meta.get('space')!r} is not {SPACE!r}")
        try:
            params = HnswParams(**meta["hnsw"])
            dim = int(meta["dim"])
            model = dict(meta["model"])
        except (KeyError, TypeError, ValueError, ParameterError) as exc:
            raise IndexFormatError(f"{meta_path}: bad metadata ({exc})") from None
        bin_path = gen_dir / INDEX_FILE
        size = os.stat(bin_path).st_size  # FileNotFoundError -> caller retries
        if size != meta.get("index_bytes"):
            raise IndexFormatError(f"{bin_path}: {size} bytes, metadata says {meta.get('index_bytes')}")
        hnsw = hnswlib.Index(space=SPACE, dim=dim)
        try:
            hnsw.load_index(str(bin_path), max_elements=0, allow_replace_deleted=True)
        except RuntimeError as exc:
            raise IndexFormatError(f"{bin_path}: hnswlib cannot load it ({exc})") from None
        if threads:
            hnsw.set_num_threads(int(threads))
        if hnsw.element_count - len(meta.get("deleted") or []) != len(meta.get("items") or {}):
            raise IndexFormatError(f"{gen_dir}: index holds {hnsw.element_count} vectors, "
                                   f"metadata {len(meta.get('items') or {})}")
        return cls(dim=dim, model=model, params=params, meta=meta, hnsw=hnsw)

    def check_model(self, model: dict, index_dir: str | Path = "") -> None:
        """Refuse an export other than the one this index was built with."""
        if model.get("fingerprint") != self.model.get("fingerprint"):
            mine = self.model.get("fingerprint") or "?"
            theirs = model.get("fingerprint") or "?"
            raise ModelMismatchError(
                f"{index_dir}: index was built with export {mine[:12]} "
                f"({self.model.get('clip_model')}, {self.model.get('model_dir')}), not with "
                f"{theirs[:12]} ({model.get('model_dir')}); use that export, or another --index")
        if int(model.get("embed_dim", self.dim)) != self.dim:
            raise ModelMismatchError(f"{index_dir}: index dim {self.dim} != export embed_dim "
                                     f"{model.get('embed_dim')}")

    # -- edits ---------------------------------------------------------------------------------------
    def add_vectors(self, vectors: np.ndarray, hashes: list[str]) -> list[int]:
        """Add one vector per new content hash; returns their labels."""
        vectors = np.ascontiguousarray(vectors, np.float32)
        if len(hashes) != len(vectors):
            raise ValueError("one hash per vector")
        if not len(hashes):
            return []
        labels = list(range(self.next_label, self.next_label + len(hashes)))
        need = self.hnsw.element_count + len(labels)
        if need > self.hnsw.max_elements:
            self.hnsw.resize_index(max(need, 2 * self.hnsw.max_elements))
        self.hnsw.add_items(vectors, np.asarray(labels, np.int64), replace_deleted=True)
        self.next_label += len(labels)
        for label, sha in zip(labels, hashes):
            self.items[label] = sha
            self.by_hash[sha] = label
            self.paths.setdefault(label, [])
        return labels

    def set_file(self, path: str, sha256: str, size: int, mtime_ns: int) -> None:
        """Point ``path`` at the item holding ``sha256`` (which must already be indexed)."""
        label = self.by_hash[sha256]
        old = self.files.get(path)
        if old is not None and int(old["label"]) != label:
            self._unlink(path, int(old["label"]))
        if old is None or int(old["label"]) != label:
            lst = self.paths.setdefault(label, [])
            lst.append(path)
            lst.sort()
        self.files[path] = {"sha256": sha256, "size": int(size), "mtime_ns": int(mtime_ns),
                            "label": label}
        self.skipped.pop(path, None)

    def remove_file(self, path: str) -> bool:
        rec = self.files.pop(path, None)
        if rec is None:
            return False
        self._unlink(path, int(rec["label"]))
        return True

    def _unlink(self, path: str, label: int) -> None:
        lst = self.paths.get(label, [])
        if path in lst:
            lst.remove(path)
        if not lst:  # no file shows this content any more: drop the vector
            self.paths.pop(label, None)
            sha = self.items.pop(label, None)
            if sha is not None and self.by_hash.get(sha) == label:
                del self.by_hash[sha]
            self.hnsw.mark_deleted(label)

    def deleted_labels(self) -> list[int]:
        """Labels still in hnswlib's storage but marked deleted (slots reused by later adds)."""
        live = self.items
        return [int(x) for x in self.hnsw.get_ids_list() if int(x) not in live]

    # -- search --------------------------------------------------------------------------------------
    def search(self, vector: np.ndarray, k: int, ef: int | None = None) -> list[tuple[int, float]]:
        """Top-k (label, cosine similarity), best first."""
        k = min(int(k), len(self.items))
        if k <= 0:
            return []
        q = np.ascontiguousarray(np.asarray(vector, np.float32).reshape(1, -1))
        ef = max(int(ef or self.params.ef_search), k)
        for ef_try in (ef, max(4 * ef, 256), self.hnsw.element_count):
            self.hnsw.set_ef(ef_try)
            try:
                labels, dists = self.hnsw.knn_query(q, k=k)
                break
            except RuntimeError:  # hnswlib found fewer than k (many deleted slots): search wider
                continue
        else:
            return self._exact(q[0], k)
        return [(int(label), float(1.0 - d)) for label, d in zip(labels[0], dists[0])]

    def _exact(self, q: np.ndarray, k: int) -> list[tuple[int, float]]:
        labels = np.fromiter(self.items, np.int64, len(self.items))
        vecs = np.asarray(self.hnsw.get_items(labels), np.float32)
        vecs /= np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
        scores = vecs @ (q / max(float(np.linalg.norm(q)), 1e-12))
        order = np.argsort(-scores, kind="stable")[:k]
        return [(int(labels[i]), float(scores[i])) for i in order]

    # -- save ----------------------------------------------------------------------------------------
    def meta(self) -> dict:
        return {
            "format": INDEX_FORMAT, "format_version": INDEX_FORMAT_VERSION,
            "generation": self.generation, "created": self.created, "updated": self.updated,
            "model": self.model, "space": SPACE, "dim": self.dim, "hnsw": self.params.to_dict(),
            "count": len(self.items), "next_label": self.next_label, "roots": self.roots,
            "deleted": self.deleted_labels(),
            "items": {str(label): {"sha256": sha} for label, sha in sorted(self.items.items())},
            "files": dict(sorted(self.files.items())),
            "skipped": dict(sorted(self.skipped.items())),
        }

    def save(self, index_dir: str | Path) -> str:
        """Commit this state as a new generation (caller holds the writer lock). Returns its name."""
        index_dir = Path(index_dir)
        index_dir.mkdir(parents=True, exist_ok=True)
        old = current_generation(index_dir)
        numbers = [_gen_number(p.name) for p in index_dir.iterdir()]
        gen = max([n for n in numbers if n is not None] + [self.generation]) + 1
        name = f"{_GEN_PREFIX}{gen:06d}"
        tmp = index_dir / f"{_TMP_PREFIX}{name}-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        try:
            self.hnsw.save_index(str(tmp / INDEX_FILE))
            meta = self.meta()
            meta.update(generation=gen, updated=_now(), index_bytes=os.stat(tmp / INDEX_FILE).st_size)
            with open(tmp / META_FILE, "w", encoding="utf-8") as f:
                json.dump(meta, f, separators=(",", ":"))
                f.flush()
                os.fsync(f.fileno())
            _fsync_file(tmp / INDEX_FILE)
            _fsync_dir(tmp)
            os.replace(tmp, index_dir / name)
            _fsync_dir(index_dir)
            pointer = index_dir / f".{CURRENT}.tmp-{os.getpid()}"
            with open(pointer, "w", encoding="utf-8") as f:
                f.write(name + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(pointer, index_dir / CURRENT)  # the commit point
            _fsync_dir(index_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.generation, self.updated = gen, meta["updated"]
        cleanup(index_dir, keep=(name, old))
        return name


def cleanup(index_dir: str | Path, keep: tuple[str | None, ...] = ()) -> None:
    """Remove temp dirs and generations not kept (caller holds the writer lock). When ``keep`` is
    empty, keep the live generation and the newest one older than it."""
    index_dir = Path(index_dir)
    if not keep:
        live = current_generation(index_dir)
        n_live = _gen_number(live) if live else -1
        older = sorted(n for p in index_dir.iterdir()
                       if (n := _gen_number(p.name)) is not None and n < n_live)
        keep = (live, f"{_GEN_PREFIX}{older[-1]:06d}" if older else None)
    for p in index_dir.iterdir():
        if p.name.startswith(_TMP_PREFIX) or p.name.startswith(f".{CURRENT}.tmp-"):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
        elif _gen_number(p.name) is not None and p.name not in keep and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


def check_index_dir(index_dir: str | Path) -> None:
    """Refuse to create an index inside a dir that holds other things (e.g. a photo folder)."""
    index_dir = Path(index_dir)
    if index_dir.exists() and not index_dir.is_dir():
        raise IndexFormatError(f"{index_dir}: exists and is not a directory")
    if not index_dir.is_dir() or exists(index_dir):
        return
    ours = {CURRENT, LOCK}
    foreign = [p.name for p in index_dir.iterdir()
               if p.name not in ours and _gen_number(p.name) is None
               and not p.name.startswith(_TMP_PREFIX) and not p.name.startswith(f".{CURRENT}.tmp-")]
    if foreign:
        raise IndexFormatError(f"{index_dir}: exists and holds other files ({foreign[0]}...); "
                               "an index needs its own dir")
