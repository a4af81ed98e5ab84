"""The errors ``models`` raises on purpose; each carries the exit status a command returns."""

from __future__ import annotations


class StbirModelError(ValueError):
    """Base of the model package's errors: bad input, so exit status 2."""

    exit_code = 2


class ModelError(StbirModelError):
    """A model that cannot be built as asked (bad name, missing or unsafe weights...)."""


class CheckpointError(StbirModelError):
    """A file that is missing, unreadable, unsafe to load, or not an STBIR checkpoint."""


def load_failure(exc: BaseException) -> str:
    """One line on why ``torch.load(..., weights_only=True)`` (or a state-dict load) failed."""
    import pickle

    if isinstance(exc, pickle.UnpicklingError):
        return ("refused: it holds pickled objects that would run code when loaded; only tensors "
                "and plain data are read")
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


__all__ = ["CheckpointError", "ModelError", "StbirModelError", "load_failure"]
