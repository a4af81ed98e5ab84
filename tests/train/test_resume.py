"""Resuming and running single stages: a resumed run equals an uninterrupted one."""

import json

import pytest

from models import load_model, read_checkpoint
from stbir_train.config import ConfigError, load_config
from stbir_train.train import train


def test_resumed_run_matches_an_uninterrupted_run(tiny_dataset, tmp_path, write_config):
    stages = [{"target": "sketch", "epochs": 1, "lr": 1e-4, "weight_decay": 0.01},
              {"target": "all", "epochs": 2, "lr": 1e-4, "weight_decay": 0.01}]
    full = load_config(write_config(tiny_dataset, tmp_path / "full", **{"training.stages": stages}))
    part = load_config(write_config(tiny_dataset, tmp_path / "part", **{"training.stages": stages}))
    summary = train(full, log=lambda *a: None)
    assert summary["processes"] == 1 and summary["distributed"] is None
    train(part, stop_after_validations=2, log=lambda *a: None)  # stop in the middle of stage 2
    assert read_checkpoint(part.out / "checkpoints" / "last.pt")["epoch"] == 1
    resumed = train(part, resume=part.out / "checkpoints" / "last.pt", log=lambda *a: None)
    a = read_checkpoint(full.out / "checkpoints" / "last.pt")["model"]
    b = read_checkpoint(part.out / "checkpoints" / "last.pt")["model"]
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= 1e-5
    assert resumed["best"] == pytest.approx(summary["best"])
    log = [json.loads(line) for line in (part.out / "train_log.jsonl").read_text().splitlines()]
    assert [(r["target"], r["epoch"]) for r in log] == [("sketch", 1), ("all", 1), ("all", 2)]


def test_only_one_stage_runs_with_stage_option(tiny_dataset, tmp_path, write_config):
    stages = [{"target": "sketch", "epochs": 1, "lr": 1e-4}, {"target": "text", "epochs": 1, "lr": 1e-4}]
    cfg = load_config(write_config(tiny_dataset, tmp_path, **{"training.stages": stages,
                                                              "data.negatives_per_modality": 2}))
    train(cfg, only_stage="text", log=lambda *a: None)
    log = [json.loads(line) for line in (cfg.out / "train_log.jsonl").read_text().splitlines()]
    assert [r["target"] for r in log] == ["text"]
    best, ckpt = load_model(cfg.out / "checkpoints" / "best.pt")
    assert ckpt["metrics"]["val"]["sketch+text"]["queries"] > 0


def test_stage_option_naming_a_stage_the_config_lacks_is_an_error(tiny_dataset, tmp_path, write_config):
    cfg = load_config(write_config(tiny_dataset, tmp_path))
    with pytest.raises(ConfigError, match=r"--stage image: training.stages has no such stage \(it has all\)"):
        train(cfg, only_stage="image", log=lambda *a: None)
