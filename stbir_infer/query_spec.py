"""One query's parts, checked once: ``QuerySpec``. The CLI, ``query --batch``, the web API and
``Searcher`` all build their queries here, so a limit (text length, top_k, a weight's range,
``--where``) is one rule with one message everywhere; the web page reads the same limits from
``/api/health`` (``limits()``).

A query has up to three inputs: a ``sketch`` and an example ``image`` (a path or a PIL image,
decoded later by the encoders, whose decode bounds apply), a ``text``; or, instead of an image
file, ``like``: the id (label) of a photo already in the index, whose stored vector is the
example ("more like this"). Transport details stay with the caller: a web form's strings are
turned into numbers there, a sketch's base64 is decoded there.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from stbir_infer.contract import QUERY_NEEDS_INPUT
from stbir_infer.errors import QueryError
from stbir_infer.filters import Where, parse_where

MAX_TEXT_CHARS = 1000   # characters of a query text (the text tower reads well under 100 tokens)
MAX_ID = 10 ** 18       # an index label (``like``) is a non-negative integer below this
AUTO = "auto"
KEYS = ("sketch", "image", "like", "text", "top_k", "sketch_weight", "image_weight",
        "min_score", "where")
_KINDS = {list: "array", dict: "object", bool: "boolean", int: "number", float: "number"}


def _number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def check_text(value) -> str | None:
    """A string of at most MAX_TEXT_CHARS valid Unicode characters; None or blank -> None."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise QueryError(f"text must be a string, not a {_KINDS.get(type(value), 'value')} "
                         f"({type(value).__name__})")
    if len(value) > MAX_TEXT_CHARS:
        raise QueryError(f"text is {len(value):,} characters long; at most "
                         f"{MAX_TEXT_CHARS:,} are accepted")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise QueryError("text is not valid Unicode (it holds a lone surrogate)") from None
    return value if value.strip() else None


def check_top_k(value, max_top_k: int | None = None) -> int:
    """An integer from 1 (to ``max_top_k`` when given)."""
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 1
    if not ok or (max_top_k is not None and value > max_top_k):
        span = ">= 1" if max_top_k is None else f"between 1 and {max_top_k}"
        raise QueryError(f"top_k must be an integer {span}, not {_short(value)}")
    return int(value)


def check_weight(value, name: str = "sketch_weight") -> float | None:
    """A finite number from 0 to 1 (None stays None)."""
    if value is None:
        return None
    if not _number(value) or not math.isfinite(float(value)) or not 0.0 <= float(value) <= 1.0:
        raise QueryError(f"{name} must be a number from 0 to 1, not {_short(value)}")
    return float(value)


def parse_min_score(value):
    """None, "auto", or a finite number (a string of one too)."""
    if value is None or (isinstance(value, str) and value.strip().lower() == AUTO):
        return None if value is None else AUTO
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise QueryError(f"min_score must be a number or auto, not {_short(value)}") from None
    if not _number(value) or not math.isfinite(float(value)):
        raise QueryError(f"min_score must be a number or auto, not {_short(value)}")
    return float(value)


def check_like(value) -> int | None:
    """The index id of an enrolled photo (``more like this``)."""
    if value is None:
        return None
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or not 0 <= value < MAX_ID:
        raise QueryError(f"like must be the id of a photo in the index (an integer >= 0), "
                         f"not {_short(value)}")
    return int(value)


def _short(value, limit: int = 40) -> str:
    """A caller's value in a message: scalars as written, containers by type (the repr of a
    100,000-deep list is itself a RecursionError)."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        text = repr(value).encode("utf-8", "backslashreplace").decode()
        return text if len(text) <= limit else text[:limit - 3] + "..."
    return f"a {_KINDS.get(type(value), type(value).__name__)}"


def mode_of(sketch: bool, image: bool, text: bool) -> str:
    """``sketch``, ``text``, ``sketch+text``, ``image``, ``image+text``, ...: the inputs a query
    has, in that order (the export's score thresholds are per mode)."""
    parts = [name for name, have in (("sketch", sketch), ("image", image), ("text", text)) if have]
    if not parts:
        raise QueryError(QUERY_NEEDS_INPUT)
    return "+".join(parts)


@dataclass(frozen=True)
class QuerySpec:
    """A checked query (build it with ``parse`` or ``from_dict``; the fields are then valid)."""

    sketch: object = None
    image: object = None
    like: int | None = None
    text: str | None = None
    top_k: int = 10
    sketch_weight: float | None = None
    image_weight: float | None = None
    min_score: float | str | None = None
    where: Where = field(default_factory=dict)
    image_sha256: str | None = None  # the example's content, when the caller knows it (web upload)

    @classmethod
    def parse(cls, *, sketch=None, image=None, like=None, text=None, top_k=10,
              sketch_weight=None, image_weight=None, min_score=None, where=None,
              max_top_k: int | None = None, image_sha256: str | None = None) -> QuerySpec:
        """Every part checked (QueryError, one line, at the first bad one)."""
        if top_k is None:
            top_k = 10
        for name, value in (("sketch", sketch), ("image", image)):
            if value is not None and not isinstance(value, (str, os.PathLike, Image.Image)):
                raise QueryError(f"{name} must be a file path (a string)")
        spec = cls(sketch=sketch, image=image, like=check_like(like), text=check_text(text),
                   top_k=check_top_k(top_k, max_top_k),
                   sketch_weight=check_weight(sketch_weight),
                   image_weight=check_weight(image_weight, "image_weight"),
                   min_score=parse_min_score(min_score), where=parse_where(where),
                   image_sha256=image_sha256)
        if image is not None and like is not None:
            raise QueryError("give an example photo (image) or an index id (like), not both")
        spec.mode  # noqa: B018 - raises when the query has no input
        return spec

    @classmethod
    def from_dict(cls, data, defaults: dict | None = None, *,
                  max_top_k: int | None = None) -> QuerySpec:
        """A query given as a mapping (a ``--batch`` line, ``Searcher.query_many``); unknown keys
        are refused. ``defaults`` fill the keys it lacks (the command's options)."""
        if isinstance(data, QuerySpec):
            return data
        if not isinstance(data, dict):
            raise QueryError(f'a query is a JSON object such as {{"sketch": "a.png", "text": '
                             f'"..."}}, not {_short(data)}')
        unknown = sorted(map(str, set(data) - set(KEYS)))
        if unknown:
            raise QueryError(f"unknown key(s) {', '.join(_short(k, 30) for k in unknown[:5])} "
                             f"(a query takes {', '.join(KEYS)})")
        return cls.parse(**{**(defaults or {}), **data}, max_top_k=max_top_k)

    @property
    def has_image(self) -> bool:
        return self.image is not None or self.like is not None

    @property
    def mode(self) -> str:
        return mode_of(self.sketch is not None, self.has_image, self.text is not None)


def limits(max_top_k: int | None = None) -> dict:
    """What a client may send (the web page reads these from /api/health)."""
    return {"max_text": MAX_TEXT_CHARS, "max_top_k": max_top_k, "weights": [0.0, 1.0]}


__all__ = ["AUTO", "KEYS", "MAX_TEXT_CHARS", "QuerySpec", "check_text", "check_top_k",
           "check_weight", "limits", "mode_of", "parse_min_score"]
