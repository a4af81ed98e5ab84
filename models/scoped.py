"""Process state that library code may change only for a moment, and always puts back.

``quiet_logs`` hides the warnings a library prints on the root logger (open_clip's "initialized
randomly" before weights are loaded; onnxruntime quantisation's pre-processing advice) without
``logging.disable``, which would wipe the caller's own setting. ``offline_hub`` makes Hugging Face
Hub lookups local-only while open_clip is imported or fetches weights, then restores
``HF_HUB_OFFLINE`` (the environment variable and huggingface_hub's copy of it).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from importlib.util import find_spec

_TRUE = {"1", "ON", "YES", "TRUE"}


class _FromPackages(logging.Filter):
    """Drops records below ERROR that were emitted from files inside the given packages."""

    def __init__(self, dirs: tuple[str, ...]):
        super().__init__()
        self.dirs = dirs

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or not record.pathname.startswith(self.dirs)


def _package_dir(name: str) -> str | None:
    spec = find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return os.path.join(list(spec.submodule_search_locations)[0], "")


@contextlib.contextmanager
def quiet_logs(*packages: str):
    """Below-ERROR records of ``packages`` are dropped inside the block: those on their own
    loggers (by raising the package logger's level) and those they send through the root logger
    with ``logging.warning(...)`` (by a filter on the root logger). Both are undone on exit."""
    loggers = [logging.getLogger(p) for p in packages]
    levels = [lg.level for lg in loggers]
    dirs = tuple(d for d in map(_package_dir, packages) if d)
    root_filter = _FromPackages(dirs)
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    logging.getLogger().addFilter(root_filter)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(root_filter)
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


@contextlib.contextmanager
def offline_hub():
    """Hugging Face Hub stays local inside the block unless the caller set HF_HUB_OFFLINE itself
    (HF_HUB_OFFLINE=0 opts back in to downloads). Devices and CI have no network: an uncached
    pretrained tag fails at once instead of retrying downloads."""
    previous = os.environ.get("HF_HUB_OFFLINE")
    if previous is None:
        os.environ["HF_HUB_OFFLINE"] = "1"
    constants = sys.modules.get("huggingface_hub.constants")
    had = getattr(constants, "HF_HUB_OFFLINE", None) if constants is not None else None
    if constants is not None and previous is None:
        constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = previous
        constants = sys.modules.get("huggingface_hub.constants")
        if constants is not None and hasattr(constants, "HF_HUB_OFFLINE"):
            if had is not None:
                constants.HF_HUB_OFFLINE = had
            else:  # imported inside the block: what the restored environment says
                value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
                constants.HF_HUB_OFFLINE = (value or "").upper() in _TRUE


@contextlib.contextmanager
def open_clip_scope():
    """What every use of open_clip runs inside: offline hub, no "initialized randomly" noise."""
    with offline_hub(), quiet_logs("open_clip"):
        yield


__all__ = ["offline_hub", "open_clip_scope", "quiet_logs"]
