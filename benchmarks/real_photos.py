"""Real photos end to end: sketchify -> pretrain -> train -> export -> enroll -> query.

    # the real-photo model (docs/real-photos.md): Flickr8k, a sentence encoder
    python benchmarks/real_photos.py ../shared/data/flickr8k --text-model DIR --weights W --out OUT
    # the older recipe (the product's own small text tower) on the 1,000-photo subset
    python benchmarks/real_photos.py ../shared/data/flickr8k-1k [--out runs/real] [--epochs 15]
    python benchmarks/real_photos.py ../shared/data/flickr8k-1k --sheet-only   # the contact sheet

DATA_DIR is Flickr8k's layout (``images/``, ``captions.csv``, ``split.csv``: train on ``train``,
the ``val`` photos are the gallery) or the subset's (``images/``, ``captions.txt``; ``--test``
random photos are the gallery). Every step is the product's own command (run as a subprocess,
as a user would), except the final queries, which go through the torch-free runtime's Python
API (``stbir_infer.Searcher``, fp32 and int8, each precision enrolling its own index) so that
every query of the held-out gallery can be ranked: each test photo's pseudo-sketch (sketch),
each of its captions (text, 5 a photo) and each caption with the sketch (sketch+text), against
the enrolled test photos; and image->text (a photo against all test captions: found when any
of its own ranks within k). R@1/5/10, mAP (one relevant photo per query: the mean reciprocal
rank) and the median rank. OUT/export is the export a user points ``stbir-infer`` at. Writes
OUT/real_photos.json and prints markdown tables; docs/real-photos.md quotes them.
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

from benchmarks import common  # noqa: E402

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
    """The benchmark's schedule and resize modes on top of what sketchify wrote (the text-model
    recipe keeps sketchify's schedule unless --epochs is given; ``--set`` overrides any key)."""
    data = yaml.safe_load(config.read_text())
    if not args.text_model or args.epochs is not None:
        target = "sketch" if args.text_model else "all"
        data["training"]["stages"] = [{"target": target, "epochs": args.epochs or 15,
                                       "lr": args.lr, "weight_decay": 0.05}]
    if args.pretrain_epochs is not None:
        data["pretrain"]["epochs"] = args.pretrain_epochs
    data["model"]["sketch_resize"] = args.sketch_resize
    data["model"]["image_resize"] = args.image_resize
    common.set_dotted(data, {k: yaml.safe_load(v) for k, _, v in
                             (item.partition("=") for item in args.set)})
    config.write_text(yaml.safe_dump(data, sort_keys=False))


def ranks(searcher, queries: list[tuple], n: int) -> np.ndarray:
    """Rank (1 = first) of each query's photo among the n enrolled photos."""
    answers = searcher.query_many([{"sketch": s, "text": t, "top_k": n} for s, t, _ in queries])
    out = []
    for (_, _, want), hits in zip(queries, answers):
        names = [Path(h.path).name for h in hits]
        out.append(names.index(want) + 1 if want in names else n + 1)
    return np.array(out)


def image_to_text(encoders, photos: list[Path], captions: list[tuple]) -> dict:
    """Each photo against every test caption: rank of its best own caption (1 = first)."""
    img = encoders.image([str(p) for p in photos])
    txt = np.concatenate([encoders.text([c for _, c in captions[i:i + 256]])
                          for i in range(0, len(captions), 256)])
    sim = img @ txt.T  # [P, C]
    owner = np.array([[p.name for p in photos].index(name) for name, _ in captions])
    best = np.array([sim[i, owner == i].max() for i in range(len(photos))])
    return metrics((sim > best[:, None]).sum(1) + 1)


def metrics(r: np.ndarray) -> dict:
    return {"R@1": float((r <= 1).mean()), "R@5": float((r <= 5).mean()),
            "R@10": float((r <= 10).mean()), "mAP": float((1.0 / r).mean()),
            "median_rank": float(np.median(r)), "queries": int(len(r))}


def query_all(export: Path, index: Path, data: Path, precision: str = "fp32") -> dict:
    from stbir_infer import Searcher

    cat = data / CATEGORY
    searcher = Searcher(export, index, threads=2, precision=precision)
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
    result = {k: metrics(v) for k, v in modes.items()}
    result["image->text"] = image_to_text(searcher.encoders, [cat / "testB" / p for p in photos],
                                          captions)
    return {"gallery": n, "precision": precision, "modes": result,
            "query_ms_batched": round(1000 * seconds / total, 2),
            "fusion_weight": searcher.fusion_weight}


def table(result: dict) -> str:
    rows = [f"{result['precision']}:", "| mode | queries | R@1 | R@5 | R@10 | mAP | median rank |",
            "|---|---|---|---|---|---|---|"]
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
    ap.add_argument("data_dir", type=Path, help="flickr8k folder (images/, captions.csv, "
                    "split.csv) or flickr8k-1k (images/, captions.txt)")
    ap.add_argument("--out", type=Path, default=Path("runs/real"))
    ap.add_argument("--text-model", type=Path, help="a Hugging Face sentence encoder folder "
                    "(../shared/data/get-text-model.sh DEST): the real-photo recipe")
    ap.add_argument("--weights", type=Path, help="mobilenet_v2 ImageNet weights (default: "
                    "DATA_DIR/../weights/mobilenet_v2_imagenet.pt; 'none' for random init)")
    ap.add_argument("--method", default="canny")
    ap.add_argument("--test", type=int, default=100, help="gallery size without a split.csv")
    ap.add_argument("--epochs", type=int, default=None,
                    help="training epochs (default: 15; with --text-model sketchify's schedule)")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--sketches-per-photo", type=int, default=None,
                    help="default 3; 2 with --text-model")
    ap.add_argument("--pretrain-epochs", type=int, default=None,
                    help="0: skip; else `stbir-train pretrain` (image + text towers on every "
                    "training caption) first, then train from its clip.pt (default: 5, or "
                    "sketchify's with --text-model)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a dotted config override, e.g. model.image_size=128 (repeatable)")
    ap.add_argument("--int8", action=argparse.BooleanOptionalAction, default=True,
                    help="also export int8 graphs and report the same table for them")
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
    data, export = args.out / "data", args.out / "export"
    split = args.data_dir / "split.csv"
    captions = args.data_dir / ("captions.csv" if split.is_file() else "captions.txt")
    per_photo = args.sketches_per_photo or (2 if args.text_model else 3)
    cmd = [BIN / "stbir-train", "sketchify", args.data_dir / "images", captions, data,
           "--method", args.method, "--sketches-per-photo", per_photo]
    cmd += ["--split", split] if split.is_file() else ["--test", args.test]
    cmd += ["--text-model", args.text_model] if args.text_model else []
    run(cmd + ([] if str(weights) == "none" else ["--weights", weights]), log)
    config = data / "config.yaml"
    configure(config, args)
    cfg = yaml.safe_load(config.read_text())
    if cfg["pretrain"]["epochs"] > 0 and (args.text_model or args.pretrain_epochs is None
                                          or args.pretrain_epochs > 0):
        run([BIN / "stbir-train", "pretrain", "--config", config], log)
        cfg["model"]["pretrained"] = str(data / "runs" / "pretrain" / "clip.pt")
        config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    run([BIN / "stbir-train", "--config", config], log)
    best = data / "runs" / "checkpoints" / "best.pt"
    train_seconds = sum(s["seconds"] for s in log if " sketchify " not in s["cmd"])
    evaluation = ("" if args.text_model else  # the runtime's figures below are the evaluation
                  run([BIN / "stbir-train", "evaluate", "--config", config, "--checkpoint", best], log))
    run([BIN / "stbir-export", best, export]
        + (["--quantize", "int8", "--calibration", "auto"] if args.int8 else []), log)
    results = []
    for precision in ("fp32", "int8") if args.int8 else ("fp32",):
        index = args.out / f"index-{precision}"
        # No edge gallery: the sketch queries here are pseudo-sketches of the gallery photos, which
        # would meet their own photo's drawing (docs/human-sketches.md measures human sketches)
        run([BIN / "stbir-infer", "enroll", "--images", data / CATEGORY / "testB", "--model",
             export, "--index", index, "--quiet", "--no-edge-gallery"]
            + (["--int8"] if precision == "int8" else []), log)
        results.append(query_all(export, index, data, precision))
    result = {"results": results, "args": {k: str(v) for k, v in vars(args).items()},
              "steps": log, "training_seconds": round(train_seconds, 1),
              "total_seconds": round(time.time() - t0, 1),
              "load_average": {"start": load0, "end": os.getloadavg()}, "cpus": os.cpu_count(),
              "evaluate_output": evaluation[-2500:]}
    (args.out / "real_photos.json").write_text(json.dumps(result, indent=2) + "\n")
    for r in results:
        print(table(r))
    print(f"gallery {results[0]['gallery']} held-out photos; {results[0]['query_ms_batched']} ms "
          f"a query (batched); training {train_seconds:.0f}s, total "
          f"{result['total_seconds']:.0f}s; load average {load0[0]:.1f} -> "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    return 0


if __name__ == "__main__":
    sys.exit(main())
