"""``stbir-infer query --batch FILE``: many queries in one process, JSON lines in, JSON lines out.

Each non-blank input line is one query, a JSON object with the keys of ``Searcher.query``::

    {"sketch": "sketches/cat.png", "text": "a ginger cat", "top_k": 5}
    {"text": "a red car", "min_score": "auto"}

``sketch`` is a file path (relative to the current directory, as ``--sketch``); ``top_k``,
``sketch_weight``, ``min_score`` and ``where`` ({"folder": "shoes"} or ["folder=shoes"]) default
to the command's options. Each query gets one output
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
from collections.abc import Callable, Iterator
from typing import IO

from stbir_infer.errors import QueryError
from stbir_infer.paths import display

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


def _query_of(value, defaults: dict) -> dict:
    """The ``Searcher.query`` keyword arguments of one parsed line (QueryError: a bad line)."""
    if not isinstance(value, dict):
        raise QueryError('a line must be a JSON object such as {"sketch": "a.png", "text": "..."}')
    sketch = value.get("sketch")
    if sketch is not None and not isinstance(sketch, str):
        raise QueryError("sketch must be a file path (a string)")
    return {**defaults, **value}


def run_batch(searcher, stream: IO[bytes], write: Callable[[str], object], *, top_k: int = 10,
              sketch_weight: float | None = None, min_score=None,
              where=None) -> tuple[int, int]:
    """Answer every line of ``stream``, writing one JSON line each; returns (queries, failed)."""
    defaults = {"top_k": top_k, "sketch_weight": sketch_weight, "min_score": min_score,
                "where": where}
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
                          else _query_of(value, defaults)))
        except QueryError as exc:
            chunk.append((number, exc))
        if len(chunk) >= CHUNK:
            flush()
    flush()
    return total, failed


def describe_query(searcher, q: dict) -> dict:
    """A query (``Searcher.query`` keyword arguments) as ``query --json`` shows it."""
    sketch, text = q.get("sketch"), q.get("text")
    has_text = text is not None and bool(text.strip())
    fused = sketch is not None and has_text
    weight = q.get("sketch_weight")
    return {"sketch": None if sketch is None else display(sketch),
            "text": None if text is None else text.encode("utf-8", "backslashreplace").decode(),
            "top_k": q["top_k"], "fusion": searcher.fusion.method if fused else None,
            "fusion_weight": ((searcher.fusion_weight if weight is None else weight)
                              if fused else None),
            "min_score": searcher.min_score_for(q.get("min_score"), sketch, text)}


__all__ = ["CHUNK", "MAX_LINE_BYTES", "describe_query", "read_lines", "run_batch"]
