"""model.init_from: a checkpoint of this product warm-starts another run (fine-tuning on new data)."""

from __future__ import annotations

import pytest
import torch

from models import ModelSpec, build_model, save_checkpoint
from stbir_train.errors import ConfigError
from stbir_train.train import warm_start


def test_warm_start_copies_every_tower_and_refits_the_arcface_head(tmp_path):
    torch.manual_seed(0)
    src = build_model(ModelSpec(arcface_classes=4))
    save_checkpoint(tmp_path / "best.pt", src, config={}, metrics={})
    torch.manual_seed(1)
    dst = build_model(ModelSpec(arcface_classes=16))  # new data: other classes
    lines = []
    warm_start(dst, tmp_path / "best.pt", lines.append)
    s, d = src.state_dict(), dst.state_dict()
    assert all(torch.equal(s[k], d[k]) for k in d if not k.startswith("arcface."))
    assert d["arcface.weight"].shape == (16, 128) and "ArcFace head fresh" in lines[0]


def test_warm_start_refuses_another_architecture(tmp_path, small_checkpoint):
    dst = build_model(ModelSpec(sketch_backbone="resnet34"))
    with pytest.raises(ConfigError, match="model.init_from: .* has sketch_backbone 'resnet18', the config 'resnet34'"):
        warm_start(dst, small_checkpoint, print)


def test_training_config_with_init_from_starts_from_it(tiny_dataset, tmp_path, write_config,
                                                       small_checkpoint, monkeypatch):
    from stbir_train import train as train_mod
    from stbir_train.config import load_config

    cfg = load_config(write_config(tiny_dataset, tmp_path, **{"model.init_from": str(small_checkpoint)}))
    seen = []
    monkeypatch.setattr(train_mod, "warm_start", lambda m, p, say: seen.append(p))
    run = train_mod.setup(cfg, lambda *a: None)
    train_mod.build_or_resume(run, None, train_mod.prepare_data(run))
    assert seen == [small_checkpoint]
