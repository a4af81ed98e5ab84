"""Entries stored relative to the folders they were enrolled from, so a gallery can move.

In memory the index keeps absolute paths (what enroll scans and what a query returns); on disk
(index format 3) ``roots`` lists the enrolled folders once, absolute, and ``files`` / ``skipped``
hold, per root, the paths relative to it. Moving a gallery is then one edit of ``roots``
(``stbir-infer relocate OLD NEW``). A path belongs to the outermost root that contains it (enroll
``/photos`` and later ``/photos/shoes``: a shoe's folder is ``shoes``). Paths are
``os.fsdecode`` strings (lone surrogates for undecodable bytes) and are cut and joined as strings,
never normalised, so those bytes survive.
"""

from __future__ import annotations

import os

from stbir_infer.scan import is_within


def _prefix(root: str) -> str:
    return os.path.join(root, "")


def root_of(path: str, roots: list[str]) -> str | None:
    """The outermost root that ``path`` lies under (or is), or None."""
    best = None
    for root in roots:
        if is_within(path, root) and (best is None or len(root) < len(best)):
            best = root
    return best


def relative(path: str, root: str) -> str:
    return "" if path == root else path[len(_prefix(root)):]


def folder_of(path: str, roots: list[str]) -> str:
    """The folder of ``path`` relative to its root, "/"-separated ("" for the root's own files)."""
    root = root_of(path, roots)
    rel = relative(path, root) if root is not None else path
    folder = os.path.dirname(rel)
    return folder.replace(os.sep, "/") if os.sep != "/" else folder


def in_folder(folder: str, wanted: str) -> bool:
    """Whether ``folder`` is ``wanted`` or lies under it (``wanted`` "" matches every folder)."""
    wanted = wanted.strip("/")
    return not wanted or folder == wanted or folder.startswith(wanted + "/")


def split_by_root(records: dict[str, dict], roots: list[str]) -> tuple[list[str], list[dict]]:
    """(roots, one {relative path: record} per root) for meta.json. A path under no root (an index
    written before roots were kept for it) gets its own folder as a new root."""
    roots = list(roots)
    out: list[dict] = [{} for _ in roots]
    position = {root: i for i, root in enumerate(roots)}
    for path, rec in records.items():
        root = root_of(path, roots)
        if root is None:
            root = os.path.dirname(path)
            roots.append(root)
            position[root] = len(roots) - 1
            out.append({})
        out[position[root]][relative(path, root)] = rec
    return roots, out


def join_roots(roots: list[str], per_root) -> dict[str, dict]:
    """The inverse of ``split_by_root``: {absolute path: record}. ``per_root`` comes from an
    index's meta.json, so its type is checked here."""
    if not per_root:
        return {}
    if not isinstance(per_root, list) or len(per_root) > len(roots):
        raise ValueError("one record map per root")
    out = {}
    for root, records in zip(roots, per_root):
        for rel, rec in records.items():
            out[os.path.join(root, rel) if rel else root] = rec
    return out


def moved(path: str, old: str, new: str) -> str:
    """``path`` with its leading ``old`` folder replaced by ``new`` (``path`` unchanged when not
    under ``old``)."""
    if not is_within(path, old):
        return path
    rel = relative(path, old)
    return os.path.join(new, rel) if rel else new


__all__ = ["folder_of", "in_folder", "is_within", "join_roots", "moved", "relative", "root_of",
           "split_by_root"]
