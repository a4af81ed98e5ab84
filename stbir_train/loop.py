"""One training step and a stage's steps.

``step_losses`` is the loss of a batch for a stage (it reads only the ``loss`` config section);
``run_steps`` walks a loader: learning-rate schedule, forward, a finite-loss check, backward,
clipping, the optimiser step, and running sums for the log. ``stage_steps`` and ``StageRun`` are a
stage's schedule in optimiser steps.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from stbir_infer.contract import BRANCHES
from stbir_train import losses as L
from stbir_train.errors import TrainingError


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


def step_losses(model, batch: dict, loss_cfg, target: str,
                extra_terms=None) -> dict[str, torch.Tensor]:
    """The loss terms (unweighted) of one batch for a stage whose learning branch is ``target``;
    ``loss_cfg`` is the config's ``loss`` section (a term with weight 0 is not computed).
    ``extra_terms(batch, vectors)`` adds terms on this step's sketch / image / text / query
    vectors (distillation, ``stbir_train.distill``); their weights are in ``loss_cfg.weights``."""
    learns = {b: target in (b, "all") for b in BRANCHES}
    w = loss_cfg.weights
    s = _encode(model.encode_sketch, batch["sketch"], learns["sketch"])
    # A sketch stage's frozen anchors may come computed once (train.frozen_anchors).
    i = (batch["image_vec"] if "image_vec" in batch else
         _encode(model.encode_image, batch["image"], learns["image"]))
    t = (batch["text_vec"] if "text_vec" in batch else
         _encode(model.encode_text, batch["tokens"], learns["text"]))
    q = model.fuse_for_training(s, t)
    if "drop" in batch:  # modality dropout, drawn by the dataset: 1 = text dropped, 2 = sketch
        d = batch["drop"].view(-1, 1)
        q = torch.where(d == 1, s, torch.where(d == 2, t, q))
    out = {}
    neg_i = neg_q = None
    if "neg_images" in batch:
        b, k = batch["neg_images"].shape[:2]
        neg_i = _encode(model.encode_image, batch["neg_images"].flatten(0, 1), learns["image"])
        neg_s = _encode(model.encode_sketch, batch["neg_sketches"].flatten(0, 1), learns["sketch"])
        neg_t = _encode(model.encode_text, batch["neg_tokens"].flatten(0, 1), learns["text"])
        neg_q = model.fuse_for_training(neg_s, neg_t).view(b, k, -1)
        neg_i = neg_i.view(b, k, -1)
    neg_flat = None if neg_i is None else neg_i.flatten(0, 1)
    if w.infonce:
        out["infonce"] = L.info_nce(q, i, loss_cfg.temperature, neg_flat)
    if w.infonce_sketch:  # single modes as trained queries, not only halves of the fused one
        out["infonce_sketch"] = L.info_nce(s, i, loss_cfg.temperature, neg_flat)
    if w.infonce_text:
        out["infonce_text"] = L.info_nce(t, i, loss_cfg.temperature, neg_flat)
    if w.triplet:
        if neg_i is None:  # no manifest negatives loaded: the other items of the batch
            neg_i, neg_q = L.in_batch_negatives(i), L.in_batch_negatives(q)
        out["triplet"] = (L.cosine_triplet(q, i, neg_i, loss_cfg.triplet_margin)
                          + L.cosine_triplet(i, q, neg_q, loss_cfg.triplet_margin)) / 2
    if w.fusion and (learns["image"] or learns["sketch"]):
        n = loss_cfg.fusion_items or len(i)  # the mosaic costs one more image pass: cap it
        specs = model.input_specs()
        mosaic = L.fuse_quad(batch["image"][:n], batch["sketch"][:n], specs["image"], specs["sketch"])
        f = _encode(model.encode_image, mosaic, learns["image"])
        out["fusion"] = L.fusion_consistency(f, i[:n], s[:n])
    if w.arcface and model.arcface is not None:
        y = batch["label"]
        out["arcface"] = (L.arcface_loss(model.arcface.logits(q, y), y)
                          + L.arcface_loss(model.arcface.logits(i, y), y)) / 2
    if extra_terms is not None:
        out.update(extra_terms(batch, {"sketch": s, "image": i, "text": t, "query": q}))
    return out


def total_loss(terms: dict[str, torch.Tensor], loss_cfg) -> torch.Tensor:
    return sum(getattr(loss_cfg.weights, k) * v for k, v in terms.items())


def stage_steps(epochs: int | None, samples: int | None, steps_per_epoch: int,
                global_batch: int) -> int:
    """A stage's optimiser steps: ``samples`` rounded up to whole batches, whatever the data's
    size, or (old configs) ``epochs`` passes over the training set."""
    if samples is not None:
        return -(-samples // global_batch)
    return steps_per_epoch * (epochs or 0)


@dataclass
class StageRun:
    """What one stage's steps share: its optimiser, the step function, the schedule position.

    The stage runs ``total_steps`` optimiser steps; it validates every ``val_steps`` steps and
    at its end. Its batches come epoch by epoch (``steps_per_epoch`` each), so a segment of
    steps ends at an epoch's end, a validation or the stage's end, whichever is first."""

    index: int
    target: str
    lr: float
    optimizer: torch.optim.Optimizer
    params: list
    step_fn: object  # (batch, loss_cfg, target) -> loss terms; DDP-wrapped under torchrun
    steps_per_epoch: int
    total_steps: int
    val_steps: int
    batch: int  # training samples per step, all processes together
    step: int = 0  # optimiser steps taken in this stage
    stopped_early: bool = False
    sums: dict = field(default_factory=dict)  # loss sums since the last validation
    summed: int = 0  # steps in ``sums``

    @property
    def epoch(self) -> int:
        """The epoch the next step belongs to (0-based)."""
        return self.step // self.steps_per_epoch

    @property
    def seen(self) -> int:
        """Training samples shown in this stage so far."""
        return self.step * self.batch

    @property
    def done(self) -> bool:
        return self.stopped_early or self.step >= self.total_steps

    def segment_end(self) -> int:
        """The step the next segment stops at: epoch end, validation or stage end."""
        epoch_end = (self.epoch + 1) * self.steps_per_epoch
        next_val = (self.step // self.val_steps + 1) * self.val_steps
        return min(epoch_end, next_val, self.total_steps)

    def validates_now(self) -> bool:
        return self.step == self.total_steps or self.step % self.val_steps == 0

    def take_losses(self) -> dict:
        """Mean of each loss term since the last call."""
        out = {k: v / max(self.summed, 1) for k, v in self.sums.items()}
        self.sums, self.summed = {}, 0
        return out


def _to(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def run_steps(model, stage: StageRun, loader, end: int, *, loss_cfg, grad_clip: float,
              device: torch.device, amp: bool, show_progress: bool, last_good: str) -> None:
    """Train ``model`` on ``loader``'s batches until the stage's step count reaches ``end``;
    the loss terms add up in ``stage.sums``.

    A non-finite loss raises TrainingError before the step, so no bad weights are kept."""
    model.train()
    start = stage.step
    bar = tqdm(total=end - start, disable=not show_progress or None, leave=False,
               desc=f"{stage.target} epoch {stage.epoch + 1}", file=sys.stderr)
    for batch in loader:
        for g in stage.optimizer.param_groups:  # lr_scale: pretrained layers learn slower
            g["lr"] = stage.lr * g.get("lr_scale", 1.0) * lr_factor(stage.step, stage.total_steps)
        batch = _to(batch, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            terms = stage.step_fn(batch, loss_cfg, stage.target)
            loss = total_loss(terms, loss_cfg)
        if not torch.isfinite(loss):
            raise TrainingError(
                f"loss became {loss.item()} at stage {stage.target}, epoch {stage.epoch + 1}, step "
                f"{stage.step + 1}; stopped without saving. The last good checkpoint is "
                f"{last_good} (if one was written); lower the learning rate and resume")
        stage.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(stage.params, grad_clip)
        stage.optimizer.step()
        stage.step += 1
        stage.summed += 1
        for k, v in terms.items():
            stage.sums[k] = stage.sums.get(k, 0.0) + float(v.detach())
        stage.sums["total"] = stage.sums.get("total", 0.0) + float(loss.detach())
        bar.update(1)
        if show_progress:
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
        if stage.step >= end:
            break
    bar.close()
