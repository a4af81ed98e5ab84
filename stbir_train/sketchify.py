"""`stbir-train sketchify`: a captioned photo collection -> training data in the seed layout.

Each photo gets line drawings made from it -- pseudo-sketches, the stand-in the sketch-based
retrieval literature uses when no hand-drawn sketches exist (edge maps: Canny, HED, XDoG; thinned
to strokes). The extractors (``canny``, ``xdog``) live in the runtime, `stbir_infer.edges`, so
the edge gallery draws enrolled photos exactly as training draws its variants.

Every variant of a photo draws its own extraction parameters, warps the strokes with a smooth
random displacement field, drops patches of strokes and isolated specks, and picks a stroke width
and ink tone, so a model cannot key on the exact artefacts of one extraction.

Layout written (one category, ``photos``): ``photos/trainA`` (``<stem>_<k>.png`` sketches),
``photos/trainB`` (the photo files, copied byte for byte), ``testA``, ``testB``, ``train.txt`` /
``test.txt`` (``name<TAB>caption``, the photo's first caption), ``train_captions.csv`` /
``test_captions.csv`` (every caption, ``image,caption``: ``pretrain`` and the real-photo
benchmark read them) and ``config.yaml``.
"""

from __future__ import annotations

import csv
import io
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from stbir_infer.edges import METHODS, canny, extract, render, thin, xdog  # re-exported
from stbir_infer.preprocess import ImageDecodeError, open_image
from stbir_train.captions import read_csv_pairs
from stbir_train.config import curriculum_noise_yaml
from stbir_train.errors import DataError

CATEGORY = "photos"
RECIPES = (*METHODS, "contour")  # `contour`: stbir_train.strokes, the training-side recipe


# -- variants -----------------------------------------------------------------------------------

def sketches_of(photo: Image.Image, method: str, n: int, rng: np.random.Generator) -> list[Image.Image]:
    if method == "contour":  # long strokes of the salient object (scikit-image: imported on use)
        from stbir_train.strokes import contour_sketches

        return contour_sketches(photo, n, rng)
    return [render(extract(photo, method, rng), rng) for _ in range(n)]


# -- the dataset ---------------------------------------------------------------------------------

def write_dataset(photos_dir: str | Path, captions: str | Path, out_dir: str | Path, *,
                  method: str = "canny", test: int = 100, sketches_per_photo: int = 3,
                  limit: int = 0, seed: int = 0, weights: str | None = None,
                  split: str | Path | None = None, text_model: str | None = None,
                  log=None) -> Path:
    """Write the layout and its ``config.yaml`` (returned). ``test`` photos (drawn by ``seed``)
    form the test split, one sketch each, unless ``split`` names a CSV ``image,split`` (Flickr8k's
    ``split.csv``: ``train`` photos train, the others are the test split); ``limit`` > 0 keeps
    only that many photos (the first in sorted order). ``weights``: a torchvision mobilenet_v2
    state dict for both visual towers; ``text_model``: a Hugging Face sentence encoder folder
    for the text tower (the real-photo recipe, ``real_config_text``)."""
    if method not in RECIPES:
        raise DataError(f"sketch method {method!r} is not one of {', '.join(RECIPES)}")
    pairs = read_csv_pairs(Path(captions), Path(photos_dir))
    by_photo: dict[Path, list[str]] = {}
    for cap, i in zip(pairs.captions, pairs.owner):
        by_photo.setdefault(pairs.photos[i], []).append(cap)
    photos = sorted(by_photo, key=lambda p: p.name)[: limit or None]
    if len({p.stem for p in photos}) != len(photos):
        raise DataError(f"{captions}: two photos share a file stem; names must be unique")
    if split is not None:
        is_test = read_split(Path(split), photos)
    else:
        if not 0 < test < len(photos):
            raise DataError(f"test split of {test} photos needs 0 < test < {len(photos)} photos")
        order = np.random.default_rng([seed, 15]).permutation(len(photos))
        is_test = np.zeros(len(photos), bool)
        is_test[order[:test]] = True
    out = Path(out_dir)
    cat = out / CATEGORY
    for d in ("trainA", "trainB", "testA", "testB"):
        (cat / d).mkdir(parents=True, exist_ok=True)
    lines = {"train": [], "test": []}
    rows = {"train": [], "test": []}
    skipped = 0
    for i, photo in enumerate(photos):
        split = "test" if is_test[i] else "train"
        try:
            img = open_image(photo, 3)
        except ImageDecodeError as exc:
            skipped += 1
            if log:
                log(f"skipped {exc}")
            continue
        rng = np.random.default_rng([seed, int(is_test[i]), i])
        n = 1 if split == "test" else sketches_per_photo
        for k, sk in enumerate(sketches_of(img, method, n, rng)):
            sk.save(cat / f"{split}A" / f"{photo.stem}_{k}.png", optimize=False, compress_level=6)
        shutil.copyfile(photo, cat / f"{split}B" / photo.name)
        caps = by_photo[photo]
        lines[split].append(f"{photo.name}\t{caps[0]}")
        rows[split].extend((photo.name, c) for c in caps)
    for split in ("train", "test"):
        (cat / f"{split}.txt").write_text("\n".join(lines[split]) + "\n", encoding="utf-8")
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["image", "caption"])
        writer.writerows(rows[split])
        (cat / f"{split}_captions.csv").write_text(buf.getvalue(), encoding="utf-8")
    config = out / "config.yaml"
    text = real_config_text(text_model, weights) if text_model else config_text(weights)
    config.write_text(text, encoding="utf-8")
    if log:
        log(f"{len(lines['train'])} training photos ({sketches_per_photo} sketches each), "
            f"{len(lines['test'])} test photos (1 sketch each), {skipped} skipped; method {method}")
    return config


def read_split(path: Path, photos: list[Path]) -> np.ndarray:
    """Which of ``photos`` are test photos, from a CSV ``image,split`` (``train`` or another
    split name, e.g. Flickr8k's ``val``); every photo must be listed."""
    if not path.is_file():
        raise DataError(f"{path}: split file not found")
    with path.open(newline="", encoding="utf-8-sig") as f:
        rows = list(csv.reader(f))
    if not rows or [h.strip().lower() for h in rows[0][:2]] != ["image", "split"]:
        raise DataError(f"{path}:1: expected a header 'image,split'")
    split_of = {}
    for n, row in enumerate(rows[1:], start=2):
        if len(row) < 2 or not row[0].strip() or not row[1].strip():
            raise DataError(f"{path}:{n}: expected 'image,split'")
        split_of[row[0].strip()] = row[1].strip().lower()
    missing = [p.name for p in photos if p.name not in split_of]
    if missing:
        raise DataError(f"{path}: {len(missing)} photos have no split (e.g. {missing[0]})")
    is_test = np.array([split_of[p.name] != "train" for p in photos])
    if is_test.all() or not is_test.any():
        raise DataError(f"{path}: needs both training ('train') and test photos")
    return is_test


def real_config_text(text_model: str, weights: str | None = None) -> str:
    """The real-photo recipe (docs/real-photos.md): a pretrained sentence encoder as
    the text tower, ImageNet MobileNetV2 image and sketch towers; ``pretrain`` aligns image and
    text first, then the sketch stage learns against those two as anchors."""
    w = (f"{Path(weights).resolve()}" if weights else "null")
    return f"""\
# Written by `stbir-train sketchify --text-model`. Relative paths resolve against this folder.
# Run `stbir-train pretrain` first, then set model.pretrained to runs/pretrain/clip.pt.
output_dir: runs
model:
  preset: real              # MobileNetV2 towers (image 160 px, sketch 128 px), 256-d space
  text_model: {Path(text_model).expanduser().resolve()}
  text_proj: mlp            # 2-layer projection heads (measured better than linear)
  image_proj: mlp
  text_unlocked_layers: 0   # the sentence encoder locked: only its projection learns
  image_unlocked_layers: 6  # the top 6 of MobileNetV2's 18 layer groups learn ...
  trunk_lr_scale: 0.1       # ... at a tenth of the heads' rate (BatchNorm frozen); the rest
                            # runs once per photo (pretrain caches it)
  pretrained: {w}        # torchvision mobilenet_v2 ImageNet weights for the image tower
  sketch_pretrained: {w}  # ... and for the sketch tower
  sketch_resize: pad
  image_resize: pad
  train_sketch_weight: 0.5
data:
  root: .
  categories:
    {CATEGORY}: {{}}
  val_fraction: 0.05
  negatives_per_modality: 0
  virtual_classes: 16
  manifest_seed: 0
{curriculum_noise_yaml(22_784)}training:
  batch_size: 64
  num_workers: 1
  seed: 0
  cache_anchors: true       # their vectors computed once: each step runs the sketch tower only
  # In training samples, whatever the photo count: 11,392 (178 steps) is 2 epochs of
  # Flickr8k's 5,700 training items; validation every 5,696 (docs/training-defaults.md).
  val_every: 5696
  stages:                   # the image and text towers are the sketch stage's anchors
    - {{target: sketch, samples: 11392, lr: 0.0005, weight_decay: 0.05}}
loss:
  temperature: 0.07
  arcface_labels: virtual_class
  fusion_items: 16
  modality_dropout: 0.3
  weights: {{infonce: 1.0, triplet: 0.0, fusion: 0.0, arcface: 0.0, infonce_sketch: 0.5}}
pretrain:                   # image + text towers on every training caption
  captions: {CATEGORY}/train_captions.csv
  images: {CATEGORY}/trainB
  holdout: 0.05
  epochs: 4
  lr: 0.001
  batch_size: 128
"""


def config_text(weights: str | None = None) -> str:
    """The config written next to the data: the edge preset (MobileNetV2 sketch and image towers),
    both visual towers from ``weights`` when given, all branches at once."""
    w = (f"{Path(weights).resolve()}" if weights else "null")
    return f"""\
# Written by `stbir-train sketchify`. Relative paths resolve against this file's folder.
output_dir: runs
model:
  preset: edge              # MobileNetV2 sketch and image towers (96 px), 2-layer text tower
  pretrained: {w}        # torchvision mobilenet_v2 ImageNet weights for the image tower
  sketch_pretrained: {w}  # ... and for the sketch tower
  sketch_resize: pad        # letterbox, white: a wide sketch keeps its ends (docs/real-photos.md, "Crop or pad")
  image_resize: pad         # letterbox on the normalisation mean (measured better than the crop)
  train_sketch_weight: 0.5
data:
  root: .
  categories:
    {CATEGORY}: {{}}
  val_fraction: 0.1
  negatives_per_modality: 0
  virtual_classes: 16
  manifest_seed: 0
{curriculum_noise_yaml(21_504)}training:
  batch_size: 64
  num_workers: 1
  seed: 0
  # In training samples: 80,640 (1,260 steps) is 15 epochs of 6,000 training photos less the
  # validation tenth; validation every 5,376 (docs/training-defaults.md).
  val_every: 5376
  stages:
    - {{target: all, samples: 80640, lr: 0.0003, weight_decay: 0.05}}
loss:
  temperature: 0.07
  arcface_labels: virtual_class
  fusion_items: 16
  modality_dropout: 0.3
  weights: {{infonce: 1.0, triplet: 0.0, fusion: 0.0, arcface: 0.1}}
pretrain:                   # `stbir-train pretrain` first (then model.pretrained: runs/pretrain/clip.pt)
  captions: {CATEGORY}/train_captions.csv
  images: {CATEGORY}/trainB
  epochs: 5
"""


def contact_sheet(pairs: list[tuple[Image.Image, Image.Image]], cell: int = 128) -> Image.Image:
    """Photo / sketch pairs side by side, one pair per cell pair, four pairs a row."""
    cols = 4
    rows = -(-len(pairs) // cols)
    sheet = Image.new("RGB", (cols * 2 * cell, rows * cell), "white")
    for j, (photo, sketch) in enumerate(pairs):
        x, y = (j % cols) * 2 * cell, (j // cols) * cell
        for k, im in enumerate((photo.convert("RGB"), sketch.convert("RGB"))):
            im = im.copy()
            im.thumbnail((cell - 4, cell - 4), Image.Resampling.LANCZOS)
            sheet.paste(im, (x + k * cell + (cell - im.width) // 2, y + (cell - im.height) // 2))
    return sheet


__all__ = ["METHODS", "canny", "config_text", "contact_sheet", "extract", "render",
           "sketches_of", "thin", "write_dataset", "xdog"]
