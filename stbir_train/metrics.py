"""Retrieval metrics from a query x gallery similarity matrix (numpy only).

Conventions, so the numbers can be checked by hand:
- ``relevant[q, g]`` is True where gallery item g is a right answer for query q.
- Ties are counted against the query: a wrong item that scores exactly like the right one is
  ranked ahead of it (the pessimistic rank), so a constant model cannot look good.
- Rank is 1-based, of the first right answer. Recall@K (top-K accuracy) is the share of queries
  whose first right answer has rank <= K. AP averages precision at the rank of every right answer;
  mAP@all is its mean over queries.
"""

from __future__ import annotations

import numpy as np

KS = (1, 5, 10)


def ranks_of_relevant(scores: np.ndarray, relevant: np.ndarray) -> list[np.ndarray]:
    """For each query, the sorted 1-based ranks of its relevant gallery items."""
    out = []
    for s, r in zip(scores, relevant):
        order = np.lexsort((r, -s))  # by score descending; within a tie, wrong answers first
        out.append(np.flatnonzero(r[order]) + 1)
    return out


def retrieval_metrics(scores: np.ndarray, relevant: np.ndarray) -> dict:
    scores = np.asarray(scores, np.float64)
    relevant = np.asarray(relevant, bool)
    if scores.shape != relevant.shape:
        raise ValueError(f"scores {scores.shape} and relevant {relevant.shape} differ in shape")
    if not relevant.any(1).all():
        raise ValueError("every query needs at least one relevant gallery item")
    ranks = ranks_of_relevant(scores, relevant)
    first = np.array([r[0] for r in ranks], np.float64)
    ap = np.array([np.mean(np.arange(1, len(r) + 1) / r) for r in ranks])
    out = {f"R@{k}": float(np.mean(first <= k)) for k in KS}
    out.update({"mAP": float(ap.mean()), "median_rank": float(np.median(first)),
                "mean_rank": float(first.mean()), "queries": int(len(first))})
    return out


def metrics_by_group(scores: np.ndarray, relevant: np.ndarray, groups: list[str]) -> dict:
    """Overall metrics plus one entry per group (e.g. per category) of queries."""
    groups_arr = np.asarray(groups)
    result = {"overall": retrieval_metrics(scores, relevant), "per_category": {}}
    for g in sorted(set(groups)):
        sel = groups_arr == g
        result["per_category"][g] = retrieval_metrics(scores[sel], relevant[sel])
    return result
