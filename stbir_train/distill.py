"""`stbir-train distill`: train the config's (small) model into a teacher's embedding space.

Seed 004's edge story: a big model enrolls the gallery on a server, a small one distilled into the
same space answers queries on the device. The student learns, besides the config's usual losses,

- ``distill_sketch`` / ``distill_image`` / ``distill_text``: 1 - cos(student, teacher) per tower
  (on unit vectors, half the squared distance), weight ``distill.embed``;
- ``distill_relational``: KL(teacher || student) of the in-batch query -> photo similarity
  distributions (softmax over the batch's photos at ``distill.temperature``), for sketch, text and
  sketch+text queries, weight ``distill.relational``: the student's queries against its own
  photos (all-student search) and against the teacher's photos (an index the teacher enrolled).

The teacher runs once: its vectors of every training photo, positive sketch and caption (clean,
eval mode) are cached on disk under a key made of the teacher checkpoint's sha256 and the
training rows and files, and every epoch reads them. The checkpoints are ordinary training
checkpoints plus ``distill``: the teacher's file, sha256 and embedding space (``models.space``),
which the export copies into ``export.json`` so the runtime lets the student query the teacher's
index.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from models import load_model, weighted_mean
from models.space import embedding_space
from stbir_infer.contract import BRANCHES, atomic_write, file_sha256
from stbir_train import train as T
from stbir_train.errors import ConfigError, TrainingError
from stbir_train.evaluate import encode_rows

CACHE_VERSION = 1
TERMS = tuple(f"distill_{b}" for b in BRANCHES) + ("distill_relational",)


def distill(cfg, resume: str | Path | None = None, stop_after_validations: int | None = None,
            log=print) -> dict:
    """Train ``cfg``'s model towards ``cfg.distill.teacher``; returns train()'s summary plus
    the teacher record and where its embeddings are cached."""
    check_spec(cfg)
    run = T.setup(cfg, log)
    if run.procs.world > 1:
        raise TrainingError("stbir-train distill runs in one process (not under torchrun)")
    teacher_path = cfg.resolve(cfg.distill.teacher)
    teacher, meta = load_model(teacher_path)
    record = {"file": teacher_path.name, "sha256": file_sha256(teacher_path),
              "space": embedding_space(teacher, meta), "clip_model": teacher.spec.clip_model,
              "sketch_backbone": teacher.spec.sketch_backbone}
    rows = T.prepare_data(run)
    T.build_or_resume(run, resume, rows)
    if run.model.embed_dim != teacher.embed_dim:
        raise ConfigError(f"{cfg.source or 'config'}: the model's vectors are "
                          f"{run.model.embed_dim}-d, the teacher's {teacher.embed_dim}-d; "
                          f"distillation needs one size")
    if run.resume_state is not None:
        had = (run.resume_state.get("distill") or {}).get("space")
        if had != record["space"]:
            raise TrainingError(f"{resume}: not a distillation checkpoint of teacher {teacher_path} "
                                f"(its teacher space is {str(had)[:12]}, this one's "
                                f"{record['space'][:12]})")
    t0 = time.time()
    targets, cache_path, reused = teacher_targets(teacher, rows, run.cache,
                                                  cfg.out / cfg.distill.cache, record["sha256"])
    run.say(f"teacher {teacher_path} ({record['clip_model']} + {record['sketch_backbone']}, space "
            f"{record['space'][:12]}): embeddings {'reused from' if reused else 'computed into'} "
            f"{cache_path} ({time.time() - t0:.1f}s)")
    del teacher
    run.train_set = WithTeacher(run.train_set, targets)
    run.extra_state = {"distill": {"space": record["space"], "teacher": record}}
    loss_cfg = distill_loss(cfg)
    run.extra_terms = relational_terms(run.model, cfg.distill.temperature)
    T.run_stages(run, loss_cfg, stop_after_validations=stop_after_validations)
    return {**run.summary(), "teacher": record, "cache": str(cache_path)}


def check_spec(cfg) -> None:
    d, where = cfg.distill, cfg.source or "config"
    if not d.teacher:
        raise ConfigError(f"{where}: distill.teacher is not set (the teacher's checkpoint, e.g. "
                          f"teacher/best.pt)")
    for key in ("embed", "relational"):
        if getattr(d, key) < 0:
            raise ConfigError(f"{where}: distill.{key} must be >= 0")
    if d.temperature <= 0:
        raise ConfigError(f"{where}: distill.temperature must be > 0")


def distill_loss(cfg):
    """The ``loss`` section with the distillation terms' weights added (``loop.total_loss``
    weights every term by ``loss_cfg.weights.<name>``)."""
    d = cfg.distill
    weights = types.SimpleNamespace(**dataclasses.asdict(cfg.loss.weights),
                                    **{t: d.embed for t in TERMS[:3]}, distill_relational=d.relational)
    return dataclasses.replace(cfg.loss, weights=weights)


def relational_terms(model, temperature: float):
    """``step_losses``'s extra terms: per-tower cosine distance to the teacher's vectors, and the
    relational KD of sketch, text and sketch+text queries against the batch's photos, the
    student's own and the teacher's."""
    def terms(batch: dict, v: dict) -> dict[str, torch.Tensor]:
        out = {f"distill_{b}": (1 - (v[b] * batch[f"teacher_{b}"]).sum(-1)).mean() for b in BRANCHES}
        w = float(model.spec.train_sketch_weight)
        ts, ti, tt = (batch[f"teacher_{b}"] for b in BRANCHES)
        pairs = ((v["sketch"], ts), (v["text"], tt),
                 (weighted_mean(v["sketch"], v["text"], w), weighted_mean(ts, tt, w)))
        out["distill_relational"] = sum(
            relational_kl(sq @ photos.T, tq @ ti.T, temperature)
            for sq, tq in pairs for photos in (v["image"], ti)) / (2 * len(pairs))
        return out
    return terms


def relational_kl(student_sims: torch.Tensor, teacher_sims: torch.Tensor,
                  temperature: float) -> torch.Tensor:
    """KL(teacher || student) of the row-wise softmax over a [queries, photos] similarity matrix,
    averaged over queries."""
    return F.kl_div(F.log_softmax(student_sims / temperature, dim=1),
                    F.log_softmax(teacher_sims / temperature, dim=1),
                    log_target=True, reduction="batchmean")


# -- the teacher's vectors, computed once -------------------------------------------------------

def encode_teacher(teacher, rows: list[dict], cache) -> dict[str, np.ndarray]:
    """Every training photo, positive sketch (in row order) and caption through the teacher."""
    enc = encode_rows(teacher, rows, cache)
    return {"image": enc["gallery"].numpy(), "sketch": enc["sketch"].numpy(),
            "text": enc["text"].numpy()}


def cache_key(teacher_sha256: str, rows: list[dict], root: Path) -> str:
    """What the cached vectors depend on: the teacher, the rows, and the bytes of every file."""
    h = hashlib.sha256(f"stbir-distill-cache {CACHE_VERSION} {teacher_sha256}\n".encode())
    for r in rows:
        files = [r["image"], *r["positive_sketches"]]
        h.update(json.dumps([files, r["text"], [file_sha256(root / f) for f in files]]).encode())
    return h.hexdigest()


def teacher_targets(teacher, rows: list[dict], image_cache, cache_dir: Path,
                    teacher_sha256: str) -> tuple[dict[str, np.ndarray], Path, bool]:
    """(vectors by branch, the cache file, whether it was reused). A cache file that does not
    read back as exactly what this key needs is recomputed and replaced atomically."""
    key = cache_key(teacher_sha256, rows, image_cache.root)
    path = Path(cache_dir) / f"teacher-{key[:24]}.npz"
    n_sketches = sum(len(r["positive_sketches"]) for r in rows)
    want = {"image": len(rows), "text": len(rows), "sketch": n_sketches}
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                found = {b: z[b].astype(np.float32) for b in BRANCHES}
                ok = str(z["key"]) == key and all(len(found[b]) == want[b] for b in BRANCHES)
            if ok and all(np.isfinite(v).all() for v in found.values()):
                return found, path, True
        except (OSError, ValueError, KeyError):
            pass  # unreadable: computed again below
    found = encode_teacher(teacher, rows, image_cache)
    atomic_write(path, lambda f: np.savez(f, key=np.array(key), **found))
    return found, path, False


class WithTeacher(Dataset):
    """The training set's items plus the teacher's vectors of the same photo, caption and the
    very sketch the item drew (``teacher_sketch`` / ``teacher_image`` / ``teacher_text``)."""

    def __init__(self, base, targets: dict[str, np.ndarray]):
        self.base = base
        self.targets = {b: torch.from_numpy(v) for b, v in targets.items()}
        self.offsets = np.cumsum([0] + [len(r["positive_sketches"]) for r in base.rows])

    def set_epoch(self, stage_index: int, target: str, epoch: int, seen: int = 0) -> None:
        self.base.set_epoch(stage_index, target, epoch, seen)

    def __len__(self) -> int:
        return len(self.base)

    def sketch_drawn(self, i: int) -> int:
        """Which positive sketch ``SBIRDataset.__getitem__`` picks for item ``i`` this epoch."""
        return self.base.pick_sketch(i, self.base.item_rng(i))

    def __getitem__(self, i: int) -> dict:
        item = self.base[i]
        item["teacher_sketch"] = self.targets["sketch"][self.offsets[i] + self.sketch_drawn(i)]
        item["teacher_image"] = self.targets["image"][i]
        item["teacher_text"] = self.targets["text"][i]
        return item
