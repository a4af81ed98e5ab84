"""Exceptions of the runtime. The CLI turns them into one line on stderr and an exit status."""

from __future__ import annotations

from stbir_infer.preprocess import ImageDecodeError


class StbirInferError(Exception):
    """Base of every error the runtime raises on purpose. ``exit_code`` is what the CLI returns:
    2 for bad usage or bad input (the default), 1 for an internal failure."""

    exit_code = 2


class ExportDirError(StbirInferError):
    """The model dir is missing, is not an STBIR export, or is of an unsupported version."""


class TokenizerError(StbirInferError):
    """The tokenizer assets or settings in the export dir cannot reproduce open_clip's tokenizer."""


class QueryError(StbirInferError):
    """A query that cannot run (no sketch and no text, bad top_k, unreadable sketch file)."""


class IndexNotFoundError(StbirInferError):
    """No index at the given dir (nothing enrolled yet)."""


class IndexFormatError(StbirInferError):
    """The index dir holds something this build cannot read (corrupt, or another format)."""


class ModelMismatchError(StbirInferError):
    """The index was built with another export (fingerprint differs)."""


class IndexLockedError(StbirInferError):
    """Another process is writing the index."""


class ParameterError(StbirInferError):
    """An HNSW parameter out of range, or one that an existing index cannot change."""


class EnrollError(StbirInferError):
    """An enroll that cannot start (missing images dir, bad batch size...)."""


__all__ = [
    "EnrollError", "ExportDirError", "ImageDecodeError", "IndexFormatError", "IndexLockedError",
    "IndexNotFoundError", "ModelMismatchError", "ParameterError", "QueryError", "StbirInferError",
    "TokenizerError",
]
