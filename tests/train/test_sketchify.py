"""Issue 15.1: `stbir-train sketchify` turns captioned photos into the seed layout + a config that
`stbir-train --config` trains on; its pseudo-sketches are thin strokes on white."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from PIL import Image, ImageDraw

from stbir_train import sketchify as S
from stbir_train.cli import main
from stbir_train.config import load_config
from stbir_train.manifest import read_split

FLICKR = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "flickr8k-1k"


def _photos(folder: Path, n: int) -> Path:
    """n photos (odd sizes, JPEG and PNG) with 2 captions each; returns the captions CSV."""
    from stbir_train.synth import render_photo, sample_item

    folder.mkdir(parents=True)
    rows = []
    for i in range(n):
        rng = np.random.default_rng([5, i])
        img = render_photo(sample_item(rng, f"p{i}"), rng).resize((90 + 7 * i, 70))
        name = f"p{i}.jpg" if i % 2 else f"p{i}.png"
        img.save(folder / name)
        rows += [(name, f"photo number {i}"), (name, f"another caption of {i}")]
    path = folder.parent / "captions.csv"
    with path.open("w", newline="") as f:
        csv.writer(f).writerows([("filename", "caption"), *rows])
    return path


def _small_training(config: Path) -> Path:
    """The written config, cut to one quick epoch (no pretrained weights)."""
    data = yaml.safe_load(config.read_text())
    data["model"].update(pretrained=None, sketch_pretrained=None)
    data["training"].update(batch_size=4, num_workers=0)
    data["training"]["stages"][0].pop("samples")  # the written length, in samples
    data["training"]["stages"][0]["epochs"] = 1
    data["data"]["val_fraction"] = 0.25  # 2 items: verification.py fails on 1 (told the lead)
    data["data"]["virtual_classes"] = 2
    config.write_text(yaml.safe_dump(data))
    return config


def test_sketchify_writes_the_seed_layout_and_a_config_that_trains(tmp_path):
    captions = _photos(tmp_path / "photos", 10)
    res = CliRunner().invoke(main, ["sketchify", str(tmp_path / "photos"), str(captions),
                                    str(tmp_path / "out"), "--test", "2", "--sketches-per-photo", "2"])
    assert res.exit_code == 0, res.output
    cat = tmp_path / "out" / S.CATEGORY
    assert len(list((cat / "trainB").iterdir())) == 8 and len(list((cat / "testB").iterdir())) == 2
    assert len(list((cat / "trainA").glob("*_[01].png"))) == 16
    assert len(list((cat / "testA").glob("*_0.png"))) == 2
    assert (cat / "train_captions.csv").read_text().count("\n") == 1 + 16  # every caption kept
    cfg = load_config(tmp_path / "out" / "config.yaml")
    assert cfg.model.preset == "edge" and cfg.model.pretrained is None
    assert (cfg.model.sketch_resize, cfg.model.image_resize) == ("pad", "pad")
    assert len(read_split(cfg, "train")) == 8 and len(read_split(cfg, "test")) == 2
    sketch = Image.open(next((cat / "trainA").iterdir()))
    assert sketch.mode == "L" and np.asarray(sketch).mean() > 180  # dark strokes on white

    config = _small_training(tmp_path / "out" / "config.yaml")
    res = CliRunner().invoke(main, ["--config", str(config)])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "out" / "runs" / "checkpoints" / "best.pt").is_file()


def test_bad_input_is_one_line(tmp_path):
    captions = _photos(tmp_path / "photos", 3)
    res = CliRunner().invoke(main, ["sketchify", str(tmp_path / "photos"), str(captions),
                                    str(tmp_path / "out"), "--test", "5"])
    assert res.exit_code == 2 and "test split of 5 photos" in res.stderr
    res = CliRunner().invoke(main, ["sketchify", str(tmp_path / "photos"),
                                    str(tmp_path / "none.csv"), str(tmp_path / "out")])
    assert res.exit_code == 2 and "captions file not found" in res.stderr


@pytest.mark.parametrize("method", S.METHODS)
def test_extraction_gives_thin_strokes_on_the_outline(method):
    img = Image.new("RGB", (160, 120), (235, 235, 230))
    ImageDraw.Draw(img).rectangle((40, 30, 120, 90), fill=(40, 60, 150))
    edges = S.extract(img, method)
    assert edges.shape == (192, 256)  # long side at WORK_SIZE
    ys, xs = np.nonzero(edges)
    assert len(ys) > 200
    # on or next to the rectangle's outline (scaled by 1.6), nowhere inside or far outside
    near = ((np.abs(xs - 64) < 5) | (np.abs(xs - 192) < 5) | (np.abs(ys - 48) < 5)
            | (np.abs(ys - 144) < 5))
    assert near.mean() > 0.95
    assert edges.sum(1).max() < 0.9 * 256  # no filled rows


def test_variants_differ_and_a_seed_repeats_them():
    img = Image.new("RGB", (120, 100), "white")
    ImageDraw.Draw(img).ellipse((20, 15, 100, 85), fill="black")
    a = S.sketches_of(img, "canny", 3, np.random.default_rng(1))
    b = S.sketches_of(img, "canny", 3, np.random.default_rng(1))
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))
    assert not np.array_equal(np.asarray(a[0]), np.asarray(a[1]))


def test_thinning_leaves_one_pixel_lines():
    ink = np.zeros((30, 40), bool)
    ink[10:15, 5:35] = True  # a 5-pixel-wide bar
    thin = S.thin(ink)
    assert 0 < thin.sum() <= 32 and thin.sum(0).max() == 1


@pytest.mark.skipif(not FLICKR.is_dir(), reason=f"real photos not here ({FLICKR})")
def test_sketchify_on_a_handful_of_flickr_photos(tmp_path):
    config = S.write_dataset(FLICKR / "images", FLICKR / "captions.txt", tmp_path / "f",
                             test=3, sketches_per_photo=2, limit=12)
    cfg = load_config(config)
    train, test = read_split(cfg, "train"), read_split(cfg, "test")
    assert (len(train), len(test)) == (9, 3)
    assert all(len(s.sketches) == 2 for s in train)
    rows = list(csv.reader((tmp_path / "f" / S.CATEGORY / "test_captions.csv").open()))
    assert rows[0] == ["image", "caption"] and len(rows) == 1 + 3 * 5  # 5 captions a photo
    photo = Image.open(cfg.resolve(cfg.data.root) / test[0].image)
    sketch = Image.open(cfg.resolve(cfg.data.root) / test[0].sketches[0])
    assert abs(sketch.width / sketch.height - photo.width / photo.height) < 0.02  # same framing


def test_resize_modes_reach_the_input_specs_and_a_bad_one_is_refused(tmp_path):
    from models import ModelError, ModelSpec, build_model
    from stbir_train.config import config_from_dict

    cfg = config_from_dict({"model": {"sketch_resize": "pad"}})
    spec = cfg.model.spec()
    assert (spec.sketch_resize, spec.image_resize) == ("pad", "shortest")
    specs = build_model(ModelSpec(sketch_resize="pad", image_resize="pad")).input_specs()
    assert specs["sketch"]["resize_mode"] == "pad" and specs["sketch"]["pad_fill"] == [255]
    mean = specs["image"]["mean"]
    assert specs["image"]["pad_fill"] == [round(m * 255) for m in mean]  # normalises to 0
    assert ModelSpec.from_dict({}).sketch_resize == "shortest"  # older checkpoints: as trained
    with pytest.raises(ModelError, match="sketch_resize"):
        build_model(ModelSpec(sketch_resize="stretch"))
