"""Does int8 cost retrieval quality? Test-set Recall of a trained model through the runtime's
fp32 graphs vs its int8 graphs.

Needs a trained checkpoint and its training config (for the test manifest and the data root):

    python benchmarks/quantization.py --checkpoint runs/demo/.../best.pt --config .../config.yaml

or an existing export that has int8 graphs (``stbir-export --quantize int8``) instead of the
checkpoint: ``--export DIR --config CONFIG``. A checkpoint is exported (with int8, calibrated on
its training data: ``--calibration auto``) into a temp dir that is deleted afterwards.

The test gallery (every test photo) is encoded with the runtime's image encoder, every positive
sketch of a test item is a query, and each item's caption is its text query; sketch+text queries
are fused with the export's weight -- the same protocol as ``stbir-train evaluate``, but through
``stbir_infer.Encoders`` at each precision. Reported per mode: R@1 / R@5 / R@10 / mAP for fp32 and
int8, their difference, the cosine of int8 to fp32 vectors, and per tower the export's int8 method
(static or dynamic) with the batch-1 times it measured. Targets: sketch+text R@10 of int8 within
1 point (0.01) of fp32; every vector's cosine to its fp32 twin >= 0.995. Without a checkpoint or
export, the JSON records the row as skipped.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

MODES = ("sketch", "text", "sketch+text")
SKIP_NOTE = ("skipped: needs a trained model -- pass --checkpoint CKPT --config CONFIG "
             "(e.g. from `make demo`)")


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=None, help="trained checkpoint (.pt)")
    p.add_argument("--export", type=Path, default=None,
                   help="an export dir with int8 graphs, instead of --checkpoint")
    p.add_argument("--config", type=Path, default=None, help="the training config (YAML)")
    p.add_argument("--calibration", default="auto",
                   help="with --checkpoint: calibration images for static int8 (auto, DIR, none)")
    p.add_argument("--split", default="test", choices=("test", "val"))
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workdir", type=Path, default=None, help="temp export goes here (deleted after)")
    common.add_common_args(p, "quantization")
    args = p.parse_args(argv)
    if args.checkpoint and args.export:
        p.error("give --checkpoint or --export, not both")
    if (args.checkpoint or args.export) and not args.config:
        p.error("--config is needed with --checkpoint / --export (for the test manifest)")
    return args


def encode_all(enc, rows: list[dict], root: Path, bs: int) -> dict:
    import numpy as np

    sketches, owner = [], []
    for i, r in enumerate(rows):
        for s in r["positive_sketches"]:
            sketches.append(root / s)
            owner.append(i)
    batched = lambda fn, items: np.concatenate([fn(items[i:i + bs]) for i in range(0, len(items), bs)])
    return {"gallery": batched(enc.image, [root / r["image"] for r in rows]),
            "sketch": batched(enc.sketch, sketches),
            "text": batched(enc.text, [r["text"] for r in rows]),
            "owner": np.asarray(owner, np.int64)}


def metrics(enc, v: dict) -> dict:
    import numpy as np

    from stbir_train.metrics import retrieval_metrics

    g = v["gallery"]
    n = len(g)
    from stbir_infer.fusion import Fusion

    fused = Fusion(enc).combine(v["sketch"], v["text"][v["owner"]])
    out = {}
    for mode, (q, target) in {"sketch": (v["sketch"], v["owner"]),
                              "text": (v["text"], np.arange(n)),
                              "sketch+text": (fused, v["owner"])}.items():
        scores = q @ g.T
        rel = np.zeros_like(scores, dtype=bool)
        rel[np.arange(len(target)), target] = True
        out[mode] = retrieval_metrics(scores, rel)
    return out


def run(args, log) -> dict:
    import numpy as np

    from stbir_infer.encoders import Encoders
    from stbir_train.config import load_config
    from stbir_train.manifest import build_manifests, manifest_paths, read_manifest_rows

    cfg = load_config(args.config)
    path = manifest_paths(cfg)[args.split]
    if not path.is_file():
        log(f"{path} missing: building the manifests (as `stbir-train evaluate` does)")
        build_manifests(cfg)
    rows = read_manifest_rows(path)
    root = cfg.resolve(cfg.data.root)
    work = Path(tempfile.mkdtemp(prefix="stbir-bench-quant-", dir=args.workdir))
    try:
        export = args.export
        if export is None:
            from stbir_export import export_checkpoint

            log(f"exporting {args.checkpoint} with int8 graphs ...")
            export = work / "export"
            export_checkpoint(args.checkpoint, export, quantize="int8", log=lambda *a, **k: None,
                              calibration=None if args.calibration == "none" else args.calibration)
        out = {"split": args.split, "gallery": len(rows), "source": str(args.checkpoint or export),
               "precisions": {}, "int8": Encoders(export).manifest["quantization"]["int8"]}
        vecs = {}
        for precision in ("fp32", "int8"):
            enc = Encoders(export, threads=args.threads, precision=precision)
            with common.Stopwatch() as sw:
                vecs[precision] = encode_all(enc, rows, root, args.batch_size)
            out["precisions"][precision] = {"modes": metrics(enc, vecs[precision]),
                                            "encode_seconds": sw.seconds}
            m = out["precisions"][precision]["modes"]["sketch+text"]
            log(f"[{precision}] sketch+text R@1 {m['R@1']:.3f} R@10 {m['R@10']:.3f} "
                f"({sw.seconds:.1f} s to encode)")
        out["sketch_queries"] = int(len(vecs["fp32"]["owner"]))
        out["cosine_int8_to_fp32"] = {
            k: {"min": float((vecs["fp32"][k] * vecs["int8"][k]).sum(1).min()),
                "mean": float((vecs["fp32"][k] * vecs["int8"][k]).sum(1).mean())}
            for k in ("gallery", "sketch", "text")}
        np.testing.assert_equal(vecs["fp32"]["owner"], vecs["int8"]["owner"])
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)


def markdown(result: dict) -> str:
    parts = ["### Int8 vs fp32 retrieval quality (trained model, runtime encoders)"]
    q = result.get("quality")
    if q is None:
        return "\n".join(parts + ["", result["note"]])
    parts += [f"Machine: {common.machine_line(result['machine'])}", "",
              f"{q['source']}: {q['split']} split, gallery {q['gallery']} photos, "
              f"{q['sketch_queries']} sketch queries, {q['gallery']} text queries.", ""]
    rows = []
    for mode in MODES:
        a, b = q["precisions"]["fp32"]["modes"][mode], q["precisions"]["int8"]["modes"][mode]
        rows.append([mode] + [f"{a[k]:.3f} / {b[k]:.3f}" for k in ("R@1", "R@5", "R@10", "mAP")]
                    + [f"{b['R@10'] - a['R@10']:+.3f}"])
    parts.append(common.md_table(["mode", "R@1 fp32 / int8", "R@5", "R@10", "mAP", "R@10 int8 - fp32"],
                                 rows))
    cos = ", ".join(f"{k} {v['min']:.4f} (mean {v['mean']:.5f})"
                    for k, v in q["cosine_int8_to_fp32"].items())
    parts += ["", f"Cosine int8 to fp32, min: {cos}.", ""]
    towers = q.get("int8", {}).get("encoders", {})
    rows = [[e, r["method"]] + [f"{r['batch1_ms'][k]:.3f}" if "batch1_ms" in r else "-"
                                for k in ("fp32", "static", "dynamic")]
            + [f"{r['cosine_to_fp32']:.5f}"] for e, r in towers.items()]
    if rows:
        parts += ["int8 per tower, as the export chose it (batch-1 ms measured at export):", "",
                  common.md_table(["tower", "int8", "fp32 ms", "static ms", "dynamic ms",
                                   "cosine (export check)"], rows), ""]
    parts += ["Targets:", "",
              common.targets_table(result["targets"])]
    return "\n".join(parts)


def main(argv=None) -> dict:
    args = parse(argv)
    result, t_start = common.begin("quantization", args.threads)
    if not (args.checkpoint or args.export):
        result.update(quality=None, note=SKIP_NOTE, targets=[common.target(
            "int8 sketch+text R@10 drop vs fp32 (points)", None, 1.0, "<=", SKIP_NOTE)])
    else:
        q = run(args, common.log)
        drop = 100 * (q["precisions"]["fp32"]["modes"]["sketch+text"]["R@10"]
                      - q["precisions"]["int8"]["modes"]["sketch+text"]["R@10"])
        cos = min(v["min"] for v in q["cosine_int8_to_fp32"].values())
        result.update(quality=q, targets=[
            common.target("int8 sketch+text R@10 drop vs fp32 (points)", drop, 1.0, "<="),
            common.target("int8 cosine to fp32 (min over all test vectors)", cos, 0.995, ">=")])
    common.finish("quantization", result, args.out, markdown(result), t_start)
    return result


if __name__ == "__main__":
    main()
