"""The staged training loop, in reading order: ``train`` is setup, data, build-or-resume, then for
each stage an optimiser and segments of steps, each followed (at a validation point) by
validate and checkpoint.

Stages are data (``training.stages`` in the config): each names the branch that learns
(``sketch``, ``image``, ``text`` or ``all``), its length in samples (or epochs) and its lr /
weight decay. Validation comes every ``training.val_every`` samples (or once an epoch) and at a
stage's end; ``best.pt`` keeps the best validation sketch+text R@1, a stage can stop early
(``training.patience``), and a stage that another follows hands on its best weights. Only rank 0
writes (checkpoints, the JSONL log); under ``torchrun`` every process trains on its shard and
DistributedDataParallel averages gradients (``stbir_train.distributed``). Without validation rows
``best.pt`` is the last weights, and the log says so.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from models import build_model, load_model, read_checkpoint, save_checkpoint
from stbir_train import distributed
from stbir_train.config import Config, DataSpec
from stbir_train.data import ImageCache, SBIRDataset
from stbir_train.errors import ConfigError, TrainingError
from stbir_train.evaluate import evaluate_rows
from stbir_train.fusion import describe as describe_fusion
from stbir_train.loop import StageRun, lr_factor, run_steps, stage_steps, step_losses, total_loss
from stbir_train.manifest import build_manifests, check_files, manifest_paths, read_manifest_rows
from stbir_train.noise import NoiseSchedule
from stbir_train.verification import thresholds

__all__ = ["TrainingError", "label_names", "lr_factor", "row_labels", "step_losses", "total_loss",
           "train"]


def label_names(data: DataSpec, arcface_labels: str) -> list[str]:
    """ArcFace classes: the categories, or the manifest's k-means virtual classes."""
    if arcface_labels == "category":
        return list(data.categories)
    return [f"cluster_{i:02d}" for i in range(data.virtual_classes)]


def row_labels(data: DataSpec, arcface_labels: str, rows: list[dict]) -> list[int]:
    index = {name: i for i, name in enumerate(label_names(data, arcface_labels))}
    key = "category" if arcface_labels == "category" else "virtual_class"
    return [index[r[key]] for r in rows]


@dataclass
class Run:
    """One invocation's state, passed from step to step."""

    cfg: Config
    procs: distributed.Processes
    say: object
    model: object = None
    train_set: SBIRDataset | None = None
    val_rows: list | None = None
    cache: ImageCache | None = None
    resume_state: dict | None = None
    start_stage: int = 0
    start_step: int = 0
    start_epoch: int = 0  # a checkpoint from before samples-based stages knew only its epochs
    best: float | None = None  # best validation sketch+text R@1; None without validation
    # The running stage's best validation: {"score", "file" (its weights), "since" (validations
    # since it)}; None before the stage's first validation or without validation rows.
    stage_best: dict | None = None
    extra_state: dict | None = None  # more checkpoint keys (distill: the teacher's record)
    extra_terms: object = None  # more loss terms (loop.step_losses; distill: towards the teacher)
    last_state: dict | None = None  # the last validation's checkpoint keys, besides the weights

    @property
    def ckpt_dir(self) -> Path:
        return self.cfg.out / "checkpoints"

    def summary(self) -> dict:
        return {"best": self.best, "best_path": str(self.ckpt_dir / "best.pt"),
                "last_path": str(self.ckpt_dir / "last.pt"), "processes": self.procs.world,
                "distributed": distributed.DDP_NAME if self.procs.world > 1 else None}


def train(cfg: Config, only_stage: str | None = None, resume: str | Path | None = None,
          stop_after_validations: int | None = None, log=print) -> dict:
    """Run the config's stages; returns a summary (best metric, checkpoint paths, processes).

    ``only_stage`` runs just the stages with that target; ``resume`` continues from a checkpoint
    written by this loop; ``stop_after_validations`` ends this invocation early after that many
    validation points (epochs, for a stage in epochs); the run can be resumed from ``last.pt``.
    """
    run = setup(cfg, log)
    check_stage_option(cfg, only_stage)
    train_rows = prepare_data(run)
    build_or_resume(run, resume, train_rows)
    run_stages(run, cfg.loss, only_stage, stop_after_validations)
    return run.summary()


def run_stages(run: Run, loss_cfg, only_stage: str | None = None,
               stop_after_validations: int | None = None) -> None:
    """The stage and step loop of train() and distill()."""
    stages = run.cfg.training.stages
    validations = 0
    for si in range(run.start_stage, len(stages)):
        if only_stage is not None and stages[si].target != only_stage:
            continue
        stage = start_stage(run, si)
        t0 = time.time()
        while not stage.done:
            run_steps(run.model, stage, segment_loader(run, stage), stage.segment_end(),
                      loss_cfg=loss_cfg, grad_clip=run.cfg.training.grad_clip,
                      device=run.procs.device,
                      amp=run.cfg.training.amp and run.procs.device.type == "cuda",
                      show_progress=run.procs.is_main, last_good=str(run.ckpt_dir / "last.pt"))
            if not stage.validates_now():
                continue
            stop = validate_and_checkpoint(run, stage, t0) if run.procs.is_main else False
            stage.stopped_early = distributed.agree(run.procs, stop)
            distributed.barrier(run.procs)
            t0 = time.time()
            validations += 1
            if stop_after_validations is not None and validations >= stop_after_validations:
                return
        if si + 1 < len(stages) and only_stage is None:
            hand_on_stage_best(run, stage)


# -- the steps, in the order train() takes them ------------------------------------------------

def setup(cfg: Config, log) -> Run:
    """Processes and device, the seed, and a logger that only rank 0 prints with."""
    procs = distributed.setup(cfg.training.device)
    torch.manual_seed(cfg.training.seed)
    return Run(cfg, procs, log if procs.is_main else (lambda *a, **k: None))


def check_stage_option(cfg: Config, only_stage: str | None) -> None:
    stages = cfg.training.stages
    if only_stage is not None and all(st.target != only_stage for st in stages):
        raise ConfigError(f"{cfg.source or 'config'}: --stage {only_stage}: training.stages has no "
                          f"such stage (it has {', '.join(st.target for st in stages)})")


def prepare_data(run: Run) -> list[dict]:
    """Manifests (rank 0 builds missing ones), checked rows; returns the training rows."""
    cfg = run.cfg
    paths = manifest_paths(cfg)
    if run.procs.is_main and not all(p.is_file() for p in paths.values()):
        run.say(f"building manifests in {cfg.manifest_dir}")
        build_manifests(cfg)
    distributed.barrier(run.procs)
    root = cfg.resolve(cfg.data.root)
    train_rows, run.val_rows = read_manifest_rows(paths["train"]), read_manifest_rows(paths["val"])
    check_files(train_rows, root, paths["train"])
    check_files(run.val_rows, root, paths["val"])
    run.cache = ImageCache(root)
    return train_rows


def build_or_resume(run: Run, resume: str | Path | None, train_rows: list[dict]) -> None:
    """A fresh model from the config, or the model and position of a checkpoint; then the
    training set, which needs the model's tokenizer and input specs."""
    cfg = run.cfg
    n_labels = len(label_names(cfg.data, cfg.loss.arcface_labels))
    if resume is not None:
        run.model, run.resume_state = load_model(resume)
        if run.model.spec.arcface_classes != n_labels:
            raise TrainingError(f"{resume}: checkpoint's ArcFace head has "
                                f"{run.model.spec.arcface_classes} classes, the config {n_labels}")
        state = run.resume_state
        run.start_stage = state.get("stage_index", 0)
        run.start_step = state.get("step_in_stage", 0)
        run.start_epoch = 0 if "step_in_stage" in state else state.get("epoch", 0)
        best = state.get("best")
        run.best = best if isinstance(best, float) and best >= 0 else None
        stage_best = state.get("stage_best")
        run.stage_best = stage_best if isinstance(stage_best, dict) else None
        if state.get("stage_done"):
            run.start_stage, run.start_step, run.start_epoch = run.start_stage + 1, 0, 0
        run.say(f"resuming from {resume}: stage {run.start_stage}, "
                + (f"step {run.start_step}" if run.start_step else f"epoch {run.start_epoch}"))
    else:
        run.model = build_model(cfg.model.spec(arcface_classes=n_labels))
        if cfg.model.init_from:
            warm_start(run.model, cfg.resolve(cfg.model.init_from), run.say)
    model = run.model
    model.to(run.procs.device)
    run.train_set = SBIRDataset(
        train_rows, cfg.resolve(cfg.data.root), model.input_specs(), model.tokenizer(),
        row_labels(cfg.data, cfg.loss.arcface_labels, train_rows), cfg.data.negatives_per_modality,
        NoiseSchedule(cfg.data.curriculum_noise), train=True, seed=cfg.training.seed,
        cache=run.cache, modality_dropout=cfg.loss.modality_dropout)
    n_params = sum(p.numel() for p in model.parameters())
    run.say(f"model {model.spec.clip_model} + {model.spec.sketch_backbone}: {n_params / 1e6:.1f}M "
            f"parameters, {model.embed_dim}-d; {len(train_rows)} training items, "
            f"{len(run.val_rows)} validation items; {run.procs.describe()}")
    if not run.val_rows:
        run.say("no validation rows (data.val_fraction is 0): best.pt will be the last epoch's "
                "weights, not the best by validation R@1")


def warm_start(model, path: Path, say) -> None:
    """``model.init_from``: the weights of another run's checkpoint, for fine-tuning on new data.
    The towers must be the same architecture; an ArcFace head for other classes starts fresh."""
    ckpt = read_checkpoint(path)
    spec = ckpt["model_spec"]
    for k in ("clip_model", "sketch_backbone", "sketch_size"):
        if spec.get(k) != getattr(model.spec, k):
            raise ConfigError(f"model.init_from: {path} has {k} {spec.get(k)!r}, the config "
                              f"{getattr(model.spec, k)!r}")
    own = model.state_dict()
    state = {k: v for k, v in ckpt["model"].items()
             if not (k.startswith(("arcface.", "combiner.")) and (k not in own or own[k].shape != v.shape))}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith(("arcface.", "combiner.")) for k in missing):
        raise ConfigError(f"model.init_from: {path} does not fit the model "
                          f"({len(missing)} missing, {len(unexpected)} unexpected tensors)")
    say(f"warm start from {path} ({len(state)} tensors"
        + (", ArcFace head fresh" if any(k.startswith("arcface.") for k in missing) else "")
        + (", Combiner fresh" if any(k.startswith("combiner.") for k in missing) else "") + ")")


def start_stage(run: Run, si: int) -> StageRun:
    """Make the stage's branch trainable, give it an optimiser and its schedule in steps
    (position and optimiser restored on resume)."""
    cfg, model, procs = run.cfg, run.model, run.procs
    st = cfg.training.stages[si]
    model.configure_stage(st.target)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(model.param_groups(st.lr), lr=st.lr, weight_decay=st.weight_decay)
    batch = cfg.training.batch_size * procs.world
    steps_per_epoch = len(run.train_set) // batch
    if steps_per_epoch == 0:
        raise TrainingError(f"{len(run.train_set)} training items are fewer than one batch of "
                            f"{cfg.training.batch_size} x {procs.world} process(es)")
    total = stage_steps(st.epochs, st.samples, steps_per_epoch, batch)
    val_every = cfg.training.val_every
    val_steps = max(1, round(val_every / batch)) if val_every else steps_per_epoch
    stage = StageRun(si, st.target, st.lr, optimizer, params,
                     distributed.loss_step(model, procs, run.extra_terms), steps_per_epoch,
                     total, val_steps, batch)
    resuming = run.resume_state is not None and si == run.start_stage
    if resuming and (run.start_step or run.start_epoch):
        optimizer.load_state_dict(run.resume_state["optimizer"])
        stage.step = run.start_step or run.start_epoch * steps_per_epoch
    else:
        run.stage_best = None
    if not stage.done:
        frozen_anchors(run, st.target)
    length = (f"{st.samples} samples" if st.samples is not None else f"{st.epochs} epoch(s)")
    run.say(f"stage {si + 1}/{len(cfg.training.stages)}: {st.target} for {length} = {total} "
            f"steps of {batch} ({total / steps_per_epoch:.1f} epochs of {len(run.train_set)} "
            f"items), validation every {val_steps} steps, lr {st.lr:g}, weight decay "
            f"{st.weight_decay:g}; trainable {sum(p.numel() for p in params) / 1e6:.1f}M")
    return stage


@torch.no_grad()
def frozen_anchors(run: Run, target: str, batch: int = 128) -> None:
    """``training.cache_anchors``: in a sketch stage the image and text towers are frozen, so
    each training item's image and text vectors are the same every epoch (the photo left
    uncorrupted): computed here once, each step then runs the sketch tower only. Not with
    manifest negatives or the fusion loss, which need the photos' pixels."""
    ds, cfg = run.train_set, run.cfg
    ds.anchors = None
    if (not cfg.training.cache_anchors or target != "sketch" or ds.negatives
            or cfg.loss.weights.fusion):
        return
    t0 = time.time()
    model, device = run.model, run.procs.device
    was = model.training
    model.eval()
    image, text = [], []
    for start in range(0, len(ds), batch):
        rows = range(start, min(start + batch, len(ds)))
        pixels = torch.stack([ds.clean_photo(i) for i in rows])
        image.append(model.encode_image(pixels.to(device)).cpu())
        text.append(model.encode_text(ds.tokens[start:start + len(rows)].to(device)).cpu())
    model.train(was)
    ds.anchors = {"image": torch.cat(image), "text": torch.cat(text)}
    run.say(f"  frozen image and text vectors of {len(ds)} items computed once "
            f"({time.time() - t0:.0f}s)")


def segment_loader(run: Run, stage: StageRun) -> DataLoader:
    """The batches from the stage's position to its next segment end: the epoch's order (fixed
    by seed, stage and epoch) from where the stage is in it, and the noise level of the samples
    the stage has shown."""
    cfg, epoch = run.cfg, stage.epoch
    run.train_set.set_epoch(stage.index, stage.target, epoch, stage.seen)
    epoch_seed = cfg.training.seed * 1_000_003 + stage.index * 1009 + epoch
    sampler = distributed.sampler(run.train_set, run.procs, cfg.training.seed,
                                  stage.index * 1009 + epoch, epoch_seed)
    first = stage.step - epoch * stage.steps_per_epoch
    if first or stage.segment_end() < (epoch + 1) * stage.steps_per_epoch:
        b = cfg.training.batch_size
        sampler = list(sampler)[first * b:(stage.segment_end() - epoch * stage.steps_per_epoch) * b]
    return DataLoader(run.train_set, cfg.training.batch_size, sampler=sampler, drop_last=True,
                      num_workers=cfg.training.num_workers,
                      pin_memory=run.procs.device.type == "cuda")


def validate_and_checkpoint(run: Run, stage: StageRun, t0: float) -> bool:
    """Rank 0: validation metrics, ``last.pt`` always, ``best.pt`` when R@1 improved (every
    time when there is no validation), the stage's best weights, one JSONL log line, one
    printed line. Returns whether the stage stops early (``training.patience``)."""
    val = (evaluate_rows(run.model, run.val_rows, run.cache, device=run.procs.device,
                         select=True, verify=True)  # picks the default fusion (stbir_train.fusion)
           if run.val_rows else None)
    epoch = stage.step / stage.steps_per_epoch
    record = {"stage": stage.index, "target": stage.target, "epoch": round(epoch, 3),
              "step": stage.step, "samples": stage.seen, "losses": stage.take_losses(),
              "lr": stage.optimizer.param_groups[0]["lr"], "seconds": round(time.time() - t0, 2),
              "val": {m: val["modes"][m]["overall"] for m in val["modes"]} if val else None}
    improved, stage_improved = True, False  # without validation, best is last
    if val is not None:
        score = val["modes"]["sketch+text"]["overall"]["R@1"]
        improved = run.best is None or score > run.best
        run.best = score if improved else run.best
        sb = run.stage_best
        stage_improved = sb is None or score > sb["score"]
        run.stage_best = ({"score": score, "file": "best.pt" if improved else "stage_best.pt",
                           "since": 0} if stage_improved else {**sb, "since": sb["since"] + 1})
    patience = run.cfg.training.patience
    stop = bool(patience and run.stage_best and run.stage_best["since"] >= patience
                and stage.step < stage.total_steps)
    state = dict(config=run.cfg.to_dict(), optimizer=stage.optimizer.state_dict(),
                 stage_index=stage.index, epoch=int(epoch), step_in_stage=stage.step,
                 stage_done=stop or stage.step >= stage.total_steps, stage_best=run.stage_best,
                 metrics=record, best=run.best, **fusion_state(val), **(run.extra_state or {}))
    save_checkpoint(run.ckpt_dir / "last.pt", run.model, **state)
    if improved:
        save_checkpoint(run.ckpt_dir / "best.pt", run.model, **state)
    elif stage_improved:  # the stage's best, below an earlier stage's: the next stage's start
        save_checkpoint(run.ckpt_dir / "stage_best.pt", run.model, **state)
    run.last_state = state
    log_path = run.cfg.out / "train_log.jsonl"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
    v = record["val"] or {}
    mark = (" *best*" if improved else "") if val is not None else " (no validation: best = last)"
    run.say(f"  {stage.target} step {stage.step}/{stage.total_steps} (epoch {epoch:.2f}, "
            f"{stage.seen} samples): loss {record['losses'].get('total', float('nan')):.4f}"
            + "".join(f", val {m} R@1 {v[m]['R@1']:.3f}" for m in v)
            + f" ({record['seconds']:.0f}s){mark}")
    if val is not None:
        run.say("    " + describe_fusion(val["fusion"]))
    if stop:
        run.say(f"  early stop: {patience} validation(s) without a better {stage.target} stage")
    return stop


def hand_on_stage_best(run: Run, stage: StageRun) -> None:
    """Before the next stage: the finished stage's best validated weights, not its last ones
    (``last.pt`` is rewritten with them, so a resume starts the next stage from them too)."""
    sb = run.stage_best  # rank 0's (it validates): the other processes follow its decision
    if not distributed.agree(run.procs, sb is not None and sb["since"] > 0):
        return
    from_best = distributed.agree(run.procs, sb is not None and sb["file"] == "best.pt")
    path = run.ckpt_dir / ("best.pt" if from_best else "stage_best.pt")
    run.model.load_state_dict(read_checkpoint(path)["model"])
    if run.procs.is_main:
        save_checkpoint(run.ckpt_dir / "last.pt", run.model, **run.last_state)
    distributed.barrier(run.procs)
    if sb is not None:
        run.say(f"  the next stage starts from this stage's best weights (val sketch+text R@1 "
                f"{sb['score']:.3f}, {path.name})")


def fusion_state(val: dict | None) -> dict:
    """What a checkpoint keeps of validation: the fusion choice and the score thresholds at each
    FAR per query mode (stbir-export copies one into export.json)."""
    if val is None:
        return {}
    if "verification" not in val:  # a one-item validation split has no impostor pairs
        return {"fusion_selection": val["fusion"]}
    modes = {m: thresholds(val["verification"][m]) for m in ("sketch", "text", "sketch+text")}
    return {"fusion_selection": val["fusion"],
            "score_thresholds": {"split": "val", "modes": modes}}
