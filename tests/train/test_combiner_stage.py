"""The learned fusion: a Combiner stage with the towers frozen, the validation-picked default,
and `evaluate` reporting both fusions, verification figures and image->text R@k."""

import json

import pytest
import torch
import torch.nn.functional as F

from models import read_checkpoint
from models.combiner import Combiner
from stbir_train.config import load_config
from stbir_train.errors import ConfigError
from stbir_train.evaluate import run_evaluation
from stbir_train.train import train


def test_a_new_combiner_is_the_weighted_mean_it_replaces():
    torch.manual_seed(0)
    c = Combiner(16, init_weight=0.3).eval()
    s, t = F.normalize(torch.randn(5, 16), dim=-1), F.normalize(torch.randn(5, 16), dim=-1)
    torch.testing.assert_close(c(s, t), F.normalize(0.3 * s + 0.7 * t, dim=-1))


def test_a_combiner_stage_needs_model_combiner(tiny_dataset, tmp_path, write_config):
    stages = [{"target": "combiner", "epochs": 1, "lr": 1e-3, "weight_decay": 0.0}]
    with pytest.raises(ConfigError, match="combiner needs model.combiner: true"):
        load_config(write_config(tiny_dataset, tmp_path, **{"training.stages": stages}))


def test_combiner_stage_trains_only_the_combiner_and_evaluate_compares_fusions(
        tiny_dataset, tmp_path, write_config, small_checkpoint):
    stages = [{"target": "combiner", "epochs": 1, "lr": 1e-2, "weight_decay": 0.0}]
    cfg = load_config(write_config(tiny_dataset, tmp_path, **{  # the checkpoint's 64 px sketches
        "training.stages": stages, "model.combiner": True, "model.init_from": str(small_checkpoint),
        "model.sketch_size": 64}))
    lines = []
    summary = train(cfg, log=lines.append)
    assert any("fusion picked on validation" in line and "Combiner" in line for line in lines)
    ckpt = read_checkpoint(summary["last_path"])
    start = read_checkpoint(small_checkpoint)["model"]
    for k, v in ckpt["model"].items():
        if k in start and not k.startswith(("arcface.", "query_sketch_weight")):
            assert torch.equal(v, start[k]), f"{k} changed in a combiner stage"
    assert not torch.equal(ckpt["model"]["combiner.combine.weight"],
                           Combiner(128).combine.weight)  # trained (and not the init)
    sel = ckpt["fusion_selection"]
    assert len(sel["grid"]) == 9 and sel["method"] in ("mean", "combiner")
    assert float(ckpt["model"]["query_sketch_weight"]) == pytest.approx(sel["weight"])
    assert float(ckpt["model"]["combiner.preferred"]) == (sel["method"] == "combiner")
    modes = ckpt["score_thresholds"]["modes"]
    assert set(modes) == {"sketch", "text", "sketch+text"} and set(modes["sketch"]) == {"0.01", "0.001", "0.0001"}

    out = tmp_path / "results.json"
    printed = []
    run_evaluation(cfg, summary["last_path"], out=out, echo=printed.append)
    res = json.loads(out.read_text())
    assert {"sketch+text:mean", "sketch+text:combiner"} <= set(res["modes"])
    default = "sketch+text:combiner" if sel["method"] == "combiner" else "sketch+text:mean"
    assert res["modes"]["sketch+text"]["overall"] == res["modes"][default]["overall"]
    for mode in ("sketch", "text", "sketch+text"):
        v = res["verification"][mode]
        assert 0 <= v["eer"]["eer"] <= 1 and len(v["hardest_false_accepts"]) == 10
        assert v["hardest_false_rejects"][0]["gallery"].endswith(".png")
    assert res["image_to_text"]["queries"] == res["counts"]["gallery"]
    text = "\n".join(printed)
    assert "image->text" in text and "FRR@FAR=0.001" in text and "weighted mean by w" in text


def test_the_combiner_learns_in_its_own_stage_and_jointly_but_not_in_a_branch_stage():
    from models import ModelSpec, build_model

    m = build_model(ModelSpec(combiner=True, arcface_classes=2))
    for target, learns, towers in (("combiner", True, False), ("all", True, True),
                                   ("sketch", False, None)):
        m.configure_stage(target)
        m.train()
        assert all(p.requires_grad == learns for p in m.combiner.parameters()), target
        assert m.combiner.training == learns
        if towers is not None:
            assert all(p.requires_grad == towers for p in m.branch_parameters("sketch"))
