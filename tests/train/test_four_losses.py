"""All four losses (InfoNCE, cosine triplet, fusion consistency, ArcFace), the per-mode InfoNCE
terms and manifest hard negatives run in a training step; none is silently skipped, and each
one's gradient reaches the branches it should (and only those)."""

from __future__ import annotations

import pytest
import torch

from models import ModelSpec, build_model
from stbir_train import loop
from stbir_train.config import load_config
from stbir_train.loop import step_losses
from stbir_train.train import train

ALL_WEIGHTS = {"infonce": 1.0, "triplet": 0.3, "fusion": 0.1, "arcface": 0.1,
               "infonce_sketch": 0.5, "infonce_text": 0.5}
# term -> branches its gradient must reach (and no other branch)
REACHES = {"infonce": {"sketch", "image", "text"}, "triplet": {"sketch", "image", "text"},
           "fusion": {"sketch", "image"}, "arcface": {"sketch", "image", "text", "arcface"},
           "infonce_sketch": {"sketch", "image"}, "infonce_text": {"image", "text"}}


@pytest.fixture(scope="module")
def setup(tiny_dataset, tmp_path_factory, write_config):
    tmp = tmp_path_factory.mktemp("four")
    cfg = load_config(write_config(tiny_dataset, tmp, **{
        "loss.weights": ALL_WEIGHTS, "loss.modality_dropout": 0.5,
        "data.negatives_per_modality": 1}))
    torch.manual_seed(2)
    return cfg, build_model(ModelSpec(arcface_classes=4))


def _batch(m, b=4, k=1):
    return {"sketch": torch.randn(b, 1, 64, 64), "image": torch.randn(b, 3, 64, 64),
            "tokens": m.tokenizer()(["red star", "blue dots", "a green tile", "pink"]),
            "label": torch.tensor([0, 1, 2, 3]), "neg_images": torch.randn(b, k, 3, 64, 64),
            "neg_sketches": torch.randn(b, k, 1, 64, 64),
            "neg_tokens": m.tokenizer()(["x", "y", "z", "w"]).unsqueeze(1),
            "drop": torch.tensor([0, 1, 2, 0])}


def test_every_weighted_term_is_computed_finite_and_reaches_its_branches(setup):
    cfg, m = setup
    m.configure_stage("all")
    m.train()
    terms = step_losses(m, _batch(m), cfg.loss, "all")
    assert set(terms) == {k for k, w in ALL_WEIGHTS.items() if w}, "a weighted loss was skipped"
    groups = {b: m.branch_parameters(b) for b in ("sketch", "image", "text")}
    groups["arcface"] = list(m.arcface.parameters())
    for name, value in terms.items():
        assert torch.isfinite(value) and value.item() > 0, name
        grads = torch.autograd.grad(value, [p for ps in groups.values() for p in ps],
                                    retain_graph=True, allow_unused=True)
        it = iter(grads)
        reached = set()
        for group, ps in groups.items():
            g = [next(it) for _ in ps]
            if any(x is not None and x.abs().sum() > 0 for x in g):
                reached.add(group)
        assert reached == REACHES[name], f"{name} reaches {sorted(reached)}"


def test_modality_dropout_makes_single_modes_the_query(setup):
    cfg, m = setup
    m.eval()
    batch = _batch(m)
    seen = {}
    real = loop.L.info_nce

    def spy(q, g, t, extra=None):
        seen.setdefault("q", q)
        return real(q, g, t, extra)

    loop.L.info_nce, saved = spy, loop.L.info_nce
    try:
        step_losses(m, batch, cfg.loss, "all")
    finally:
        loop.L.info_nce = saved
    with torch.no_grad():
        s, t = m.encode_sketch(batch["sketch"]), m.encode_text(batch["tokens"])
    q = seen["q"]
    assert torch.allclose(q[1], s[1], atol=1e-5) and torch.allclose(q[2], t[2], atol=1e-5)
    assert torch.allclose(q[0], m.fuse_for_training(s, t)[0], atol=1e-5)


def test_a_real_training_step_runs_all_four_losses_with_manifest_negatives(setup, monkeypatch):
    cfg, _ = setup
    recorded = []
    real = loop.total_loss

    class Stop(Exception):
        pass

    def record(terms, loss_cfg):  # one real step is enough: stop before the optimiser runs
        recorded.append(set(terms))
        real(terms, loss_cfg)
        raise Stop

    monkeypatch.setattr(loop, "total_loss", record)
    real_step = loop.step_losses
    batches = []

    def spy(model, batch, loss_cfg, target, extra_terms=None):
        batches.append(set(batch))
        return real_step(model, batch, loss_cfg, target, extra_terms)

    monkeypatch.setattr("stbir_train.distributed.step_losses", spy)
    with pytest.raises(Stop):
        train(cfg, log=lambda *a: None)
    assert recorded and all(r == set(ALL_WEIGHTS) for r in recorded)
    assert batches and all({"neg_images", "neg_sketches", "neg_tokens", "drop"} <= b for b in batches)
