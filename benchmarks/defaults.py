"""Do the training defaults hold beyond the demo? (issue 29 item 6; docs/training-defaults.md)

Trains the config `stbir-train synth` writes, unchanged, on the built-in set at several sizes
and on a set from another generator (benchmarks/synth_variant.py, which the defaults were not
tuned on), and ranks each test gallery: sketch, text and sketch+text R@1 / R@10 of best.pt,
with the training's wall and CPU seconds. Each run is one row, trained for as long as its
schedule says.

  --recipe after    the config as synth writes it now: 19,200 training samples, whatever the
                    data's size, validated every 6,400 (best.pt the best validation)
  --recipe before   the same config with the schedule synth wrote before: 3 epochs, validated
                    once an epoch, noise ramped over 4 epochs

    nice -n 15 python benchmarks/defaults.py --rows builtin-2000 --recipe after --out runs/defaults
    python benchmarks/defaults.py --table --out runs/defaults [--save]

Every run writes OUT/rows/<row>-<recipe>.json, so the rows can be trained one at a time (the
machine is shared); --table gathers them into OUT/defaults.json and .md (and
benchmarks/results/ with --save).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import synth_variant  # noqa: E402

# row -> (generator, training photos in all); both write 100 test photos per category and
# `stbir-train synth`'s default of 2 sketches per training photo.
ROWS = {"builtin-2000": ("builtin", 2000), "builtin-6800": ("builtin", 6800),
        "builtin-20000": ("builtin", 20000), "variant-4000": ("variant", 4000)}
# The schedule synth wrote before the samples-based one (git show 8e12ea4:stbir_train/synth.py).
BEFORE = {"training.stages": [{"target": "all", "epochs": 3, "lr": 0.001, "weight_decay": 0.05}],
          "training.val_every": None,
          **{f"data.curriculum_noise.{m}.{k}": v for m in ("photo", "sketch")
             for k, v in (("ramp_samples", None), ("ramp_epochs", 4))}}


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (data-loader workers)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def photos_per_category(row: str) -> int:
    from stbir_train import synth

    generator, photos = ROWS[row]
    return -(-photos // len((synth if generator == "builtin" else synth_variant).SHAPES))


def training_photos(row: str) -> int:
    from stbir_train import synth

    n = len((synth if ROWS[row][0] == "builtin" else synth_variant).SHAPES)
    return n * photos_per_category(row)


def make_data(out: Path, row: str) -> Path:
    """The row's dataset under out/data/, written once and reused by both recipes."""
    from stbir_train import synth

    data = out / "data" / row
    if not (data / "config.yaml").is_file():
        writer = synth.write_dataset if ROWS[row][0] == "builtin" else synth_variant.write_dataset
        writer(data, photos_per_category(row), 100, 2, 0)
    return data


def run_row(out: Path, row: str, recipe: str) -> dict:
    from stbir_train.config import load_config
    from stbir_train.train import train

    data = make_data(out, row)
    cfg_path = common.run_config(data, out, f"{row}-{recipe}", BEFORE if recipe == "before" else {})
    cfg = load_config(cfg_path)
    log_path = cfg.out / "train_log.jsonl"
    log_path.unlink(missing_ok=True)
    t0, c0 = time.time(), cpu_seconds()
    summary = train(cfg, log=common.log)
    seconds, cpu = time.time() - t0, cpu_seconds() - c0
    log = [json.loads(x) for x in log_path.read_text().splitlines()]
    result = {"row": row, "recipe": recipe, "generator": ROWS[row][0], "photos": training_photos(row),
              "stages": [{k: v for k, v in vars(s).items() if v is not None} for s in cfg.training.stages],
              "val_every": cfg.training.val_every,
              "steps": log[-1]["step"], "epochs": log[-1]["epoch"],
              "val_sketch+text_R@1": [round(r["val"]["sketch+text"]["R@1"], 4) for r in log],
              "best_val": summary["best"], "train_s": round(seconds, 1), "train_cpu_s": round(cpu, 1),
              "load_after": [round(x, 2) for x in os.getloadavg()],
              "test": common.checkpoint_recall(cfg_path, summary["best_path"])}
    rows_dir = out / "rows"
    rows_dir.mkdir(parents=True, exist_ok=True)
    (rows_dir / f"{row}-{recipe}.json").write_text(json.dumps(result, indent=2))
    return result


def table(out: Path, save: bool) -> str:
    rows = [json.loads(p.read_text()) for p in sorted((out / "rows").glob("*.json"))]
    order = {name: i for i, name in enumerate(ROWS)}
    rows.sort(key=lambda r: (order[r["row"]], r["recipe"] != "before"))
    lines = ["| data | recipe | steps (epochs) | train wall / CPU s | sketch R@1 / R@10 | "
             "text R@1 / R@10 | sketch+text R@1 / R@10 | val sketch+text R@1 |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        m = r["test"]
        lines.append(f"| {r['generator']} {training_photos(r['row']):,} | {r['recipe']} | {r['steps']} "
                     f"({r['epochs']:.1f}) | {r['train_s']:.0f} / {r['train_cpu_s']:.0f} | "
                     + " | ".join(f"{m[k]['R@1']:.3f} / {m[k]['R@10']:.3f}"
                                  for k in ("sketch", "text", "sketch+text"))
                     + " | " + ", ".join(f"{v:.3f}" for v in r["val_sketch+text_R@1"]) + " |")
    text = "\n".join(lines)
    result = {"rows": rows, "cpus": common.default_threads()}
    for folder in [out] + ([common.RESULTS] if save else []):
        (folder / "defaults.json").write_text(json.dumps(result, indent=2))
        (folder / "defaults.md").write_text(text + "\n")
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {', '.join(ROWS)}")
    ap.add_argument("--recipe", choices=("after", "before"), default="after")
    ap.add_argument("--out", type=Path, default=Path("runs/defaults"))
    ap.add_argument("--table", action="store_true", help="only gather the rows run so far")
    ap.add_argument("--save", action="store_true", help="--table also writes benchmarks/results/")
    args = ap.parse_args(argv)
    out = args.out.resolve()
    if not args.table:
        for row in args.rows.split(","):
            if row not in ROWS:
                ap.error(f"unknown row {row!r} (known: {', '.join(ROWS)})")
            print(json.dumps(run_row(out, row, args.recipe)))
    print(table(out, args.save))
    return 0


if __name__ == "__main__":
    sys.exit(main())
