"""The example photo's default weight in a photo + text query (``fusion.DEFAULT_IMAGE_WEIGHT``).

Task ("like this photo, but ..."): on the Flickr8k validation gallery of the real-photo model
(runs/real8k: index-fp32, 1,000 photos), for each target photo X the example Z is one of its 10
nearest *other* photos in image space, drawn at random (a photo like it, not X itself), the text
is X's first caption; the query normalize(w * image(Z) + (1 - w) * text) should find X. Z itself
is left out of the ranking (the user has it already; the runtime returns it first, marked
same_file). R@1 / R@10 of X over the weight grid; w = 0 is the caption alone, w = 1 the example
photo alone. The default is the weight with the best R@1 (R@10 on a tie).

    nice .venv/bin/python benchmarks/image_weight.py
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import common
import numpy as np

from stbir_infer.encoders import Encoders
from stbir_infer.fusion import DEFAULT_IMAGE_WEIGHT
from stbir_infer.gallery import GalleryIndex

RUN = common.REPO / "runs" / "real8k"
CAPTIONS = common.REPO.parent / "shared" / "data" / "flickr8k" / "captions.csv"
GRID = tuple(round(0.1 * i, 1) for i in range(11))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=RUN / "export")
    ap.add_argument("--index", type=Path, default=RUN / "index-fp32")
    ap.add_argument("--queries", type=int, default=1000, help="target photos (first N by name)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=common.RESULTS / "image_weight.json")
    args = ap.parse_args(argv)
    result, t_start = common.begin("image_weight", args.threads)
    idx = GalleryIndex.load(args.index)
    names = sorted(idx.files)[: args.queries]
    labels = np.array([int(idx.files[p]["label"]) for p in names])
    every = np.fromiter(sorted(idx.items), np.int64, len(idx.items))
    gallery = np.asarray(idx.hnsw.get_items(every), np.float32)
    row_of = {int(label): i for i, label in enumerate(every)}
    targets = np.array([row_of[int(label)] for label in labels])
    captions: dict[str, str] = {}
    with open(CAPTIONS, newline="") as f:
        for r in csv.DictReader(f):
            captions.setdefault(r["image"], r["caption"])
    enc = Encoders(args.model, threads=args.threads)
    t0 = time.perf_counter()
    text = np.concatenate([enc.text([captions[Path(p).name] for p in names[s:s + 64]])
                           for s in range(0, len(names), 64)])
    text_s = time.perf_counter() - t0
    sims = gallery[targets] @ gallery.T
    sims[np.arange(len(targets)), targets] = -2  # the example is another photo than the target
    near = np.argsort(-sims, axis=1)[:, :10]
    pick = near[np.arange(len(targets)), np.random.default_rng(0).integers(0, 10, len(targets))]
    examples = gallery[pick]
    rows = []
    for w in GRID:
        q = w * examples + (1 - w) * text
        q /= np.linalg.norm(q, axis=1, keepdims=True)
        scores = q @ gallery.T
        scores[np.arange(len(targets)), pick] = -2  # the example itself is not a find
        rank = (scores > scores[np.arange(len(targets)), targets][:, None]).sum(axis=1) + 1
        rows.append({"image_weight": w, "R@1": float((rank <= 1).mean()),
                     "R@10": float((rank <= 10).mean()), "median_rank": float(np.median(rank))})
    best = max(rows, key=lambda r: (r["R@1"], r["R@10"]))
    result.update(queries=len(names), gallery=len(every), text_seconds=round(text_s, 1),
                  rows=rows, best=best["image_weight"], runtime_default=DEFAULT_IMAGE_WEIGHT)
    md = ["# Example photo + text: the image weight", "",
          "| image weight | R@1 | R@10 | median rank |", "|---|---|---|---|"]
    md += [f"| {r['image_weight']:.1f} | {r['R@1']:.3f} | {r['R@10']:.3f} | {r['median_rank']:.0f} |"
           for r in rows]
    md.append(f"\nbest R@1: image weight {best['image_weight']} (runtime default "
              f"{DEFAULT_IMAGE_WEIGHT})")
    common.finish("image_weight", result, args.out, "\n".join(md), t_start)
    return result


if __name__ == "__main__":
    main()
