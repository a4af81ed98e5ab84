"""The YAML config: bad keys and values are one-line errors naming the key and the file."""

import subprocess
import sys

import pytest

from stbir_train.config import ConfigError, config_from_dict, load_config


@pytest.mark.parametrize("data, key", [
    ({"training": {"batchsize": 4}}, "training.batchsize"),
    ({"training": {"stages": [{"target": "paint", "epochs": 1}]}}, "training.stages[0].target"),
    ({"training": {"stages": [{"target": "all", "epochs": "two"}]}}, "training.stages[0].epochs"),
    ({"loss": {"weights": {"infonce": "high"}}}, "loss.weights.infonce"),
    ({"model": {"preset": "huge"}}, "model.preset"),
    ({"data": {"curriculum_noise": {"photo": {"max_prob": 2}}}}, "data.curriculum_noise.photo.max_prob"),
    ({"loss": {"modality_dropout": 1.5}}, "loss.modality_dropout"),
    ({"loss": {"weights": {"infonce_text": -1}}}, "loss.weights.infonce_text"),
    ({"model": {"init_from": 3.5, "quick_gelu": "yes"}}, "model.quick_gelu"),
    ({"pretrain": {"holdout": 1.0}}, "pretrain.holdout"),
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
