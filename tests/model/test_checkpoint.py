"""Checkpoints and weights files are user input: loading one never runs code from it.

``evil_checkpoint`` (tests/conftest.py) is a .pt whose pickle would create a marker file when
loaded with ``weights_only=False``. Every command that reads a user's .pt must refuse it with one
line on stderr and exit 2, and the marker must not appear."""

import pytest
import torch
import yaml
from click.testing import CliRunner

from models import CheckpointError, ModelError, ModelSpec, build_model, read_checkpoint, save_checkpoint
from stbir_export.cli import main as export_main
from stbir_train.cli import main as train_main


def _refused(result, prog, marker):
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(f"{prog}: error: ")
    assert "refused" in result.stderr and "Traceback" not in result.output
    assert not marker.exists(), "the checkpoint's pickle ran"


def test_read_checkpoint_refuses_a_pickle_that_runs_code(evil_checkpoint):
    path, marker = evil_checkpoint
    with pytest.raises(CheckpointError, match="refused: it holds pickled objects"):
        read_checkpoint(path)
    assert not marker.exists()


def test_the_products_own_checkpoints_load_weights_only(tmp_path):
    model = build_model(ModelSpec(arcface_classes=2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.encode_sketch(torch.randn(2, 1, 64, 64)).sum().backward()
    opt.step()
    path = save_checkpoint(tmp_path / "c.pt", model, config={"a": {"b": [1, 2.5, None]}},
                           optimizer=opt.state_dict(), stage_index=0, epoch=1, step_in_stage=3,
                           metrics={"val": None, "losses": {"total": 1.5}}, best=None)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert ckpt["step_in_stage"] == 3 and ckpt["optimizer"]["param_groups"][0]["lr"] == 1e-3
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # atomic: no temp file left


def test_stbir_export_refuses_it(evil_checkpoint, tmp_path):
    path, marker = evil_checkpoint
    _refused(CliRunner().invoke(export_main, [str(path), str(tmp_path / "out")]), "stbir-export", marker)
    assert not (tmp_path / "out").exists()


def test_stbir_train_evaluate_refuses_it(evil_checkpoint, tiny_dataset, tmp_path, write_config):
    path, marker = evil_checkpoint
    config = write_config(tiny_dataset, tmp_path)
    result = CliRunner().invoke(train_main, ["evaluate", "--config", str(config), "--checkpoint", str(path)])
    _refused(result, "stbir-train", marker)


def test_stbir_train_resume_refuses_it(evil_checkpoint, tiny_dataset, tmp_path, write_config):
    path, marker = evil_checkpoint
    config = write_config(tiny_dataset, tmp_path)
    result = CliRunner().invoke(train_main, ["--config", str(config), "--resume", str(path)])
    _refused(result, "stbir-train", marker)
    assert not (tmp_path / "out" / "checkpoints").exists()


@pytest.mark.parametrize("key", ["pretrained", "sketch_pretrained"])
def test_pretrained_weights_files_are_loaded_weights_only(evil_checkpoint, tiny_dataset, tmp_path,
                                                          write_config, key):
    path, marker = evil_checkpoint
    with pytest.raises(ModelError, match=f"{key}: .*refused"):
        build_model(ModelSpec(**{key: str(path)}))
    assert not marker.exists()
    config = write_config(tiny_dataset, tmp_path)
    data = yaml.safe_load(config.read_text())
    data["model"][key] = str(path)
    config.write_text(yaml.safe_dump(data))
    _refused(CliRunner().invoke(train_main, ["--config", str(config)]), "stbir-train", marker)


def test_a_checkpoint_and_config_from_before_the_weight_rename_still_load(tmp_path):
    """The training weight was ``spec.fusion_weight`` and the validated query weight the buffer
    ``fusion_weight``; they are ``train_sketch_weight`` and ``query_sketch_weight`` now."""
    from models import load_model
    from stbir_train.config import config_from_dict

    model = build_model(ModelSpec(train_sketch_weight=0.4))
    model.query_sketch_weight.fill_(0.7)
    path = save_checkpoint(tmp_path / "new.pt", model)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    spec = ckpt["model_spec"]
    spec["fusion_weight"] = spec.pop("train_sketch_weight")
    ckpt["model"]["fusion_weight"] = ckpt["model"].pop("query_sketch_weight")
    torch.save(ckpt, tmp_path / "old.pt")
    old, _ = load_model(tmp_path / "old.pt")
    assert old.spec.train_sketch_weight == 0.4
    assert float(old.query_sketch_weight) == pytest.approx(0.7)
    cfg = config_from_dict({"model": {"fusion_weight": 0.3}})
    assert cfg.model.train_sketch_weight == 0.3
