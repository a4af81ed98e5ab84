"""Walking a photo folder for enroll (which regular files are there, what could not be read), and
reading those files.

Hidden names (a leading dot) are skipped, and so is the index dir when it sits inside the folder.
A link (to a file or a directory) whose target lies outside the folder is reported in
``external_links`` and not followed, unless ``follow_external_links``; links to directories inside
the folder are never walked (their files are listed where they really are), and each real
directory is walked once, so a link loop ends. A folder that cannot be listed is reported in
``unreadable``: the caller must not take the absence of its files as their deletion.
"""

from __future__ import annotations

import hashlib
import os
import stat
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class ScanResult:
    files: list[tuple[str, os.stat_result]] = field(default_factory=list)  # (path, stat), sorted
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (folder, reason)
    unstatable: set[str] = field(default_factory=set)  # names listed but not stat-able (kept)
    external_links: list[str] = field(default_factory=list)


def is_within(path: str, root: str) -> bool:
    """Whether real path ``path`` is ``root`` or lies under it (both absolute, resolved)."""
    return path == root or path.startswith(os.path.join(root, ""))


def scan_tree(root: str | Path, *, exclude: str | Path | None = None,
              follow_external_links: bool = False) -> ScanResult:
    """Regular files under ``root`` (an absolute, resolved path), depth-first in name order."""
    root = os.fspath(root)
    real_root = os.path.realpath(root)
    out = ScanResult()
    skip_dir = None
    if exclude is not None:
        try:
            st = os.stat(exclude)
            skip_dir = (st.st_dev, st.st_ino)
        except OSError:
            pass
    try:
        st = os.stat(root)
        visited = {(st.st_dev, st.st_ino)}
    except OSError:
        visited = set()
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            out.unreadable.append((folder, f"unreadable folder ({exc.strerror or type(exc).__name__}); "
                                           "its files stay in the index as they were"))
            continue
        subdirs = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = entry.path
            try:
                is_link = entry.is_symlink()
            except OSError:
                is_link = False
            try:
                st = os.stat(path)  # follows a link
            except FileNotFoundError:
                continue  # a dangling link (or a file deleted as we looked): nothing to index
            except OSError as exc:
                if is_link:
                    continue  # a link loop, or a target we may not reach: nothing to index
                out.unstatable.add(path)
                out.unreadable.append((path, f"cannot stat ({exc.strerror or type(exc).__name__}); "
                                             "kept in the index as it was"))
                continue
            if stat.S_ISDIR(st.st_mode):
                key = (st.st_dev, st.st_ino)
                if key == skip_dir or key in visited:
                    continue
                if is_link:
                    if is_within(os.path.realpath(path), real_root):
                        continue  # an inside link: its files are enrolled where they really are
                    if not follow_external_links:
                        out.external_links.append(path)
                        continue
                visited.add(key)
                subdirs.append(path)
            elif stat.S_ISREG(st.st_mode):
                if is_link and not follow_external_links \
                        and not is_within(os.path.realpath(path), real_root):
                    out.external_links.append(path)
                    continue
                out.files.append((path, st))
        stack.extend(reversed(subdirs))
    return out


def open_regular(path: str) -> int:
    """An fd on ``path`` if it is a regular file (O_NONBLOCK: a FIFO swapped in cannot hang us)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise IsADirectoryError(0, "not a regular file")
    return fd


def hash_file(path: str) -> tuple[str, os.stat_result]:
    """sha256 of the file's bytes, and its stat as opened (size and mtime of those bytes)."""
    fd = open_regular(path)
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        return sha256_of(f), st


def sha256_of(f) -> str:
    """sha256 of a file object's bytes from where it stands, read 1 MB at a time."""
    h = hashlib.sha256()
    for block in iter(lambda: f.read(1 << 20), b""):
        h.update(block)
    return h.hexdigest()


def stamp(st: os.stat_result) -> tuple:
    """What any write to a file changes (a write always moves ctime)."""
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


@contextmanager
def opened_if_sha(path: str, sha: str):
    """(the file, opened and at its start; its ``stamp`` before it was hashed) if its bytes
    (still) hash to ``sha``; (None, None) if not, or if it cannot be read. Hashed as a stream,
    never read whole into memory (a 2 GB file cost 2.26 GB when it was); a caller that reads it
    again compares ``stamp`` afterwards: a write in between moves it."""
    try:
        f = os.fdopen(open_regular(path), "rb")
    except OSError:
        yield None, None
        return
    with f:
        try:
            before = stamp(os.fstat(f.fileno()))
            ok = sha256_of(f) == sha
            f.seek(0)
        except OSError:
            ok = False
        yield (f, before) if ok else (None, None)
