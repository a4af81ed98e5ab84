"""Distillation to an edge student (issue 17, seed 004), end to end on the built-in dataset.

1. data: `stbir-train synth` at --per-category photos (100 test photos per category) + manifests;
2. teacher: the `medium` preset (--teacher; MobileNetV2 towers from ImageNet: --imagenet), all
   branches at once;
3. student alone: the `tiny` preset, the same recipe, no teacher;
4. student distilled: the `tiny` preset through `stbir-train distill` with the teacher's best.pt;
5. each checkpoint on the test split (sketch, text, sketch+text R@1 / R@10, torch), exported
   (`stbir-export`, fp32, verified), and each export's encoders timed in onnxruntime at batch 1
   (p50, blocks alternating between the three exports so load is shared);
6. the runtime: the test photos enrolled with the teacher's export and with the student's, then
   every test sketch, caption and sketch+text pair queried through `stbir_infer.Searcher` with
   the distilled student's export against both indexes (and the teacher's against its own).

Steps whose output exists are reused (the checkpoints, exports and indexes under --out); --fresh
starts over. Writes OUT/distill.json and benchmarks/results/distill.{json,md} with --save.

    python benchmarks/distill.py --imagenet ../shared/data/weights/mobilenet_v2_imagenet.pt \\
        [--per-category 600] [--epochs 3] [--student-epochs 3] [--out /tmp/distill] [--save]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

MODES = ("sketch", "text", "sketch+text")
MODELS = ("teacher", "alone", "distilled")


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--imagenet", type=Path, default=None,
                   help="torchvision mobilenet_v2 ImageNet weights for the teacher's towers")
    p.add_argument("--per-category", type=int, default=600)
    p.add_argument("--teacher", default="medium", help="teacher preset (default %(default)s)")
    p.add_argument("--epochs", type=int, default=3, help="teacher epochs (all branches)")
    p.add_argument("--student-epochs", type=int, default=3, help="epochs of both students")
    p.add_argument("--student-lr", type=float, default=5e-4)
    p.add_argument("--student-set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for both students, e.g. model.sketch_size=32 (repeatable)")
    p.add_argument("--embed", type=float, default=10.0, help="distill.embed")
    p.add_argument("--relational", type=float, default=1.0, help="distill.relational")
    p.add_argument("--train-threads", type=int, default=1, help="torch threads while training")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/stbir-distill"))
    p.add_argument("--fresh", action="store_true", help="recompute every step")
    p.add_argument("--redo", default="", help="retrain these (comma-separated: alone,distilled)")
    p.add_argument("--save", action="store_true", help="also write benchmarks/results/distill.*")
    p.add_argument("--repeats", type=int, default=200, help="timed calls per encoder and export")
    common.add_common_args(p, "distill")
    return p.parse_args(argv)


def write_config(data: Path, out: Path, name: str, preset: str, epochs: int, lr: float,
                 extra: dict) -> Path:
    stages = [{"target": "all", "epochs": epochs, "lr": lr, "weight_decay": 0.05}]
    # model.sketch_size null: each preset's own sketch size (the demo config pins 48 px)
    return common.run_config(data, out, name, {"model.preset": preset, "model.sketch_size": None,
                                               "training.num_workers": 0,
                                               "training.stages": stages, **extra})


def train_one(name: str, cfg_path: Path, fresh: bool) -> dict:
    """Train (or reuse) one model; returns {checkpoint, train_s}."""
    from stbir_train.config import load_config
    from stbir_train.distill import distill
    from stbir_train.train import train

    cfg = load_config(cfg_path)
    best, done = cfg.out / "checkpoints" / "best.pt", cfg.out / "bench_done.json"
    if done.is_file() and best.is_file() and not fresh:
        return json.loads(done.read_text())
    shutil.rmtree(cfg.out, ignore_errors=True)
    t0 = time.time()
    (distill if cfg.distill.teacher else train)(cfg, log=common.log)
    rec = {"checkpoint": str(best), "train_s": round(time.time() - t0, 1)}
    done.write_text(json.dumps(rec))
    common.log(f"[{name}] trained in {rec['train_s']} s")
    return rec


def evaluate(cfg_path: Path, ckpt: str) -> dict:
    res = common.checkpoint_recall(cfg_path, ckpt)
    return {m: res[m] for m in MODES}


def latencies(exports: dict[str, Path], threads: int, repeats: int) -> dict:
    """p50 ms of each export's encoders at batch 1 (onnxruntime fp32), alternating exports."""
    import numpy as np
    from encoders import make_inputs

    from stbir_infer.encoders import Encoders

    encs = {name: Encoders(d, threads=threads) for name, d in exports.items()}
    out: dict[str, dict] = {name: {} for name in exports}
    for encoder in ("sketch", "image", "text"):
        fns = {}
        for name, e in encs.items():
            inp = make_inputs(e, 1)
            if encoder == "text":  # the token-table lookup plus the graph, as the runtime does it
                ids = inp["ids"]
                names = [i["name"] for i in e.manifest["encoders"]["text"]["inputs"]]
                sess, table = e.session("text"), e.token_table
                fns[name] = (lambda sess=sess, table=table, ids=ids, names=names: sess.run(
                    None, {names[0]: np.ascontiguousarray(table[ids], np.float32),
                           names[1]: ids.argmax(-1).astype(np.int64)}))
            else:
                x = inp[encoder]
                fns[name] = lambda e=e, x=x, enc=encoder: e.encode_pixels(enc, x)
        stats = common.measure_alternating(fns, warmup=10, repeats=repeats, passes=4)
        for name, s in stats.items():
            out[name][encoder] = {"p50_ms": s["p50_ms"], "p95_ms": s["p95_ms"]}
    return out


def runtime_recall(query_export: Path, index: Path, rows: list[dict], data: Path,
                   gallery: Path, threads: int) -> dict:
    """R@1 / R@10 of every test sketch, caption and sketch+text pair through the runtime."""
    from stbir_infer import Searcher

    s = Searcher(query_export, index, threads=threads)
    target = {r["image"]: i for i, r in enumerate(rows)}
    out = {}
    for mode in MODES:
        hits1 = hits10 = n = 0
        for r in rows:
            sk = str(data / r["positive_sketches"][0]) if mode != "text" else None
            tx = r["text"] if mode != "sketch" else None
            found = [Path(h.path).resolve().relative_to(gallery.resolve()).as_posix()
                     for h in s.query(sk, tx, top_k=10)]
            rank = found.index(r["image"]) + 1 if r["image"] in found else None
            hits1 += rank == 1
            hits10 += rank is not None
            n += 1
        out[mode] = {"R@1": hits1 / n, "R@10": hits10 / n, "queries": n}
    assert len(target) == len(rows)
    return out


def main(argv=None) -> dict:
    args = parse(argv)
    result, t_start = common.begin("distill", args.threads)
    import torch
    import yaml

    from stbir_export import export_checkpoint
    from stbir_infer import Searcher
    from stbir_train.manifest import manifest_paths, read_manifest_rows

    out = args.workdir.resolve()
    data, base = common.synth_data(out, args.per_category)
    teacher_extra = ({"model.pretrained": str(args.imagenet.resolve()),
                      "model.sketch_pretrained": str(args.imagenet.resolve())} if args.imagenet else {})
    cfgs = {"teacher": write_config(data, out, "teacher", args.teacher, args.epochs, 5e-4,
                                    teacher_extra)}
    # the students start from the same ImageNet weights as the teacher (their towers are the
    # teacher's MobileNetV2s at 48 px): the only difference between them is the teacher
    student_extra = {**teacher_extra, **{k: yaml.safe_load(v) for k, v in
                                         (kv.split("=", 1) for kv in args.student_set)}}
    cfgs["alone"] = write_config(data, out, "alone", "tiny", args.student_epochs, args.student_lr,
                                 student_extra)
    torch.set_num_threads(args.train_threads)
    redo = {n: args.fresh or n in args.redo.split(",") for n in MODELS}
    runs = {"teacher": train_one("teacher", cfgs["teacher"], redo["teacher"])}
    cfgs["distilled"] = write_config(data, out, "distilled", "tiny", args.student_epochs,
                                     args.student_lr, {**student_extra, "distill": {
                                         "teacher": runs["teacher"]["checkpoint"],
                                         "embed": args.embed, "relational": args.relational}})
    for name in ("alone", "distilled"):
        runs[name] = train_one(name, cfgs[name], redo[name])
    torch.set_num_threads(args.threads)
    exports = {}
    for name in MODELS:
        runs[name]["test"] = evaluate(cfgs[name], runs[name]["checkpoint"])
        exports[name] = out / "exports" / name
        if redo[name] or not (exports[name] / "export.json").is_file():
            export_checkpoint(runs[name]["checkpoint"], exports[name], force=True,
                              log=lambda *a: None)
        runs[name]["space"] = json.loads((exports[name] / "export.json").read_text())["space"]
        common.log(f"[{name}] test {runs[name]['test']}")
    lat = latencies(exports, args.threads, args.repeats)
    for name in MODELS:
        runs[name]["latency_ms"] = lat[name]

    rows = read_manifest_rows(manifest_paths(base)["test"])
    gallery = out / "gallery"
    if not gallery.is_dir():
        for r in rows:
            (gallery / r["image"]).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(data / r["image"], gallery / r["image"])
    indexes = {}
    for name in ("teacher", "distilled"):
        indexes[name] = out / "indexes" / name
        if redo[name] or not indexes[name].is_dir():
            shutil.rmtree(indexes[name], ignore_errors=True)
            Searcher(exports[name], indexes[name], threads=args.threads).enroll(gallery)
    runtime = {
        "teacher -> teacher index": runtime_recall(exports["teacher"], indexes["teacher"], rows,
                                                   data, gallery, args.threads),
        "student -> student index": runtime_recall(exports["distilled"], indexes["distilled"],
                                                   rows, data, gallery, args.threads),
        "student -> teacher index": runtime_recall(exports["distilled"], indexes["teacher"], rows,
                                                   data, gallery, args.threads),
    }
    t, d = runs["teacher"], runs["distilled"]
    query_ms = lambda r: r["latency_ms"]["sketch"]["p50_ms"] + r["latency_ms"]["text"]["p50_ms"]
    targets = [
        common.target("distilled / teacher sketch+text R@1", d["test"]["sketch+text"]["R@1"]
                      / max(t["test"]["sketch+text"]["R@1"], 1e-9), 0.95, ">="),
        common.target("distilled - alone sketch+text R@1", d["test"]["sketch+text"]["R@1"]
                      - runs["alone"]["test"]["sketch+text"]["R@1"], 0.0, ">="),
        *[common.target(f"distilled / teacher {e} encoder b1 p50", d["latency_ms"][e]["p50_ms"]
                        / t["latency_ms"][e]["p50_ms"], 0.25) for e in ("sketch", "image", "text")],
        common.target("distilled / teacher sketch+text query encoders (sketch + text)",
                      query_ms(d) / query_ms(t), 0.25),
        *[common.target(f"student on teacher index - all-student, {m} R@1 (points)",
                        100 * (runtime["student -> teacher index"][m]["R@1"]
                               - runtime["student -> student index"][m]["R@1"]), -3.0, ">=")
          for m in ("sketch", "text", "sketch+text")],
    ]
    result.update({"settings": {k: str(v) for k, v in vars(args).items()}, "runs": runs,
                   "runtime": runtime, "targets": targets})
    common.finish("distill", result, args.out if args.save else out / "distill.json",
                  markdown(result), t_start)
    return result


def markdown(result: dict) -> str:
    runs = result["runs"]
    parts = common.md_header("### Distillation to an edge student", result["machine"])
    label = {"teacher": f"teacher ({result['settings']['teacher']})", "alone": "student alone (tiny)",
             "distilled": "student distilled (tiny)"}
    t_lat = runs["teacher"]["latency_ms"]
    rows = []
    for name in MODELS:
        r = runs[name]
        lat = r["latency_ms"]
        rows.append([label[name]] + [f"{r['test'][m]['R@1']:.3f} / {r['test'][m]['R@10']:.3f}"
                                     for m in MODES]
                    + [f"{lat[e]['p50_ms']:.3f} ({lat[e]['p50_ms'] / t_lat[e]['p50_ms']:.2f}x)"
                       for e in ("sketch", "image", "text")] + [f"{r['train_s']:.0f} s"])
    parts.append(common.md_table(["model", "sketch R@1 / R@10", "text R@1 / R@10",
                                  "sketch+text R@1 / R@10", "sketch ms", "image ms", "text ms",
                                  "train"], rows))
    parts += ["", "Runtime (onnxruntime fp32, `Searcher.query`, top 10), R@1 / R@10:", ""]
    parts.append(common.md_table(["query export -> index"] + list(MODES), [
        [k] + [f"{v[m]['R@1']:.3f} / {v[m]['R@10']:.3f}" for m in MODES]
        for k, v in result["runtime"].items()]))
    parts += ["", "Targets:", "", common.targets_table(result["targets"])]
    return "\n".join(parts)


if __name__ == "__main__":
    main()
