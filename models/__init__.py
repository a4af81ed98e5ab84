"""Torch network code shared by training and export (never imported by the runtime)."""

from models.checkpoint import load_model, read_checkpoint, save_checkpoint
from models.errors import CheckpointError, ModelError, StbirModelError
from models.model import BRANCHES, STAGE_TARGETS, STBIRModel, build_model, eot_position, weighted_mean
from models.scoped import offline_hub, open_clip_scope, quiet_logs
from models.spec import PRESETS, ModelSpec

__all__ = [
    "BRANCHES", "PRESETS", "STAGE_TARGETS", "CheckpointError", "ModelError", "ModelSpec",
    "STBIRModel", "StbirModelError", "build_model", "eot_position", "load_model",
    "weighted_mean",
    "offline_hub", "open_clip_scope", "quiet_logs", "read_checkpoint", "save_checkpoint",
]
