"""Staged or all at once, from a pretrained start or from random init (issue 14).

On the built-in dataset: pretrain the image/text towers on its photo-caption pairs
(`stbir-train pretrain`), then train

  staged      the seed's stages sketch -> image -> text, anchored on the pretrained towers
  all-pre     all branches at once from the same pretrained towers
  all-random  all branches at once from random init (the old demo)

and rank the test gallery (sketch, text, sketch+text R@1 / R@10). Training times are measured;
pretraining time is added to the schedules that use it, so "total" is what a user waits.

    python benchmarks/schedules.py --per-category 500 --out runs/schedules [--only staged,...]
        [--epochs 4] [--pretrain-epochs 3] [--staged 2,1,1] [--modes both|fused|dropout]

Writes OUT/schedules.json and OUT/schedules.md (and benchmarks/results/schedules.* with --save).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml  # noqa: E402

from stbir_train.config import load_config  # noqa: E402
from stbir_train.evaluate import evaluate_rows  # noqa: E402
from stbir_train.data import ImageCache  # noqa: E402
from stbir_train.manifest import build_manifests, manifest_paths, read_manifest  # noqa: E402
from stbir_train.pretrain import pretrain  # noqa: E402
from stbir_train.synth import write_dataset  # noqa: E402
from stbir_train.train import train  # noqa: E402

MODE_LOSSES = {  # how single modes are trained (item 4 of the issue)
    "fused": dict(modality_dropout=0.0, infonce_sketch=0.0, infonce_text=0.0),
    "both": dict(modality_dropout=0.2, infonce_sketch=0.5, infonce_text=0.5),
}


def _config(data_dir: Path, out: Path, name: str, stages: list, mode_losses: dict, extra: dict,
            four_losses: bool) -> Path:
    d = yaml.safe_load((data_dir / "config.yaml").read_text())
    d["output_dir"] = str(out / name)
    d["data"]["root"] = str(data_dir)
    d["training"]["stages"] = stages
    d["loss"]["modality_dropout"] = mode_losses["modality_dropout"]
    d["loss"]["weights"].update(infonce_sketch=mode_losses["infonce_sketch"],
                                infonce_text=mode_losses["infonce_text"])
    if four_losses:
        d["loss"]["weights"].update(triplet=0.3, fusion=0.1)
    for k, v in extra.items():
        node = d
        *parents, last = k.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = v
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


def _evaluate(cfg_path: Path, ckpt: str) -> dict:
    from models import load_model

    cfg = load_config(cfg_path)
    rows = read_manifest(manifest_paths(cfg)["test"])
    model, _ = load_model(ckpt)
    res = evaluate_rows(model, rows, ImageCache(cfg.resolve(cfg.data.root)))
    return {m: {k: res["modes"][m]["overall"][k] for k in ("R@1", "R@10")} for m in res["modes"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--per-category", type=int, default=500)
    ap.add_argument("--out", default="runs/schedules")
    ap.add_argument("--epochs", type=int, default=4, help="epochs of the all-at-once schedules")
    ap.add_argument("--pretrain-epochs", type=int, default=3)
    ap.add_argument("--staged", default="2,1,1", help="epochs of the sketch, image, text stages")
    ap.add_argument("--pre-epochs", type=int, default=None,
                    help="epochs of all-pre (default: --epochs minus the pretraining's share)")
    ap.add_argument("--modes", default="both", choices=sorted(MODE_LOSSES))
    ap.add_argument("--four-losses", action="store_true", help="triplet 0.3 + fusion 0.1 too")
    ap.add_argument("--only", default="staged,all-pre,all-random")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--preset", default="small", help="model preset (small, edge, seed)")
    ap.add_argument("--imagenet", default=None,
                    help="torchvision mobilenet_v2 weights: adds all-imagenet (edge preset: both "
                         "visual towers from ImageNet, all at once)")
    ap.add_argument("--pretrained-weights", default=None,
                    help="reuse this `pretrain` clip.pt (its results.json beside it gives the time)")
    ap.add_argument("--warm", type=int, default=0,
                    help="epochs of all branches at once before the staged schedule's stages")
    ap.add_argument("--sketch-lr", type=float, default=None, help="lr of the staged sketch stage")
    ap.add_argument("--save", action="store_true", help="also write benchmarks/results/schedules.*")
    args = ap.parse_args(argv)
    out = Path(args.out).resolve()
    data = out / f"data-{args.per_category}"
    if not (data / "config.yaml").is_file():
        write_dataset(data, args.per_category, 100, 1, 0)
    base_cfg = load_config(data / "config.yaml")
    if not all(p.is_file() for p in manifest_paths(base_cfg).values()):
        build_manifests(base_cfg)
    modes = MODE_LOSSES[args.modes]
    only = args.only.split(",")
    rows, pre_seconds, pre_res = [], 0.0, None
    weights = out / "pretrain" / "pretrain" / "clip.pt"
    if args.pretrained_weights:
        weights = Path(args.pretrained_weights).resolve()
        done = json.loads((weights.parent / "results.json").read_text())
        pre_seconds, pre_res = done["train_seconds"], done["final"]
    elif {"staged", "all-pre"} & set(only):
        cfg_path = _config(data, out, "pretrain", [{"target": "all", "epochs": 1}], modes,
                           {"pretrain.epochs": args.pretrain_epochs, "model.preset": args.preset},
                           False)
        t0 = time.time()
        summary = pretrain(load_config(cfg_path), log=print)
        pre_seconds = time.time() - t0
        pre_res = summary["final"]
    se, ie, te = (int(x) for x in args.staged.split(","))
    lr, wd = args.lr, 0.05
    schedules = {
        "staged": ([{"target": "sketch", "epochs": se, "lr": args.sketch_lr or lr, "weight_decay": wd},
                    {"target": "image", "epochs": ie, "lr": lr / 5, "weight_decay": wd},
                    {"target": "text", "epochs": te, "lr": lr / 5, "weight_decay": wd}], True),
        "all-pre": ([{"target": "all", "epochs": args.pre_epochs or args.epochs, "lr": lr,
                      "weight_decay": wd}], True),
        "all-random": ([{"target": "all", "epochs": args.epochs, "lr": lr, "weight_decay": wd}],
                       False),
        "all-imagenet": ([{"target": "all", "epochs": args.epochs, "lr": lr, "weight_decay": wd}],
                         False),
    }
    if args.warm:
        schedules["staged"][0].insert(0, {"target": "all", "epochs": args.warm, "lr": lr,
                                          "weight_decay": wd})
    for name in only:
        stages, uses_pre = schedules[name]
        extra = {"model.pretrained": str(weights)} if uses_pre else {}
        extra["model.preset"] = args.preset
        if name == "all-imagenet":
            extra.update({"model.pretrained": args.imagenet, "model.sketch_pretrained": args.imagenet})
        cfg_path = _config(data, out, name, stages, modes, extra, args.four_losses)
        t0 = time.time()
        summary = train(load_config(cfg_path), log=print)
        seconds = time.time() - t0
        metrics = _evaluate(cfg_path, summary["best_path"])
        rows.append({"schedule": name, "stages": [f"{s['target']} {s['epochs']}" for s in stages],
                     "train_s": round(seconds, 1), "pretrain_s": round(pre_seconds, 1) if uses_pre else 0.0,
                     "total_s": round(seconds + (pre_seconds if uses_pre else 0.0), 1),
                     "metrics": metrics})
        print(json.dumps(rows[-1]))
    load = os.getloadavg()
    result = {"preset": args.preset, "per_category": args.per_category, "modes": args.modes, "modality": modes,
              "four_losses": args.four_losses, "pretrain_epochs": args.pretrain_epochs,
              "pretrain_heldout": pre_res, "load_after": [round(x, 2) for x in load], "rows": rows}
    lines = ["| schedule | stages (epochs) | pretrain + train = total | sketch R@1 / R@10 | "
             "text R@1 / R@10 | sketch+text R@1 / R@10 |", "|---|---|---|---|---|---|"]
    for r in rows:
        m = r["metrics"]
        lines.append(f"| {r['schedule']} | {', '.join(r['stages'])} | {r['pretrain_s']:.0f} + "
                     f"{r['train_s']:.0f} = {r['total_s']:.0f} s | "
                     + " | ".join(f"{m[k]['R@1']:.3f} / {m[k]['R@10']:.3f}"
                                  for k in ("sketch", "text", "sketch+text")) + " |")
    table = "\n".join(lines)
    print(table)
    out.mkdir(parents=True, exist_ok=True)
    stem = (f"schedules-{args.preset}-{args.modes}" + ("-4loss" if args.four_losses else "")
            + ("-" + args.only.replace(",", "-") if args.only != ap.get_default("only") else "")
            + (f"-sketchlr{args.sketch_lr:g}" if args.sketch_lr else "")
            + (f"-warm{args.warm}" if args.warm else ""))
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    (out / f"{stem}.md").write_text(table + "\n")
    if args.save:
        res_dir = Path(__file__).resolve().parent / "results"
        (res_dir / f"{stem}.json").write_text(json.dumps(result, indent=2))
        (res_dir / f"{stem}.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
