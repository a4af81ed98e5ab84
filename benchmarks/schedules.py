"""Staged or all at once, from a pretrained start or from random init (issue 14).

On the built-in dataset: give the towers a text anchor, then train

  staged        the seed's stages sketch -> image -> text, anchored on the pretrained towers
  all-pre       all branches at once from the same anchors
  all-random    all branches at once from random init (the old demo)
  all-imagenet  all branches at once from ImageNet (--imagenet W; edge preset)

and rank the test gallery (sketch, text, sketch+text R@1 / R@10). The anchor (--anchor) is
`stbir-train pretrain` of the image and text towers on the photo-caption pairs (pretrain), or,
with --imagenet, a text-only first stage against the locked ImageNet image tower (lit, as in LiT).
Each row records wall seconds, CPU seconds (what it costs on an idle core whatever else runs; run
with OMP_NUM_THREADS=1 to compare rows) and per-epoch validation R@1; pretraining is added to the
schedules that use it, so "total" is what a user waits.

    python benchmarks/schedules.py --per-category 600 --out runs/schedules [--only staged,...]
        [--epochs 3] [--pretrain-epochs 1] [--staged 1,2,1] [--stage-lrs 2e-3,2e-3,1e-3]
        [--preset edge --imagenet W [--anchor lit]] [--modes both|fused] [--tag NAME]

Writes OUT/schedules-*.json and .md (and benchmarks/results/ with --save).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

from stbir_train.config import load_config  # noqa: E402
from stbir_train.pretrain import pretrain  # noqa: E402
from stbir_train.train import train  # noqa: E402

MODE_LOSSES = {  # how single modes are trained (item 4 of the issue)
    "fused": dict(modality_dropout=0.0, infonce_sketch=0.0, infonce_text=0.0),
    "both": dict(modality_dropout=0.2, infonce_sketch=0.5, infonce_text=0.5),
}


def _config(data_dir: Path, out: Path, name: str, stages: list, mode_losses: dict, extra: dict,
            four_losses: bool) -> Path:
    losses = {"modality_dropout": mode_losses["modality_dropout"],
              "weights.infonce_sketch": mode_losses["infonce_sketch"],
              "weights.infonce_text": mode_losses["infonce_text"]}
    if four_losses:
        losses.update({"weights.triplet": 0.3, "weights.fusion": 0.1})
    return common.run_config(data_dir, out, name, {"training.stages": stages,
                                                   **{f"loss.{k}": v for k, v in losses.items()},
                                                   **extra})


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the data-loader workers): with one
    thread it is what the run costs on an idle core, whatever else the machine is running."""
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


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
                    help="torchvision mobilenet_v2 weights (edge preset): the all-imagenet row (both "
                         "visual towers from ImageNet, all at once), and the start of the "
                         "pretraining and of the sketch tower in the pretrained rows")
    ap.add_argument("--pretrained-weights", default=None,
                    help="reuse this `pretrain` clip.pt (its results.json beside it gives the time)")
    ap.add_argument("--warm", type=int, default=0,
                    help="epochs of all branches at once before the staged schedule's stages")
    ap.add_argument("--sketch-lr", type=float, default=None, help="lr of the staged sketch stage")
    ap.add_argument("--stage-lrs", default=None,
                    help="lrs of the staged sketch,image,text stages (default: lr, lr/5, lr/5)")
    ap.add_argument("--pre-lr", type=float, default=None, help="lr of all-pre (default: --lr)")
    ap.add_argument("--tag", default="", help="appended to the output file names")
    ap.add_argument("--seed", type=int, default=0, help="training.seed of every trained row")
    ap.add_argument("--anchor", default="pretrain", choices=("pretrain", "lit"),
                    help="how staged/all-pre get their text anchor: `stbir-train pretrain` of both "
                         "towers on the captions (pretrain), or, with --imagenet, a text-only first "
                         "stage against the locked ImageNet image tower (lit, as in LiT)")
    ap.add_argument("--lit-epochs", type=int, default=1, help="epochs of the lit text stage")
    ap.add_argument("--lit-lr", type=float, default=1e-3, help="lr of the lit text stage")
    ap.add_argument("--save", action="store_true", help="also write benchmarks/results/schedules.*")
    args = ap.parse_args(argv)
    if args.anchor == "lit" and not args.imagenet:
        ap.error("--anchor lit locks the ImageNet image tower: give --imagenet W")
    out = Path(args.out).resolve()
    data, base_cfg = common.synth_data(out, args.per_category)
    modes = MODE_LOSSES[args.modes]
    only = args.only.split(",")
    rows, pre_seconds, pre_cpu, pre_res = [], 0.0, 0.0, None
    weights = out / "pretrain" / "pretrain" / "clip.pt"
    if args.pretrained_weights:
        weights = Path(args.pretrained_weights).resolve()
        done = json.loads((weights.parent / "results.json").read_text())
        pre_seconds, pre_res = done["train_seconds"], done["final"]
        cpu_file = weights.parent / "cpu_seconds.json"  # written by this script's pretraining
        pre_cpu = json.loads(cpu_file.read_text())["cpu_seconds"] if cpu_file.is_file() else 0.0
    elif {"staged", "all-pre"} & set(only) and args.anchor == "pretrain":
        pre_extra = {"pretrain.epochs": args.pretrain_epochs, "model.preset": args.preset}
        if args.imagenet:  # the caption pretraining starts from the ImageNet image tower
            pre_extra["model.pretrained"] = args.imagenet
        cfg_path = _config(data, out, "pretrain", [{"target": "all", "epochs": 1}], modes,
                           pre_extra, False)
        t0, c0 = time.time(), cpu_seconds()
        summary = pretrain(load_config(cfg_path), log=print)
        pre_seconds, pre_cpu = time.time() - t0, cpu_seconds() - c0
        pre_res = summary["final"]
        (weights.parent / "cpu_seconds.json").write_text(json.dumps({"cpu_seconds": pre_cpu}))
    se, ie, te = (int(x) for x in args.staged.split(","))
    lr, wd = args.lr, 0.05
    slr, ilr, tlr = ([float(x) for x in args.stage_lrs.split(",")] if args.stage_lrs
                     else [args.sketch_lr or lr, lr / 5, lr / 5])
    schedules = {
        "staged": ([{"target": "sketch", "epochs": se, "lr": slr, "weight_decay": wd},
                    {"target": "image", "epochs": ie, "lr": ilr, "weight_decay": wd},
                    {"target": "text", "epochs": te, "lr": tlr, "weight_decay": wd}], True),
        "all-pre": ([{"target": "all", "epochs": args.pre_epochs or args.epochs,
                      "lr": args.pre_lr or lr,
                      "weight_decay": wd}], True),
        "all-random": ([{"target": "all", "epochs": args.epochs, "lr": lr, "weight_decay": wd}],
                       False),
        "all-imagenet": ([{"target": "all", "epochs": args.epochs, "lr": lr, "weight_decay": wd}],
                         False),
    }
    if args.anchor == "lit":
        for name in ("staged", "all-pre"):
            schedules[name][0].insert(0, {"target": "text", "epochs": args.lit_epochs,
                                          "lr": args.lit_lr, "weight_decay": wd})
    if args.warm:
        schedules["staged"][0].insert(0, {"target": "all", "epochs": args.warm, "lr": lr,
                                          "weight_decay": wd})
    for name in only:
        stages, uses_pre = schedules[name]
        uses_pre = uses_pre and args.anchor == "pretrain"
        extra = {"model.pretrained": str(weights)} if uses_pre else {}
        extra["model.preset"] = args.preset
        extra["training.seed"] = args.seed
        if uses_pre and args.imagenet:  # the sketch tower starts from ImageNet too
            extra["model.sketch_pretrained"] = args.imagenet
        if name == "all-imagenet" or (name != "all-random" and args.anchor == "lit"):
            extra.update({"model.pretrained": args.imagenet, "model.sketch_pretrained": args.imagenet})
        cfg_path = _config(data, out, name, stages, modes, extra, args.four_losses)
        log_path = load_config(cfg_path).out / "train_log.jsonl"
        log_path.unlink(missing_ok=True)  # a re-run's epochs only
        t0, c0 = time.time(), cpu_seconds()
        summary = train(load_config(cfg_path), log=print)
        seconds, cpu = time.time() - t0, cpu_seconds() - c0
        metrics = common.checkpoint_recall(cfg_path, summary["best_path"])
        log = [json.loads(x) for x in log_path.read_text().splitlines()]
        rows.append({"schedule": name, "stages": [f"{s['target']} {s['epochs']}" for s in stages],
                     "lrs": [s["lr"] for s in stages], "epoch_seconds": [
                         [r["target"], r["epoch"], r["seconds"]] for r in log],
                     "val_R@1": [{m: v["R@1"] for m, v in (r["val"] or {}).items()} for r in log],
                     "train_s": round(seconds, 1), "pretrain_s": round(pre_seconds, 1) if uses_pre else 0.0,
                     "total_s": round(seconds + (pre_seconds if uses_pre else 0.0), 1),
                     "train_cpu_s": round(cpu, 1), "pretrain_cpu_s": round(pre_cpu, 1) if uses_pre else 0.0,
                     "metrics": metrics})
        print(json.dumps(rows[-1]))
    load = os.getloadavg()
    result = {"anchor": args.anchor, "seed": args.seed, "threads": torch_threads(), "preset": args.preset,
              "per_category": args.per_category, "modes": args.modes, "modality": modes,
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
            + (f"-warm{args.warm}" if args.warm else "") + (f"-{args.tag}" if args.tag else ""))
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    (out / f"{stem}.md").write_text(table + "\n")
    if args.save:
        res_dir = Path(__file__).resolve().parent / "results"
        (res_dir / f"{stem}.json").write_text(json.dumps(result, indent=2))
        (res_dir / f"{stem}.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
