"""The index dir on disk: generations, the CURRENT pointer, the writer lock, atomic commits.

Layout::

    IDX/
      CURRENT              one line: the name of the live generation ("gen-000007")
      gen-000007/          the live generation, never modified once written
        index.bin          the vectors (hnswlib's file; see ``stbir_infer.gallery``)
        meta.json          format, model fingerprint, HNSW params, items, files, checksums
      gen-000006/          the one before, kept so a reader that has just read CURRENT can finish
      .lock                a single writer holds fcntl.flock on it (the pid is written inside)

A commit writes ``IDX/.tmp-gen-N-PID/`` (index.bin + meta.json, fsynced), renames it to
``gen-N/``, then replaces ``CURRENT`` atomically (the commit point), then removes generations
older than the previous one. A crash before the swap leaves ``CURRENT`` naming the old, complete
generation; a crash after it leaves the new one; half-written temp dirs are removed by the next
writer. Readers take no lock: they follow ``CURRENT``.

``meta.json`` records the size and sha256 of every other file of its generation (``checksums``);
a reader verifies a file's bytes before handing it to a library that trusts them (hnswlib reads
whatever is there, and a flipped byte can crash the process). Format version 1 (before
checksums) is still read, unverified, and version 2 (absolute paths in meta.json) as it is; the
next writer rewrites either as version 3 (paths relative to the enrolled roots: ``roots``).

This module knows nothing of vectors; ``gallery.GalleryIndex`` is the in-memory side.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TypeVar

from stbir_infer.contract import HNSW_SPACE, atomic_write_text, file_sha256, fsync_dir
from stbir_infer.errors import IndexFormatError, IndexLockedError, IndexNotFoundError
from stbir_infer.index_meta import (  # meta.json: its format, reading and checking every field
    INDEX_FORMAT,
    INDEX_FORMAT_VERSION,
    MAX_GENERATION,
    META_FILE,
    read_meta,
)

SPACE = HNSW_SPACE
CURRENT = "CURRENT"
LOCK = ".lock"
INDEX_FILE = "index.bin"
GEN_PREFIX = "gen-"
TMP_PREFIX = ".tmp-"
_CURRENT_TMP_PREFIX = f".{CURRENT}."  # atomic_write's temp files for CURRENT
_GEN_NAME = re.compile(r"gen-[0-9]{1,12}")
_CURRENT_MAX_BYTES = 64
_LOAD_ATTEMPTS = 5
_CHUNK = 1 << 20

T = TypeVar("T")


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def gen_number(name: str) -> int | None:
    return int(name[len(GEN_PREFIX):]) if _GEN_NAME.fullmatch(name) else None


def gen_name(number: int) -> str:
    return f"{GEN_PREFIX}{number:06d}"


# -- the CURRENT pointer ---------------------------------------------------------------------------

def current_generation(index_dir: str | Path) -> str | None:
    """Name of the live generation dir, or None where nothing has been committed.

    CURRENT is read without following a symbolic link and at most 64 bytes of it; what it holds
    is never echoed in an error (it may be anything, e.g. a link to another file)."""
    path = Path(index_dir) / CURRENT
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        return None
    except OSError as exc:
        why = "a symbolic link" if os.path.islink(path) else (exc.strerror or type(exc).__name__)
        raise IndexFormatError(f"{index_dir}: {CURRENT} is not a valid generation pointer "
                               f"({why})") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise IndexFormatError(f"{index_dir}: {CURRENT} is not a regular file")
        raw = os.read(fd, _CURRENT_MAX_BYTES + 1)
    except OSError as exc:
        raise IndexFormatError(f"{index_dir}: unreadable {CURRENT} file "
                               f"({exc.strerror or type(exc).__name__})") from None
    finally:
        os.close(fd)
    try:
        name = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        name = ""
    if len(raw) > _CURRENT_MAX_BYTES or gen_number(name) is None:
        raise IndexFormatError(f"{index_dir}: {CURRENT} does not hold a valid generation name "
                               "(expected one line like gen-000001)")
    return name


def exists(index_dir: str | Path) -> bool:
    return current_generation(index_dir) is not None


def current_stamp(index_dir: str | Path):
    """Something that changes whenever a writer commits (to notice another process's enroll)."""
    try:
        st = os.lstat(os.path.join(index_dir, CURRENT))  # per query: no pathlib objects
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


# -- the writer lock -------------------------------------------------------------------------------

class WriterLock:
    """Exclusive writer lock on IDX/.lock (fcntl.flock: released by the OS if the holder dies)."""

    def __init__(self, index_dir: str | Path):
        self.index_dir = Path(index_dir)
        self._fd: int | None = None

    def acquire(self) -> WriterLock:
        import fcntl

        self.index_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.index_dir / LOCK,
                     os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
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

            with suppress(OSError):
                os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> WriterLock:
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


# -- housekeeping ----------------------------------------------------------------------------------

def _is_temp(name: str) -> bool:
    return name.startswith(TMP_PREFIX) or name.startswith(_CURRENT_TMP_PREFIX)


def cleanup(index_dir: str | Path, keep: tuple[str | None, ...] = ()) -> None:
    """Remove temp dirs and generations not kept (caller holds the writer lock). When ``keep`` is
    empty, keep the live generation and the newest one older than it."""
    index_dir = Path(index_dir)
    if not keep:
        live = current_generation(index_dir)
        live_number = gen_number(live) if live else None
        n_live = -1 if live_number is None else live_number
        numbers = (gen_number(p.name) for p in index_dir.iterdir())
        older = sorted(n for n in numbers if n is not None and n < n_live)
        keep = (live, gen_name(older[-1]) if older else None)
    for p in index_dir.iterdir():
        if _is_temp(p.name):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
        elif gen_number(p.name) is not None and p.name not in keep and p.is_dir() \
                and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)


def check_index_dir(index_dir: str | Path) -> None:
    """Refuse to create an index inside a dir that holds other things (e.g. a photo folder)."""
    index_dir = Path(index_dir)
    if index_dir.exists() and not index_dir.is_dir():
        raise IndexFormatError(f"{index_dir}: exists and is not a directory")
    if not index_dir.is_dir() or exists(index_dir):
        return
    foreign = sorted(p.name for p in index_dir.iterdir()
                     if p.name not in (CURRENT, LOCK) and gen_number(p.name) is None
                     and not _is_temp(p.name))
    if foreign:
        from stbir_infer.paths import display

        raise IndexFormatError(f"{index_dir}: exists and holds other files ({display(foreign[0])}"
                               "...); an index needs its own dir")


# -- writing a generation --------------------------------------------------------------------------

def _checksum(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "sha256": file_sha256(path)}


def commit(index_dir: str | Path, *, write_files: Callable[[Path], None], meta: dict,
           after: int = 0) -> tuple[str, dict]:
    """Write a new generation and make it the live one (caller holds the writer lock).

    ``write_files(tmp_dir)`` writes the generation's data files; their sizes and sha256 are added
    to ``meta`` (``checksums``) with ``generation``, ``updated`` and the format keys, and the
    result is written as meta.json. The generation number is above every one on disk and above
    ``after``. Returns (generation name, the meta written)."""
    index_dir = Path(index_dir)
    index_dir.mkdir(parents=True, exist_ok=True)
    old = current_generation(index_dir)
    numbers = [n for p in index_dir.iterdir() if (n := gen_number(p.name)) is not None]
    number = max(numbers + [int(after)]) + 1
    if number > MAX_GENERATION:  # a stray gen-999999999999 dir would make CURRENT unreadable
        raise IndexFormatError(f"{index_dir}: generation {number} is past the last one allowed")
    name = gen_name(number)
    tmp = index_dir / f"{TMP_PREFIX}{name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        write_files(tmp)
        checksums = {p.name: _checksum(p) for p in sorted(tmp.iterdir()) if p.name != META_FILE}
        meta = {**meta, "format": INDEX_FORMAT, "format_version": INDEX_FORMAT_VERSION,
                "generation": number, "updated": now(), "checksums": checksums}
        if INDEX_FILE in checksums:
            meta["index_bytes"] = checksums[INDEX_FILE]["bytes"]
        with open(tmp / META_FILE, "w", encoding="utf-8") as f:
            # ensure_ascii: a file name with undecodable bytes (a lone surrogate) round-trips
            json.dump(meta, f, separators=(",", ":"), ensure_ascii=True)
            f.flush()
            os.fsync(f.fileno())
        for fname in checksums:
            _fsync_file(tmp / fname)
        fsync_dir(tmp)
        os.replace(tmp, index_dir / name)
        fsync_dir(index_dir)
        atomic_write_text(index_dir / CURRENT, name + "\n")  # the commit point
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    cleanup(index_dir, keep=(name, old))
    return name, meta


# -- reading a generation --------------------------------------------------------------------------

def _sha_and_copy(fd: int, out_fd: int | None) -> tuple[str, int]:
    h, n = hashlib.sha256(), 0
    while block := os.read(fd, _CHUNK):
        h.update(block)
        n += len(block)
        if out_fd is not None:
            view = memoryview(block)
            while view:
                view = view[os.write(out_fd, view):]
    return h.hexdigest(), n


def _proc_fd_path(fd: int) -> str | None:
    path = f"/proc/{os.getpid()}/fd/{fd}"
    return path if os.path.exists(path) else None


@contextmanager
def verified_file(gen_dir: Path, meta: dict, name: str, *,
                  private_copy: bool | None = None) -> Iterator[str]:
    """A path whose bytes are ``gen_dir/name`` as meta.json's checksum says they must be.

    The file is opened once (no symbolic link) and hashed through that descriptor, and the path
    yielded is ``/proc/PID/fd/N`` of that descriptor: swapping the name for another file after the
    check changes nothing. What is left, an in-place rewrite of that very file while a library
    reads it, only another user can do to us (``private_copy`` None: the file is not ours, or
    group/others may write it); then, or with ``private_copy`` True, the bytes are copied into an
    anonymous in-memory file as they are hashed and the copy is yielded (safe, but the index sits
    in memory twice while it loads). A size, mtime or ctime changed by the end of the caller's
    block is an IndexFormatError. Without /proc, the file's own path is yielded. IndexFormatError
    on a size or hash mismatch; FileNotFoundError passes through; version 1 (no checksums) is
    yielded unverified."""
    path = gen_dir / name
    sums = meta.get("checksums")
    if sums is None:  # format version 1
        os.stat(path)  # FileNotFoundError -> the caller retries
        yield str(path)
        return
    want = sums.get(name)
    if want is None:
        raise IndexFormatError(f"{gen_dir / META_FILE}: no checksum for {name}")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise
    except OSError as exc:
        why = "a symbolic link" if os.path.islink(path) else (exc.strerror or type(exc).__name__)
        raise IndexFormatError(f"{path}: cannot be opened ({why})") from None
    copy_fd = None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise IndexFormatError(f"{path}: not a regular file")
        if st.st_size != want["bytes"]:
            raise IndexFormatError(f"{path}: {st.st_size} bytes, metadata says {want['bytes']}")
        if private_copy is None:  # could someone else rewrite it in place?
            private_copy = st.st_uid != os.geteuid() or bool(st.st_mode & (stat.S_IWGRP | stat.S_IWOTH))
        if private_copy and hasattr(os, "memfd_create") and _proc_fd_path(fd):
            with suppress(OSError):
                copy_fd = os.memfd_create("stbir-index", getattr(os, "MFD_CLOEXEC", 0))
        digest, n = _sha_and_copy(fd, copy_fd)
        if digest != want["sha256"] or n != want["bytes"]:
            raise IndexFormatError(f"{path}: contents do not match the checksum in {META_FILE} "
                                   "(the file is corrupt)")
        yield _proc_fd_path(copy_fd if copy_fd is not None else fd) or str(path)
        now = os.fstat(fd)
        if copy_fd is None and (now.st_size, now.st_mtime_ns, now.st_ctime_ns) != (
                st.st_size, st.st_mtime_ns, st.st_ctime_ns):
            raise IndexFormatError(f"{path}: changed while it was loading")
    finally:
        os.close(fd)
        if copy_fd is not None:
            os.close(copy_fd)


def load_current(index_dir: str | Path, load: Callable[[Path, dict], T]) -> T:
    """``load(gen_dir, meta)`` on the live generation; if a writer swaps generations while we
    read (a file vanishes), follow CURRENT again (a few times)."""
    index_dir = Path(index_dir)
    attempts = 0
    while True:
        name = current_generation(index_dir)
        if name is None:
            raise IndexNotFoundError(f"{index_dir}: no index here yet "
                                     "(run `stbir-infer enroll --images DIR` first)")
        try:
            gen_dir = index_dir / name
            return load(gen_dir, read_meta(gen_dir, gen_number(name)))
        except FileNotFoundError:
            attempts += 1
            if attempts >= _LOAD_ATTEMPTS or current_generation(index_dir) == name:
                raise IndexFormatError(f"{index_dir}: generation {name} is incomplete") from None
