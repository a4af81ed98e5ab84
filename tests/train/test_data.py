"""Layout reader, manifests, curriculum noise, the built-in dataset and bad-data messages."""

import json
from collections import defaultdict

import numpy as np
import pytest
from PIL import Image

from stbir_train.config import CurriculumSpec, NoiseSpec, StageNoise, load_config
from stbir_train.data import ImageCache
from stbir_train.manifest import DataError, build_manifests, check_files, read_manifest_rows, read_split
from stbir_train.noise import NoiseSchedule


def _png(path, value=128, mode="L"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (16, 16), value).save(path)


@pytest.fixture
def tree(tmp_path):
    """A two-category dataset in the seed's layout, written by hand."""
    root = tmp_path / "ds"
    for cat in ("shoe", "chair"):
        for split in ("train", "test"):
            names = [f"{cat}{i}" for i in range(4)]
            for n in names:
                _png(root / cat / f"{split}B" / f"{n}.png", mode="RGB")
                _png(root / cat / f"{split}A" / f"{n}_0.png")
            _png(root / cat / f"{split}A" / f"{names[0]}_1.png")
            (root / cat / f"{split}.txt").write_text("".join(f"{n}.png\t{cat} number {n}\n" for n in names))
    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"output_dir: {tmp_path / 'out'}\ndata:\n  root: ds\n"
                   "  categories:\n    shoe: {}\n    chair: {}\n"
                   "  negatives_per_modality: 2\n  virtual_classes: 3\n  val_fraction: 0.25\n")
    return root, cfg


def test_layout_reader_pairs_sketches_photos_and_captions(tree):
    root, cfg_path = tree
    samples = read_split(load_config(cfg_path), "train")
    assert len(samples) == 8
    first = next(s for s in samples if s.name == "shoe0")
    assert first.image == "shoe/trainB/shoe0.png"
    assert first.sketches == ["shoe/trainA/shoe0_0.png", "shoe/trainA/shoe0_1.png"]
    assert first.text == "shoe number shoe0" and first.id == "shoe:shoe0"


def test_sketch_without_photo_is_reported_and_skipped(tree):
    root, cfg_path = tree
    _png(root / "shoe" / "trainA" / "ghost_0.png")
    warnings = []
    samples = read_split(load_config(cfg_path), "train", warn=warnings.append)
    assert len(samples) == 8
    assert any("ghost_0.png" in w and "no photo" in w for w in warnings)


def test_text_line_without_tab_names_file_and_line(tree):
    root, cfg_path = tree
    (root / "chair" / "train.txt").write_text("chair0.png\tok\nchair1.png no tab here\n")
    with pytest.raises(DataError, match=r"chair/train.txt:2: line has no tab"):
        read_split(load_config(cfg_path), "train")


def test_photo_that_does_not_decode_is_named(tree):
    root, cfg_path = tree
    (root / "shoe" / "trainB" / "shoe2.png").write_bytes(b"not a png at all")
    with pytest.raises(DataError, match=r"shoe2.png: not a readable image"):
        build_manifests(load_config(cfg_path))
    with pytest.raises(DataError, match=r"shoe2.png"):
        ImageCache(root).get("shoe/trainB/shoe2.png", 3)


def test_manifest_pointing_at_missing_file_is_named(tree):
    root, cfg_path = tree
    cfg = load_config(cfg_path)
    paths = build_manifests(cfg)
    rows = read_manifest_rows(paths["train"])
    (root / rows[0]["image"]).unlink()
    with pytest.raises(DataError, match=rf"missing file .*{rows[0]['image']}"):
        check_files(rows, root, paths["train"])


def test_manifests_are_deterministic_for_a_seed_and_differ_for_another(tree, tmp_path):
    root, cfg_path = tree
    cfg = load_config(cfg_path)
    first = {k: p.read_bytes() for k, p in build_manifests(cfg, seed=1).items()}
    again = {k: p.read_bytes() for k, p in build_manifests(cfg, seed=1).items()}
    other = {k: p.read_bytes() for k, p in build_manifests(cfg, seed=2).items()}
    assert first == again
    assert first != other
    rows = [json.loads(line) for line in first["train"].decode().splitlines()]
    assert set(rows[0]) == {"id", "category", "image", "text", "positive_sketches", "negative_sketches",
                            "negative_images", "negative_texts", "virtual_class"}


def test_negatives_differ_from_positive_and_share_category_or_virtual_class(tiny_dataset, tmp_path,
                                                                            write_config):
    cfg = load_config(write_config(tiny_dataset, tmp_path, **{"data.negatives_per_modality": 3}))
    paths = build_manifests(cfg)
    for split in ("train", "test"):
        rows = read_manifest_rows(paths[split])
        by_image = {r["image"]: r for r in rows}
        for r in rows:
            assert len(r["negative_images"]) == len(r["negative_sketches"]) == len(r["negative_texts"]) == 3
            for img, sk in zip(r["negative_images"], r["negative_sketches"]):
                assert img != r["image"] and sk not in r["positive_sketches"]
                neg = by_image[img]
                # 12+ items per category, so a same-category/same-cluster negative always exists
                assert neg["category"] == r["category"] or neg["virtual_class"] == r["virtual_class"]
                assert sk in neg["positive_sketches"]


def test_noise_schedule_never_falls_and_respects_the_off_switch():
    spec = CurriculumSpec(photo=NoiseSpec(0.1, 0.6, 0.2, 0.9, ramp_epochs=5),
                          sketch=NoiseSpec(0.0, 0.4, 0.1, 0.5, ramp_epochs=3),
                          stages={"text": StageNoise(enabled=False), "image": StageNoise(photo={"max_prob": 0.9})})
    sched = NoiseSchedule(spec)
    for target in ("all", "sketch", "image"):
        for mod in ("photo", "sketch"):
            values = [sched.params(target, e, mod) for e in range(12)]
            assert all(b[0] >= a[0] and b[1] >= a[1] for a, b in zip(values, values[1:]))
            assert values[-1][0] > values[0][0]
    assert sched.params("all", 0, "photo") == pytest.approx((0.1, 0.2))
    assert sched.params("all", 99, "photo") == pytest.approx((0.6, 0.9))
    assert sched.params("image", 99, "photo")[0] == pytest.approx(0.9)  # per-stage override
    assert all(sched.params("text", e, m) == (0.0, 0.0) for e in range(10) for m in ("photo", "sketch"))
    off = NoiseSchedule(CurriculumSpec(enabled=False, photo=spec.photo))
    assert off.params("all", 9, "photo") == (0.0, 0.0)


def test_synth_is_deterministic_and_teaches_the_point(tmp_path):
    from stbir_train.synth import write_dataset

    write_dataset(tmp_path / "a", per_category=3, test_per_category=100, sketches_per_photo=1, seed=5)
    write_dataset(tmp_path / "b", per_category=3, test_per_category=2, sketches_per_photo=1, seed=5)
    write_dataset(tmp_path / "c", per_category=3, test_per_category=2, sketches_per_photo=1, seed=6)
    f = "star/trainB/star_train_00001.png"
    assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    assert (tmp_path / "a" / f).read_bytes() != (tmp_path / "c" / f).read_bytes()
    items = [json.loads(line) for line in (tmp_path / "a" / "synth_items.jsonl").read_text().splitlines()]
    test = [i for i in items if i["split"] == "test"]
    assert len(test) == 400
    colours_of_shape, shapes_of_colour = defaultdict(set), defaultdict(set)
    for i in test:
        colours_of_shape[i["shape"]].add(i["colour"])
        shapes_of_colour[i["colour"]].add(i["shape"])
    # neither half identifies a photo: each shape in several colours, each colour on many shapes
    assert len(colours_of_shape) == 16 and min(len(c) for c in colours_of_shape.values()) >= 4
    assert min(len(s) for s in shapes_of_colour.values()) >= 10
    # sketches look drawn: grey levels and stroke widths vary, not a clean 1-px edge
    sketch = np.asarray(Image.open(tmp_path / "a" / "star" / "testA" / "star_test_00000_0.png"))
    assert sketch.min() < 80 and len(np.unique(sketch)) > 5
