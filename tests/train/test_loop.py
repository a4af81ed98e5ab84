"""One stage's steps: which weights learn, a non-finite loss, a run without validation rows."""

import json

import pytest
import torch

from models import BRANCHES, ModelSpec, build_model, load_model, read_checkpoint
from stbir_train import loop
from stbir_train.config import load_config
from stbir_train.loop import step_losses, total_loss
from stbir_train.train import TrainingError, train


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(ModelSpec(arcface_classes=4))


def _ids(params):
    return {id(p) for p in params}


def test_every_parameter_belongs_to_exactly_one_branch_or_the_head(model):
    groups = [_ids(model.branch_parameters(b)) for b in BRANCHES] + [_ids(model.arcface.parameters())]
    model.configure_stage("all")
    for name, p in model.named_parameters():
        owners = sum(id(p) in g for g in groups)
        if p.requires_grad:  # everything that can learn: one owner, so no stage trains it by accident
            assert owners == 1, f"{name} belongs to {owners} branches"
        else:  # what never learns (open_clip's logit_scale: the config's temperature is used)
            assert owners == 0 and name == "clip.logit_scale", name


@pytest.mark.parametrize("target", ["sketch", "image", "text", "all"])
def test_configure_stage_leaves_exactly_the_target_branch_trainable(model, target):
    model.configure_stage(target)
    trainable = _ids(p for p in model.parameters() if p.requires_grad)
    expected = _ids(model.arcface.parameters())
    for b in BRANCHES:
        if target in (b, "all"):
            expected |= _ids(model.branch_parameters(b))
    assert trainable == expected


@pytest.mark.parametrize("target", ["sketch", "image", "text"])
def test_a_training_step_leaves_frozen_weights_bit_identical(target, tiny_dataset, tmp_path, write_config):
    cfg = load_config(write_config(tiny_dataset, tmp_path))
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
    loss = total_loss(step_losses(m, batch, cfg.loss, target), cfg.loss)
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


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tiny_dataset, tmp_path, monkeypatch,
                                                              write_config):
    stages = [{"target": "all", "epochs": 3, "lr": 1e-4}]
    cfg = load_config(write_config(tiny_dataset, tmp_path, **{"training.stages": stages}))
    real = loop.total_loss
    calls = {"n": 0}

    from stbir_train.manifest import build_manifests, read_manifest_rows

    steps_per_epoch = len(read_manifest_rows(build_manifests(cfg)["train"])) // cfg.training.batch_size

    def poisoned(terms, loss_cfg):
        calls["n"] += 1
        loss = real(terms, loss_cfg)
        return loss * float("nan") if calls["n"] > steps_per_epoch else loss

    monkeypatch.setattr(loop, "total_loss", poisoned)
    with pytest.raises(TrainingError, match=r"loss became nan at stage all, epoch 2"):
        train(cfg, log=lambda *a: None)
    ckpt = read_checkpoint(cfg.out / "checkpoints" / "last.pt")
    assert ckpt["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_without_validation_rows_best_is_the_last_epoch_and_the_log_says_so(tiny_dataset, tmp_path,
                                                                             write_config):
    stages = [{"target": "all", "epochs": 2, "lr": 1e-4}]
    cfg = load_config(write_config(tiny_dataset, tmp_path, **{"training.stages": stages,
                                                              "data.val_fraction": 0.0}))
    lines = []
    summary = train(cfg, log=lines.append)
    assert summary["best"] is None
    text = "\n".join(lines)
    assert "0 validation items" in text and "best.pt will be the last epoch's weights" in text
    assert "best R@1" not in text and "*best*" not in text
    best = read_checkpoint(cfg.out / "checkpoints" / "best.pt")
    last = read_checkpoint(cfg.out / "checkpoints" / "last.pt")
    assert best["epoch"] == last["epoch"] == 2 and best["best"] is None
    assert all(torch.equal(best["model"][k], last["model"][k]) for k in last["model"])
    log = [json.loads(line) for line in (cfg.out / "train_log.jsonl").read_text().splitlines()]
    assert [r["val"] for r in log] == [None, None]
    load_model(cfg.out / "checkpoints" / "best.pt")  # and it is a normal, loadable checkpoint
