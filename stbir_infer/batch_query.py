"""``stbir-infer query --batch FILE``: many queries in one process, JSON lines in, JSON lines out.

Each non-blank input line is one query, a JSON object with the keys of ``Searcher.query``
(checked by ``stbir_infer.query_spec.QuerySpec``)::

    {"sketch": "sketches/cat.png", "text": "a ginger cat", "top_k": 5}
    {"text": "a red car", "min_score": "auto"}
    {"image": "photos/beach.jpg", "text": "at sunset"}
    {"like": 42}

``sketch`` and ``image`` are file paths (relative to the current directory, as ``--sketch``);
``like`` the id of a photo in the index; ``top_k``, ``sketch_weight``, ``image_weight``,
``min_score`` and ``where`` ({"folder": "shoes"} or ["folder=shoes"]) default to the command's
options. Each query gets one output
line, in input order, numbered by its input line (1-based)::

    {"line": 1, "query": {...}, "results": [{"rank": 1, "score": ..., "path": ...}, ...]}
    {"line": 2, "error": "top_k must be an integer >= 1, not 0"}

A bad line (not JSON, not an object, an unknown key, a wrong type, a sketch that cannot be read,
neither sketch nor text) gets an error record and the other lines are still answered; then, after
the last line, the command says how many failed on stderr and exits with status 2. Lines are read
and answered ``CHUNK`` at a time (``Searcher.query_many``), so memory follows the chunk, not the
file; a line longer than ``MAX_LINE_BYTES`` is an error record without being read into memory.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from typing import IO

from stbir_infer.errors import QueryError
from stbir_infer.fusion import DEFAULT_IMAGE_WEIGHT
from stbir_infer.paths import display
from stbir_infer.query_spec import QuerySpec

CHUNK = 256
MAX_LINE_BYTES = 1 << 20


def read_lines(stream: IO[bytes], limit: int = MAX_LINE_BYTES) -> Iterator[tuple[int, object]]:
    """(line number, parsed JSON value or the QueryError saying why not), blank lines skipped."""
    number = 0
    while True:
        raw = stream.readline(limit + 1)
        if not raw:
            return
        number += 1
        if len(raw) > limit and not raw.endswith(b"\n"):
            while raw and not raw.endswith(b"\n"):  # skip the rest of the line, a block at a time
                raw = stream.readline(limit)
            yield number, QueryError(f"line is longer than {limit:,} bytes")
            continue
        if not raw.strip():
            continue
        try:
            yield number, json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            yield number, QueryError("line is not UTF-8")
        except (ValueError, RecursionError) as exc:
            yield number, QueryError(f"not valid JSON ({str(exc)[:120]})")


def run_batch(searcher, stream: IO[bytes], write: Callable[[str], object], *, top_k: int = 10,
              sketch_weight: float | None = None, min_score=None,
              where=None, image_weight: float | None = None) -> tuple[int, int]:
    """Answer every line of ``stream``, writing one JSON line each; returns (queries, failed)."""
    defaults = {"top_k": top_k, "sketch_weight": sketch_weight, "min_score": min_score,
                "where": where, "image_weight": image_weight}
    total = failed = 0
    chunk: list[tuple[int, object]] = []

    def flush():
        nonlocal failed
        todo = [(n, q) for n, q in chunk if not isinstance(q, QueryError)]
        answers = iter(searcher.query_many([q for _, q in todo], errors="return"))
        for number, q in chunk:
            result = q if isinstance(q, QueryError) else next(answers)
            if isinstance(result, QueryError):
                failed += 1
                write(json.dumps({"line": number, "error": str(result)}, ensure_ascii=False))
            else:
                write(json.dumps({"line": number, "query": describe_query(searcher, q),
                                  "results": [h.to_dict() for h in result]}, ensure_ascii=False))
        chunk.clear()

    for number, value in read_lines(stream):
        total += 1
        try:
            chunk.append((number, value if isinstance(value, QueryError)
                          else QuerySpec.from_dict(value, defaults)))
        except QueryError as exc:
            chunk.append((number, exc))
        if len(chunk) >= CHUNK:
            flush()
    flush()
    return total, failed


def describe_query(searcher, q: QuerySpec) -> dict:
    """A query as ``query --json`` shows it."""
    fused = q.sketch is not None and q.text is not None
    out = {"sketch": None if q.sketch is None else display(str(q.sketch)),  # a path in a batch file
           "text": q.text, "top_k": q.top_k,
           "fusion": searcher.fusion.method if fused else None,
           "fusion_weight": ((searcher.fusion_weight if q.sketch_weight is None
                              else q.sketch_weight) if fused else None),
           "min_score": searcher.min_score_for(q.min_score, mode=q.mode)}
    if q.image is not None:
        out["image"] = display(q.image) if isinstance(q.image, (str, os.PathLike)) else "(image)"
    if q.like is not None:
        out["like"] = q.like
    if q.has_image and (q.sketch is not None or q.text is not None):
        out["image_weight"] = DEFAULT_IMAGE_WEIGHT if q.image_weight is None else q.image_weight
    return out


__all__ = ["CHUNK", "MAX_LINE_BYTES", "describe_query", "read_lines", "run_batch"]
