"""`stbir-train distill`: the teacher runs once (its vectors are cached and reused), the student's
checkpoint records the teacher, and the loss terms do what they claim."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from models import ModelSpec, build_model, load_model, read_checkpoint, save_checkpoint
from models.space import weights_fingerprint
from stbir_infer.contract import file_sha256
from stbir_train import distill as D
from stbir_train.cli import main as train_main
from stbir_train.config import load_config
from stbir_train.data import SBIRDataset
from stbir_train.errors import ConfigError, TrainingError
from stbir_train.manifest import build_manifests, manifest_paths, read_manifest_rows

STAGES = [{"target": "all", "epochs": 2, "lr": 1e-4, "weight_decay": 0.01}]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A random small-preset teacher (128-d, like the tiny student)."""
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("teacher") / "teacher_best.pt"
    save_checkpoint(path, build_model(ModelSpec()), config={}, metrics={})
    return path


def student_config(tiny_dataset, tmp_path, write_config, teacher, **extra):
    return load_config(write_config(tiny_dataset, tmp_path, **{
        "model.preset": "tiny", "training.stages": STAGES, "loss.weights.triplet": 0.3,
        "distill": {"teacher": str(teacher)}, **extra}))


def count_teacher_runs(monkeypatch) -> list:
    calls = []
    real = D.encode_teacher

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(D, "encode_teacher", counting)
    return calls


def test_teacher_runs_once_and_its_cached_vectors_are_reused(tiny_dataset, tmp_path, write_config,
                                                             teacher, monkeypatch):
    calls = count_teacher_runs(monkeypatch)
    cfg = student_config(tiny_dataset, tmp_path, write_config, teacher)
    lines = []
    first = D.distill(cfg, stop_after_validations=1, log=lines.append)
    assert len(calls) == 1 and any("computed into" in line for line in lines)
    cache = list((cfg.out / "distill_cache").glob("teacher-*.npz"))
    assert len(cache) == 1 and str(cache[0]) == first["cache"]
    stamp = cache[0].stat().st_mtime_ns
    lines.clear()
    D.distill(cfg, resume=cfg.out / "checkpoints" / "last.pt", log=lines.append)  # epoch 2 of 2
    assert len(calls) == 1, "the teacher ran again although its vectors were cached"
    assert any("reused from" in line for line in lines)
    assert cache[0].stat().st_mtime_ns == stamp
    ckpt = read_checkpoint(cfg.out / "checkpoints" / "last.pt")
    assert ckpt["epoch"] == 2
    t_model, _ = load_model(teacher)
    assert ckpt["distill"]["space"] == weights_fingerprint(t_model)
    assert ckpt["distill"]["teacher"]["sha256"] == file_sha256(teacher)
    assert ckpt["distill"]["teacher"]["file"] == "teacher_best.pt"
    assert set(D.TERMS) <= set(ckpt["metrics"]["losses"])  # every distillation term trained
    torch.load(cfg.out / "checkpoints" / "best.pt", weights_only=True)  # the usual format
    torch.manual_seed(7)  # resuming towards another teacher is refused
    other = tmp_path / "other.pt"
    save_checkpoint(other, build_model(ModelSpec()), config={}, metrics={})
    cfg2 = student_config(tiny_dataset, tmp_path / "other", write_config, other)
    with pytest.raises(TrainingError, match="not a distillation checkpoint of teacher"):
        D.distill(cfg2, resume=cfg.out / "checkpoints" / "last.pt", log=lambda *a: None)


def test_cache_is_keyed_by_teacher_and_data(tiny_dataset, tmp_path, write_config, teacher):
    cfg = load_config(write_config(tiny_dataset, tmp_path))
    build_manifests(cfg)
    rows = read_manifest_rows(manifest_paths(cfg)["train"])
    calls = []

    def fake(model, rows_, cache):
        calls.append(model)
        n = sum(len(r["positive_sketches"]) for r in rows_)
        return {"image": np.ones((len(rows_), 4), np.float32), "text": np.ones((len(rows_), 4), np.float32),
                "sketch": np.ones((n, 4), np.float32)}

    from stbir_train.data import ImageCache
    cache = ImageCache(tiny_dataset)
    import unittest.mock as mock
    with mock.patch.object(D, "encode_teacher", fake):
        _, a, reused = D.teacher_targets("t1", rows, cache, tmp_path / "c", "sha-1")
        assert not reused
        assert D.teacher_targets("t1", rows, cache, tmp_path / "c", "sha-1")[2]  # same: reused
        _, b, reused = D.teacher_targets("t2", rows, cache, tmp_path / "c", "sha-2")
        assert not reused and b != a  # another teacher
        _, c, reused = D.teacher_targets("t1", rows[:-1], cache, tmp_path / "c", "sha-1")
        assert not reused and c not in (a, b)  # other data
        a.write_bytes(b"not an npz")  # a damaged cache is recomputed, not trusted
        assert not D.teacher_targets("t1", rows, cache, tmp_path / "c", "sha-1")[2]
    assert len(calls) == 4


def test_teacher_vector_of_an_item_is_that_of_the_sketch_it_drew(tiny_dataset, tmp_path, write_config):
    """WithTeacher mirrors SBIRDataset's draw of a positive sketch; if one changes, this fails."""
    from stbir_infer.preprocess import open_image, preprocess

    cfg = load_config(write_config(tiny_dataset, tmp_path))
    build_manifests(cfg)
    rows = read_manifest_rows(manifest_paths(cfg)["train"])
    model = build_model(ModelSpec(clip_model="stbir-tiny", sketch_backbone="mobilenet_v3_small"))
    specs = model.input_specs()
    base = SBIRDataset(rows, tiny_dataset, specs, model.tokenizer(), [0] * len(rows), 0, noise=None,
                       train=True, seed=5)
    n = sum(len(r["positive_sketches"]) for r in rows)
    targets = {"sketch": np.arange(n, dtype=np.float32)[:, None].repeat(2, 1),
               "image": np.zeros((len(rows), 2), np.float32), "text": np.zeros((len(rows), 2), np.float32)}
    data = D.WithTeacher(base, targets)
    drawn = set()
    for epoch in range(3):
        data.set_epoch(0, "all", epoch)
        for i, row in enumerate(rows[:8]):
            item = data[i]
            k = int(item["teacher_sketch"][0]) - int(data.offsets[i])
            want = preprocess(open_image(tiny_dataset / row["positive_sketches"][k], 1), specs["sketch"])
            assert np.array_equal(item["sketch"].numpy(), want)
            drawn.add(k)
    assert drawn == {0, 1}  # both sketches of an item get drawn over the epochs


def test_relational_kl_is_zero_for_the_same_structure_and_matches_a_hand_value():
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert D.relational_kl(s, s.clone(), 0.5).item() == pytest.approx(0.0, abs=1e-7)
    teacher = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    student = torch.zeros(2, 2)  # uniform over the two photos
    p = torch.softmax(teacher / 0.5, 1)
    want = (p * (p / 0.5).log()).sum(1).mean().item()
    assert D.relational_kl(student, teacher, 0.5).item() == pytest.approx(want, rel=1e-6)
    assert D.relational_kl(teacher, student, 0.5).item() > 0


def test_distillation_terms_pull_the_student_to_the_teacher():
    """A few optimiser steps on the distillation terms alone bring the student's vectors to the
    teacher's (cosine) and its batch similarity structure to the teacher's."""
    torch.manual_seed(0)
    branches = ("sketch", "image", "text")
    towers = torch.nn.ModuleDict({b: torch.nn.Linear(6, 4) for b in branches})
    x = {b: torch.randn(8, 6) for b in branches}
    batch = {f"teacher_{b}": torch.nn.functional.normalize(torch.randn(8, 4), dim=-1) for b in branches}
    model = type("M", (), {"spec": ModelSpec(train_sketch_weight=0.5)})()
    terms = D.relational_terms(model, 0.1)
    opt = torch.optim.Adam(towers.parameters(), lr=0.05)

    def losses():
        return terms(batch, {b: torch.nn.functional.normalize(towers[b](x[b]), dim=-1) for b in branches})

    before = {k: float(v.detach()) for k, v in losses().items()}
    for _ in range(60):
        out = losses()
        opt.zero_grad()
        sum(out.values()).backward()
        opt.step()
    after = {k: float(v.detach()) for k, v in losses().items()}
    assert set(before) == set(D.TERMS)
    assert all(after[k] < before[k] for k in D.TERMS), (before, after)


def test_bad_distill_settings_are_one_line_errors(tiny_dataset, tmp_path, write_config, teacher):
    cfg = load_config(write_config(tiny_dataset, tmp_path / "a", **{"model.preset": "tiny"}))
    with pytest.raises(ConfigError, match="distill.teacher is not set"):
        D.distill(cfg, log=lambda *a: None)
    cfg = student_config(tiny_dataset, tmp_path / "b", write_config, teacher,
                         **{"distill.temperature": 0})
    with pytest.raises(ConfigError, match="distill.temperature must be > 0"):
        D.distill(cfg, log=lambda *a: None)
    path = write_config(tiny_dataset, tmp_path / "c", **{"model.preset": "tiny", "training.stages": STAGES,
                                                         "distill": {"teacher": str(tmp_path / "missing.pt")}})
    result = CliRunner().invoke(train_main, ["distill", "--config", str(path)])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        f"stbir-train: error: {tmp_path / 'missing.pt'}: checkpoint not found"]
