"""Checkpoint format: one ``torch.save`` dict, written atomically (temp file + rename).

Keys: ``format`` ("stbir-checkpoint"), ``format_version``, ``model_spec`` (ModelSpec as a dict),
``model`` (state dict), ``config`` (the full training config), ``text_model_files`` (with a Hugging
Face text tower: its config.json and tokenizer.json as text), and training state where there is
one: ``optimizer``, ``stage_index``, ``epoch`` (epochs done in that stage), ``metrics``.

Everything in it is tensors and plain data, so it is read with ``weights_only=True``: a file
whose pickle would run code (``stbir-export``, ``evaluate`` and ``--resume`` all take user
files) is refused with a ``CheckpointError`` before anything in it runs.
"""

from __future__ import annotations

from pathlib import Path

import torch

from models.errors import CheckpointError, load_failure
from models.model import ModelSpec, STBIRModel, build_model
from stbir_infer.contract import atomic_write

FORMAT = "stbir-checkpoint"
FORMAT_VERSION = 1


def save_checkpoint(path: str | Path, model: STBIRModel, **state) -> Path:
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION,
               "model_spec": model.spec.to_dict(), "model": model.state_dict(), **state}
    if model.text_files is not None:  # the HF text tower's config and tokenizer (models.hf_text)
        payload["text_model_files"] = model.text_files
    return atomic_write(path, lambda f: torch.save(payload, f))


def load_tensors(path: str | Path, what: str = "checkpoint"):
    """``torch.load`` of a file we may have been sent: tensors and plain containers only
    (``weights_only``), never code; any failure is one CheckpointError line."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: {what} not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: not a readable {what} ({load_failure(exc)})") from None


def read_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    ckpt = load_tensors(path)
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
    text_files = ckpt.get("text_model_files")
    if spec.text_model and not isinstance(text_files, dict):
        raise CheckpointError(f"{path}: its text tower is a Hugging Face model, but the "
                              "checkpoint lacks that model's config and tokenizer")
    model = build_model(spec, text_files if spec.text_model else None)
    model.load_state_dict(ckpt["model"])
    model.eval()
    return model, ckpt
