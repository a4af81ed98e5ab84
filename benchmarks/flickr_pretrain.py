"""CLIP-style pretraining on real photos (flickr8k-1k): the edge preset's image tower from ImageNet
weights (MobileNetV2) against from scratch; image->text and text->image R@1/5/10 on the 100
held-out photos (500 captions), after training on the other 900 (4,500 captions; each epoch
shows every photo once with one of its captions).

    python benchmarks/flickr_pretrain.py [--data ../shared/data] [--epochs 6] [--out runs/flickr]
        [--starts imagenet,scratch] [--preset edge] [--save]

Each start is one `stbir-train pretrain --config OUT/<start>.yaml` run; the configs are kept, so
any row can be re-run with the CLI alone.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml  # noqa: E402

from stbir_train.config import load_config  # noqa: E402
from stbir_train.pretrain import pretrain  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    root = Path(__file__).resolve().parents[2] / "shared" / "data"
    ap.add_argument("--data", default=str(root))
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--preset", default="edge")
    ap.add_argument("--starts", default="imagenet,scratch")
    ap.add_argument("--out", default="runs/flickr")
    ap.add_argument("--save", action="store_true", help="also write benchmarks/results/flickr_pretrain.*")
    args = ap.parse_args(argv)
    data, out = Path(args.data), Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for start in args.starts.split(","):
        model = {"preset": args.preset}
        if start == "imagenet":
            weights = str(data / "weights" / "mobilenet_v2_imagenet.pt")
            model.update(pretrained=weights, sketch_pretrained=weights)
        cfg = {"output_dir": str(out / start), "model": model,
               "pretrain": {"captions": str(data / "flickr8k-1k" / "captions.txt"),
                            "images": str(data / "flickr8k-1k" / "images"), "holdout": 0.1,
                            "epochs": args.epochs, "lr": args.lr, "batch_size": 64}}
        path = out / f"{start}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        print(f"$ stbir-train pretrain --config {path}")
        summary = pretrain(load_config(path), log=print)
        rows.append({"start": start, "config": str(path), "seconds": round(summary["seconds"], 1),
                     "final": summary["final"]})
    lines = ["| image tower start | epochs | train time | image->text R@1 / R@5 / R@10 | "
             "text->image R@1 / R@5 / R@10 |", "|---|---|---|---|---|"]
    for r in rows:
        f = r["final"]
        lines.append(f"| {r['start']} | {args.epochs} | {r['seconds']:.0f} s | "
                     + " | ".join(" / ".join(f"{f[d][k]:.3f}" for k in ("R@1", "R@5", "R@10"))
                                  for d in ("image_to_text", "text_to_image")) + " |")
    table = "\n".join(lines)
    print(table)
    result = {"preset": args.preset, "epochs": args.epochs, "lr": args.lr, "rows": rows,
              "load_after": [round(x, 2) for x in os.getloadavg()]}
    (out / "flickr_pretrain.json").write_text(json.dumps(result, indent=2))
    (out / "flickr_pretrain.md").write_text(table + "\n")
    if args.save:
        res = Path(__file__).resolve().parent / "results"
        (res / "flickr_pretrain.json").write_text(json.dumps(result, indent=2))
        (res / "flickr_pretrain.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
