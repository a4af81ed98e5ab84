"""The seed's folder layout -> train / val / test JSONL manifests with hard negatives.

Layout, per category (paths from the config): ``trainA/`` sketches, ``trainB/`` photos,
``testA/``, ``testB/``, and text files of ``image_name<TAB>description`` lines. Sketch
``xxx_N.png`` belongs to photo ``xxx.png``.

Each manifest row carries the seed's fields::

    {"id", "category", "image", "text", "positive_sketches",
     "negative_sketches", "negative_images", "negative_texts", "virtual_class"}

Negatives come from the same category or the same virtual class first (virtual classes are
k-means clusters of cheap image + text features), then from anywhere. Paths in rows are relative to
``data.root``. Same config and seed, same bytes.
"""

from __future__ import annotations

import json
import os
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from stbir_infer.contract import atomic_write_text
from stbir_infer.preprocess import IMAGE_EXTENSIONS, ImageDecodeError, open_image
from stbir_train.config import Config
from stbir_train.errors import DataError

SPLITS = ("train", "val", "test")


@dataclass
class Sample:
    category: str
    name: str  # the photo's file stem
    image: str  # relative to data.root
    text: str
    sketches: list[str] = field(default_factory=list)

    @property
    def id(self) -> str:
        return f"{self.category}:{self.name}"


def read_tab_lines(path: Path):
    """``(line number, image name, raw text)`` of each non-blank ``image_name<TAB>text`` line."""
    if not path.is_file():
        raise DataError(f"{path}: text file not found")
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if "\t" not in line:
            raise DataError(f"{path}:{n}: line has no tab (expected image_name<TAB>description)")
        name, text = line.split("\t", 1)
        yield n, name.strip(), text


def _read_captions(path: Path) -> dict[str, str]:
    return {Path(name).stem: text.strip() for _, name, text in read_tab_lines(path)}


def _images_in(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise DataError(f"{folder}: folder not found")
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)


def read_split(cfg: Config, split: str, warn=None) -> list[Sample]:
    """All usable samples of ``split`` ("train" or "test") over the config's categories.

    A sketch without its photo, or a photo without a caption or a sketch, is reported through
    ``warn`` and skipped; a missing folder or a malformed text file is an error.
    """
    warn = warn or (lambda msg: print(f"warning: {msg}", file=sys.stderr))
    root = cfg.resolve(cfg.data.root)
    samples = []
    for category, spec in cfg.data.categories.items():
        photos_dir = root / getattr(spec, f"{split}_images")
        sketches_dir = root / getattr(spec, f"{split}_sketches")
        captions = _read_captions(root / getattr(spec, f"{split}_text"))
        photos = {p.stem: p for p in _images_in(photos_dir)}
        sketches: dict[str, list[str]] = {}
        for s in _images_in(sketches_dir):
            stem, _, idx = s.stem.rpartition("_")
            if not stem or not idx.isdigit():
                warn(f"{s}: sketch name is not <photo>_<N>; skipped")
            elif stem not in photos:
                warn(f"{s}: sketch has no photo {stem}.* in {photos_dir}; skipped")
            else:
                sketches.setdefault(stem, []).append(os.path.relpath(s, root))
        for stem, photo in photos.items():
            if stem not in captions:
                warn(f"{photo}: no caption in {getattr(spec, f'{split}_text')}; skipped")
            elif stem not in sketches:
                warn(f"{photo}: no sketch in {sketches_dir}; skipped")
            else:
                samples.append(Sample(category, stem, os.path.relpath(photo, root), captions[stem],
                                      sketches[stem]))
    return samples


def _cheap_features(root: Path, samples: list[Sample]) -> np.ndarray:
    """Colour layout (an 8x8 thumbnail) + hashed caption words: enough to cluster look-alikes."""
    feats = np.zeros((len(samples), 8 * 8 * 3 + 64), np.float32)
    for i, s in enumerate(samples):
        try:
            thumb = open_image(root / s.image, 3).resize((8, 8), Image.Resampling.BOX)
        except ImageDecodeError as exc:
            raise DataError(str(exc)) from None
        feats[i, :192] = np.asarray(thumb, np.float32).ravel() / 255.0
        for w in s.text.lower().split():
            feats[i, 192 + zlib.crc32(w.encode()) % 64] += 1.0
    return feats


def kmeans(x: np.ndarray, k: int, seed: int, iters: int = 20) -> np.ndarray:
    """Plain Lloyd's k-means with a seeded init; deterministic for a seed."""
    k = max(1, min(k, len(x)))
    rng = np.random.default_rng(seed)
    centres = x[rng.choice(len(x), k, replace=False)]
    labels = np.zeros(len(x), np.int64)
    for _ in range(iters):
        d = (centres ** 2).sum(1)[None] - 2 * x @ centres.T  # squared distance, less |x|^2
        labels = d.argmin(1)
        for j in range(k):
            if np.any(labels == j):
                centres[j] = x[labels == j].mean(0)
    return labels


def _rows(samples: list[Sample], clusters: np.ndarray, k: int, rng: np.random.Generator) -> list[dict]:
    by_group: dict[tuple, list[int]] = {}
    for i, s in enumerate(samples):
        by_group.setdefault(("c", s.category), []).append(i)
        by_group.setdefault(("v", int(clusters[i])), []).append(i)
    rows = []
    for i, s in enumerate(samples):
        hard = sorted((set(by_group[("c", s.category)]) | set(by_group[("v", int(clusters[i]))])) - {i})
        picks = list(rng.permutation(hard)[:k]) if hard else []
        if len(picks) < k:  # too few look-alikes: fill from anywhere else
            rest = [j for j in range(len(samples)) if j != i and j not in picks]
            picks += list(rng.permutation(rest)[: k - len(picks)]) if rest else []
        negs = [samples[j] for j in picks]
        rows.append({
            "id": s.id,
            "category": s.category,
            "image": s.image,
            "text": s.text,
            "positive_sketches": s.sketches,
            "negative_sketches": [n.sketches[int(rng.integers(len(n.sketches)))] for n in negs],
            "negative_images": [n.image for n in negs],
            "negative_texts": [n.text for n in negs],
            "virtual_class": f"cluster_{int(clusters[i]):02d}",
        })
    return rows


def manifest_paths(cfg: Config) -> dict[str, Path]:
    return {split: cfg.manifest_dir / f"{split}.jsonl" for split in SPLITS}


def build_manifests(cfg: Config, seed: int | None = None, warn=None) -> dict[str, Path]:
    """Write ``train|val|test.jsonl`` under ``output_dir/manifests``; returns their paths."""
    seed = cfg.data.manifest_seed if seed is None else seed
    root = cfg.resolve(cfg.data.root)
    if not cfg.data.categories:
        raise DataError(f"{cfg.source or 'config'}: data.categories is empty")
    rng = np.random.default_rng(seed)
    train = read_split(cfg, "train", warn)
    test = read_split(cfg, "test", warn)
    if not train:
        raise DataError(f"{root}: no usable training samples")
    order = rng.permutation(len(train))
    n_val = int(round(len(train) * cfg.data.val_fraction))
    if cfg.data.val_fraction > 0:
        n_val = max(n_val, 1)
    splits = {"val": [train[i] for i in sorted(order[:n_val])],
              "train": [train[i] for i in sorted(order[n_val:])],
              "test": test}
    # Virtual classes are fitted on all samples together so labels mean the same in every split.
    everything = splits["train"] + splits["val"] + splits["test"]
    clusters = kmeans(_cheap_features(root, everything), cfg.data.virtual_classes, seed)
    paths = manifest_paths(cfg)
    paths["train"].parent.mkdir(parents=True, exist_ok=True)
    start = 0
    for split in ("train", "val", "test"):
        part = splits[split]
        rows = _rows(part, clusters[start:start + len(part)], cfg.data.negatives_per_modality, rng)
        start += len(part)
        atomic_write_text(paths[split], "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return paths


def read_manifest_rows(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: manifest not found")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise DataError(f"{path}:{n}: not a JSON line") from None
    return rows


def check_files(rows: list[dict], root: Path, manifest: Path) -> None:
    """Fail early, naming the file, when a manifest points at something that is not there."""
    for r in rows:
        for p in [r["image"], *r["positive_sketches"], *r["negative_sketches"], *r["negative_images"]]:
            if not (root / p).is_file():
                raise DataError(f"{manifest}: row {r['id']} points at missing file {root / p}")
