"""The staged loop: which weights learn, resume equality, config errors, NaN, torchrun."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import make_config
from models import BRANCHES, ModelSpec, build_model, load_model, read_checkpoint
from stbir_train import train as train_mod
from stbir_train.config import ConfigError, config_from_dict, load_config
from stbir_train.train import TrainingError, step_losses, total_loss, train


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(ModelSpec(arcface_classes=4))


def _ids(params):
    return {id(p) for p in params}


@pytest.mark.parametrize("target", ["sketch", "image", "text", "all"])
def test_configure_stage_leaves_exactly_the_target_branch_trainable(model, target):
    model.configure_stage(target)
    trainable = _ids(p for p in model.parameters() if p.requires_grad)
    expected = _ids(model.arcface.parameters())
    for b in BRANCHES:
        if target in (b, "all"):
            expected |= _ids(model.branch_parameters(b))
    assert trainable == expected
    # every parameter belongs to some branch or the head, so nothing trains by accident
    covered = _ids(model.arcface.parameters()).union(*(_ids(model.branch_parameters(b)) for b in BRANCHES))
    assert _ids(p for p in model.parameters() if p.requires_grad) <= covered


@pytest.mark.parametrize("target", ["sketch", "image", "text"])
def test_a_training_step_leaves_frozen_weights_bit_identical(target, tiny_dataset, tmp_path):
    cfg = load_config(make_config(tiny_dataset, tmp_path))
    torch.manual_seed(1)
    m = build_model(ModelSpec(arcface_classes=4))
    m.configure_stage(target)
    m.train()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    b = 4
    batch = {"sketch": torch.randn(b, 1, 64, 64), "image": torch.randn(b, 3, 64, 64),
             "tokens": m.tokenizer()(["red star", "blue dots", "a green tile", "pink"]),
             "label": torch.tensor([0, 1, 2, 3]), "neg_images": torch.randn(b, 1, 3, 64, 64),
             "neg_sketches": torch.randn(b, 1, 1, 64, 64),
             "neg_tokens": m.tokenizer()(["x", "y", "z", "w"]).unsqueeze(1)}
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    loss = total_loss(step_losses(m, batch, cfg, target), cfg)
    loss.backward()
    opt.step()
    after = m.state_dict()
    prefixes = {"sketch": ("sketch.",), "image": ("clip.visual.",),
                "text": ("clip.token_embedding", "clip.positional_embedding", "clip.transformer",
                         "clip.ln_final", "clip.text_projection")}
    for key, value in after.items():
        other = any(key.startswith(p) for b, ps in prefixes.items() if b != target for p in ps)
        if other:
            assert torch.equal(value, before[key]), f"{key} changed while training {target}"
    changed = [k for k in after if k.startswith(prefixes[target]) and not torch.equal(after[k], before[k])]
    assert changed, f"no {target} weight changed"


def test_resumed_run_matches_an_uninterrupted_run(tiny_dataset, tmp_path):
    stages = [{"target": "sketch", "epochs": 1, "lr": 1e-4, "weight_decay": 0.01},
              {"target": "all", "epochs": 2, "lr": 1e-4, "weight_decay": 0.01}]
    full = load_config(make_config(tiny_dataset, tmp_path / "full", **{"training.stages": stages}))
    part = load_config(make_config(tiny_dataset, tmp_path / "part", **{"training.stages": stages}))
    train(full, log=lambda *a: None)
    train(part, stop_after_epochs=2, log=lambda *a: None)  # stop in the middle of stage 2
    assert read_checkpoint(part.out / "checkpoints" / "last.pt")["epoch"] == 1
    train(part, resume=part.out / "checkpoints" / "last.pt", log=lambda *a: None)
    a = read_checkpoint(full.out / "checkpoints" / "last.pt")["model"]
    b = read_checkpoint(part.out / "checkpoints" / "last.pt")["model"]
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= 1e-5
    log = [json.loads(line) for line in (part.out / "train_log.jsonl").read_text().splitlines()]
    assert [(r["target"], r["epoch"]) for r in log] == [("sketch", 1), ("all", 1), ("all", 2)]


def test_only_one_stage_runs_with_stage_option(tiny_dataset, tmp_path):
    stages = [{"target": "sketch", "epochs": 1, "lr": 1e-4}, {"target": "text", "epochs": 1, "lr": 1e-4}]
    cfg = load_config(make_config(tiny_dataset, tmp_path, **{"training.stages": stages,
                                                             "data.negatives_per_modality": 2}))
    train(cfg, only_stage="text", log=lambda *a: None)
    log = [json.loads(line) for line in (cfg.out / "train_log.jsonl").read_text().splitlines()]
    assert [r["target"] for r in log] == ["text"]
    best, ckpt = load_model(cfg.out / "checkpoints" / "best.pt")
    assert ckpt["metrics"]["val"]["sketch+text"]["queries"] > 0


@pytest.mark.parametrize("data, key", [
    ({"training": {"batchsize": 4}}, "training.batchsize"),
    ({"training": {"stages": [{"target": "paint", "epochs": 1}]}}, "training.stages[0].target"),
    ({"training": {"stages": [{"target": "all", "epochs": "two"}]}}, "training.stages[0].epochs"),
    ({"loss": {"weights": {"infonce": "high"}}}, "loss.weights.infonce"),
    ({"model": {"preset": "huge"}}, "model.preset"),
    ({"data": {"curriculum_noise": {"photo": {"max_prob": 2}}}}, "data.curriculum_noise.photo.max_prob"),
])
def test_bad_config_is_rejected_naming_the_key(data, key, tmp_path):
    import yaml

    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert key in str(err.value) and "bad.yaml" in str(err.value)
    proc = subprocess.run([sys.executable, "-m", "stbir_train.cli", "--config", str(path)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and key in proc.stderr and "Traceback" not in proc.stderr


def test_relative_paths_resolve_against_the_config_file(tmp_path):
    path = tmp_path / "sub" / "c.yaml"
    path.parent.mkdir()
    path.write_text("output_dir: out\ndata:\n  root: data\n")
    cfg = load_config(path)
    assert cfg.out == path.parent.resolve() / "out"
    assert cfg.resolve(cfg.data.root) == path.parent.resolve() / "data"
    assert config_from_dict({}).training.stages[0].target == "sketch"  # the seed's order by default


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tiny_dataset, tmp_path, monkeypatch):
    stages = [{"target": "all", "epochs": 3, "lr": 1e-4}]
    cfg = load_config(make_config(tiny_dataset, tmp_path, **{"training.stages": stages}))
    real = train_mod.total_loss
    calls = {"n": 0}
    steps_per_epoch = None

    def poisoned(terms, cfg_):
        calls["n"] += 1
        loss = real(terms, cfg_)
        return loss * float("nan") if calls["n"] > steps_per_epoch else loss

    from stbir_train.manifest import build_manifests, read_manifest

    n_train = len(read_manifest(build_manifests(cfg)["train"]))
    steps_per_epoch = n_train // cfg.training.batch_size
    monkeypatch.setattr(train_mod, "total_loss", poisoned)
    with pytest.raises(TrainingError, match=r"loss became nan at stage all, epoch 2"):
        train(cfg, log=lambda *a: None)
    ckpt = read_checkpoint(cfg.out / "checkpoints" / "last.pt")
    assert ckpt["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_torchrun_two_processes_train_and_write_one_checkpoint(tiny_dataset, tmp_path):
    cfg_path = make_config(tiny_dataset, tmp_path, **{"training.batch_size": 4})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "stbir_train.cli", "--config", str(cfg_path)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "2 process(es)" in proc.stdout
    cfg = load_config(cfg_path)
    ckpts = sorted(p.name for p in (cfg.out / "checkpoints").iterdir())
    assert ckpts == ["best.pt", "last.pt"]  # no per-rank copies, no stray temp files
    log = (cfg.out / "train_log.jsonl").read_text().splitlines()
    assert len(log) == 1  # one epoch, written once (rank 0 only)
    model, _ = load_model(cfg.out / "checkpoints" / "last.pt")
    assert model.arcface is not None


def test_stage_option_naming_a_stage_the_config_lacks_is_an_error(tiny_dataset, tmp_path):
    cfg = load_config(make_config(tiny_dataset, tmp_path))
    with pytest.raises(ConfigError, match=r"--stage image: training.stages has no such stage \(it has all\)"):
        train(cfg, only_stage="image", log=lambda *a: None)
