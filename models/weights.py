"""Pretrained weights for the open_clip towers: which format a file is, and loading it.

``model.pretrained`` takes (format detected from the keys, never from the name):

- ``open_clip``: a plain open_clip state dict -- what ``stbir-train pretrain`` writes and what
  ``open_clip.create_model(arch, pretrained=FILE)`` reads;
- ``open_clip-checkpoint``: an open_clip training checkpoint (``{"state_dict": ..., "epoch": ...}``,
  keys possibly prefixed ``module.`` by DDP);
- ``openai``: an OpenAI CLIP state dict (the ``state_dict()`` of OpenAI's released models). Same
  key names as open_clip's, plus ``input_resolution`` / ``context_length`` / ``vocab_size``
  entries (open_clip's ``load_state_dict`` and ``build_model_from_openai_state_dict`` drop
  exactly these), and the weights were trained with QuickGELU: the architecture must use it;
- ``torchvision-mobilenet_v2``: ImageNet weights of ``torchvision.models.mobilenet_v2`` for an
  architecture whose image tower is timm's ``mobilenetv2_100`` (``stbir-edge``): the trunk gets
  them, the projection and text tower start at random.

Every file is read with ``torch.load(weights_only=True)``: a pickle that would run code is
refused, never run.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from models.errors import ModelError, load_failure

OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")


def read_state_dict(path: str | Path, key: str) -> dict:
    """The raw dict in a weights file (safetensors or torch), read without running code."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ModelError(f"{key}: weights file {path} does not exist")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(p), device="cpu")
        else:
            sd = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelError(f"{key}: {path} is not a readable torch weights file "
                         f"({load_failure(exc)})") from None
    if not isinstance(sd, dict):
        raise ModelError(f"{key}: {path} holds a {type(sd).__name__}, not a state dict")
    return sd


def detect_format(sd: dict) -> str:
    """One of open_clip, open_clip-checkpoint, openai, torchvision-mobilenet_v2 (see module doc)."""
    if isinstance(sd.get("state_dict"), dict):
        return "open_clip-checkpoint"
    if any(k in sd for k in OPENAI_EXTRA_KEYS) and "text_projection" in sd:
        return "openai"
    if "features.0.0.weight" in sd and "classifier.1.weight" in sd:
        return "torchvision-mobilenet_v2"
    return "open_clip"


def strip_module(sd: dict) -> dict:
    """Keys without DataParallel's ``module.`` prefix."""
    return {k[7:] if k.startswith("module.") else k: v for k, v in sd.items()}


def load_clip_weights(clip: nn.Module, name: str, path: str, quick_gelu: bool) -> str:
    """Load ``path`` into the open_clip model ``clip`` (architecture ``name``); returns the
    detected format. Any mismatch is a one-line ModelError naming the file."""
    sd = read_state_dict(path, "pretrained")
    fmt = detect_format(sd)
    if fmt == "torchvision-mobilenet_v2":
        trunk = getattr(getattr(clip, "visual", None), "trunk", None)
        if trunk is None or not hasattr(trunk, "conv_stem"):  # timm's mobilenetv2_100
            raise ModelError(f"pretrained: {path} holds torchvision mobilenet_v2 weights, which fit "
                             f"only an architecture with a mobilenet_v2 image tower (stbir-edge), "
                             f"not {name}")
        load_mobilenet_v2_into_timm(trunk, sd, path)
        return fmt
    if fmt == "openai":
        if not quick_gelu:
            raise ModelError(f"pretrained: {path} is an OpenAI CLIP state dict, trained with "
                             f"QuickGELU; set model.quick_gelu: true (or a -quickgelu clip_model)")
        sd = {k: v for k, v in sd.items() if k not in OPENAI_EXTRA_KEYS}
    elif fmt == "open_clip-checkpoint":
        sd = sd["state_dict"]
    sd = {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v
          for k, v in strip_module(sd).items()}
    if "logit_scale" in sd and sd["logit_scale"].ndim != clip.logit_scale.ndim:
        sd["logit_scale"] = sd["logit_scale"].reshape(clip.logit_scale.shape)
    if getattr(clip, "logit_bias", None) is None:
        sd.pop("logit_bias", None)
    try:
        clip.load_state_dict(sd, strict=True)
    except Exception as exc:
        raise ModelError(f"pretrained: could not load {path} ({fmt} format) into {name} "
                         f"({load_failure(exc)})") from None
    return fmt


def load_mobilenet_v2_into_timm(trunk: nn.Module, sd: dict, path: str) -> None:
    """torchvision mobilenet_v2 -> timm mobilenetv2_100: the same layers in the same order, so
    the feature tensors pair up one to one (the classifier is left out: the trunk has none)."""
    src = [(k, v) for k, v in sd.items() if not k.startswith("classifier.")]
    dst = [k for k in trunk.state_dict() if not k.startswith("classifier.")]
    target = trunk.state_dict()
    if len(src) != len(dst) or any(v.shape != target[k].shape for (_, v), k in zip(src, dst)):
        raise ModelError(f"pretrained: {path}: its mobilenet_v2 layers do not match the image "
                         f"tower's ({len(src)} vs {len(dst)} tensors)")
    trunk.load_state_dict({k: v for (_, v), k in zip(src, dst)}, strict=False)


__all__ = ["OPENAI_EXTRA_KEYS", "detect_format", "load_clip_weights",
           "load_mobilenet_v2_into_timm", "read_state_dict"]
