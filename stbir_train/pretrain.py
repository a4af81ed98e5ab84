"""`stbir-train pretrain` (seed 003): CLIP-style symmetric contrastive training of the open_clip
image and text towers on photo-caption pairs, before the sketch tower is trained against them.

Writes under ``OUTPUT_DIR/<pretrain.output>/``:

- ``clip.pt``: the open_clip model's plain state dict, which ``open_clip.create_model(arch,
  pretrained=FILE)`` loads as it is, and ``model.pretrained`` of a training config takes;
- ``last.pt``: the same plus optimiser and epoch, for ``--resume``;
- ``results.json``: image->text and text->image R@1/5/10 on the held-out photos, per epoch.

Every write is atomic: an interrupted run keeps the files of its last finished epoch. Held-out
photos are never trained on; each epoch shows every training photo once, with one of its
captions (drawn per epoch from the seed), so a batch never holds one photo twice.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from models import build_model
from models.checkpoint import load_tensors
from models.errors import CheckpointError
from models.frozen import image_split, text_split
from stbir_infer.contract import atomic_write, atomic_write_text
from stbir_infer.preprocess import preprocess
from stbir_train import losses as L
from stbir_train.captions import Pairs, decode_all, read_csv_pairs, read_layout_pairs
from stbir_train.config import Config
from stbir_train.errors import TrainingError
from stbir_train.loop import lr_factor

FORMAT = "stbir-pretrain"
KS = (1, 5, 10)


def load_pairs(cfg: Config) -> Pairs:
    pt = cfg.pretrain
    if pt.captions:
        return read_csv_pairs(cfg.resolve(pt.captions), cfg.resolve(pt.images))
    return read_layout_pairs(cfg)


def split_photos(n: int, holdout: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(training photo indices, held-out photo indices), fixed by the seed."""
    perm = np.random.default_rng([seed, 7]).permutation(n)
    k = min(max(1, round(holdout * n)), n - 2)
    return np.sort(perm[k:]), np.sort(perm[:k])


class CachedTowers:
    """Photo and caption indices -> embeddings for the pretrain loop. A tower's locked part
    (``models.frozen``) runs once per photo or caption, here, and each step runs only what
    learns: with the real-photo recipe's locked sentence encoder and the top image layers
    learning, an epoch costs seconds instead of minutes."""

    def __init__(self, model, pixels: torch.Tensor, tokens: torch.Tensor, log, batch: int = 256):
        self.model, self.pixels, self.tokens = model, pixels, tokens
        self.image_cache = self.text_cache = None
        t0 = time.time()
        image, text = image_split(model), text_split(model)
        if image is not None:
            prefix, self.image_rest = image
            with torch.no_grad():
                self.image_cache = torch.cat([prefix(pixels[i:i + batch])
                                              for i in range(0, len(pixels), batch)])
        if text is not None:
            features, self.text_rest = text
            # Batches of similar length: each is cut to its longest caption (models.hf_text).
            order = torch.argsort((tokens != model.clip.text.config.pad_token_id).sum(1))
            out = torch.cat([features(tokens[order[i:i + batch]]) for i in range(0, len(order), batch)])
            self.text_cache = torch.empty_like(out)
            self.text_cache[order] = out
        if image is not None or text is not None:
            log(f"locked layers computed once: {'image' if image else ''}"
                f"{' and ' if image and text else ''}{'text' if text else ''} "
                f"({time.time() - t0:.0f}s)")

    def image(self, ids) -> torch.Tensor:
        if self.image_cache is not None:
            return self.image_rest(self.image_cache[ids])
        return self.model.encode_image(self.pixels[ids])

    def text(self, ids) -> torch.Tensor:
        if self.text_cache is not None:
            return self.text_rest(self.text_cache[ids])
        return self.model.encode_text(self.tokens[ids])


@torch.no_grad()
def retrieval(model, enc: CachedTowers, photos: np.ndarray, captions: np.ndarray, owner: np.ndarray,
              batch: int = 256) -> dict:
    """image->text (a photo is found when any of its captions ranks within k) and text->image
    R@k over the photos and captions of those indices, caption c's photo being ``owner[c]``
    (an index into ``photos``)."""
    was = model.training
    model.eval()
    img = torch.cat([enc.image(photos[i:i + batch]) for i in range(0, len(photos), batch)])
    txt = torch.cat([enc.text(captions[i:i + batch]) for i in range(0, len(captions), batch)])
    model.train(was)
    sim = (txt @ img.T).numpy()  # [C, P]
    t_rank = (sim > sim[np.arange(len(owner)), owner][:, None]).sum(1)  # 0 = first
    best_of_photo = np.full(len(photos), np.inf)
    sim_it = sim.T  # [P, C]: rank of each caption for its photo; keep the best per photo
    for c, p in enumerate(owner.tolist()):
        r = (sim_it[p] > sim_it[p, c]).sum()
        best_of_photo[p] = min(best_of_photo[p], r)
    return {"image_to_text": {f"R@{k}": float((best_of_photo < k).mean()) for k in KS},
           "text_to_image": {f"R@{k}": float((t_rank < k).mean()) for k in KS},
           "photos": int(len(photos)), "captions": int(len(captions))}


def pretrain(cfg: Config, resume: str | Path | None = None, log=print) -> dict:
    pt = cfg.pretrain
    torch.manual_seed(pt.seed)
    out_dir = cfg.out / pt.output
    pairs = load_pairs(cfg)
    images = decode_all(pairs)
    model = build_model(cfg.model.spec(arcface_classes=0))
    if cfg.model.init_from:
        raise TrainingError("model.init_from is for training runs; pretrain starts from "
                            "model.pretrained (e.g. a previous clip.pt)")
    spec = model.input_specs()["image"]
    pixels = torch.from_numpy(np.stack([preprocess(im, spec) for im in images]))
    tokens = model.tokenizer()(pairs.captions)
    owner = np.array(pairs.owner)
    train_ids, held_ids = split_photos(len(pairs.photos), pt.holdout, pt.seed)
    caps_of = [[] for _ in pairs.photos]
    for c, p in enumerate(pairs.owner):
        caps_of[p].append(c)
    held_caps = np.array([c for p in held_ids for c in caps_of[p]])
    remap = {int(p): i for i, p in enumerate(held_ids)}
    held_owner = np.array([remap[int(owner[c])] for c in held_caps])
    steps = len(train_ids) // pt.batch_size
    if steps == 0:
        raise TrainingError(f"{len(train_ids)} training photos are fewer than one batch of "
                            f"{pt.batch_size} (pretrain.batch_size)")
    model.configure_stage("all")  # what of the image and text towers learns: model.*_unlocked_layers
    model.sketch.requires_grad_(False)
    groups = model.param_groups(pt.lr)
    params = [p for g in groups for p in g["params"]]
    opt = torch.optim.AdamW(groups, lr=pt.lr, weight_decay=pt.weight_decay)
    enc = CachedTowers(model, pixels, tokens, log)
    start, history = 0, []
    if resume is not None:
        state = _read_state(Path(resume))
        model.clip.load_state_dict(state["clip"])
        opt.load_state_dict(state["optimizer"])
        start, history = int(state["epoch"]), list(json.loads(state["history"]))
        log(f"resuming pretraining from {resume}: epoch {start}")
    n_params = sum(p.numel() for p in params)
    log(f"pretrain {model.spec.clip_model}: {n_params / 1e6:.1f}M parameters; "
        f"{len(train_ids)} training photos ({sum(len(caps_of[p]) for p in train_ids)} pairs), "
        f"{len(held_ids)} held out ({len(held_caps)} captions); {pt.epochs} epoch(s)")
    t_total = sum(h["seconds"] for h in history)
    for epoch in range(start, pt.epochs):
        t0 = time.time()
        rng = np.random.default_rng([pt.seed, epoch])
        order = rng.permutation(train_ids)
        model.train()
        total = 0.0
        bar = tqdm(range(steps), leave=False, desc=f"pretrain {epoch + 1}/{pt.epochs}",
                   file=sys.stderr)
        for b in bar:
            for g in opt.param_groups:
                g["lr"] = pt.lr * g.get("lr_scale", 1.0) * lr_factor(epoch * steps + b,
                                                                    pt.epochs * steps)
            ids = order[b * pt.batch_size:(b + 1) * pt.batch_size]
            caps = [caps_of[p][int(rng.integers(len(caps_of[p])))] for p in ids]
            i = enc.image(ids)
            t = enc.text(caps)
            loss = L.info_nce(t, i, pt.temperature)
            if not torch.isfinite(loss):
                raise TrainingError(f"pretrain loss became {loss.item()} at epoch {epoch + 1}, "
                                    f"step {b + 1}; lower pretrain.lr and resume from last.pt")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            total += float(loss.detach())
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
        bar.close()
        seconds = time.time() - t0
        t_total += seconds
        res = retrieval(model, enc, held_ids, held_caps, held_owner)
        history.append({"epoch": epoch + 1, "loss": total / steps, "seconds": round(seconds, 2),
                        **res})
        _write(out_dir, model, opt, epoch + 1, history, cfg, t_total)
        log(f"  pretrain epoch {epoch + 1}/{pt.epochs}: loss {total / steps:.4f}, held-out "
            f"i->t R@1 {res['image_to_text']['R@1']:.3f} R@10 {res['image_to_text']['R@10']:.3f}, "
            f"t->i R@1 {res['text_to_image']['R@1']:.3f} R@10 {res['text_to_image']['R@10']:.3f} "
            f"({seconds:.0f}s)")
    if not history:  # 0 epochs: the starting weights, measured
        res = retrieval(model, enc, held_ids, held_caps, held_owner)
        history.append({"epoch": 0, "loss": None, "seconds": 0.0, **res})
        _write(out_dir, model, opt, 0, history, cfg, 0.0)
    return {"weights": str(out_dir / "clip.pt"), "results": str(out_dir / "results.json"),
            "last": str(out_dir / "last.pt"), "final": history[-1], "seconds": t_total}


def _write(out_dir: Path, model, opt, epoch: int, history: list, cfg: Config, seconds: float):
    out_dir.mkdir(parents=True, exist_ok=True)
    clip_sd = model.clip.state_dict()
    atomic_write(out_dir / "clip.pt", lambda f: torch.save(clip_sd, f))
    state = {"format": FORMAT, "clip": clip_sd, "optimizer": opt.state_dict(), "epoch": epoch,
             "history": json.dumps(history), "clip_model": model.spec.clip_model}
    atomic_write(out_dir / "last.pt", lambda f: torch.save(state, f))
    results = {"clip_model": model.spec.clip_model, "weights": str(out_dir / "clip.pt"),
               "epochs": epoch, "train_seconds": round(seconds, 1), "config": cfg.to_dict(),
               "final": history[-1], "history": history}
    atomic_write_text(out_dir / "results.json", json.dumps(results, indent=2) + "\n")


def _read_state(path: Path) -> dict:
    state = load_tensors(path, "pretrain checkpoint")
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a `stbir-train pretrain` last.pt")
    return state


__all__ = ["load_pairs", "pretrain", "retrieval", "split_photos"]
