"""Stages in training samples (issue 29 item 6): the step count does not depend on the data's
size, best.pt is the best validation, a stage hands on its best weights, early stopping, and
configs and checkpoints in epochs keep working."""

import json

import pytest
import torch
import yaml

from models import read_checkpoint
from stbir_train import loop
from stbir_train import train as T
from stbir_train.config import ConfigError, CurriculumSpec, NoiseSpec, config_from_dict, load_config
from stbir_train.loop import stage_steps
from stbir_train.manifest import build_manifests, read_manifest_rows
from stbir_train.noise import NoiseSchedule
from stbir_train.sketchify import config_text, real_config_text
from stbir_train.synth import default_config_text, write_dataset


def _log(cfg) -> list[dict]:
    return [json.loads(x) for x in (cfg.out / "train_log.jsonl").read_text().splitlines()]


def _count_steps(monkeypatch) -> dict:
    calls = {"n": 0}
    real = loop.total_loss

    def counted(terms, loss_cfg):
        calls["n"] += 1
        return real(terms, loss_cfg)

    monkeypatch.setattr(loop, "total_loss", counted)
    return calls


def _scripted_scores(monkeypatch, scores: list[float]) -> list[dict]:
    """Validation reports ``scores`` as sketch+text R@1, one per validation, and the weights it
    saw are kept (one state dict per validation)."""
    seen = []
    real = T.evaluate_rows

    def scripted(model, *args, **kwargs):
        val = real(model, *args, **kwargs)
        val["modes"]["sketch+text"]["overall"]["R@1"] = scores[len(seen)]
        seen.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return val

    monkeypatch.setattr(T, "evaluate_rows", scripted)
    return seen


@pytest.fixture(scope="module")
def bigger_dataset(tmp_path_factory):
    """The built-in set at 2.5 times ``tiny_dataset``'s training photos."""
    root = tmp_path_factory.mktemp("synth30")
    write_dataset(root, per_category=30, test_per_category=4, sketches_per_photo=1, seed=5)
    return root


def test_a_stage_in_samples_runs_the_same_steps_at_two_dataset_sizes(tiny_dataset, bigger_dataset,
                                                                     tmp_path, monkeypatch, write_config):
    stages = [{"target": "all", "samples": 50, "lr": 1e-4}]  # ceil(50 / 4) = 13 steps
    epochs = []
    for data in (tiny_dataset, bigger_dataset):
        calls = _count_steps(monkeypatch)
        cfg = load_config(write_config(data, tmp_path / data.name, **{
            "training.stages": stages, "training.val_every": 24, "training.batch_size": 4}))
        T.train(cfg, log=lambda *a: None)
        assert calls["n"] == 13
        log = _log(cfg)
        assert [r["step"] for r in log] == [6, 12, 13]  # every 24 samples = 6 steps, and the end
        assert [r["samples"] for r in log] == [24, 48, 52]
        assert read_checkpoint(cfg.out / "checkpoints" / "last.pt")["step_in_stage"] == 13
        epochs.append(log[-1]["epoch"])
    assert epochs[0] > 2 * epochs[1]  # the same steps are more passes over the smaller set


def test_best_pt_is_the_best_validation_and_the_next_stage_starts_from_it(tiny_dataset, tmp_path,
                                                                           monkeypatch, write_config):
    stages = [{"target": "all", "samples": 48, "lr": 1e-3},       # 6 steps: validations at 2, 4, 6
              {"target": "sketch", "samples": 32, "lr": 1e-3}]    # 4 steps: at 2, 4
    seen = _scripted_scores(monkeypatch, [0.2, 0.9, 0.4, 0.1, 0.3])
    cfg = load_config(write_config(tiny_dataset, tmp_path, **{"training.stages": stages,
                                                              "training.val_every": 16}))
    summary = T.train(cfg, log=lambda *a: None)
    assert summary["best"] == 0.9 and len(seen) == 5
    best = read_checkpoint(cfg.out / "checkpoints" / "best.pt")
    assert (best["stage_index"], best["step_in_stage"]) == (0, 4)
    assert all(torch.equal(best["model"][k], seen[1][k]) for k in seen[1])
    assert not all(torch.equal(seen[2][k], seen[1][k]) for k in seen[1])  # training went on
    # The sketch stage froze the image tower: it is the first stage's best, not its last.
    last = read_checkpoint(cfg.out / "checkpoints" / "last.pt")["model"]
    image = [k for k in last if k.startswith("clip.visual.") and last[k].is_floating_point()]
    assert image and all(torch.equal(last[k], seen[1][k]) for k in image)
    assert not all(torch.equal(seen[2][k], seen[1][k]) for k in image)


def test_patience_stops_a_stage_after_validations_without_a_new_best(tiny_dataset, tmp_path,
                                                                      monkeypatch, write_config):
    calls = _count_steps(monkeypatch)
    _scripted_scores(monkeypatch, [0.5, 0.4, 0.45, 0.9])
    stages = [{"target": "all", "samples": 64, "lr": 1e-4}]  # 8 steps, validations every 2
    cfg = load_config(write_config(tiny_dataset, tmp_path, **{
        "training.stages": stages, "training.val_every": 16, "training.patience": 2}))
    summary = T.train(cfg, log=lambda *a: None)
    assert calls["n"] == 6 and [r["step"] for r in _log(cfg)] == [2, 4, 6]
    assert summary["best"] == 0.5
    assert read_checkpoint(cfg.out / "checkpoints" / "last.pt")["stage_done"] is True


def test_a_resumed_samples_run_matches_an_uninterrupted_one_from_mid_epoch(tiny_dataset, tmp_path,
                                                                           write_config):
    stages = [{"target": "all", "samples": 80, "lr": 1e-4}]  # 10 steps; an epoch is 5
    over = {"training.stages": stages, "training.val_every": 24}  # validations at 3, 6, 9, 10
    full = load_config(write_config(tiny_dataset, tmp_path / "full", **over))
    part = load_config(write_config(tiny_dataset, tmp_path / "part", **over))
    T.train(full, log=lambda *a: None)
    T.train(part, stop_after_validations=1, log=lambda *a: None)
    assert read_checkpoint(part.out / "checkpoints" / "last.pt")["step_in_stage"] == 3
    T.train(part, resume=part.out / "checkpoints" / "last.pt", log=lambda *a: None)
    a = read_checkpoint(full.out / "checkpoints" / "last.pt")["model"]
    b = read_checkpoint(part.out / "checkpoints" / "last.pt")["model"]
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) <= 1e-5
    assert [r["step"] for r in _log(part)] == [3, 6, 9, 10]


def test_an_epoch_config_trains_and_validates_by_epoch(tiny_dataset, tmp_path, monkeypatch,
                                                       write_config):
    calls = _count_steps(monkeypatch)
    cfg = load_config(write_config(tiny_dataset, tmp_path, **{
        "training.stages": [{"target": "all", "epochs": 2, "lr": 1e-4}]}))
    assert cfg.training.stages[0].samples is None and cfg.training.val_every is None
    T.train(cfg, log=lambda *a: None)
    log = _log(cfg)
    steps_per_epoch = log[0]["step"]
    assert steps_per_epoch > 0 and calls["n"] == 2 * steps_per_epoch
    assert [r["epoch"] for r in log] == [1, 2]


def test_samples_of_whole_epochs_train_exactly_what_those_epochs_trained(tiny_dataset, tmp_path,
                                                                          write_config):
    """What keeps `make demo` (and the real-photo recipe) as it was: a stage in samples that
    are N whole epochs, validated once an epoch's samples, is the epoch stage step for step."""
    def noise(**ramp):  # noise that matters (90% of items at its top), ramped over 4 epochs
        return {f"data.curriculum_noise.{m}.{k}": v for m in ("photo", "sketch")
                for k, v in {"max_prob": 0.9, **ramp}.items()}

    epochs = load_config(write_config(tiny_dataset, tmp_path / "epochs", **noise(
        ramp_samples=None, ramp_epochs=4), **{"training.stages": [{"target": "all", "epochs": 2, "lr": 1e-3}]}))
    epoch = len(read_manifest_rows(build_manifests(epochs)["train"])) // 8 * 8  # samples of an epoch
    samples = load_config(write_config(tiny_dataset, tmp_path / "samples", **noise(ramp_samples=4 * epoch), **{
        "training.stages": [{"target": "all", "samples": 2 * epoch, "lr": 1e-3}],
        "training.val_every": epoch}))
    T.train(epochs, log=lambda *a: None)
    T.train(samples, log=lambda *a: None)
    assert [r["step"] for r in _log(samples)] == [r["step"] for r in _log(epochs)] == [epoch // 8, epoch // 4]
    a = read_checkpoint(epochs.out / "checkpoints" / "last.pt")["model"]
    b = read_checkpoint(samples.out / "checkpoints" / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_checkpoint_from_before_samples_resumes_by_its_epochs(tiny_dataset, tmp_path, write_config):
    stages = [{"target": "all", "epochs": 2, "lr": 1e-4}]
    cfg = load_config(write_config(tiny_dataset, tmp_path, **{"training.stages": stages}))
    T.train(cfg, stop_after_validations=1, log=lambda *a: None)
    path = cfg.out / "checkpoints" / "last.pt"
    old = read_checkpoint(path)
    for key in ("step_in_stage", "stage_done", "stage_best"):  # what an older loop wrote
        old.pop(key)
    torch.save(old, path)
    T.train(cfg, resume=path, log=lambda *a: None)
    assert [r["epoch"] for r in _log(cfg)] == [1, 2]


@pytest.mark.parametrize("stage, message", [
    ({"target": "all", "epochs": 2, "samples": 100}, r"training.stages\[0\] sets both epochs and samples"),
    ({"target": "all", "samples": 0}, r"training.stages\[0\].samples must be >= 1"),
])
def test_a_stage_has_one_length(stage, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict({"training": {"stages": [stage]}})


def test_a_stage_without_a_length_is_one_epoch_as_before():
    cfg = config_from_dict({"training": {"stages": [{"target": "all"}]}})
    assert (cfg.training.stages[0].epochs, cfg.training.stages[0].samples) == (1, None)


def test_written_configs_keep_todays_sample_counts():
    """synth's schedule is the demo's 3 epochs of 6,460 items (100 steps of 64 each); the
    real-photo recipe's is 2 epochs of Flickr8k's 5,700 items (89 steps each)."""
    synth = yaml.safe_load(default_config_text())
    st = synth["training"]["stages"][0]
    assert stage_steps(None, st["samples"], 6460 // 64, 64) == stage_steps(3, None, 6460 // 64, 64)
    assert synth["training"]["val_every"] == 100 * 64
    real = yaml.safe_load(real_config_text("/nonexistent/minilm"))
    st = real["training"]["stages"][0]
    assert stage_steps(None, st["samples"], 5700 // 64, 64) == stage_steps(2, None, 5700 // 64, 64)
    assert real["training"]["val_every"] == 5700 // 64 * 64
    edge = yaml.safe_load(config_text())
    assert edge["training"]["stages"][0]["samples"] == 15 * (5400 // 64) * 64
    for written in (synth, real, edge):
        assert written["data"]["curriculum_noise"]["photo"]["ramp_samples"] == 4 * written["training"]["val_every"]


def test_noise_ramps_over_samples_when_given_and_over_epochs_otherwise():
    spec = NoiseSpec(start_prob=0.0, max_prob=0.4, start_strength=0.1, max_strength=0.5, ramp_epochs=4)
    by_epochs = NoiseSchedule(CurriculumSpec(photo=spec))
    assert by_epochs.params("all", 2, "photo", seen=10**6) == pytest.approx((0.2, 0.3))
    spec.ramp_samples = 1000
    by_samples = NoiseSchedule(CurriculumSpec(photo=spec))
    assert by_samples.params("all", 0, "photo", seen=250) == pytest.approx((0.1, 0.2))
    assert by_samples.params("all", 0, "photo", seen=5000) == pytest.approx((0.4, 0.5))
