"""Which sketch+text fusion a checkpoint answers with, picked on validation.

The weighted mean's weight is chosen over ``GRID`` (0.1 .. 0.9) by R@1 (mAP breaks ties, then the
lower weight); a Combiner, where the model has one, becomes the default only when its (R@1, mAP)
is strictly better than the best weighted mean's. The choice is written into the model's buffers
(``query_sketch_weight``, ``combiner.preferred``), so the checkpoint, evaluation and the export agree.
"""

from __future__ import annotations

import numpy as np
import torch

from models.model import weighted_mean
from stbir_train.metrics import retrieval_metrics

GRID = tuple(round(0.1 * i, 1) for i in range(1, 10))


def relevant_mask(shape, target) -> np.ndarray:
    """[Q, G] bool: True only at query q's own photo ``target[q]``."""
    rel = np.zeros(shape, bool)
    rel[np.arange(len(target)), target] = True
    return rel


def _r1_map(scores: np.ndarray, owner: np.ndarray) -> dict:
    m = retrieval_metrics(scores, relevant_mask(scores.shape, owner))
    return {"R@1": m["R@1"], "mAP": m["mAP"]}


@torch.no_grad()
def query_fused(model, sketch: torch.Tensor, text: torch.Tensor,
                method: str | None = None) -> torch.Tensor:
    """``model.fuse_for_query`` of CPU embeddings, run where the model's fusion weights are (a
    Combiner, the ``query_sketch_weight`` buffer: on the GPU when training there); the result on CPU."""
    device = model.query_sketch_weight.device
    return model.fuse_for_query(sketch.to(device), text.to(device), method).cpu()


@torch.no_grad()
def fused_scores(model, enc: dict, method: str, weight: float | None = None) -> np.ndarray:
    """[Q, G] scores of sketch+text queries fused by ``method`` ("mean" or "combiner")."""
    s = enc["sketch"]
    t = enc["text"][torch.from_numpy(enc["owner"])]
    if method == "combiner":
        q = query_fused(model, s, t, "combiner")
    else:
        q = weighted_mean(s, t, float(model.query_sketch_weight) if weight is None else weight)
    return (q @ enc["gallery"].T).numpy()


def weight_grid(model, enc: dict) -> dict[float, dict]:
    """{weight: {R@1, mAP}} of the weighted mean over GRID."""
    return {w: _r1_map(fused_scores(model, enc, "mean", w), enc["owner"]) for w in GRID}


def select_fusion(model, enc: dict) -> dict:
    """Pick the default fusion on these (validation) embeddings and store it in the model."""
    grid = weight_grid(model, enc)
    best = max(GRID, key=lambda w: (grid[w]["R@1"], grid[w]["mAP"], -w))
    record = {"weight": best, "method": "mean", "grid": {str(w): v for w, v in grid.items()},
              "mean": grid[best], "combiner": None}
    model.query_sketch_weight.fill_(float(best))
    if model.combiner is not None:
        m = record["combiner"] = _r1_map(fused_scores(model, enc, "combiner"), enc["owner"])
        better = (m["R@1"], m["mAP"]) > (grid[best]["R@1"], grid[best]["mAP"])
        record["method"] = "combiner" if better else "mean"
        model.combiner.preferred.fill_(1.0 if better else 0.0)
    return record


def describe(record: dict) -> str:
    c = record.get("combiner")
    line = (f"fusion picked on validation: weighted mean w={record['weight']} "
            f"(R@1 {record['mean']['R@1']:.3f}, mAP {record['mean']['mAP']:.3f})")
    if c is not None:
        line += (f", Combiner R@1 {c['R@1']:.3f}, mAP {c['mAP']:.3f} -> default "
                 f"{'Combiner' if record['method'] == 'combiner' else 'weighted mean'}")
    return line


__all__ = ["GRID", "describe", "fused_scores", "query_fused", "relevant_mask", "select_fusion",
           "weight_grid"]
