"""Verification figures of a retrieval score matrix (seed 004): is this query/photo pair a match?

Every (query, gallery photo) score is a verification attempt: *genuine* where the photo is the
query's own, *impostor* otherwise. A threshold ``t`` accepts a pair when ``score >= t`` (a score
equal to ``t`` is accepted, so ties at the threshold all go the same way). Then

- FAR(t) = impostor scores >= t / impostor count   (false accepts)
- FRR(t) = genuine scores < t / genuine count      (false rejects)

Candidate thresholds are the distinct scores plus one just above the highest (accept nothing).
- EER: (FAR + FRR) / 2 at the candidate where |FAR - FRR| is smallest; among equals, the one
  with the lower (FAR + FRR) / 2, then the lowest threshold.
- FRR at FAR = x: the lowest candidate whose FAR <= x, and its FRR. A group of tied impostor
  scores that would push FAR over x is rejected whole (the threshold moves above it).

numpy only; ``stbir-train evaluate`` writes the report to results.json, training stores the
validation thresholds in the checkpoint, export copies one into export.json.
"""

from __future__ import annotations

import numpy as np

FARS = (1e-2, 1e-3, 1e-4)
HIST_EDGES = np.linspace(-1.0, 1.0, 41)  # cosine scores, 0.05 wide bins


def far_key(far: float) -> str:
    return f"{far:g}"


def curve(genuine, impostor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(thresholds ascending, FAR, FRR) at every candidate threshold."""
    gen = np.sort(np.asarray(genuine, np.float64).ravel())
    imp = np.sort(np.asarray(impostor, np.float64).ravel())
    if not len(gen) or not len(imp):
        raise ValueError("verification needs at least one genuine and one impostor score")
    t = np.unique(np.concatenate([gen, imp]))
    t = np.append(t, np.nextafter(t[-1], np.inf))  # accept nothing
    far = (len(imp) - np.searchsorted(imp, t, "left")) / len(imp)
    frr = np.searchsorted(gen, t, "left") / len(gen)
    return t, far, frr


def eer(genuine, impostor) -> dict:
    return _eer(*curve(genuine, impostor))


def _eer(t: np.ndarray, far: np.ndarray, frr: np.ndarray) -> dict:
    i = int(np.lexsort((t, np.round(far + frr, 12), np.round(np.abs(far - frr), 12)))[0])
    return {"eer": float((far[i] + frr[i]) / 2), "threshold": float(t[i]),
            "far": float(far[i]), "frr": float(frr[i])}


def frr_at_far(genuine, impostor, target: float) -> dict:
    return _frr_at_far(*curve(genuine, impostor), target)


def _frr_at_far(t: np.ndarray, far: np.ndarray, frr: np.ndarray, target: float) -> dict:
    i = int(np.flatnonzero(far <= target)[0])
    return {"frr": float(frr[i]), "threshold": float(t[i]), "far": float(far[i])}


def summary(x: np.ndarray) -> dict:
    x = np.asarray(x, np.float64)
    q = np.percentile(x, [1, 5, 25, 50, 75, 95, 99])
    return {"count": int(len(x)), "mean": float(x.mean()), "std": float(x.std()),
            "min": float(x.min()), "max": float(x.max()),
            "percentiles": {p: round(float(v), 6) for p, v in zip(("1", "5", "25", "50", "75", "95", "99"), q)},
            "histogram": np.histogram(np.clip(x, -1, 1), HIST_EDGES)[0].tolist()}


def split(scores: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(genuine [Q], impostor [Q*(G-1)], mask of impostor cells [Q, G])."""
    scores = np.asarray(scores, np.float64)
    rows = np.arange(len(target))
    mask = np.ones(scores.shape, bool)
    mask[rows, target] = False
    return scores[rows, target], scores[mask], mask


def report(scores: np.ndarray, target: np.ndarray, query_names: list[str],
           gallery_names: list[str], fars=FARS, hardest: int = 10) -> dict:
    """Distributions, EER, FRR at each FAR and the hardest errors of one mode's score matrix."""
    genuine, impostor, mask = split(scores, target)
    c = curve(genuine, impostor)  # sorted once for the EER and every FAR
    out = {"genuine": summary(genuine), "impostor": summary(impostor),
           "histogram_edges": [round(float(e), 4) for e in HIST_EDGES],
           "eer": _eer(*c), "frr_at_far": {far_key(f): _frr_at_far(*c, f) for f in fars}}
    worst = np.argsort(genuine, kind="stable")[:hardest]
    out["hardest_false_rejects"] = [
        {"query": query_names[q], "gallery": gallery_names[target[q]], "score": round(float(genuine[q]), 6)}
        for q in worst]
    imp = np.where(mask, scores, -np.inf).ravel()
    top = np.argpartition(-imp, min(hardest, len(imp) - 1))[:hardest]
    top = top[np.argsort(-imp[top], kind="stable")]
    g = scores.shape[1]
    out["hardest_false_accepts"] = [
        {"query": query_names[i // g], "gallery": gallery_names[i % g], "score": round(float(imp[i]), 6)}
        for i in top if np.isfinite(imp[i])]
    return out


def thresholds(rep: dict) -> dict:
    """{far: threshold} of a ``report`` (what a checkpoint keeps from validation)."""
    return {k: v["threshold"] for k, v in rep["frr_at_far"].items()}


def format_table(reports: dict[str, dict]) -> str:
    """One row per mode: EER (threshold), FRR at each FAR (threshold)."""
    fars = list(next(iter(reports.values()))["frr_at_far"])
    head = f"| {'mode':<20} | {'EER (thr)':>16} | " + " | ".join(f"{'FRR@FAR=' + f:>20}" for f in fars) + " |"
    lines = [head, "|" + "-" * (len(head) - 2) + "|"]
    for mode, r in reports.items():
        e = r["eer"]
        cells = [f"{r['frr_at_far'][f]['frr']:.3f} ({r['frr_at_far'][f]['threshold']:.3f})" for f in fars]
        lines.append(f"| {mode:<20} | {e['eer']:>7.3f} ({e['threshold']:.3f}) | "
                     + " | ".join(f"{c:>20}" for c in cells) + " |")
    return "\n".join(lines)


__all__ = ["FARS", "curve", "eer", "far_key", "format_table", "frr_at_far", "report", "split",
           "summary", "thresholds"]
