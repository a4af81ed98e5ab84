"""File names as the index keeps them, and as people and JSON see them.

The index keeps a path as ``os.fsdecode`` gives it: a ``str`` in which bytes that are not valid
UTF-8 survive as lone surrogates (PEP 383), so ``os.fsencode`` gives back the exact bytes to open.
Such a string cannot be printed or written as UTF-8; ``display`` is the form for terminals, JSON
and HTTP: undecodable bytes become ``\\xNN`` and control characters ``\\uNNNN``-style escapes.
"""

from __future__ import annotations

import base64
import os
import re

# C0/C1 controls, DEL, line/paragraph separators and the bidirectional controls: they would
# move a terminal's cursor, recolour it, split one record into two lines, or show a name
# reversed (U+202E makes "gpj.exe" read "exe.jpg").
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]")


def display(path: str | os.PathLike) -> str:
    """A printable, valid-UTF-8 form of ``path`` (identity for ordinary names)."""
    text = os.fsdecode(path)
    if text.isprintable() and not _CONTROL.search(text):
        try:
            text.encode("utf-8")
            return text
        except UnicodeEncodeError:
            pass
    raw = os.fsencode(text)
    out = raw.decode("utf-8", "backslashreplace")
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100
                        else f"\\u{ord(m.group()):04x}", out)


def path_bytes_b64(path: str) -> str:
    """The exact bytes of a file name, base64-encoded (beside ``display`` where the two differ)."""
    return base64.b64encode(os.fsencode(path)).decode("ascii")


__all__ = ["display", "path_bytes_b64"]
