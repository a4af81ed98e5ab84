"""``training.cache_anchors``: a sketch stage computes the frozen image and text towers' vectors
once; training then goes exactly as it does when every step runs those towers."""

from __future__ import annotations

import torch


def _train(tiny_dataset, tmp_path, write_config, cache: bool, target: str = "sketch"):
    """One epoch of one stage; returns the model and what the run printed."""
    from models import load_model
    from stbir_train.config import load_config
    from stbir_train.train import train

    config = write_config(tiny_dataset, tmp_path / ("cached" if cache else "plain"), **{
        "model.preset": "tiny", "training.cache_anchors": cache,
        "data.curriculum_noise.enabled": False, "loss.modality_dropout": 0.0,
        "loss.weights.fusion": 0.0,
        "training.stages": [{"target": target, "epochs": 1, "lr": 1e-3}]})
    lines = []
    summary = train(load_config(config), log=lines.append)
    return load_model(summary["last_path"])[0], lines


def test_a_step_on_cached_anchors_is_the_step_on_the_towers(tiny_dataset, tmp_path, write_config):
    """The same items give the same loss and the same sketch-tower gradient whether the frozen
    towers run in the step or their vectors come from the cache."""
    from torch.utils.data import default_collate

    from stbir_train import train as T
    from stbir_train.config import load_config
    from stbir_train.loop import step_losses, total_loss

    config = write_config(tiny_dataset, tmp_path, **{
        "model.preset": "tiny", "training.cache_anchors": True, "loss.modality_dropout": 0.0,
        "data.curriculum_noise.enabled": False, "loss.weights.fusion": 0.0})
    cfg = load_config(config)  # (modality dropout's draw follows the photo's: off, for equal items)
    run = T.setup(cfg, lambda *a, **k: None)
    T.build_or_resume(run, None, T.prepare_data(run))
    model, ds = run.model, run.train_set
    model.configure_stage("sketch")
    model.train()
    T.frozen_anchors(run, "sketch")
    assert ds.anchors is not None and len(ds.anchors["image"]) == len(ds)
    items = range(0, min(len(ds), 8))

    def step(batch):
        model.zero_grad(set_to_none=True)
        loss = total_loss(step_losses(model, batch, cfg.loss, "sketch"), cfg.loss)
        loss.backward()
        return float(loss.detach()), torch.cat([p.grad.flatten() for p in model.sketch.parameters()])

    cached = default_collate([ds[i] for i in items])
    assert "image" not in cached and "image_vec" in cached  # the photos were not even decoded
    ds.anchors = None
    plain = default_collate([ds[i] for i in items])
    (loss_c, grad_c), (loss_p, grad_p) = step(cached), step(plain)
    assert abs(loss_c - loss_p) < 1e-5
    assert float(torch.nn.functional.cosine_similarity(grad_c, grad_p, dim=0)) > 0.99999
    assert grad_c.abs().max() > 0


def test_a_cached_sketch_stage_trains_only_the_sketch_tower(tiny_dataset, tmp_path, write_config):
    from models import build_model

    model, said = _train(tiny_dataset, tmp_path, write_config, cache=True)
    assert any("computed once" in line for line in said)
    torch.manual_seed(0)  # training.seed: the weights the run started from
    start = build_model(model.spec)
    assert any(not torch.equal(a, b) for a, b in zip(model.sketch.parameters(),
                                                     start.sketch.parameters()))
    for a, b in zip(model.clip.state_dict().values(), start.clip.state_dict().values()):
        assert torch.equal(a, b)  # the anchors did not move


def test_anchors_are_not_cached_where_the_photo_towers_learn(tiny_dataset, tmp_path, write_config):
    _, said = _train(tiny_dataset, tmp_path, write_config, cache=True, target="all")
    assert not any("computed once" in line for line in said)
