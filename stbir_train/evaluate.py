"""Retrieval evaluation: encode a gallery once, rank it for every query in three modes.

Modes: ``sketch`` (sketch-only queries), ``text`` (caption-only) and ``sketch+text`` (the two fused
with the checkpoint's weight). Every positive sketch of an item is its own query; a text-only
query is one per item. The same code runs validation inside training, so the numbers agree.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from stbir_train.data import ImageCache
from stbir_train.metrics import metrics_by_group
from stbir_infer.contract import atomic_write_text, file_sha256
from stbir_infer.preprocess import preprocess

MODES = ("sketch", "text", "sketch+text")


@torch.no_grad()
def _encode_pixels(encode, paths: list[str], cache: ImageCache, spec: dict, batch_size: int,
                   device) -> torch.Tensor:
    out = []
    for i in range(0, len(paths), batch_size):
        x = np.stack([preprocess(cache.get(p, spec["channels"]), spec) for p in paths[i:i + batch_size]])
        out.append(encode(torch.from_numpy(x).to(device)).float().cpu())
    return torch.cat(out) if out else torch.zeros(0)


@torch.no_grad()
def encode_rows(model, rows: list[dict], cache: ImageCache, batch_size: int = 128,
                device: str | torch.device = "cpu") -> dict:
    """Gallery, sketch-query and text-query embeddings of manifest rows (model in eval mode)."""
    was_training = model.training
    model.eval()
    specs = model.input_specs()
    sketch_paths, owner = [], []
    for i, r in enumerate(rows):
        for s in r["positive_sketches"]:
            sketch_paths.append(s)
            owner.append(i)
    tokens = model.tokenizer()([r["text"] for r in rows])
    texts = torch.cat([model.encode_text(tokens[i:i + batch_size].to(device)).float().cpu()
                       for i in range(0, len(rows), batch_size)])
    out = {
        "gallery": _encode_pixels(model.encode_image, [r["image"] for r in rows], cache,
                                  specs["image"], batch_size, device),
        "sketch": _encode_pixels(model.encode_sketch, sketch_paths, cache, specs["sketch"],
                                 batch_size, device),
        "text": texts,
        "owner": np.array(owner, np.int64),
        "sketch_paths": sketch_paths,
    }
    model.train(was_training)
    return out


def score_modes(model, enc: dict) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per mode: (scores [Q, G], index of each query's item in the gallery [Q])."""
    gallery = enc["gallery"]
    owner = torch.from_numpy(enc["owner"])
    fused = model.fuse(enc["sketch"], enc["text"][owner])
    n = len(gallery)
    return {
        "sketch": ((enc["sketch"] @ gallery.T).numpy(), enc["owner"]),
        "text": ((enc["text"] @ gallery.T).numpy(), np.arange(n)),
        "sketch+text": ((fused @ gallery.T).numpy(), enc["owner"]),
    }


def evaluate_rows(model, rows: list[dict], cache: ImageCache, batch_size: int = 128,
                  device="cpu", rankings: int = 0) -> dict:
    """Metrics per mode (overall and per category); with ``rankings`` > 0 also the top
    ``rankings`` gallery images of every sketch+text query."""
    enc = encode_rows(model, rows, cache, batch_size, device)
    results = {"modes": {}, "counts": {"gallery": len(rows), "sketch_queries": len(enc["owner"]),
                                       "text_queries": len(rows),
                                       "items_with_several_sketches": int(sum(
                                           len(r["positive_sketches"]) > 1 for r in rows))}}
    categories = [r["category"] for r in rows]
    for mode, (scores, target) in score_modes(model, enc).items():
        relevant = np.zeros_like(scores, dtype=bool)
        relevant[np.arange(len(target)), target] = True
        results["modes"][mode] = metrics_by_group(scores, relevant, [categories[t] for t in target])
        if mode == "sketch+text" and rankings:
            top = np.argsort(-scores, axis=1, kind="stable")[:, :rankings]
            results["rankings"] = [
                {"sketch": enc["sketch_paths"][q], "text": rows[enc["owner"][q]]["text"],
                 "target": rows[enc["owner"][q]]["image"],
                 "top": [rows[g]["image"] for g in top[q]],
                 "scores": [round(float(scores[q, g]), 6) for g in top[q]]}
                for q in range(len(top))]
    return results


def format_table(results: dict) -> str:
    cols = ("R@1", "R@5", "R@10", "mAP", "median_rank", "mean_rank")
    head = "| mode        | " + " | ".join(f"{c:>11}" for c in cols) + " |"
    lines = [head, "|" + "-" * (len(head) - 2) + "|"]
    for mode in MODES:
        m = results["modes"][mode]["overall"]
        lines.append(f"| {mode:<11} | " + " | ".join(f"{m[c]:>11.3f}" for c in cols) + " |")
    c = results["counts"]
    lines.append(f"gallery {c['gallery']} photos; {c['sketch_queries']} sketch queries "
                 f"(every sketch of an item is a query; {c['items_with_several_sketches']} items have "
                 f"several), {c['text_queries']} text queries")
    return "\n".join(lines)


def run_evaluation(cfg, checkpoint: str | Path, split: str = "test", compare: str | Path | None = None,
                   out: str | Path | None = None, echo=print) -> Path:
    """`stbir-train evaluate`: metrics of one checkpoint (and optionally a second one on the same
    rows) -> printed tables and ``results.json``; returns the JSON's path."""
    from models import load_model
    from stbir_train.manifest import build_manifests, check_files, manifest_paths, read_manifest

    paths = manifest_paths(cfg)
    if not paths[split].is_file():
        build_manifests(cfg)
    rows = read_manifest(paths[split])
    root = cfg.resolve(cfg.data.root)
    check_files(rows, root, paths[split])
    cache = ImageCache(root)
    runs = []
    for ckpt in [checkpoint] + ([compare] if compare else []):
        model, meta = load_model(ckpt)
        res = evaluate_rows(model, rows, cache, rankings=5)
        stages = (meta.get("config") or {}).get("training", {}).get("stages")
        res["checkpoint"] = {"path": str(ckpt), "sha256": file_sha256(ckpt),
                             "stages": [s["target"] for s in stages] if stages else None,
                             "fusion_weight": float(model.fusion_weight)}
        echo(f"{split} split, checkpoint {ckpt}"
             + (f" (stages: {' -> '.join(res['checkpoint']['stages'])})" if stages else ""))
        echo(format_table(res))
        runs.append(res)
    results = {**runs[0], "split": split, "config": cfg.to_dict()}
    if compare:
        other = {k: v for k, v in runs[1].items() if k != "rankings"}
        results["compare"] = other
        for mode in MODES:
            a = runs[0]["modes"][mode]["overall"]["R@1"]
            b = runs[1]["modes"][mode]["overall"]["R@1"]
            echo(f"{mode:<11} R@1: {a:.3f} vs {b:.3f} ({a - b:+.3f})")
    return atomic_write_text(out or cfg.out / "results.json", json.dumps(results, indent=2))
