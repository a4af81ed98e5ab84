"""Checkpoint format: one ``torch.save`` dict, written atomically (temp file + rename).

Keys: ``format`` ("stbir-checkpoint"), ``format_version``, ``model_spec`` (ModelSpec as a dict),
``model`` (state dict), ``config`` (the full training config), and training state where there is
one: ``optimizer``, ``stage_index``, ``epoch`` (epochs done in that stage), ``metrics``.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import torch

from models.model import ModelSpec, STBIRModel, build_model

FORMAT = "stbir-checkpoint"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A file that is missing, unreadable, or not an STBIR checkpoint."""


def save_checkpoint(path: str | Path, model: STBIRModel, **state) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION,
               "model_spec": model.spec.to_dict(), "model": model.state_dict(), **state}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(exc).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an STBIR checkpoint")
    if ckpt.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {ckpt.get('format_version')} "
                              f"is not supported (this build reads {FORMAT_VERSION})")
    return ckpt


def load_model(path: str | Path) -> tuple[STBIRModel, dict]:
    """Rebuild the model from a checkpoint (no pretrained download: the weights are in it)."""
    ckpt = read_checkpoint(path)
    spec = ModelSpec.from_dict({**ckpt["model_spec"], "pretrained": None, "sketch_pretrained": None})
    model = build_model(spec)
    model.load_state_dict(ckpt["model"])
    model.eval()
    return model, ckpt


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
