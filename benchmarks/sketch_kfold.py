"""Sketch-tower fine-tuning measured on human sketches, with k-fold real-sketch mixing.

    python benchmarks/sketch_kfold.py ../shared/data/sketchy-dev25 \
        --checkpoint runs/real8k-v2/data/runs/checkpoints/best.pt \
        --data contour=runs/real8k-v2/data/photos \
        [--baseline canny=runs/real8k/data/runs/checkpoints/best.pt] \
        [--steps 30] [--limit 256] [--folds 5] [--weight 0.25]

Every sketchy-dev25 sketch (625) queries a gallery of its 119 photos, scored in torch (the
towers the export converts): against the image vectors (``image``), the sketch tower's vectors
of the photos' edge-gallery drawings (``edge``, ``stbir_infer.edges.gallery_sketch``) and their
mean (``image+edge``), the drawing descriptors of sketch and edge drawing (``drawing``: what the
runtime's edge gallery ranks a sketch alone by, at its default weight 1.0); ``text`` ("a photo
of a <class>") and ``sketch+text`` (the unit mean of the two vectors at the checkpoint's
validated sketch weight, against the image vectors). Instance R@1/5/10 (the photo the sketch
was drawn from), class P@1 and mAP (any photo of its class).

Rows: each ``--baseline`` and the checkpoint as they are; ``stbir-train sketch-tune``
(``stbir_train.sketch_tune``) on each ``--data`` folder's pseudo-sketches only (zero-shot: no
sketchy-dev25 sketch seen); and with the last ``--data`` plus real pairs (``real_sketches``) in
a k-fold over the 25 classes: train on the other classes' pairs, query with the held-out
classes' sketches only (all 119 photos stay in the gallery), pooled over the folds, so no
figure comes from a class it was trained on.
Writes benchmarks/results/sketch_kfold.json and a markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.sketch_recipes import class_metrics  # noqa: E402
from models import load_model  # noqa: E402
from stbir_infer.preprocess import open_image, preprocess  # noqa: E402
from stbir_train.sketch_pairs import read_pairs  # noqa: E402
from stbir_train.sketch_tune import targets, tune, tune_config  # noqa: E402

MODES = ("image", "edge", "image+edge", "drawing", "text", "sketch+text")


@torch.no_grad()
def scores(model, pairs, sketch_weight: float, keep: set[str] | None = None,
           gallery: tuple | None = None) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Per mode, the [sketches, photos] score matrix of the sketches of classes ``keep`` (all:
    None); and each sketch's photo index. ``gallery``: the photos' image vectors and edge
    drawings when already computed (a tuned checkpoint keeps its base's image tower)."""
    spec = model.input_specs()["sketch"]
    image, edge_px = gallery or targets(model, pairs)
    edge, edge_draw = (torch.cat(t) for t in zip(*(model.encode_sketch_graph(edge_px[i:i + 64])
                                                   for i in range(0, len(edge_px), 64))))
    paths = [(i, s) for i, ss in enumerate(pairs.sketches) for s in ss
             if keep is None or pairs.classes[i] in keep]
    owner = np.array([i for i, _ in paths])
    px = torch.from_numpy(np.stack([preprocess(open_image(s, 1), spec) for _, s in paths]))
    sk, sk_draw = (torch.cat(t) for t in zip(*(model.encode_sketch_graph(px[i:i + 64])
                                               for i in range(0, len(px), 64))))
    names = sorted(set(pairs.classes))
    text = model.encode_text(model.tokenizer()([f"a photo of a {c.replace('_', ' ')}" for c in names]))
    t = text[[names.index(pairs.classes[i]) for i in owner]]
    fused = torch.nn.functional.normalize(sketch_weight * sk + (1 - sketch_weight) * t, dim=-1)
    si, se = sk @ image.T, sk @ edge.T
    out = {"image": si, "edge": se, "image+edge": (si + se) / 2, "drawing": sk_draw @ edge_draw.T,
           "text": t @ image.T,
           "sketch+text": fused @ image.T}
    return {k: v.numpy() for k, v in out.items()}, owner


def evaluate(ckpt: Path, pairs, keep: set[str] | None = None, gallery: tuple | None = None,
             ) -> tuple[dict, np.ndarray]:
    """Score matrices of every mode for the sketches of classes ``keep`` (all: None)."""
    model, state = load_model(ckpt)
    w = float((state.get("fusion_selection") or {}).get("weight", 0.5))  # validated on flickr8k
    return scores(model, pairs, w, keep, gallery)


def row(name: str, sims: dict, owner: np.ndarray, classes: list[str], **extra) -> dict:
    return {"row": name, **extra, "modes": {m: class_metrics(sims[m], owner, classes) for m in MODES}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sketchy", type=Path)
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--data", action="append", required=True, metavar="NAME=FOLDER",
                    help="a sketchify category folder (trainA, trainB) per recipe; repeatable")
    ap.add_argument("--baseline", action="append", default=[], metavar="NAME=CKPT",
                    help="another checkpoint, evaluated as it is (repeatable)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--limit", type=int, default=256)
    ap.add_argument("--edge", type=float, default=0.5, help="loss weight of sketch <-> edge drawing")
    ap.add_argument("--drawing", type=float, default=0.0,
                    help="loss weight of the drawing descriptors of sketch <-> edge drawing")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--weight", type=float, default=0.25, help="real pairs' share of a batch")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/sketch_kfold.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    t0 = time.time()
    pairs = read_pairs(args.sketchy.resolve())  # the paths sketch_tune keys its cache by
    names = sorted(set(pairs.classes))
    data = dict(item.split("=", 1) for item in args.data)
    rows = []
    for name, ckpt in [item.split("=", 1) for item in args.baseline]:
        rows.append(row(f"{name} as is", *evaluate(Path(ckpt), pairs), pairs.classes, checkpoint=str(ckpt)))
        print(rows[-1]["row"], {k: round(v["instance_R@1"], 3) for k, v in rows[-1]["modes"].items()}, flush=True)
    # The gallery's image vectors and edge drawings, once: every tuned model keeps this image tower
    # (sketch_tune reads them from the same cache for the real pairs).
    gallery = targets(load_model(args.checkpoint)[0], pairs)
    cache: dict = {(str(args.checkpoint.resolve()), str(args.sketchy.resolve())):
                   ({p: i for i, p in enumerate(pairs.photos)}, gallery)}
    rows.append(row("checkpoint as is", *evaluate(args.checkpoint, pairs, gallery=gallery), pairs.classes,
                    checkpoint=str(args.checkpoint)))
    base = {"checkpoint": str(args.checkpoint.resolve()), "steps": args.steps, "limit": args.limit,
            "batch_size": args.batch_size, "lr": args.lr,
            "loss": {"image": 1.0, "edge": args.edge, "drawing": args.drawing}}
    with tempfile.TemporaryDirectory(prefix="sketch_kfold_") as tmp:
        for name, folder in data.items():
            cfg = tune_config({**base, "data": str(Path(folder).resolve()), "out": f"{tmp}/{name}.pt"})
            info = tune(cfg, cache=cache)
            rows.append(row(f"tuned on {name} pseudo-sketches", *evaluate(Path(cfg.out), pairs, gallery=gallery),
                            pairs.classes, seconds=info["seconds"]))
            print(rows[-1]["row"], {k: round(v["instance_R@1"], 3) for k, v in rows[-1]["modes"].items()}, flush=True)
        folds = np.array_split(np.random.default_rng(0).permutation(names), args.folds)
        parts, seconds = [], 0.0
        for k, held in enumerate(folds):
            held = sorted(held.tolist())
            real = {"root": str(args.sketchy.resolve()), "weight": args.weight, "exclude": held}
            cfg = tune_config({**base, "data": str(Path(folder).resolve()), "out": f"{tmp}/fold{k}.pt",
                               "real_sketches": real})
            seconds += tune(cfg, cache=cache)["seconds"]
            parts.append(evaluate(Path(cfg.out), pairs, set(held), gallery))
            print(f"fold {k + 1}/{args.folds} (held out: {', '.join(held)}) done", flush=True)
        sims = {m: np.concatenate([p[0][m] for p in parts]) for m in MODES}
        owner = np.concatenate([p[1] for p in parts])
        rows.append(row(f"tuned on {name} + real pairs, {args.folds}-fold over classes", sims, owner,
                        pairs.classes, folds=[sorted(f.tolist()) for f in folds], seconds=round(seconds, 1)))
    result = {"sketchy": str(args.sketchy), "photos": len(pairs), "classes": len(names),
              "chance": {"instance_R@1": 1 / len(pairs), "class_P@1": 1 / len(names)},
              "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows,
              "command": "python benchmarks/sketch_kfold.py " + " ".join(argv or sys.argv[1:]),
              "total_seconds": round(time.time() - t0, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    return 0


def table(result: dict) -> str:
    lines = ["| row | mode | inst R@1 | R@5 | R@10 | class P@1 | class mAP |", "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        for m, v in r["modes"].items():
            lines.append(f"| {r['row']} | {m} | {v['instance_R@1']:.3f} | {v['instance_R@5']:.3f} | "
                         f"{v['instance_R@10']:.3f} | {v['class_P@1']:.3f} | {v['class_mAP']:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
