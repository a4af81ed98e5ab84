"""Issue 27: `stbir-train sketch-tune` and its real-sketch mixing (``real_sketches``): a folder
of sketch/photo pairs in the Sketchy layout is read, mixed into every batch at its share, and a
bad folder or key is one clear line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from PIL import Image, ImageDraw

from stbir_train import sketch_tune as T
from stbir_train.cli import main
from stbir_train.errors import ConfigError, DataError
from stbir_train.sketch_pairs import augment, read_pairs

SKETCHY = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "sketchy-dev25"


def _photo(i: int) -> Image.Image:
    img = Image.new("RGB", (64, 48), (200, 200 - 9 * i, 180))
    ImageDraw.Draw(img).ellipse((8 + i, 8, 40 + i, 40), fill=(30 * i % 255, 40, 60))
    return img


def _sketch(i: int) -> Image.Image:
    img = Image.new("L", (128, 128), 255)
    ImageDraw.Draw(img).ellipse((20 + 3 * i, 20, 100, 100 - 2 * i), outline=0, width=2)
    return img


def sketch_folder(root: Path, classes=("cat", "cup", "owl"), photos: int = 3, per_photo: int = 2) -> Path:
    """ROOT/photo/<class>/<id>.jpg and ROOT/sketch/<class>/<id>-<k>.png; one extra sketch-less
    photo per class (it must be skipped)."""
    for c, cls in enumerate(classes):
        (root / "photo" / cls).mkdir(parents=True)
        (root / "sketch" / cls).mkdir(parents=True)
        for j in range(photos + 1):
            _photo(c + j).save(root / "photo" / cls / f"n{c}_{j}.jpg")
            if j < photos:
                for k in range(1, per_photo + 1):
                    _sketch(j + k).save(root / "sketch" / cls / f"n{c}_{j}-{k}.png")
    return root


def pseudo_folder(root: Path, photos: int = 12) -> Path:
    """A sketchify category folder: trainB photos, trainA <stem>_<k>.png sketches."""
    (root / "trainA").mkdir(parents=True)
    (root / "trainB").mkdir(parents=True)
    for i in range(photos):
        _photo(i % 7).save(root / "trainB" / f"p{i}.jpg")
        for k in range(2):
            _sketch(i % 5 + k).save(root / "trainA" / f"p{i}_{k}.png")
    return root


def test_read_pairs_lists_sketched_photos_by_class(tmp_path):
    root = sketch_folder(tmp_path / "sk")
    pairs = read_pairs(root)
    assert len(pairs) == 9 and sorted(set(pairs.classes)) == ["cat", "cup", "owl"]
    assert all(len(s) == 2 and s[0].stem.startswith(p.stem + "-") for p, s in zip(pairs.photos, pairs.sketches))
    held_out = read_pairs(root, exclude=["owl"])
    assert set(held_out.classes) == {"cat", "cup"} and len(held_out) == 6
    assert set(read_pairs(root, classes=["cup"]).classes) == {"cup"}


@pytest.mark.parametrize("make, message", [
    (lambda r: r.mkdir(), "Sketchy layout"),
    (lambda r: sketch_folder(r, classes=("cat",), per_photo=0), "no photo with a sketch"),
])
def test_bad_sketch_folder_is_one_data_error(tmp_path, make, message):
    root = tmp_path / "bad"
    make(root)
    with pytest.raises(DataError, match=message):
        read_pairs(root)
    with pytest.raises(DataError, match="no class folder photo/dog"):
        read_pairs(sketch_folder(tmp_path / "ok"), exclude=["dog"])


def test_augment_redraws_human_strokes_with_the_canvas_pen_inside_the_canvas():
    from stbir_train.strokes import PEN_WIDTH

    src = Image.new("L", (128, 128), 255)
    ImageDraw.Draw(src).line((0, 64, 127, 64), fill=0, width=5)  # a thick line across the page
    out = np.asarray(augment(src, np.random.default_rng(1), drop=0.0, rotate=0.0, elastic=0.0))
    ink = out < 128
    assert out.shape == (256, 256)
    assert np.median(ink.sum(0)[ink.any(0)]) == PEN_WIDTH  # 10 px at 256 became the pen's 3
    assert not ink[:, 0].any() and not ink[:, -1].any()  # pulled inside the margin


def test_config_checks_keys_and_the_real_share(tmp_path):
    base = {"checkpoint": "c.pt", "out": "o.pt", "data": "d"}
    cfg = T.tune_config({**base, "real_sketches": {"root": "sk", "weight": 0.5}}, base=tmp_path)
    assert cfg.real_sketches.weight == 0.5 and cfg.path("d") == tmp_path / "d"
    for bad, msg in [({"stepz": 3}, "unknown key 'stepz'"),
                     ({"real_sketches": {"root": "sk", "weight": 1.5}}, "between 0 and 1"),
                     ({"real_sketches": {"weight": 0.2}}, "needs root"),
                     ({"real_sketches": {"root": "sk", "augment": {"blur": 1}}}, "augment takes"),
                     ({"loss": {"image": 0, "edge": 0}}, "not all 0"),
                     ({"loss": {"image": 1, "layout": 1}}, "image, edge and drawing")]:
        with pytest.raises(ConfigError, match=msg):
            T.tune_config({**base, **bad}, "t.yaml")


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from models import ModelSpec, build_model, save_checkpoint
    from models.spec import PRESETS

    torch.manual_seed(0)
    model = build_model(ModelSpec(**PRESETS["tiny"]))
    path = tmp_path_factory.mktemp("tiny") / "tiny.pt"
    save_checkpoint(path, model, config={}, metrics={})
    return path


def test_tune_mixes_real_pairs_at_their_share_and_learns_only_the_sketch_tower(tmp_path, tiny_checkpoint,
                                                                              monkeypatch):
    from models import load_model

    seen = []
    real_augment = T.augment
    monkeypatch.setattr(T, "augment", lambda s, rng, **kw: seen.append(1) or real_augment(s, rng, **kw))
    cfg = T.tune_config({"checkpoint": str(tiny_checkpoint), "out": str(tmp_path / "out.pt"),
                         "data": str(pseudo_folder(tmp_path / "pseudo")), "steps": 3, "batch_size": 8,
                         "real_sketches": {"root": str(sketch_folder(tmp_path / "sk")), "weight": 0.25,
                                           "exclude": ["owl"]}})
    summary = T.tune(cfg, log=lambda *a: None)
    assert len(seen) == 3 * 2  # 2 of every 8 items, 3 steps: real pairs, augmented
    before, _ = load_model(tiny_checkpoint)
    after, state = load_model(summary["out"])
    changed = {k.split(".")[0] for k, v in after.state_dict().items()
               if v.is_floating_point() and not torch.equal(v, before.state_dict()[k])}
    assert changed == {"sketch"}
    assert state["sketch_tune"]["real_sketches"]["exclude"] == ["owl"]


def test_the_drawing_loss_pairs_the_descriptors_of_sketch_and_edge_drawing(tmp_path, tiny_checkpoint,
                                                                          monkeypatch):
    """loss.drawing: InfoNCE between the sketch's and its photo's edge drawing's drawing
    descriptors (what the edge gallery compares), beside the embedding losses."""
    from models import load_model

    calls = []
    real_nce = T.info_nce
    monkeypatch.setattr(T, "info_nce", lambda a, b, t: calls.append((a.shape, b.shape)) or real_nce(a, b, t))
    cfg = T.tune_config({"checkpoint": str(tiny_checkpoint), "out": str(tmp_path / "out.pt"),
                         "data": str(pseudo_folder(tmp_path / "pseudo")), "steps": 2, "batch_size": 4,
                         "loss": {"image": 0, "edge": 0, "drawing": 1.0}})
    T.tune(cfg, log=lambda *a: None)
    model, _ = load_model(tiny_checkpoint)
    embed, drawing = model.embed_dim, model.sketch.drawing_dim
    assert drawing != embed
    assert calls == [((4, embed), (4, embed)), ((4, embed), (4, embed)), ((4, drawing), (4, drawing))] * 2


def test_cli_bad_real_folder_is_one_line_exit_2(tmp_path, tiny_checkpoint):
    cfg = {"checkpoint": str(tiny_checkpoint), "out": str(tmp_path / "o.pt"),
           "data": str(pseudo_folder(tmp_path / "pseudo")), "steps": 1, "batch_size": 8,
           "real_sketches": {"root": str(tmp_path / "nowhere"), "weight": 0.25}}
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(cfg))
    res = CliRunner().invoke(main, ["sketch-tune", "--config", str(tmp_path / "t.yaml")])
    assert res.exit_code == 2
    assert "Sketchy layout" in res.output and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "o.pt").exists()


@pytest.mark.skipif(not SKETCHY.is_dir(), reason="needs ../shared/data/sketchy-dev25")
def test_sketchy_dev25_reads_as_pairs():
    pairs = read_pairs(SKETCHY)
    assert len(pairs) == 119 and len(set(pairs.classes)) == 25
    assert sum(len(s) for s in pairs.sketches) == 625
