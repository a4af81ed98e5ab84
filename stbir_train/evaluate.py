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

from stbir_infer.contract import atomic_write_text, file_sha256
from stbir_infer.preprocess import preprocess
from stbir_train import verification
from stbir_train.data import ImageCache
from stbir_train.fusion import fused_scores, query_fused, relevant_mask, select_fusion, weight_grid
from stbir_train.metrics import metrics_by_group, retrieval_metrics

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


@torch.no_grad()
def score_modes(model, enc: dict) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per mode: (scores [Q, G], index of each query's item in the gallery [Q]). ``sketch+text``
    is the checkpoint's default fusion; with a Combiner, both fusions are also modes of their own."""
    gallery = enc["gallery"]
    owner = torch.from_numpy(enc["owner"])
    fused = query_fused(model, enc["sketch"], enc["text"][owner])
    n = len(gallery)
    out = {
        "sketch": ((enc["sketch"] @ gallery.T).numpy(), enc["owner"]),
        "text": ((enc["text"] @ gallery.T).numpy(), np.arange(n)),
        "sketch+text": ((fused @ gallery.T).numpy(), enc["owner"]),
    }
    if getattr(model, "combiner", None) is not None:
        for method in ("mean", "combiner"):
            out[f"sketch+text:{method}"] = (fused_scores(model, enc, method), enc["owner"])
    return out


def evaluate_rows(model, rows: list[dict], cache: ImageCache, batch_size: int = 128,
                  device="cpu", rankings: int = 0, select: bool = False,
                  verify: bool = False) -> dict:
    """Metrics per mode (overall and per category); with ``rankings`` > 0 also the top
    ``rankings`` gallery images of every sketch+text query. ``select``: first pick the default
    fusion on these rows and store it in the model (validation; stbir_train.fusion).
    ``verify``: verification figures per mode (stbir_train.verification) under "verification"."""
    was_training = model.training
    model.eval()  # also the Combiner's dropout, for every fused score below
    enc = encode_rows(model, rows, cache, batch_size, device)
    selection = select_fusion(model, enc) if select else None
    results = {"modes": {}, "counts": {"gallery": len(rows), "sketch_queries": len(enc["owner"]),
                                       "text_queries": len(rows),
                                       "items_with_several_sketches": int(sum(
                                           len(r["positive_sketches"]) > 1 for r in rows))}}
    if selection is not None:
        results["fusion"] = selection
    elif verify:  # the weighted mean by weight on these rows, for reference (nothing is picked)
        results["weight_grid"] = {str(w): v for w, v in weight_grid(model, enc).items()}
    categories = [r["category"] for r in rows]
    images = [r["image"] for r in rows]
    for mode, (scores, target) in score_modes(model, enc).items():
        results["modes"][mode] = metrics_by_group(scores, relevant_mask(scores.shape, target),
                                                  [categories[t] for t in target])
        if verify and scores.shape[1] > 1:  # one photo alone has no impostor pairs
            names = ([f"text: {r['text']}" for r in rows] if mode == "text"
                     else enc["sketch_paths"])
            results.setdefault("verification", {})[mode] = verification.report(
                scores, target, names, images)
        if mode == "sketch+text" and rankings:
            top = np.argsort(-scores, axis=1, kind="stable")[:, :rankings]
            results["rankings"] = [
                {"sketch": enc["sketch_paths"][q], "text": rows[enc["owner"][q]]["text"],
                 "target": rows[enc["owner"][q]]["image"],
                 "top": [rows[g]["image"] for g in top[q]],
                 "scores": [round(float(scores[q, g]), 6) for g in top[q]]}
                for q in range(len(top))]
    captioned = np.array([bool(str(r.get("text") or "").strip()) for r in rows], bool)
    if captioned.any():  # seed 003's other direction: a photo finds its caption
        scores = (enc["gallery"][captioned] @ enc["text"][captioned].T).numpy()
        results["image_to_text"] = retrieval_metrics(scores, np.eye(len(scores), dtype=bool))
    model.train(was_training)
    return results


def format_table(results: dict) -> str:
    cols = ("R@1", "R@5", "R@10", "mAP", "median_rank", "mean_rank")
    head = f"| {'mode':<20} | " + " | ".join(f"{c:>11}" for c in cols) + " |"
    lines = [head, "|" + "-" * (len(head) - 2) + "|"]
    rows = [(mode, results["modes"][mode]["overall"]) for mode in results["modes"]]
    if "image_to_text" in results:
        rows.append(("image->text", results["image_to_text"]))
    for mode, m in rows:
        lines.append(f"| {mode:<20} | " + " | ".join(f"{m[c]:>11.3f}" for c in cols) + " |")
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
    from stbir_train.manifest import build_manifests, check_files, manifest_paths, read_manifest_rows

    paths = manifest_paths(cfg)
    if not paths[split].is_file():
        build_manifests(cfg)
    rows = read_manifest_rows(paths[split])
    root = cfg.resolve(cfg.data.root)
    check_files(rows, root, paths[split])
    cache = ImageCache(root)
    runs = []
    for ckpt in [checkpoint] + ([compare] if compare else []):
        model, meta = load_model(ckpt)
        res = evaluate_rows(model, rows, cache, rankings=5, verify=True)
        stages = (meta.get("config") or {}).get("training", {}).get("stages")
        default = model.default_fusion
        res["checkpoint"] = {"path": str(ckpt), "sha256": file_sha256(ckpt),
                             "stages": [s["target"] for s in stages] if stages else None,
                             "fusion_weight": round(float(model.query_sketch_weight), 6), "fusion": default,
                             "fusion_selection": meta.get("fusion_selection"),
                             "score_thresholds": meta.get("score_thresholds")}
        echo(f"{split} split, checkpoint {ckpt}"
             + (f" (stages: {' -> '.join(res['checkpoint']['stages'])})" if stages else ""))
        echo(format_table(res))
        echo(f"sketch+text is the checkpoint's default: "
             f"{'Combiner' if default == 'combiner' else 'weighted mean'}, w={float(model.query_sketch_weight):g}"
             + (" (picked on validation)" if meta.get("fusion_selection") else " (the config's)")
             + f"; {split} R@1 of the weighted mean by w: "
             + ", ".join(f"{w} {v['R@1']:.3f}" for w, v in res["weight_grid"].items()))
        if "verification" in res:
            echo("verification (accept when score >= threshold; every query x every photo):")
            echo(verification.format_table(res["verification"]))
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
