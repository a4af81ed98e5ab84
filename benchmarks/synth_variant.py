"""A second synthetic generator, for checking that the training defaults hold on data they were
not tuned on (issue 29 item 6; docs/training-defaults.md).

It keeps the built-in set's point (a sketch gives shape, pose and position, a caption colour and
texture) and changes what the recipe could have been fitted to:

  shapes    three other categories: flowers (rose curves), gears and blobs (radial waves) and
            quadrilaterals (bars, kites, trapezoids, chevrons), twelve shapes in all
  sizes     objects from 0.12 to 0.42 of the photo (the built-in set: 0.20 to 0.36), anywhere
            from 0.25 to 0.75 of the width
  strokes   each sketch is thin, dashed, doubled (two loose passes) or scribbled (many short
            overlapping strokes), never the built-in set's 2-7 px pieces

Written in the seed's layout with the config `stbir-train synth` writes (the same defaults), so
`stbir-train --config DIR/config.yaml` trains on it unchanged.

    python benchmarks/synth_variant.py OUT_DIR [--per-category 1334] [--test-per-category 100]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stbir_train.synth import (  # noqa: E402
    COLOURS,
    PHOTO_SIZE,
    TEXTURES,
    Item,
    default_config_text,
    render_photo,
)


def _radial(fn, n: int = 64) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    r = fn(t)
    pts = np.stack([r * np.cos(t), r * np.sin(t)], 1)
    return pts / np.abs(pts).max()


SHAPES: dict[str, dict[str, np.ndarray]] = {
    "flower": {
        "petals3": _radial(lambda t: 0.55 + 0.45 * np.abs(np.cos(1.5 * t))),
        "petals5": _radial(lambda t: 0.6 + 0.4 * np.cos(5 * t)),
        "petals6": _radial(lambda t: 0.5 + 0.5 * np.abs(np.cos(3 * t))),
        "clover": _radial(lambda t: 0.45 + 0.55 * np.abs(np.sin(2 * t))),
    },
    "gear": {
        "cog8": _radial(lambda t: 0.8 + 0.2 * np.sign(np.cos(8 * t)), 128),
        "wave4": _radial(lambda t: 0.75 + 0.25 * np.cos(4 * t)),
        "blob": _radial(lambda t: 0.8 + 0.15 * np.cos(2 * t) + 0.1 * np.sin(3 * t)),
        "saw": _radial(lambda t: 0.7 + 0.3 * ((6 * t / (2 * np.pi)) % 1.0), 96),
    },
    "quad": {
        "bar": np.array([[-1, -.28], [1, -.28], [1, .28], [-1, .28]]),
        "kite": np.array([[0, -1], [.55, -.2], [0, 1], [-.55, -.2]]),
        "trapezoid": np.array([[-1, .6], [1, .6], [.45, -.6], [-.45, -.6]]),
        "chevron": np.array([[-1, -.6], [0, .1], [1, -.6], [1, 0], [0, .7], [-1, 0]]),
    },
}

NOUNS = {"flower": ("flower", "bloom", "petal shape"), "gear": ("gear", "cog", "wavy shape"),
         "quad": ("bar", "block", "four-sided shape")}
TEMPLATES = ("a {colour} {tex} {noun}", "{noun}, {colour} and {tex}", "{colour} {noun} with {texphrase}",
             "a {tex} {noun} coloured {colour}", "{colour} with {texphrase}")
STROKES = ("thin", "dashed", "double", "scribble")


def outline(item: Item, size: int = PHOTO_SIZE) -> np.ndarray:
    pts = SHAPES[item.category][item.shape]
    c, s = math.cos(item.angle), math.sin(item.angle)
    return pts @ np.array([[c, s], [-s, c]]) * item.scale * size + np.array(item.centre) * size


def sample(rng: np.random.Generator, category: str, name: str) -> Item:
    return Item(name=name, category=category, shape=str(rng.choice(list(SHAPES[category]))),
                colour=str(rng.choice(list(COLOURS))), texture=str(rng.choice(list(TEXTURES))),
                angle=float(rng.uniform(0, 2 * np.pi)), scale=float(rng.uniform(0.12, 0.42)),
                centre=(float(rng.uniform(0.25, 0.75)), float(rng.uniform(0.25, 0.75))))


def _dense(pts: np.ndarray, rng: np.random.Generator, wobble: float) -> np.ndarray:
    """The closed outline resampled every ~1.5 px, with smooth hand wobble."""
    closed = np.concatenate([pts, pts[:1]])
    t = np.concatenate([[0], np.cumsum(np.linalg.norm(np.diff(closed, axis=0), axis=1))])
    d = np.linspace(0, t[-1], max(int(t[-1] / 1.5), 8))
    dense = np.stack([np.interp(d, t, closed[:, i]) for i in range(2)], 1)
    k = np.arange(len(dense)) / len(dense) * 2 * np.pi
    return dense + sum(rng.normal(0, wobble / f, (1, 2)) * np.sin(f * k[:, None] + rng.uniform(0, 6.3, (1, 2)))
                       for f in (2, 4, 7))


def render_sketch(item: Item, rng: np.random.Generator, size: int = PHOTO_SIZE) -> Image.Image:
    """One of four stroke styles, drawn at twice the size and scaled down."""
    style = STROKES[int(rng.integers(len(STROKES)))]
    img = Image.new("L", (2 * size, 2 * size), 255)
    draw = ImageDraw.Draw(img)
    pts = outline(item, size) * 2
    if style == "thin":
        p = _dense(pts, rng, 1.5)
        draw.line([tuple(x) for x in np.concatenate([p, p[:1]])], fill=int(rng.integers(0, 90)), width=2)
    elif style == "dashed":
        p = _dense(pts, rng, 2.0)
        on, off = int(rng.integers(4, 9)), int(rng.integers(2, 5))
        for start in range(0, len(p), on + off):
            draw.line([tuple(x) for x in p[start:start + on]], fill=20, width=3)
    elif style == "double":
        for _ in range(2):
            p = _dense(pts, rng, 3.5)
            draw.line([tuple(x) for x in np.concatenate([p, p[:1]])], fill=int(rng.integers(30, 110)), width=2)
    else:  # scribble: short overlapping strokes along the outline
        p = _dense(pts, rng, 2.5)
        i = 0
        while i < len(p):
            n = int(rng.integers(4, 12))
            seg = p[i:i + n] + rng.normal(0, 1.5, (len(p[i:i + n]), 2))
            if len(seg) > 1:
                draw.line([tuple(x) for x in seg], fill=int(rng.integers(0, 80)), width=int(rng.integers(2, 5)))
            i += max(n - int(rng.integers(1, 4)), 1)
    return img.resize((size, size), Image.Resampling.BOX)


def caption(item: Item, rng: np.random.Generator) -> str:
    return str(rng.choice(TEMPLATES)).format(
        colour=str(rng.choice(COLOURS[item.colour][1])), tex=str(rng.choice(TEXTURES[item.texture][0])),
        texphrase=str(rng.choice(TEXTURES[item.texture][1])), noun=str(rng.choice(NOUNS[item.category])))


def write_dataset(out_dir: str | Path, per_category: int, test_per_category: int = 100,
                  sketches_per_photo: int = 2, seed: int = 0) -> Path:
    """The seed's layout and `stbir-train synth`'s config; returns the config's path."""
    out = Path(out_dir)
    for cat_id, cat in enumerate(SHAPES):
        for split, n, n_sketch, split_id in (("train", per_category, sketches_per_photo, 0),
                                             ("test", test_per_category, 1, 1)):
            (out / cat / f"{split}A").mkdir(parents=True, exist_ok=True)
            (out / cat / f"{split}B").mkdir(parents=True, exist_ok=True)
            lines = []
            for i in range(n):
                rng = np.random.default_rng([seed, 7, split_id, cat_id, i])
                item = sample(rng, cat, f"{cat}_{split}_{i:05d}")
                render_photo(item, rng, pts=outline(item)).save(out / cat / f"{split}B" / f"{item.name}.png",
                                                                compress_level=1)
                for k in range(n_sketch):
                    render_sketch(item, rng).save(out / cat / f"{split}A" / f"{item.name}_{k}.png",
                                                  compress_level=1)
                lines.append(f"{item.name}.png\t{caption(item, rng)}")
            (out / cat / f"{split}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    config = out / "config.yaml"
    config.write_text(default_config_text(SHAPES), encoding="utf-8")
    return config


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("out_dir")
    ap.add_argument("--per-category", type=int, default=1334, help="training photos per category")
    ap.add_argument("--test-per-category", type=int, default=100)
    ap.add_argument("--sketches-per-photo", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    config = write_dataset(args.out_dir, args.per_category, args.test_per_category,
                           args.sketches_per_photo, args.seed)
    print(f"wrote {len(SHAPES) * args.per_category} training photos ({len(SHAPES)} categories); config: {config}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
