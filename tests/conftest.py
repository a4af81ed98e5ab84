"""Shared fixtures: small random-init checkpoints (no downloads, no training)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def small_checkpoint(tmp_path_factory):
    """A random-init checkpoint of the small preset (resnet18 sketch tower, stbir-small towers)."""
    import torch

    from models import ModelSpec, build_model, save_checkpoint

    torch.manual_seed(0)
    model = build_model(ModelSpec())
    path = tmp_path_factory.mktemp("ckpt") / "small.pt"
    save_checkpoint(path, model, config={}, metrics={})
    return path
