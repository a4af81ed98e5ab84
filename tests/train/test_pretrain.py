"""`stbir-train pretrain`: CLIP-style pretraining writes weights that plain open_clip loads and
held-out R@k in both directions; bad captions files are one line naming file and line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from PIL import Image

from stbir_train.cli import main

FLICKR = Path(__file__).resolve().parents[2].parent / "shared/data/flickr8k-1k"


def _config(tiny_dataset, tmp_path, write_config, **pretrain):
    path = write_config(tiny_dataset, tmp_path)
    data = yaml.safe_load(path.read_text())
    data["pretrain"] = {"epochs": 1, "batch_size": 8, "holdout": 0.2, **pretrain}
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def pretrained(tiny_dataset, tmp_path_factory, write_config):
    tmp = tmp_path_factory.mktemp("pretrain")
    path = write_config(tiny_dataset, tmp)
    data = yaml.safe_load(path.read_text())
    data["pretrain"] = {"epochs": 1, "batch_size": 8, "holdout": 0.2}
    path.write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(main, ["pretrain", "--config", str(path)])
    assert result.exit_code == 0, result.output
    return path, tmp / "out" / "pretrain", result.output


def test_weights_load_in_plain_open_clip_and_results_have_both_directions(pretrained):
    import open_clip
    import torch

    from models.model import _open_clip

    _open_clip()  # registers the product's architectures (models/configs) with open_clip
    _, out, printed = pretrained
    clip = open_clip.create_model("stbir-small", pretrained=str(out / "clip.pt"))
    saved = torch.load(out / "clip.pt", weights_only=True)
    assert all(torch.equal(v, saved[k]) for k, v in clip.state_dict().items())
    res = json.loads((out / "results.json").read_text())
    for direction in ("image_to_text", "text_to_image"):
        assert set(res["final"][direction]) == {"R@1", "R@5", "R@10"}
    assert res["final"]["photos"] == 10 and "held-out i->t R@1" in printed


def test_resume_continues_from_last_and_training_config_takes_the_weights(pretrained, tmp_path):
    from models import ModelSpec, build_model

    path, out, _ = pretrained
    data = yaml.safe_load(path.read_text())
    data["pretrain"]["epochs"] = 2
    data["output_dir"] = str(out.parent)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(main, ["pretrain", "--config", str(cfg), "--resume", str(out / "last.pt")])
    assert result.exit_code == 0, result.output
    assert "resuming pretraining" in result.output and "epoch 2/2" in result.output
    assert [h["epoch"] for h in json.loads((out / "results.json").read_text())["history"]] == [1, 2]
    build_model(ModelSpec(pretrained=str(out / "clip.pt")))  # model.pretrained takes it


def _csv_case(tmp_path, text: str, bad_photo: bool = False):
    images = tmp_path / "images"
    images.mkdir(parents=True)
    for name in ("a.jpg", "b.jpg"):
        Image.new("RGB", (40, 30), (200, 10, 10)).save(images / name)
    if bad_photo:
        (images / "b.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "captions.csv").write_text(text)
    return tmp_path / "captions.csv", images


@pytest.mark.parametrize("text, bad_photo, message", [
    ("a.jpg,a red thing\n", False, r"captions.csv:1: expected a header 'filename,caption' or 'image,caption'"),
    ("filename,caption\na.jpg,red\nzz.jpg,blue\n", False, r"captions.csv:3: image zz.jpg not found in"),
    ("image,caption\na.jpg,red\nb.jpg,  \n", False, r"captions.csv:3: empty caption for b.jpg"),
    ("image,caption\na.jpg,red\nb.jpg,blue\n", True, r"captions.csv:3: .*b.jpg"),
])
def test_bad_captions_file_is_one_line_naming_file_and_line(tiny_dataset, tmp_path, write_config,
                                                            text, bad_photo, message):
    import re

    captions, images = _csv_case(tmp_path / "d", text, bad_photo)
    config = _config(tiny_dataset, tmp_path, write_config, captions=str(captions), images=str(images))
    weights = tmp_path / "out" / "pretrain" / "clip.pt"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"earlier weights")
    result = CliRunner().invoke(main, ["pretrain", "--config", str(config)])
    assert result.exit_code == 2, result.output
    line = result.stderr.strip()
    assert "\n" not in line and line.startswith("stbir-train: error: "), line
    assert re.search(message, line), line
    assert weights.read_bytes() == b"earlier weights"  # nothing already written is lost


@pytest.mark.parametrize("key, value, message", [
    ("holdout", 0, "pretrain.holdout must be in (0, 1)"),
    ("batch_size", 1, "pretrain.batch_size must be >= 2"),
    ("captions", "x.csv", "pretrain.images must be set too"),
    ("epoch", 3, "unknown key pretrain.epoch"),
])
def test_pretrain_config_is_validated_like_training(tiny_dataset, tmp_path, write_config, key, value,
                                                    message):
    config = _config(tiny_dataset, tmp_path, write_config, **{key: value})
    result = CliRunner().invoke(main, ["pretrain", "--config", str(config)])
    assert result.exit_code == 2 and message in result.stderr, result.output


@pytest.mark.skipif(not FLICKR.is_dir(), reason=f"{FLICKR} absent (shared data not mounted)")
def test_flickr_captions_csv_pretrains_a_few_steps(tiny_dataset, tmp_path, write_config):
    """Real photos (JPEG, odd sizes) and the real `image,caption` header: the first 16 photos."""
    lines = (FLICKR / "captions.txt").read_text(encoding="utf-8").splitlines()
    (tmp_path / "captions.csv").write_text("\n".join(lines[:81]) + "\n", encoding="utf-8")
    config = _config(tiny_dataset, tmp_path, write_config, captions=str(tmp_path / "captions.csv"),
                     images=str(FLICKR / "images"), holdout=0.25)
    result = CliRunner().invoke(main, ["pretrain", "--config", str(config)])
    assert result.exit_code == 0, result.output
    res = json.loads((tmp_path / "out" / "pretrain" / "results.json").read_text())["final"]
    assert res["photos"] == 4 and res["captions"] == 20
