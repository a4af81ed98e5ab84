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


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """The built-in dataset at a test size: 4 categories x 12 training / 6 test photos."""
    from stbir_train.synth import write_dataset

    root = tmp_path_factory.mktemp("synth")
    write_dataset(root, per_category=12, test_per_category=6, sketches_per_photo=2, seed=3)
    return root


def make_config(dataset_root, tmp_path, **overrides):
    """A fast training config on ``dataset_root`` writing under ``tmp_path``; ``overrides`` are
    dotted keys, e.g. ``{"training.batch_size": 4}``. Returns the config file's path."""
    import yaml

    data = yaml.safe_load((dataset_root / "config.yaml").read_text())
    data["output_dir"] = str(tmp_path / "out")
    data["data"]["root"] = str(dataset_root)
    data["training"].update(batch_size=8, num_workers=0)
    data["training"]["stages"] = [{"target": "all", "epochs": 1, "lr": 1e-4, "weight_decay": 0.01}]
    data["data"]["val_fraction"] = 0.15
    for key, value in overrides.items():
        node = data
        *parents, last = key.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    path = tmp_path / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="session")
def small_export(small_checkpoint, tmp_path_factory):
    """``small_checkpoint`` exported by stbir_export (fp32 graphs, verified against torch)."""
    from stbir_export import export_checkpoint

    out = tmp_path_factory.mktemp("export") / "export"
    export_checkpoint(small_checkpoint, out, log=lambda *a, **k: None)
    return out


@pytest.fixture(scope="session")
def write_config():
    """``make_config`` as a fixture: ``import conftest`` is ambiguous once sub-folders of tests/
    have their own conftest.py."""
    return make_config


@pytest.fixture(scope="session")
def small_export_int8(small_checkpoint, tmp_path_factory):
    """``small_checkpoint`` exported with int8 variants: (dir, export.json dict, printed log)."""
    from stbir_export import export_checkpoint

    out = tmp_path_factory.mktemp("export-int8") / "small"
    lines: list[str] = []
    manifest = export_checkpoint(small_checkpoint, out, quantize="int8", log=lines.append)
    return out, manifest, "\n".join(lines)


@pytest.fixture(scope="session")
def evil_checkpoint(tmp_path_factory):
    """(a .pt whose pickle would create ``marker`` when loaded unsafely, the marker's path).

    It looks like an STBIR checkpoint from outside: the same format keys, plus one object whose
    ``__reduce__`` calls ``exec``. ``torch.load(weights_only=True)`` must refuse it unrun."""
    import torch

    folder = tmp_path_factory.mktemp("evil")
    marker = folder / "PWNED"

    class Payload:
        def __reduce__(self):
            return exec, (f"open({str(marker)!r}, 'w').close()",)

    path = folder / "bad.pt"
    torch.save({"format": "stbir-checkpoint", "format_version": 1, "model_spec": {},
                "model": {}, "config": {}, "payload": Payload()}, path)
    assert not marker.exists()
    return path, marker


@pytest.fixture(scope="session")
def combiner_export(tmp_path_factory):
    """A small-preset checkpoint with a (perturbed, so not the plain mean) Combiner that validation
    "preferred", default weight 0.6 and score thresholds, exported: (dir, export.json, checkpoint)."""
    import torch

    from models import ModelSpec, build_model, save_checkpoint
    from stbir_export import export_checkpoint

    torch.manual_seed(0)
    model = build_model(ModelSpec(combiner=True, fusion_weight=0.5))
    with torch.no_grad():
        for p in model.combiner.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        model.combiner.preferred.fill_(1.0)
        model.fusion_weight.fill_(0.6)
    tmp = tmp_path_factory.mktemp("combiner")
    ckpt = save_checkpoint(tmp / "combiner.pt", model, config={}, metrics={}, fusion_selection={
        "weight": 0.6, "method": "combiner"}, score_thresholds={"split": "val", "modes": {
            m: {"0.01": 0.1, "0.001": 0.2, "0.0001": 0.3} for m in ("sketch", "text", "sketch+text")}})
    manifest = export_checkpoint(ckpt, tmp / "export", log=lambda *a, **k: None)
    return tmp / "export", manifest, ckpt
