"""The errors training raises on purpose; each carries the exit status ``stbir-train`` returns
(2: bad input or usage, 1: training could not go on)."""

from __future__ import annotations


class StbirTrainError(Exception):
    """Base of the training package's errors."""

    exit_code = 2


class ConfigError(StbirTrainError, ValueError):
    """A config that cannot be used; the message names the file and the key."""


class DataError(StbirTrainError, ValueError):
    """Bad data on disk; the message names the file."""


class TrainingError(StbirTrainError, RuntimeError):
    """Training cannot go on (a non-finite loss, a resume that does not fit the config...)."""

    exit_code = 1


__all__ = ["ConfigError", "DataError", "StbirTrainError", "TrainingError"]
