"""Real photos end to end: sketchify -> train -> evaluate -> export -> enroll -> query.

    python benchmarks/real_photos.py ../shared/data/flickr8k-1k [--out runs/real] [--epochs 15] [--pretrain-epochs 5]
    python benchmarks/real_photos.py ../shared/data/flickr8k-1k --sheet-only   # the contact sheet

Every step is the product's own command (run as a subprocess, as a user would), except the final
queries, which go through the torch-free runtime's Python API (``stbir_infer.Searcher``) so that
every query of the held-out gallery can be ranked: each test photo's pseudo-sketch (sketch), each
of its captions (text, 5 a photo) and each caption with the sketch (sketch+text), against the
enrolled test photos. R@1/5/10, mAP (one relevant photo per query: the mean reciprocal rank) and
the median rank. Writes OUT/real_photos.json and prints a markdown table; the README quotes it.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
BIN = Path(sys.executable).parent
CATEGORY = "photos"


def run(cmd: list, log: list) -> str:
    """One product command; its output is echoed and kept."""
    shown = " ".join(str(c) for c in cmd)
    print(f"$ {shown}", flush=True)
    t = time.time()
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    print(out.rstrip(), flush=True)
    log.append({"cmd": shown, "seconds": round(time.time() - t, 1), "status": proc.returncode})
    if proc.returncode:
        raise SystemExit(f"failed ({proc.returncode}): {shown}")
    return out


def configure(config: Path, args) -> None:
    """The benchmark's schedule and resize modes on top of what sketchify wrote."""
    data = yaml.safe_load(config.read_text())
    data["training"]["stages"] = [{"target": "all", "epochs": args.epochs, "lr": args.lr,
                                   "weight_decay": 0.05}]
    data["model"]["sketch_resize"] = args.sketch_resize
    data["model"]["image_resize"] = args.image_resize
    config.write_text(yaml.safe_dump(data, sort_keys=False))


def ranks(searcher, queries: list[tuple], n: int) -> np.ndarray:
    """Rank (1 = first) of each query's photo among the n enrolled photos."""
    out = []
    for sketch, text, want in queries:
        hits = searcher.query(sketch=sketch, text=text, top_k=n)
        names = [Path(h.path).name for h in hits]
        out.append(names.index(want) + 1 if want in names else n + 1)
    return np.array(out)


def metrics(r: np.ndarray) -> dict:
    return {"R@1": float((r <= 1).mean()), "R@5": float((r <= 5).mean()),
            "R@10": float((r <= 10).mean()), "mAP": float((1.0 / r).mean()),
            "median_rank": float(np.median(r)), "queries": int(len(r))}


def query_all(export: Path, index: Path, data: Path) -> dict:
    from stbir_infer import Searcher

    cat = data / CATEGORY
    searcher = Searcher(export, index, threads=2)
    photos = sorted(p.name for p in (cat / "testB").iterdir())
    sketch_of = {p: cat / "testA" / f"{Path(p).stem}_0.png" for p in photos}
    with (cat / "test_captions.csv").open(newline="", encoding="utf-8") as f:
        captions = [(row[0], row[1]) for row in list(csv.reader(f))[1:]]
    n = len(photos)
    t = time.time()
    modes = {
        "sketch": ranks(searcher, [(str(sketch_of[p]), None, p) for p in photos], n),
        "text": ranks(searcher, [(None, c, p) for p, c in captions], n),
        "sketch+text": ranks(searcher, [(str(sketch_of[p]), c, p) for p, c in captions], n),
    }
    seconds = time.time() - t
    total = sum(len(v) for v in modes.values())
    return {"gallery": n, "modes": {k: metrics(v) for k, v in modes.items()},
            "query_ms": round(1000 * seconds / total, 2), "fusion_weight": searcher.fusion_weight}


def table(result: dict) -> str:
    rows = ["| mode | queries | R@1 | R@5 | R@10 | mAP | median rank |", "|---|---|---|---|---|---|---|"]
    for mode, m in result["modes"].items():
        rows.append(f"| {mode} | {m['queries']} | {m['R@1']:.3f} | {m['R@5']:.3f} | "
                    f"{m['R@10']:.3f} | {m['mAP']:.3f} | {m['median_rank']:.0f} |")
    return "\n".join(rows)


def sheet(data_dir: Path, path: Path, n: int = 12, method: str = "canny") -> None:
    """Photo / pseudo-sketch pairs of the first n photos (sorted by name), one variant each."""
    from stbir_infer.preprocess import open_image
    from stbir_train.sketchify import contact_sheet, sketches_of

    photos = sorted((data_dir / "images").glob("*.jpg"))[:n]
    pairs = []
    for i, p in enumerate(photos):
        img = open_image(p, 3)
        pairs.append((img, sketches_of(img, method, 1, np.random.default_rng([0, 1, i]))[0]))
    path.parent.mkdir(parents=True, exist_ok=True)
    contact_sheet(pairs, cell=120).convert("P", palette=1, colors=128).save(path, optimize=True)
    print(f"contact sheet: {path} ({path.stat().st_size // 1024} KB)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data_dir", type=Path, help="flickr8k-1k folder (images/, captions.txt)")
    ap.add_argument("--out", type=Path, default=Path("runs/real"))
    ap.add_argument("--weights", type=Path, help="mobilenet_v2 ImageNet weights (default: "
                    "DATA_DIR/../weights/mobilenet_v2_imagenet.pt; 'none' for random init)")
    ap.add_argument("--method", default="canny")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--sketches-per-photo", type=int, default=3)
    ap.add_argument("--pretrain-epochs", type=int, default=5,
                    help="0: skip; else `stbir-train pretrain` (image + text towers on every training "
                    "caption) first, then train from its clip.pt")
    ap.add_argument("--sketch-resize", default="pad", help="shortest (centre crop) or pad")
    ap.add_argument("--image-resize", default="pad", help="shortest (centre crop) or pad")
    ap.add_argument("--sheet", type=Path, default=REPO / "docs" / "sketchify_sheet.png")
    ap.add_argument("--sheet-only", action="store_true", help="only write the contact sheet")
    args = ap.parse_args(argv)
    if args.sheet_only:
        sheet(args.data_dir, args.sheet)
        return 0
    weights = args.weights or args.data_dir.parent / "weights" / "mobilenet_v2_imagenet.pt"
    t0, load0, log = time.time(), os.getloadavg(), []
    if args.out.exists():
        shutil.rmtree(args.out)
    data, export, index = args.out / "data", args.out / "export", args.out / "index"
    cmd = [BIN / "stbir-train", "sketchify", args.data_dir / "images",
           args.data_dir / "captions.txt", data, "--method", args.method, "--test", "100",
           "--sketches-per-photo", args.sketches_per_photo]
    run(cmd + ([] if str(weights) == "none" else ["--weights", weights]), log)
    config = data / "config.yaml"
    configure(config, args)
    if args.pretrain_epochs > 0:
        cfg = yaml.safe_load(config.read_text())
        cfg["pretrain"]["epochs"] = args.pretrain_epochs
        config.write_text(yaml.safe_dump(cfg, sort_keys=False))
        run([BIN / "stbir-train", "pretrain", "--config", config], log)
        cfg["model"]["pretrained"] = str(data / "runs" / "pretrain" / "clip.pt")
        config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    run([BIN / "stbir-train", "--config", config], log)
    best = data / "runs" / "checkpoints" / "best.pt"
    evaluation = run([BIN / "stbir-train", "evaluate", "--config", config, "--checkpoint", best], log)
    run([BIN / "stbir-export", best, export], log)
    run([BIN / "stbir-infer", "enroll", "--images", data / CATEGORY / "testB", "--model", export,
         "--index", index, "--quiet"], log)
    result = query_all(export, index, data)
    result.update(args={k: str(v) for k, v in vars(args).items()}, steps=log,
                  total_seconds=round(time.time() - t0, 1),
                  load_average={"start": load0, "end": os.getloadavg()}, cpus=os.cpu_count(),
                  evaluate_output=evaluation[-2500:])
    (args.out / "real_photos.json").write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    print(f"gallery {result['gallery']} held-out photos; {result['query_ms']} ms a query; "
          f"total {result['total_seconds']:.0f}s; load average {load0[0]:.1f} -> "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    return 0


if __name__ == "__main__":
    sys.exit(main())
