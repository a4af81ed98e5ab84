"""Exceptions of the runtime. The CLI turns them into one line on stderr and an exit status.

This module imports nothing of ours, so every other module can import it without a cycle.
"""

from __future__ import annotations


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


class ProviderError(StbirInferError):
    """An onnxruntime session setting that cannot be used: an execution provider onnxruntime does
    not know (one it knows but lacks falls back to the CPU instead), threads < 1."""


class IndexEditError(StbirInferError):
    """A remove, prune, relocate or reindex that cannot do what was asked (a path the index does
    not hold, a folder that is not one of its roots); the index is left as it was."""


class ImageDecodeError(StbirInferError, ValueError):
    """A file that is not a readable image, or one too large to decode within the runtime's bounds
    (``stbir_infer.preprocess.MAX_PIXELS``). Still a ValueError, as it was before it joined this
    family. ``transient``: it may decode another time (out of memory); enroll does not remember
    such a file as skipped."""

    transient = False


class NonFiniteEmbeddingError(QueryError):
    """An encoder output holds NaN or Inf. ``branch`` names the encoder, ``rows`` the batch rows
    that are not finite, ``vectors`` the whole output (so a batch caller such as enroll can keep
    the finite rows and skip the others). A QueryError, so a query that hits it fails with exit 2."""

    def __init__(self, message: str, *, branch: str = "", rows: list[int] | None = None,
                 vectors=None):
        super().__init__(message)
        self.branch = branch
        self.rows = list(rows or [])
        self.vectors = vectors


def first_line(exc: BaseException) -> str:
    """An exception's message cut to one line for an error of ours (its repr when empty)."""
    text = str(exc)
    return text.splitlines()[0][:200] if text else repr(exc)


__all__ = [
    "EnrollError", "ExportDirError", "ImageDecodeError", "IndexEditError", "IndexFormatError",
    "IndexLockedError", "IndexNotFoundError", "ModelMismatchError", "NonFiniteEmbeddingError",
    "ParameterError", "ProviderError", "QueryError", "StbirInferError", "TokenizerError", "first_line",
]
