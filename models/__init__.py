"""Torch network code shared by training and export (never imported by the runtime)."""

from models.checkpoint import CheckpointError, file_sha256, load_model, read_checkpoint, save_checkpoint
from models.model import (BRANCHES, PRESETS, STAGE_TARGETS, ModelError, ModelSpec, STBIRModel,
                          build_model, eot_position, fuse)

__all__ = [
    "BRANCHES", "PRESETS", "STAGE_TARGETS", "CheckpointError", "ModelError", "ModelSpec",
    "STBIRModel", "build_model", "eot_position", "file_sha256", "fuse", "load_model",
    "read_checkpoint", "save_checkpoint",
]
