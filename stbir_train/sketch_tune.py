"""`stbir-train sketch-tune --config TUNE.yaml`: fine-tune only the sketch tower of a checkpoint.

Two kinds of pairs, mixed in every batch:

- pseudo: a sketchify data folder's training sketches (``<category>/trainA/<stem>_<k>.png``)
  with their photos (``trainB``). Each sketch learns towards its photo's image vector (the
  frozen image tower, computed once: the text keeps meeting the photo as before) and towards
  the sketch tower's own vector of the photo's edge-gallery drawing
  (``stbir_infer.edges.gallery_sketch``, what the runtime encodes at enroll), so a sketch and
  the pseudo-sketch of its photo meet;
- real (``real_sketches``, optional): human sketch/photo pairs in the Sketchy layout
  (``stbir_train.sketch_pairs``), a share ``weight`` of every batch, each sketch re-drawn with
  the canvas pen and jittered (``augment``); the same two targets.

The loss is ``loss.image`` x InfoNCE(sketch, image) + ``loss.edge`` x InfoNCE(sketch, edge) +
``loss.drawing`` x InfoNCE of the two drawings' descriptors (``SketchEncoder.with_drawing``: what
the edge gallery compares a drawn query with).
The result is a checkpoint like the input's (``stbir-export`` takes it), with ``sketch_tune``
recording this config. Keys (relative paths resolve against the config's folder)::

    checkpoint: runs/real8k/data/runs/checkpoints/best.pt
    out: runs/tuned.pt
    data: runs/real8k/data/photos        # a sketchify category folder (trainA, trainB)
    limit: 0                             # 0: every training photo, else the first N by name
    steps: 100
    batch_size: 48
    lr: 0.0002
    seed: 0
    loss: {image: 1.0, edge: 0.5, drawing: 0.0}
    real_sketches:                       # optional
      root: ../shared/data/sketchy-dev25
      weight: 0.25                       # share of each batch
      classes: null                      # or a list: only these; exclude: a list to leave out
      exclude: []
      augment: {drop: 0.1, rotate: 8, elastic: 2}
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml

from stbir_infer.edges import gallery_sketch
from stbir_infer.preprocess import ImageDecodeError, open_image, preprocess
from stbir_train.errors import ConfigError, DataError
from stbir_train.losses import info_nce
from stbir_train.sketch_pairs import SketchPairs, augment, read_pairs


@dataclass
class RealSketches:
    root: str
    weight: float = 0.25
    classes: list[str] | None = None
    exclude: list[str] = field(default_factory=list)
    augment: dict = field(default_factory=lambda: {"drop": 0.1, "rotate": 8.0, "elastic": 2.0})


@dataclass
class TuneConfig:
    checkpoint: str
    out: str
    data: str
    limit: int = 0
    steps: int = 100
    batch_size: int = 48
    lr: float = 2e-4
    seed: int = 0
    temperature: float = 0.07
    loss: dict = field(default_factory=lambda: {"image": 1.0, "edge": 0.5})
    real_sketches: RealSketches | None = None
    base: str = "."  # the config's folder

    def path(self, p: str) -> Path:
        q = Path(p).expanduser()
        return q if q.is_absolute() else Path(self.base) / q


def tune_config(data: dict, source: str = "<dict>", base: str | Path = ".") -> TuneConfig:
    """A TuneConfig from a parsed YAML mapping; a missing, unknown or out-of-range key is one
    ConfigError naming ``source`` and the key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of keys")
    data = dict(data)
    real = data.pop("real_sketches", None)
    known = set(TuneConfig.__dataclass_fields__) - {"real_sketches", "base"}
    for k in data:
        if k not in known:
            raise ConfigError(f"{source}: unknown key {k!r} (known: {', '.join(sorted(known))})")
    for k in ("checkpoint", "out", "data"):
        if not isinstance(data.get(k), str) or not data[k]:
            raise ConfigError(f"{source}: {k} must name a file or folder")
    cfg = TuneConfig(**data, base=str(base))
    if real is not None:
        if not isinstance(real, dict) or not isinstance(real.get("root"), str):
            raise ConfigError(f"{source}: real_sketches needs root: a folder of sketch/photo pairs")
        bad = set(real) - set(RealSketches.__dataclass_fields__)
        if bad:
            raise ConfigError(f"{source}: real_sketches: unknown key {sorted(bad)[0]!r}")
        cfg.real_sketches = RealSketches(**real)
        if not 0 < cfg.real_sketches.weight < 1:
            raise ConfigError(f"{source}: real_sketches.weight must be between 0 and 1 (a share "
                              "of each batch)")
        if set(cfg.real_sketches.augment) - {"drop", "rotate", "elastic"}:
            raise ConfigError(f"{source}: real_sketches.augment takes drop, rotate, elastic")
    if cfg.steps < 1 or cfg.batch_size < 4 or cfg.lr <= 0 or cfg.limit < 0:
        raise ConfigError(f"{source}: needs steps >= 1, batch_size >= 4, lr > 0, limit >= 0")
    if set(cfg.loss) - {"image", "edge", "drawing"} or not any(cfg.loss.values()):
        raise ConfigError(f"{source}: loss takes image, edge and drawing weights, not all 0")
    return cfg


def load_tune_config(path: str | Path) -> TuneConfig:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read the config ({exc.__class__.__name__})") from None
    return tune_config(data, str(path), path.resolve().parent)


def pseudo_pairs(folder: Path, limit: int) -> SketchPairs:
    """A sketchify category folder's training photos and their sketch variants."""
    photos_dir, sketch_dir = folder / "trainB", folder / "trainA"
    if not photos_dir.is_dir() or not sketch_dir.is_dir():
        raise DataError(f"{folder}: expected a sketchify category folder (trainA, trainB)")
    variants: dict[str, list[Path]] = {}
    for s in sorted(sketch_dir.glob("*.png")):
        variants.setdefault(s.stem.rpartition("_")[0], []).append(s)
    photos = [p for p in sorted(photos_dir.iterdir()) if variants.get(p.stem)][: limit or None]
    if not photos:
        raise DataError(f"{folder}: no training photo with a sketch")
    return SketchPairs(photos, ["pseudo"] * len(photos), [variants[p.stem] for p in photos])


def _open(path: Path, channels: int):
    try:
        return open_image(path, channels)
    except ImageDecodeError as exc:
        raise DataError(str(exc)) from None


@torch.no_grad()
def targets(model, pairs: SketchPairs, batch: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Per photo: its image vector (frozen image tower) and its edge drawing, preprocessed for
    the sketch tower (its vector changes as the tower learns)."""
    specs = model.input_specs()
    image, edge = [], []
    for i in range(0, len(pairs), batch):
        imgs = [_open(p, 3) for p in pairs.photos[i:i + batch]]
        x = torch.from_numpy(np.stack([preprocess(im, specs["image"]) for im in imgs]))
        image.append(model.encode_image(x))
        edge.extend(torch.from_numpy(preprocess(gallery_sketch(im), specs["sketch"])) for im in imgs)
    return torch.cat(image), torch.stack(edge)


def tune(cfg: TuneConfig, log=print, cache: dict | None = None) -> dict:
    """Fine-tune, write ``cfg.out``; returns the mean losses of the first and last tenth of
    the steps and the seconds taken. ``cache``: a dict kept between calls on the same
    checkpoint and data (a k-fold), so the pseudo pairs' targets are computed once."""
    from models import load_model, save_checkpoint

    t0 = time.time()
    torch.manual_seed(cfg.seed)
    model, ckpt = load_model(cfg.path(cfg.checkpoint))
    model.eval()
    specs = model.input_specs()
    cache = {} if cache is None else cache
    key = (str(cfg.path(cfg.checkpoint)), str(cfg.path(cfg.data)), cfg.limit)
    if key not in cache:
        pairs = pseudo_pairs(cfg.path(cfg.data), cfg.limit)
        cache[key] = pairs, targets(model, pairs)
    pools, prepared = {"pseudo": cache[key][0]}, {"pseudo": cache[key][1]}
    real = cfg.real_sketches
    if real is not None:  # targets of the whole folder once; each fold takes its classes
        pools["real"] = read_pairs(cfg.path(real.root), real.classes, real.exclude)
        key = (str(cfg.path(cfg.checkpoint)), str(cfg.path(real.root)))
        if key not in cache:
            every = read_pairs(cfg.path(real.root))
            cache[key] = {p: i for i, p in enumerate(every.photos)}, targets(model, every)
        where, (image, edge) = cache[key]
        rows = [where[p] for p in pools["real"].photos]
        prepared["real"] = image[rows], edge[rows]
    n_real = 0 if real is None else max(1, round(real.weight * cfg.batch_size))
    share = {"pseudo": cfg.batch_size - n_real, "real": n_real}
    for k, pairs in pools.items():
        if len(pairs) < share[k]:
            raise DataError(f"{k} pairs: {len(pairs)} photos are fewer than their {share[k]} of "
                            f"a batch of {cfg.batch_size}")
    log(f"sketch-tune: {len(pools['pseudo'])} pseudo pairs"
        + (f", {len(pools['real'])} real photos ({share['real']} of every {cfg.batch_size})"
           if real else "") + f"; targets in {time.time() - t0:.0f}s")
    model.configure_stage("sketch")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(model.param_groups(cfg.lr), lr=cfg.lr, weight_decay=0.05)
    model.train()
    rng = np.random.default_rng(cfg.seed)
    losses = []
    for step in range(cfg.steps):
        for g in opt.param_groups:  # cosine to 10% over the run
            g["lr"] = cfg.lr * g.get("lr_scale", 1.0) * (0.55 + 0.45 * np.cos(np.pi * step / cfg.steps))
        sk, img, edge = [], [], []
        for k, pairs in pools.items():
            for i in rng.choice(len(pairs), share[k], replace=False):  # one sketch per photo
                s = _open(pairs.sketches[i][rng.integers(len(pairs.sketches[i]))], 1)
                if k == "real":
                    s = augment(s, rng, **real.augment)
                sk.append(torch.from_numpy(preprocess(s, specs["sketch"])))
                img.append(prepared[k][0][i])
                edge.append(prepared[k][1][i])
        s_vec, s_draw = model.encode_sketch_graph(torch.stack(sk))
        loss = cfg.loss.get("image", 0) * info_nce(s_vec, torch.stack(img), cfg.temperature)
        if cfg.loss.get("edge", 0) or cfg.loss.get("drawing", 0):
            e_vec, e_draw = model.encode_sketch_graph(torch.stack(edge))
            loss = loss + cfg.loss.get("edge", 0) * info_nce(s_vec, e_vec, cfg.temperature)
            loss = loss + cfg.loss.get("drawing", 0) * info_nce(s_draw, e_draw, cfg.temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        if (step + 1) % max(1, cfg.steps // 5) == 0:
            log(f"  step {step + 1}/{cfg.steps}: loss {np.mean(losses[-10:]):.3f}")
    model.eval()
    keep = {k: v for k, v in ckpt.items()
            if k not in ("format", "format_version", "model_spec", "model", "text_model_files",
                         "optimizer")}
    # the checkpoint tuned from, absolute: its run folder is where the recorded training config's
    # relative paths start (stbir-export --calibration auto finds the training data through it)
    record = {**asdict(cfg), "base": None, "checkpoint": str(cfg.path(cfg.checkpoint).resolve())}
    out = save_checkpoint(cfg.path(cfg.out), model, **keep, sketch_tune=record)
    tenth = max(1, cfg.steps // 10)
    summary = {"first_loss": float(np.mean(losses[:tenth])), "last_loss": float(np.mean(losses[-tenth:])),
               "seconds": round(time.time() - t0, 1), "out": str(out)}
    log(f"sketch-tune: wrote {out} in {summary['seconds']:.0f}s (loss {summary['first_loss']:.3f} "
        f"-> {summary['last_loss']:.3f})")
    return summary
