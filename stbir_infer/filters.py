"""Tags and filters: ``enroll --tag key=value`` labels every file of that enroll; a query's
``--where key=value`` keeps only entries whose folder (``folder=shoes``: the folder relative to
its enrolled root, or one below it) or tag matches. Conditions on one key are alternatives (OR),
conditions on different keys must all hold (AND).

Filtered search runs in hnswlib with a filter callback, except when very few entries match: then
an exact search of just those vectors (``use_exact``). The exact search costs about matching x
dim, dominated by gathering the vectors out of hnswlib (``get_items``: about 8 us a 128-d vector
here, 1,000x the dot products); the filtered graph search visits about ef x total / matching
nodes (it walks past the entries that do not match), so the two break even where
matching^2 x dim = ``FILTER_CROSSOVER`` x total. Measured by ``benchmarks/index.py --lifecycle``
at 100k 128-d vectors: at 1-2% selectivity the graph takes 12-46 ms (ef 32-64) and the gathered
exact search 15-22 ms; at 10% the graph 0.8-1.8 ms, exact 170-300 ms. The constant puts the
crossover at ~1% there, ~0.3% of a million 128-d vectors and ~0.16% of a million 512-d.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from stbir_infer.errors import EnrollError, QueryError
from stbir_infer.roots import folder_of, in_folder

FOLDER = "folder"
FILTER_CROSSOVER = 1.3e3
_KEY = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_MAX_VALUE = 256

Where = dict  # {key: frozenset of accepted values}


def _pairs(items: Iterable[str] | Mapping[str, str], what: str, error) -> list[tuple[str, str]]:
    pairs = list(items.items()) if isinstance(items, Mapping) else []
    if not isinstance(items, Mapping):
        for item in items:
            key, sep, value = str(item).partition("=")
            if not sep:
                raise error(f"{what} {item!r} is not KEY=VALUE")
            pairs.append((key.strip(), value))
    for key, value in pairs:
        if not isinstance(key, str) or not _KEY.fullmatch(key):
            raise error(f"{what} key {str(key)[:70]!r}: use 1-64 letters, digits, '_', '.' or '-'")
        if not isinstance(value, str) or not value or len(value) > _MAX_VALUE \
                or not value.isprintable():
            raise error(f"{what} {key}=...: the value must be 1-{_MAX_VALUE} printable characters")
    return pairs


def parse_tags(items: Iterable[str] | Mapping[str, str] | None) -> dict[str, str]:
    """``["key=value", ...]`` (or a dict) -> {key: value}; ``folder`` is not a tag (it is where
    the file is). EnrollError when malformed."""
    tags = dict(_pairs(items or (), "--tag", EnrollError))
    if FOLDER in tags:
        raise EnrollError("--tag folder=...: 'folder' is where a file is, not a tag; use another key")
    return tags


def parse_where(items: Iterable[str] | Mapping[str, str] | None) -> Where:
    """``["key=value", ...]`` (or a dict) -> {key: frozenset of values}. QueryError when malformed."""
    out: dict[str, set] = {}
    for key, value in _pairs(items or (), "--where", QueryError):
        out.setdefault(key, set()).add(value)
    return {k: frozenset(v) for k, v in out.items()}


def check_keys(where: Where, known: set[str]) -> None:
    """Refuse a key that is neither ``folder`` nor a tag some entry has."""
    for key in where:
        if key != FOLDER and key not in known:
            have = ", ".join(sorted({FOLDER} | known))
            raise QueryError(f"--where {key}=...: no entry has a tag {key!r} (keys here: {have})")


def matches(path: str, rec: dict, roots: list[str], where: Where) -> bool:
    tags = rec.get("tags") or {}
    for key, values in where.items():
        if key == FOLDER:
            folder = folder_of(path, roots)
            if not any(in_folder(folder, v) for v in values):
                return False
        elif tags.get(key) not in values:
            return False
    return True


def use_exact(matching: int, total: int, dim: int) -> bool:
    """Whether exact search of the ``matching`` vectors beats hnswlib's filtered search."""
    return float(matching) ** 2 * dim <= FILTER_CROSSOVER * total


__all__ = ["FILTER_CROSSOVER", "FOLDER", "check_keys", "matches", "parse_tags",
           "parse_where", "use_exact"]
