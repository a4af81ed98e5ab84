"""Which pseudo-sketch recipe looks most like what people draw? Measured without training.

    python benchmarks/sketch_recipes.py ../shared/data/sketchy-dev25 [--weights W] [--size 128]

The ImageNet MobileNetV2 with no training (pooled features; the start of the real preset's
sketch tower), every human sketch of sketchy-dev25 (625) as a query against the 119 photos'
pseudo-sketches drawn by one recipe (no jitter): instance R@1 / R@10 (the photo the sketch was
drawn from), class P@1 and mAP (any photo of its class). A recipe whose drawings sit closer to
human ones in this untrained space gives the sketch tower less distance to learn. Rows:
``canny`` is the runtime's edge-gallery drawing (``stbir_infer.edges.gallery_sketch``, today's
training extraction unjittered); ``contour`` rows are ``stbir_train.strokes`` at one abstraction
level and salience emphasis each. Writes benchmarks/results/sketch_recipes.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402
from benchmarks.sketch_proxies import _trunk, embed, spec  # noqa: E402
from stbir_infer.edges import gallery_sketch  # noqa: E402
from stbir_infer.preprocess import open_image  # noqa: E402
from stbir_train import strokes  # noqa: E402

RECIPES = {  # name -> photo -> drawing
    "canny": gallery_sketch,
    **{f"contour level={lv} emphasis={em}":
       (lambda p, lv=lv, em=em: strokes.draw(strokes.contour_strokes(p, lv, em)))
       for lv in (0.0, 0.5, 1.0) for em in (0.0, 1.0, 2.0)},
}


def sketchy(root: Path):
    """(photo paths, photo classes, sketch paths, sketch -> photo index)."""
    photos = sorted(root.glob("photo/*/*.jpg"))
    if not photos:
        raise SystemExit(f"{root}: no photo/<class>/<id>.jpg")
    index = {(p.parent.name, p.stem): i for i, p in enumerate(photos)}
    sketches, owner = [], []
    for s in sorted(root.glob("sketch/*/*.png")):
        key = (s.parent.name, s.stem.rsplit("-", 1)[0])
        if key in index:
            sketches.append(s)
            owner.append(index[key])
    return photos, [p.parent.name for p in photos], sketches, np.array(owner)


def class_metrics(sims: np.ndarray, owner: np.ndarray, classes: list[str]) -> dict:
    """Sketch queries [Q, G] against the gallery: instance R@k (the photo ``owner`` drew from)
    and class P@1 / mAP (any photo of the same class); also used by sketch_kfold.py."""
    own = sims[np.arange(len(owner)), owner]
    rank = (sims > own[:, None]).sum(1) + 1
    cls = np.array(classes)
    hits = np.take_along_axis(cls[None, :] == cls[owner][:, None], np.argsort(-sims, 1), 1)
    ap = (np.cumsum(hits, 1) / np.arange(1, hits.shape[1] + 1) * hits).sum(1) / hits.sum(1)
    return {"instance_R@1": float((rank <= 1).mean()), "instance_R@5": float((rank <= 5).mean()),
            "instance_R@10": float((rank <= 10).mean()), "class_P@1": float(hits[:, 0].mean()),
            "class_mAP": float(ap.mean()), "queries": int(len(owner))}


def metric_table(name: str, rows: list[dict], key: str) -> str:
    """Markdown: one row per ``rows`` item (``class_metrics`` keys), labelled by ``row[key]``."""
    return common.md_table([name, "inst R@1", "inst R@10", "class P@1", "class mAP"],
                           [[r[key], *(f"{r[m]:.3f}" for m in ("instance_R@1", "instance_R@10",
                                                             "class_P@1", "class_mAP"))] for r in rows])


def scores(q: torch.Tensor, g: torch.Tensor, owner: np.ndarray, classes: list[str]) -> dict:
    return class_metrics((q @ g.T).numpy(), owner, classes)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data_dir", type=Path, help="sketchy-dev25 (photo/<class>/, sketch/<class>/)")
    ap.add_argument("--weights", type=Path, help="torchvision mobilenet_v2 state dict "
                    "(default: DATA_DIR/../weights/mobilenet_v2_imagenet.pt)")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/sketch_recipes.json"))
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(2)
    weights = args.weights or args.data_dir.parent / "weights" / "mobilenet_v2_imagenet.pt"
    t0 = time.time()
    photo_paths, classes, sketch_paths, owner = sketchy(args.data_dir)
    photos = [open_image(p, 3) for p in photo_paths]
    net = _trunk(weights)
    sp = spec(args.size, 1, "pad")
    q = embed(net, [open_image(s, 1) for s in sketch_paths], sp)
    rows = [{"recipe": "photo (no pseudo-sketch)",
             **scores(q, embed(net, photos, spec(args.size, 3, "pad")), owner, classes)}]
    for name, fn in RECIPES.items():
        t = time.time()
        drawings = [fn(p) for p in photos]
        rows.append({"recipe": name, **scores(q, embed(net, drawings, sp), owner, classes),
                     "draw_ms": round(1000 * (time.time() - t) / len(photos), 1)})
        print(rows[-1], flush=True)
    result = {"photos": len(photos), "sketches": len(sketch_paths), "size": args.size,
              "classes": len(set(classes)), "chance_class_P@1": 1 / len(set(classes)),
              "total_seconds": round(time.time() - t0, 1), "rows": rows,
              "command": " ".join(["python", "benchmarks/sketch_recipes.py", *map(str, argv or sys.argv[1:])])}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(metric_table("gallery drawing", rows, "recipe"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
