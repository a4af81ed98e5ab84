"""The staged training loop, in reading order: setup, data, model, then for each stage an
optimiser, epochs of steps, validation and checkpoints.

Stages are data (``training.stages`` in the config): each names the branch that learns
(``sketch``, ``image``, ``text`` or ``all``) and its own epochs / lr / weight decay. Only rank 0
writes (checkpoints, the JSONL log); with ``torchrun`` every process trains on its shard and
gradients are averaged across processes before each step.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler
from tqdm import tqdm

from models import build_model, load_model, read_checkpoint, save_checkpoint
from stbir_train import losses as L
from stbir_train.config import Config, ConfigError
from stbir_train.data import ImageCache, SBIRDataset
from stbir_train.evaluate import evaluate_rows
from stbir_train.manifest import build_manifests, check_files, manifest_paths, read_manifest
from stbir_train.noise import NoiseSchedule


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss, a resume that does not fit the config...)."""


def label_names(cfg: Config) -> list[str]:
    if cfg.loss.arcface_labels == "category":
        return list(cfg.data.categories)
    return [f"cluster_{i:02d}" for i in range(cfg.data.virtual_classes)]


def row_labels(cfg: Config, rows: list[dict]) -> list[int]:
    index = {name: i for i, name in enumerate(label_names(cfg))}
    key = "category" if cfg.loss.arcface_labels == "category" else "virtual_class"
    return [index[r[key]] for r in rows]


def lr_factor(step: int, total: int) -> float:
    """Linear warm-up over the first 5% of a stage's steps, then cosine down to 10%."""
    warm = max(1, int(0.05 * total))
    if step < warm:
        return (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def _encode(fn, x: torch.Tensor, trainable: bool) -> torch.Tensor:
    """Run a branch; a frozen one runs without building a graph (it is an anchor)."""
    if trainable:
        return fn(x)
    with torch.no_grad():
        return fn(x)


def step_losses(model, batch: dict, cfg: Config, target: str) -> dict[str, torch.Tensor]:
    """The weighted loss terms of one batch for a stage whose learning branch is ``target``."""
    learns = {b: target in (b, "all") for b in ("sketch", "image", "text")}
    w = cfg.loss.weights
    s = _encode(model.encode_sketch, batch["sketch"], learns["sketch"])
    i = _encode(model.encode_image, batch["image"], learns["image"])
    t = _encode(model.encode_text, batch["tokens"], learns["text"])
    q = model.fuse(s, t)
    out = {}
    neg_i = neg_q = None
    if "neg_images" in batch:
        b, k = batch["neg_images"].shape[:2]
        neg_i = _encode(model.encode_image, batch["neg_images"].flatten(0, 1), learns["image"])
        neg_s = _encode(model.encode_sketch, batch["neg_sketches"].flatten(0, 1), learns["sketch"])
        neg_t = _encode(model.encode_text, batch["neg_tokens"].flatten(0, 1), learns["text"])
        neg_q = model.fuse(neg_s, neg_t).view(b, k, -1)
        neg_i = neg_i.view(b, k, -1)
    if w.infonce:
        out["infonce"] = L.info_nce(q, i, cfg.loss.temperature,
                                    None if neg_i is None else neg_i.flatten(0, 1))
    if w.triplet:
        if neg_i is None:  # no manifest negatives loaded: the other items of the batch
            neg_i, neg_q = L.in_batch_negatives(i), L.in_batch_negatives(q)
        out["triplet"] = (L.cosine_triplet(q, i, neg_i, cfg.loss.triplet_margin)
                          + L.cosine_triplet(i, q, neg_q, cfg.loss.triplet_margin)) / 2
    if w.fusion and (learns["image"] or learns["sketch"]):
        n = cfg.loss.fusion_items or len(i)  # the mosaic costs one more image pass: cap it
        specs = model.input_specs()
        mosaic = L.fuse_quad(batch["image"][:n], batch["sketch"][:n], specs["image"], specs["sketch"])
        f = _encode(model.encode_image, mosaic, learns["image"])
        out["fusion"] = L.fusion_consistency(f, i[:n], s[:n])
    if w.arcface and model.arcface is not None:
        y = batch["label"]
        out["arcface"] = (L.arcface_loss(model.arcface.logits(q, y), y)
                          + L.arcface_loss(model.arcface.logits(i, y), y)) / 2
    return out


def total_loss(terms: dict[str, torch.Tensor], cfg: Config) -> torch.Tensor:
    return sum(getattr(cfg.loss.weights, k) * v for k, v in terms.items())


def _setup_distributed() -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank() if world > 1 else 0
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def _to(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def train(cfg: Config, only_stage: str | None = None, resume: str | Path | None = None,
          stop_after_epochs: int | None = None, log=print) -> dict:
    """Run the config's stages; returns a summary (best metric, checkpoint paths).

    ``only_stage`` runs just the stages with that target; ``resume`` continues from a checkpoint
    written by this loop; ``stop_after_epochs`` ends this invocation early after that many epochs
    (the run can be resumed from ``last.pt``).
    """
    # -- setup ---------------------------------------------------------------------------------
    rank, world, device = _setup_distributed()
    if cfg.training.device == "cpu":
        device = torch.device("cpu")
    elif cfg.training.device == "cuda" and device.type != "cuda":
        raise TrainingError("training.device is cuda but no CUDA device is available")
    is_main = rank == 0
    say = log if is_main else (lambda *a, **k: None)
    torch.manual_seed(cfg.training.seed)
    out = cfg.out
    ckpt_dir = out / "checkpoints"
    log_path = out / "train_log.jsonl"

    # -- data ----------------------------------------------------------------------------------
    paths = manifest_paths(cfg)
    if is_main and not all(p.is_file() for p in paths.values()):
        say(f"building manifests in {cfg.manifest_dir}")
        build_manifests(cfg)
    if world > 1:
        dist.barrier()
    root = cfg.resolve(cfg.data.root)
    train_rows, val_rows = read_manifest(paths["train"]), read_manifest(paths["val"])
    check_files(train_rows, root, paths["train"])
    check_files(val_rows, root, paths["val"])

    # -- model ---------------------------------------------------------------------------------
    stages = cfg.training.stages
    if only_stage is not None and all(st.target != only_stage for st in stages):
        raise ConfigError(f"{cfg.source or 'config'}: --stage {only_stage}: training.stages has no "
                          f"such stage (it has {', '.join(st.target for st in stages)})")
    start_stage, start_epoch, best = 0, 0, -1.0
    resume_state = None
    if resume is not None:
        resume_state = read_checkpoint(resume)
        model, _ = load_model(resume)
        if model.spec.arcface_classes != len(label_names(cfg)):
            raise TrainingError(f"{resume}: checkpoint's ArcFace head has {model.spec.arcface_classes} "
                                f"classes, the config {len(label_names(cfg))}")
        start_stage = resume_state.get("stage_index", 0)
        start_epoch = resume_state.get("epoch", 0)
        best = resume_state.get("best", -1.0)
        if start_stage < len(stages) and start_epoch >= stages[start_stage].epochs:
            start_stage, start_epoch = start_stage + 1, 0
        say(f"resuming from {resume}: stage {start_stage}, epoch {start_epoch}")
    else:
        model = build_model(cfg.model.spec(arcface_classes=len(label_names(cfg))))
    model.to(device)
    tokenize = model.tokenizer()
    specs = model.input_specs()
    cache = ImageCache(root)
    train_set = SBIRDataset(train_rows, root, specs, tokenize, row_labels(cfg, train_rows),
                            cfg.data.negatives_per_modality, NoiseSchedule(cfg.data.curriculum_noise),
                            train=True, seed=cfg.training.seed, cache=cache)
    n_params = sum(p.numel() for p in model.parameters())
    say(f"model {model.spec.clip_model} + {model.spec.sketch_backbone}: {n_params / 1e6:.1f}M parameters, "
        f"{model.embed_dim}-d; {len(train_rows)} training items, {len(val_rows)} validation items; "
        f"{world} process(es) on {device}")

    epochs_run = 0
    summary = {"best": best, "best_path": str(ckpt_dir / "best.pt"), "last_path": str(ckpt_dir / "last.pt")}
    for si in range(start_stage, len(stages)):
        st = stages[si]
        if only_stage is not None and st.target != only_stage:
            continue
        model.configure_stage(st.target)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=st.lr, weight_decay=st.weight_decay)
        steps_per_epoch = len(train_set) // (cfg.training.batch_size * world)
        if steps_per_epoch == 0:
            raise TrainingError(f"{len(train_set)} training items are fewer than one batch of "
                                f"{cfg.training.batch_size} x {world} process(es)")
        total_steps = steps_per_epoch * st.epochs
        step_in_stage = 0
        first_epoch = start_epoch if si == start_stage else 0
        if resume_state is not None and si == start_stage and first_epoch > 0:
            optimizer.load_state_dict(resume_state["optimizer"])
            step_in_stage = resume_state.get("step_in_stage", first_epoch * steps_per_epoch)
        amp = cfg.training.amp and device.type == "cuda"
        say(f"stage {si + 1}/{len(stages)}: {st.target} for {st.epochs} epoch(s), lr {st.lr:g}, "
            f"weight decay {st.weight_decay:g}; trainable {sum(p.numel() for p in params) / 1e6:.1f}M")

        for epoch in range(first_epoch, st.epochs):
            t0 = time.time()
            train_set.set_epoch(si, st.target, epoch)
            epoch_seed = cfg.training.seed * 1_000_003 + si * 1009 + epoch
            if world > 1:
                sampler = DistributedSampler(train_set, world, rank, shuffle=True,
                                             seed=cfg.training.seed, drop_last=True)
                sampler.set_epoch(si * 1009 + epoch)
            else:
                sampler = RandomSampler(train_set, generator=torch.Generator().manual_seed(epoch_seed))
            loader = DataLoader(train_set, cfg.training.batch_size, sampler=sampler, drop_last=True,
                                num_workers=cfg.training.num_workers, pin_memory=device.type == "cuda")
            model.train()
            sums: dict[str, float] = {}
            bar = tqdm(loader, total=steps_per_epoch, disable=not is_main or None, leave=False,
                       desc=f"{st.target} {epoch + 1}/{st.epochs}", file=sys.stderr)
            for batch in bar:
                for g in optimizer.param_groups:
                    g["lr"] = st.lr * lr_factor(step_in_stage, total_steps)
                batch = _to(batch, device)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                    terms = step_losses(model, batch, cfg, st.target)
                    loss = total_loss(terms, cfg)
                if not torch.isfinite(loss):
                    raise TrainingError(
                        f"loss became {loss.item()} at stage {st.target}, epoch {epoch + 1}, step "
                        f"{step_in_stage + 1}; stopped without saving. The last good checkpoint is "
                        f"{ckpt_dir / 'last.pt'} (if one was written); lower the learning rate and resume")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if world > 1:
                    for p in params:
                        if p.grad is not None:
                            dist.all_reduce(p.grad)
                            p.grad /= world
                if cfg.training.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, cfg.training.grad_clip)
                optimizer.step()
                step_in_stage += 1
                for k, v in terms.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach())
                sums["total"] = sums.get("total", 0.0) + float(loss.detach())
                if is_main:
                    bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
            bar.close()
            epochs_run += 1

            # -- validation and checkpoints (rank 0) ---------------------------------------------
            if is_main:
                n = max(steps_per_epoch, 1)
                val = evaluate_rows(model, val_rows, cache, device=device) if val_rows else None
                score = val["modes"]["sketch+text"]["overall"]["R@1"] if val else -epoch
                record = {"stage": si, "target": st.target, "epoch": epoch + 1,
                          "losses": {k: v / n for k, v in sums.items()},
                          "lr": optimizer.param_groups[0]["lr"], "seconds": round(time.time() - t0, 2),
                          "val": {m: val["modes"][m]["overall"] for m in val["modes"]} if val else None}
                state = dict(config=cfg.to_dict(), optimizer=optimizer.state_dict(), stage_index=si,
                             epoch=epoch + 1, step_in_stage=step_in_stage, metrics=record)
                improved = score > best
                best = max(best, score)
                save_checkpoint(ckpt_dir / "last.pt", model, best=best, **state)
                if improved:
                    save_checkpoint(ckpt_dir / "best.pt", model, best=best, **state)
                log_path.parent.mkdir(parents=True, exist_ok=True)
                with open(log_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(record) + "\n")
                v = record["val"] or {}
                say(f"  {st.target} epoch {epoch + 1}/{st.epochs}: loss {record['losses']['total']:.4f}"
                    + "".join(f", val {m} R@1 {v[m]['R@1']:.3f}" for m in v)
                    + f" ({record['seconds']:.0f}s){' *best*' if improved else ''}")
            if world > 1:
                dist.barrier()
            if stop_after_epochs is not None and epochs_run >= stop_after_epochs:
                summary["best"] = best
                return summary
    summary["best"] = best
    return summary
