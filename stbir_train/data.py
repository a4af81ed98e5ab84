"""Manifest rows -> tensors: the positive sketch/photo/caption and a fixed number of negatives.

Like the seed's ``SBIRDataset``, every item brings ``negatives_per_modality`` negative sketches,
photos and captions from the manifest, so every batch holds hard negatives. Decoded images are
kept in memory (the built-in dataset is small; decoding is the slow part on two cores), and every
random choice draws from a generator seeded by (seed, stage, epoch, index), so a resumed run sees
exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from stbir_infer.preprocess import ImageDecodeError, open_image, preprocess
from stbir_train.manifest import DataError
from stbir_train.noise import NoiseSchedule, corrupt_photo, corrupt_sketch


class ImageCache:
    """Decoded images by path, filled once; a file that does not decode is an error naming it."""

    def __init__(self, root: Path):
        self.root = root
        self._images: dict[tuple[str, int], Image.Image] = {}

    def get(self, rel: str, channels: int) -> Image.Image:
        key = (rel, channels)
        img = self._images.get(key)
        if img is None:
            try:
                img = open_image(self.root / rel, channels)
            except ImageDecodeError as exc:
                raise DataError(str(exc)) from None
            self._images[key] = img
        return img


class SBIRDataset(Dataset):
    def __init__(self, rows: list[dict], root: Path, specs: dict[str, dict], tokenize,
                 labels: list[int], negatives: int, noise: NoiseSchedule | None = None,
                 train: bool = True, seed: int = 0, cache: ImageCache | None = None,
                 modality_dropout: float = 0.0):
        self.rows = rows
        self.specs = specs
        self.labels = labels
        self.negatives = negatives
        self.noise = noise
        self.train = train
        self.seed = seed
        self.modality_dropout = modality_dropout if train else 0.0
        self.cache = cache or ImageCache(root)
        self.tokens = tokenize([r["text"] for r in rows])
        self.neg_tokens = (tokenize([t for r in rows for t in r["negative_texts"]])
                           if negatives else None)
        self._neg_offsets = np.cumsum([0] + [len(r["negative_texts"]) for r in rows])
        self.stage_index, self.target, self.epoch, self.seen = 0, "all", 0, 0
        # Per item, the frozen image and text towers' vectors, when a stage computed them once
        # (train.frozen_anchors); the photo is then not decoded at all.
        self.anchors: dict[str, torch.Tensor] | None = None
        if negatives and any(len(r["negative_images"]) < negatives for r in rows):
            raise DataError("manifest has fewer negatives per row than data.negatives_per_modality; "
                            "rebuild it with `stbir-train manifest`")

    def set_epoch(self, stage_index: int, target: str, epoch: int, seen: int = 0) -> None:
        """Where the stage is: its epoch (the items' random draws) and the training samples it
        has shown so far (the curriculum's noise level)."""
        self.stage_index, self.target, self.epoch, self.seen = stage_index, target, epoch, seen

    def __len__(self) -> int:
        return len(self.rows)

    def _pixels(self, rel: str, modality: str, rng, noisy: bool) -> torch.Tensor:
        """Decode (cached), corrupt per the curriculum when training, preprocess.
        ``modality`` is "photo" or "sketch"."""
        spec = self.specs["image" if modality == "photo" else "sketch"]
        img = self.cache.get(rel, spec["channels"])
        if noisy and self.noise is not None:
            prob, strength = self.noise.params(self.target, self.epoch, modality, self.seen)
            if rng.random() < prob:
                img = (corrupt_photo if modality == "photo" else corrupt_sketch)(img, strength, rng)
        return torch.from_numpy(preprocess(img, spec))

    def clean_photo(self, i: int) -> torch.Tensor:
        """Item ``i``'s photo, preprocessed and never corrupted."""
        return self._pixels(self.rows[i]["image"], "photo", None, noisy=False)

    def item_rng(self, i: int) -> np.random.Generator:
        """Item ``i``'s random draws this epoch (the same in any worker process)."""
        return np.random.default_rng([self.seed, self.stage_index, self.epoch, i])

    def pick_sketch(self, i: int, rng: np.random.Generator) -> int:
        """Which positive sketch item ``i`` shows: the first draw of ``rng`` when training."""
        return int(rng.integers(len(self.rows[i]["positive_sketches"]))) if self.train else 0

    def __getitem__(self, i: int) -> dict:
        row = self.rows[i]
        rng = self.item_rng(i)
        noisy = self.train
        sketch = row["positive_sketches"][self.pick_sketch(i, rng)]
        item = {"sketch": self._pixels(sketch, "sketch", rng, noisy),
                "tokens": self.tokens[i], "label": torch.tensor(self.labels[i])}
        if self.anchors is not None:
            item["image_vec"], item["text_vec"] = self.anchors["image"][i], self.anchors["text"][i]
        else:
            item["image"] = self._pixels(row["image"], "photo", rng, noisy)
        if self.modality_dropout:  # 0 keep both, 1 drop the text, 2 drop the sketch
            u = rng.random()
            item["drop"] = torch.tensor(0 if u >= self.modality_dropout
                                        else 1 if u < self.modality_dropout / 2 else 2)
        if self.negatives:
            picks = rng.permutation(len(row["negative_images"]))[: self.negatives]
            item["neg_images"] = torch.stack([self._pixels(row["negative_images"][j], "photo", rng, noisy)
                                              for j in picks])
            item["neg_sketches"] = torch.stack([self._pixels(row["negative_sketches"][j], "sketch", rng, noisy)
                                                for j in picks])
            item["neg_tokens"] = self.neg_tokens[self._neg_offsets[i] + torch.from_numpy(picks)]
        return item
