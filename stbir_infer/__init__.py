"""STBIR runtime: sketch + text -> image search with onnxruntime, numpy, pillow and hnswlib.

No torch here (nor torchvision, open_clip, or the ``models`` package): an export dir copied to a
device is all this needs. Importing the package is cheap; the names below load on first use.

    from stbir_infer import Searcher
    searcher = Searcher("export/", "index/")
    searcher.enroll("photos/")
    hits = searcher.query(sketch="drawing.png", text="a red star", top_k=5)
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Searcher": "stbir_infer.searcher",
    "Hit": "stbir_infer.hits",
    "EnrollReport": "stbir_infer.enroll",
    "Encoders": "stbir_infer.encoders",
    "Tokenizer": "stbir_infer.tokenizer",
    "HnswParams": "stbir_infer.gallery",
    "StbirInferError": "stbir_infer.errors",
    "ExportDirError": "stbir_infer.errors",
    "TokenizerError": "stbir_infer.errors",
    "QueryError": "stbir_infer.errors",
    "EnrollError": "stbir_infer.errors",
    "ParameterError": "stbir_infer.errors",
    "IndexNotFoundError": "stbir_infer.errors",
    "IndexFormatError": "stbir_infer.errors",
    "IndexLockedError": "stbir_infer.errors",
    "ModelMismatchError": "stbir_infer.errors",
    "ImageDecodeError": "stbir_infer.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'stbir_infer' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
