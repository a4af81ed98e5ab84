"""Which feature maps make the drawing descriptor? Measured on human sketches, in torch.

    python benchmarks/drawing_descriptor.py ../shared/data/sketchy-dev25 \
        --checkpoint runs/real8k/data/runs/checkpoints/best.pt

Every sketchy-dev25 sketch (625) against the 119 photos' edge-gallery drawings
(``stbir_infer.edges.gallery_sketch``), both through the checkpoint's sketch tower (a
MobileNetV2): the projected embedding, and each candidate descriptor -- one or two of the
backbone's feature maps (``features.<i-1>``'s output for stage i), average-pooled to a g x g
grid, unit-normalised, joined (``models.towers.SketchEncoder.with_drawing`` ships stages 14 and
17 at g = 2). Instance R@1 / R@10 and class P@1 / mAP as ``benchmarks/sketch_recipes.py``
computes them; the last line picks the candidate on 4 folds of classes and reports it on the
fifth, pooled. Writes benchmarks/results/drawing_descriptor.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.sketch_recipes import class_metrics, metric_table, sketchy  # noqa: E402
from models.checkpoint import load_model  # noqa: E402
from stbir_infer.edges import gallery_sketch  # noqa: E402
from stbir_infer.preprocess import open_image, preprocess  # noqa: E402

STAGES = (11, 14, 17, 18, 19)
CANDIDATES = [((s, g),) for s in STAGES for g in (1, 2, 3)] + [
    ((14, 2), (17, 2)), ((14, 2), (18, 2)), ((14, 3), (17, 2)), ((14, 2), (17, 3)),
    ((11, 2), (14, 2), (17, 2)), ((14, 2), (17, 2), (19, 1))]


@torch.no_grad()
def features(model, images, spec) -> dict:
    """{(stage, grid): unit pooled maps, "embedding": unit embeddings} of sketch-like images."""
    x = torch.from_numpy(np.stack([preprocess(im, spec) for im in images]))
    out, h = {}, x
    for stage, block in enumerate(model.sketch.backbone.features, start=1):
        h = block(h)
        if stage in STAGES:
            for g in (1, 2, 3):
                out[(stage, g)] = F.normalize(F.adaptive_avg_pool2d(h, g).flatten(1), dim=-1)
    out["embedding"] = model.encode_sketch(x)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data_dir", type=Path, help="sketchy-dev25 (photo/<class>/, sketch/<class>/)")
    ap.add_argument("--checkpoint", type=Path, required=True, help="a checkpoint with a MobileNetV2 sketch tower")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/drawing_descriptor.json"))
    args = ap.parse_args(argv)
    if not args.data_dir.is_dir() or not args.checkpoint.is_file():
        print(f"drawing_descriptor: skipped: needs {args.data_dir} and {args.checkpoint}")
        return 0
    torch.set_num_threads(2)
    model, _ = load_model(args.checkpoint)
    model.eval()
    if model.spec.sketch_backbone != "mobilenet_v2":
        raise SystemExit(f"{args.checkpoint}: the stages here are MobileNetV2's")
    spec = model.input_specs()["sketch"]
    photo_paths, classes, sketch_paths, owner = sketchy(args.data_dir)
    q = features(model, [open_image(s, 1) for s in sketch_paths], spec)
    g = features(model, [gallery_sketch(open_image(p, 3)) for p in photo_paths], spec)
    sims = {k: (q[k] @ g[k].T).numpy() for k in q}
    scores = {"embedding": sims["embedding"],
              **{" + ".join(f"stage {s} grid {n}" for s, n in c): sum(sims[t] for t in c) / len(c)
                 for c in CANDIDATES}}
    rows = [{"descriptor": name, **class_metrics(s, owner, classes)} for name, s in scores.items()]
    # the candidate picked on 4 folds of classes (class P@1 + instance R@1), reported on the fifth
    cls = np.array(classes)[owner]
    folds = np.array_split(np.random.default_rng(0).permutation(sorted(set(classes))), 5)
    pooled, picked = np.zeros_like(sims["embedding"]), []
    for fold in folds:
        test = np.isin(cls, fold)

        def objective(name, rows=~test):
            m = class_metrics(scores[name][rows], owner[rows], classes)
            return m["class_P@1"] + m["instance_R@1"]
        best = max(scores, key=objective)
        picked.append(best)
        pooled[test] = scores[best][test]
    rows.append({"descriptor": f"picked by 5-fold class CV: {picked}", **class_metrics(pooled, owner, classes)})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"checkpoint": str(args.checkpoint), "rows": rows}, indent=2) + "\n")
    print(metric_table("descriptor", rows, "descriptor"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
