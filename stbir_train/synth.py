"""The built-in dataset: synthetic photos, hand-drawn-looking sketches and captions.

It is built to teach the product's point. A photo shows one object with a *shape*, a *pose*
(rotation, size) and a *position* -- what a sketch conveys -- and a *colour* and a *texture* --
what words convey. Every shape comes in every colour and texture, so in a test gallery of a few
hundred photos neither half of a query identifies the photo alone: the sketch narrows it to the
photos of that shape and pose, the caption to that colour and texture, and only both find it.

Written in the seed's layout (per category ``trainA/ trainB/ testA/ testB/`` plus ``train.txt`` /
``test.txt`` of ``image_name<TAB>caption`` lines), with a ``config.yaml`` that trains on it.
Deterministic for a seed: every item draws from its own generator seeded by (seed, split, index).
"""

from __future__ import annotations

import dataclasses
import json
import math
import multiprocessing
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

PHOTO_SIZE = 96

# category -> shape name -> outline in unit coordinates (radius about 1, centred on 0).
def _regular(n: int, phase: float = 0.0) -> np.ndarray:
    a = phase + np.arange(n) * 2 * np.pi / n
    return np.stack([np.cos(a), np.sin(a)], 1)


def _star(n: int, inner: float = 0.45) -> np.ndarray:
    a = np.arange(2 * n) * np.pi / n
    r = np.where(np.arange(2 * n) % 2 == 0, 1.0, inner)
    return np.stack([r * np.cos(a), r * np.sin(a)], 1)


def _curve(fn, n: int = 48) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    pts = np.stack(fn(t), 1)
    return pts / np.abs(pts).max()


SHAPES: dict[str, dict[str, np.ndarray]] = {
    "polygon": {
        "triangle": _regular(3, -np.pi / 2),
        "square": _regular(4, np.pi / 4),
        "pentagon": _regular(5, -np.pi / 2),
        "hexagon": _regular(6),
    },
    "star": {
        "star4": _star(4, 0.4),
        "star5": _star(5),
        "star6": _star(6, 0.55),
        "star8": _star(8, 0.65),
    },
    "symbol": {
        "arrow": np.array([[-1, -.3], [.2, -.3], [.2, -.75], [1, 0], [.2, .75], [.2, .3], [-1, .3]]),
        "plus": np.array([[-.3, -1], [.3, -1], [.3, -.3], [1, -.3], [1, .3], [.3, .3], [.3, 1],
                          [-.3, 1], [-.3, .3], [-1, .3], [-1, -.3], [-.3, -.3]]),
        "ell": np.array([[-.8, -1], [-.2, -1], [-.2, .4], [.8, .4], [.8, 1], [-.8, 1]]),
        "tee": np.array([[-1, -1], [1, -1], [1, -.4], [.3, -.4], [.3, 1], [-.3, 1], [-.3, -.4],
                         [-1, -.4]]),
    },
    "curve": {
        "ellipse": _curve(lambda t: (np.cos(t), 0.55 * np.sin(t))),
        "heart": _curve(lambda t: (16 * np.sin(t) ** 3,
                                   -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)))),
        "drop": _curve(lambda t: (np.sin(t) * (1 - np.cos(t)) * 0.8, -np.cos(t) * 1.0)),
        "crescent": np.concatenate([
            np.stack([np.cos(a := np.linspace(-2.4, 2.4, 24)), np.sin(a)], 1),
            np.stack([0.45 + 0.75 * np.cos(b := np.linspace(1.9, -1.9, 24)), 0.9 * np.sin(b)], 1)]),
    },
}

# colour -> (base RGB, words a person might type for it)
COLOURS: dict[str, tuple[tuple[int, int, int], tuple[str, ...]]] = {
    "red": ((205, 30, 35), ("red", "crimson", "scarlet")),
    "orange": ((240, 130, 20), ("orange", "tangerine")),
    "yellow": ((240, 210, 30), ("yellow", "lemon", "golden")),
    "green": ((40, 160, 60), ("green", "emerald", "grass-green")),
    "blue": ((35, 75, 205), ("blue", "cobalt", "royal blue")),
    "purple": ((130, 50, 170), ("purple", "violet")),
    "pink": ((240, 120, 180), ("pink", "rose", "rosy")),
    "brown": ((120, 75, 35), ("brown", "chocolate", "coffee")),
}

# texture -> (adjectives, "with ..." phrases)
TEXTURES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "plain": (("plain", "solid", "matte", "smooth"), ("a plain finish", "no pattern", "a flat colour")),
    "striped": (("striped", "stripy", "banded"), ("stripes", "a striped pattern", "bands")),
    "dotted": (("dotted", "polka-dot", "spotted"), ("dots", "polka dots", "spots")),
    "checkered": (("checkered", "chequered", "checked"), ("a checker pattern", "checks", "squares")),
}

CATEGORY_NOUNS = {
    "polygon": ("polygon", "shape", "tile", "block"),
    "star": ("star", "star shape", "badge"),
    "symbol": ("symbol", "sign", "glyph", "marker"),
    "curve": ("curved shape", "blob", "rounded shape", "form"),
}

TEMPLATES = (
    "a {colour} {tex} {noun}",
    "{tex} {colour} {noun}",
    "{colour} {noun} with {texphrase}",
    "the {noun} is {colour} and {tex}",
    "{colour}, {tex}",
    "a {noun} in {colour} with {texphrase}",
    "{colour} {tex} one",
    "something {colour} covered in {texphrase}",
)


@dataclass(frozen=True)
class Item:
    name: str
    category: str
    shape: str
    colour: str
    texture: str
    angle: float
    scale: float
    centre: tuple[float, float]


def sample_item(rng: np.random.Generator, name: str) -> Item:
    category = str(rng.choice(list(SHAPES)))
    return Item(
        name=name,
        category=category,
        shape=str(rng.choice(list(SHAPES[category]))),
        colour=str(rng.choice(list(COLOURS))),
        texture=str(rng.choice(list(TEXTURES))),
        angle=float(rng.uniform(0, 2 * np.pi)),
        scale=float(rng.uniform(0.2, 0.36)),
        centre=(float(rng.uniform(0.3, 0.7)), float(rng.uniform(0.3, 0.7))),
    )


def outline(item: Item, size: int = PHOTO_SIZE) -> np.ndarray:
    """The shape's outline in pixel coordinates: the pose and position a sketch must convey."""
    pts = SHAPES[item.category][item.shape]
    c, s = math.cos(item.angle), math.sin(item.angle)
    rot = pts @ np.array([[c, s], [-s, c]])
    return rot * item.scale * size + np.array(item.centre) * size


def render_photo(item: Item, rng: np.random.Generator, size: int = PHOTO_SIZE,
                 pts: np.ndarray | None = None) -> Image.Image:
    """The photo of ``item``; ``pts``: its outline in pixels, when not one of ``SHAPES``."""
    base = np.array(COLOURS[item.colour][0], np.float32) * rng.uniform(0.85, 1.1, 3)
    # Background: a soft two-tone gradient, light enough that every colour stands out.
    tint = rng.uniform(190, 245, 3)
    ramp = np.linspace(0, 1, size)[:, None, None] * rng.uniform(-25, 25, 3)
    bg = np.clip(tint + ramp + rng.normal(0, 4, (size, size, 3)), 0, 255)

    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    if item.texture == "striped":
        a = rng.uniform(0, np.pi)
        period = rng.uniform(6, 10)
        pattern = (np.sin((xx * np.cos(a) + yy * np.sin(a)) * 2 * np.pi / period) > 0)
    elif item.texture == "dotted":
        period = rng.uniform(7, 10)
        pattern = ((xx % period - period / 2) ** 2 + (yy % period - period / 2) ** 2) < (period / 3.5) ** 2
    elif item.texture == "checkered":
        period = rng.uniform(6, 10)
        pattern = ((xx // period + yy // period) % 2) == 0
    else:
        pattern = np.zeros((size, size), bool)
    accent = np.where(base.mean() > 128, base * 0.45, np.minimum(base * 0.4 + 150, 255))
    fill = np.where(pattern[..., None], accent, base)
    shade = 1 - 0.15 * (xx + yy)[..., None] / (2 * size)  # a little light from the top-left
    fill = np.clip(fill * shade + rng.normal(0, 3, fill.shape), 0, 255)

    mask_img = Image.new("L", (size, size), 0)
    pts = outline(item, size) if pts is None else pts
    ImageDraw.Draw(mask_img).polygon([tuple(p) for p in pts], fill=255)
    mask = np.asarray(mask_img.filter(ImageFilter.GaussianBlur(0.6)), np.float32)[..., None] / 255
    # A soft drop shadow gives the object some depth.
    shadow = np.roll(mask, (2, 2), (0, 1)) * 0.25
    out = bg * (1 - shadow) * (1 - mask) + fill * mask
    return Image.fromarray(out.astype(np.uint8), "RGB")


def render_sketch(item: Item, rng: np.random.Generator, size: int = PHOTO_SIZE) -> Image.Image:
    """A drawn outline: wobbly, uneven strokes in a few pieces, the odd gap and overshoot."""
    pts = outline(item, size)
    closed = np.concatenate([pts, pts[:1]])
    # Resample the outline densely, then wobble it with smooth low-frequency noise.
    seg = np.linalg.norm(np.diff(closed, axis=0), axis=1)
    t = np.concatenate([[0], np.cumsum(seg)])
    dense_t = np.linspace(0, t[-1], max(int(t[-1] / 1.5), 8))
    dense = np.stack([np.interp(dense_t, t, closed[:, i]) for i in range(2)], 1)
    n = len(dense)
    k = np.arange(n) / n * 2 * np.pi
    wobble = sum(rng.normal(0, 1.2 / f, (1, 2)) * np.sin(f * k[:, None] + rng.uniform(0, 6.3, (1, 2)))
                 for f in (2, 3, 5, 9))
    dense = dense + wobble + rng.normal(0, 0.35, dense.shape)

    # Drawn at twice the size and scaled down, so strokes get soft, uneven edges.
    img = Image.new("L", (2 * size, 2 * size), 255)
    draw = ImageDraw.Draw(img)
    dense = dense * 2
    start = int(rng.integers(0, n))
    order = np.roll(np.arange(n), -start)
    overshoot = int(rng.integers(0, max(n // 12, 2)))
    order = np.concatenate([order, order[:overshoot]])
    pieces = np.array_split(order, int(rng.integers(1, 4)))
    for piece in pieces:
        if rng.random() < 0.08 and len(pieces) > 1:
            continue  # a stroke the drawer never finished
        width = int(rng.integers(2, 7))
        ink = int(rng.integers(0, 70))
        draw.line([tuple(dense[i]) for i in piece], fill=ink, width=width, joint="curve")
    return img.resize((size, size), Image.Resampling.BOX)


def caption(item: Item, rng: np.random.Generator) -> str:
    words = dict(
        colour=str(rng.choice(COLOURS[item.colour][1])),
        tex=str(rng.choice(TEXTURES[item.texture][0])),
        texphrase=str(rng.choice(TEXTURES[item.texture][1])),
        noun=str(rng.choice(CATEGORY_NOUNS[item.category])),
    )
    return str(rng.choice(TEMPLATES)).format(**words)


def _write_item(job: tuple) -> tuple[str, str]:
    """Render and write one photo and its sketches; returns its caption line and truth record.
    A job is (out, split, split_id, cat_id, cat, index, sketches, seed): everything the item
    needs, so workers in any order write the same bytes."""
    out, split, split_id, cat_id, cat, i, n_sketch, seed = job
    rng = np.random.default_rng([seed, split_id, cat_id, i])
    item = sample_item(rng, f"{cat}_{split}_{i:05d}")
    # The category is fixed per folder; the rest of the item is sampled.
    item = Item(item.name, cat, str(rng.choice(list(SHAPES[cat]))), item.colour,
                item.texture, item.angle, item.scale, item.centre)
    render_photo(item, rng).save(out / cat / f"{split}B" / f"{item.name}.png", compress_level=1)
    for k in range(n_sketch):
        render_sketch(item, rng).save(out / cat / f"{split}A" / f"{item.name}_{k}.png", compress_level=1)
    return f"{item.name}.png\t{caption(item, rng)}", json.dumps({"split": split, **dataclasses.asdict(item)})


def write_dataset(out_dir: str | Path, per_category: int = 500, test_per_category: int = 100,
                  sketches_per_photo: int = 2, seed: int = 0, workers: int = 0) -> Path:
    """Write the dataset and its ``config.yaml``; returns the config's path.

    ``per_category`` and ``test_per_category`` are the number of photos in each category's
    training and test folders; every photo gets ``sketches_per_photo`` sketches in training and
    one in test. Items render in ``workers`` processes (0: one per available core); the files are
    the same for any number, since every item draws from its own generator.
    """
    out = Path(out_dir)
    jobs = []
    for split, per_cat, n_sketch, split_id in (("train", per_category, sketches_per_photo, 0),
                                               ("test", test_per_category, 1, 1)):
        for cat_id, cat in enumerate(SHAPES):
            (out / cat / f"{split}A").mkdir(parents=True, exist_ok=True)
            (out / cat / f"{split}B").mkdir(parents=True, exist_ok=True)
            jobs += [(out, split, split_id, cat_id, cat, i, n_sketch, seed) for i in range(per_cat)]
    workers = min(workers or len(os.sched_getaffinity(0)), len(jobs))
    if workers > 1:
        with multiprocessing.Pool(workers) as pool:
            results = pool.map(_write_item, jobs, chunksize=max(1, len(jobs) // (8 * workers)))
    else:
        results = [_write_item(job) for job in jobs]
    lines: dict[tuple[str, str], list[str]] = {(c, s): [] for c in SHAPES for s in ("train", "test")}
    for job, (line, _) in zip(jobs, results):
        lines[job[4], job[1]].append(line)
    for (cat, split), rows in lines.items():
        (out / cat / f"{split}.txt").write_text("\n".join(rows) + "\n", encoding="utf-8")
    # What each photo shows, for analysis and tests (not read by training).
    (out / "synth_items.jsonl").write_text("\n".join(t for _, t in results) + "\n", encoding="utf-8")
    config_path = out / "config.yaml"
    config_path.write_text(default_config_text(), encoding="utf-8")
    return config_path


def default_config_text(categories=SHAPES) -> str:
    """The config written next to the dataset, paths relative to it: the small preset with the
    schedule and losses that measured best on two CPU cores within the demo's time budget
    (docs/training.md, "Staged or all at once"). The schedule is in training samples, so it is the same
    length for any dataset size (docs/training-defaults.md). The seed's sketch -> image -> text
    schedule is commented in."""
    from stbir_train.config import curriculum_noise_yaml

    cats = "\n".join(f"    {c}: {{}}" for c in categories)
    return f"""\
# Written by `stbir-train synth`. Relative paths resolve against this file's folder.
output_dir: runs
model:
  preset: small          # stbir-small open_clip towers (ModifiedResNet image tower) + resnet18 sketches
  sketch_size: 48        # sketches at 48 px for any preset (small's own: 64, 2/3 less work); null: the preset's
  train_sketch_weight: 0.5     # sketch share of a sketch+text query
data:
  root: .
  categories:
{cats}
  val_fraction: 0.05
  negatives_per_modality: 0   # manifest hard negatives per item; 0 = in-batch negatives only
  virtual_classes: 16
  manifest_seed: 0
{curriculum_noise_yaml(25_600)}training:
  batch_size: 64
  num_workers: 1
  grad_clip: 1.0
  seed: 0
  # Stage lengths are training samples (what the model sees), not epochs: an epoch of 2,000
  # photos is a third of one of 6,800 (docs/training-defaults.md). 19,200 samples (300 steps)
  # at lr 1e-3 is what `make demo`'s 6,800 photos train in its time on two cores; best.pt is
  # the best of the validations every 6,400 samples.
  val_every: 6400
  patience: 0            # > 0: stop a stage after that many validations without a new best
  # All branches at once: measured best (docs/training.md, "Staged or all at once").
  stages:
    - {{target: all, samples: 19200, lr: 0.001, weight_decay: 0.05}}
  # The seed's order needs real anchors: with ImageNet weights in both visual towers (edge
  # preset), a text stage against the locked image tower first, then sketch -> image -> text at
  # these lrs, it comes within 0-6 points of all at once at equal time (docs/training.md, "Staged or all
  # at once"); from random init it does not train:
  # (at the demo's 6,800 photos, 6,400 samples are one epoch)
  # - {{target: text, samples: 6400, lr: 0.001, weight_decay: 0.05}}
  # - {{target: sketch, samples: 6400, lr: 0.002, weight_decay: 0.05}}
  # - {{target: image, samples: 12800, lr: 0.002, weight_decay: 0.05}}
  # - {{target: text, samples: 6400, lr: 0.001, weight_decay: 0.05}}
loss:
  temperature: 0.07
  triplet_margin: 0.2
  arcface_labels: category
  fusion_items: 16
  # Sketch-only and text-only queries are trained too (seed 002): 20% of items query with one
  # half only, and each half has its own InfoNCE term (sketch R@1 +3 points, docs/training.md).
  modality_dropout: 0.2
  # Triplet and fusion consistency are off here by measurement: at the same 4 epochs they cost
  # 5 points of test R@1 (0.845 vs 0.897, docs/training.md). Turn them on for longer or pretrained runs.
  weights: {{infonce: 1.0, triplet: 0.0, fusion: 0.0, arcface: 0.1, infonce_sketch: 0.5, infonce_text: 0.5}}
pretrain:                # `stbir-train pretrain --config this.yaml`: image/text towers on train.txt
  holdout: 0.1
  epochs: 3
  lr: 0.0005
  batch_size: 64
"""
