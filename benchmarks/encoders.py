"""Encoder latency: torch eager vs onnxruntime fp32 vs onnxruntime int8, per encoder and batch.

For each preset (``small``: the built-in demo's towers; ``seed``: ViT-B-32 towers + resnet50
sketch tower, the seed's size) a random-init model is exported into a temp dir with int8 graphs
(latency does not depend on the weights), then each encoder is timed on the same input batch in
the three runtimes, in two passes of torch / fp32 / int8 blocks (each block warmed up first), so
that load from other processes that comes and goes is shared between them:

- torch eager: ``model.encode_sketch / encode_image / encode_text(tokens)`` under
  ``torch.inference_mode()`` with ``torch.set_num_threads(threads)``;
- onnxruntime fp32 / int8: the runtime's own ``stbir_infer.encoders.Encoders`` sessions
  (``intra_op_num_threads=threads``, the runtime's default settings); int8 is what
  ``stbir-export --quantize int8`` ships: static (calibrated on built-in-style photos and
  sketches) for a tower where that measured faster at export, dynamic otherwise; for text, the
  token-table lookup plus the graph, as the runtime does it (tokenizing is left out of both
  sides; ``query.py`` times it).

Inputs are built-in-style synthetic photos / sketches / captions, preprocessed as the runtime does.
Reported: p50 / p95 ms per call and items/s at batch 1 and 16, the ratios ort/torch and
int8/fp32 at batch 1 (the targets), min cosine of ort fp32 to torch and of int8 to fp32 over the
batch of 16, graph sizes. Int8 retrieval quality on a trained model is ``quantization.py``.

    python benchmarks/encoders.py [--presets small,seed] [--threads N] [--quick]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

ENCODERS = ("sketch", "image", "text")
BACKENDS = ("torch", "ort-fp32", "ort-int8")
PRESETS = ("small", "seed", "edge", "medium", "tiny")


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="small,seed",
                   help="comma-separated model presets (small, seed, edge, tiny); default %(default)s")
    p.add_argument("--batches", default="1,16", help="batch sizes; default %(default)s")
    p.add_argument("--repeats", type=int, default=40, help="timed calls per cell (max)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls per backend first")
    p.add_argument("--budget", type=float, default=8.0,
                   help="seconds per (encoder, batch) cell for the three backends together; "
                        "slow cells stop early after 5 repeats (default %(default)s)")
    p.add_argument("--workdir", type=Path, default=None,
                   help="where the temp exports go (default: the system temp dir); deleted after")
    p.add_argument("--keep-exports", type=Path, default=None, metavar="DIR",
                   help="keep each preset's export as DIR/<preset>-export (for enroll.py --model)")
    common.add_common_args(p, "encoders")
    args = p.parse_args(argv)
    args.presets = [s.strip() for s in args.presets.split(",") if s.strip()]
    bad = [s for s in args.presets if s not in PRESETS]
    if bad:
        p.error(f"unknown preset(s) {', '.join(bad)} (choose from {', '.join(PRESETS)})")
    args.batches = [int(b) for b in args.batches.split(",")]
    if args.quick:
        args.presets = [s for s in args.presets if s == "small"] or ["small"]
        args.repeats, args.warmup, args.budget = 8, 1, 2.0
    return args


def make_inputs(enc, n: int) -> dict:
    """n synthetic sketches, photos and captions, preprocessed the runtime's way."""
    import numpy as np

    from stbir_train.synth import caption, render_photo, render_sketch, sample_item

    sketches, photos, texts = [], [], []
    for i in range(n):
        rng = np.random.default_rng([7, i])
        item = sample_item(rng, f"b{i}")
        photos.append(render_photo(item, rng))
        sketches.append(render_sketch(item, rng))
        texts.append(caption(item, rng))
    ids = enc.tokenizer(texts)  # all context_length tokens, as torch's encode_text runs
    return {"sketch": enc.preprocess("sketch", sketches), "image": enc.preprocess("image", photos),
            "ids": ids}


def runners(model, enc_fp32, enc_int8, inputs: dict, encoder: str, b: int) -> dict:
    """The three ways to run ``encoder`` on the first ``b`` inputs; each returns [b, D] numpy."""
    import numpy as np
    import torch

    def ort_text(enc):
        ids = inputs["ids"][:b]
        names = [i["name"] for i in enc.manifest["encoders"]["text"]["inputs"]]
        out = enc.manifest["encoders"]["text"].get("output", "embedding")
        sess, table = enc.session("text"), enc.token_table

        def run():
            emb = np.ascontiguousarray(table[ids], np.float32)
            return sess.run([out], {names[0]: emb, names[1]: ids.argmax(-1).astype(np.int64)})[0]
        return run

    if encoder == "text":
        tokens = torch.from_numpy(inputs["ids"][:b].astype(np.int64))

        def torch_run():
            with torch.inference_mode():
                return model.encode_text(tokens).numpy()
        return {"torch": torch_run, "ort-fp32": ort_text(enc_fp32), "ort-int8": ort_text(enc_int8)}

    x = inputs[encoder][:b]
    xt = torch.from_numpy(np.ascontiguousarray(x))
    method = getattr(model, f"encode_{encoder}")

    def torch_run():
        with torch.inference_mode():
            return method(xt).numpy()
    return {"torch": torch_run,
            "ort-fp32": lambda: enc_fp32.encode_pixels(encoder, x),
            "ort-int8": lambda: enc_int8.encode_pixels(encoder, x)}


def min_cosine(a, b) -> float:
    import numpy as np

    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float((a * b).sum(1).min())


def bench_preset(preset: str, args, log) -> dict:
    from stbir_infer.encoders import Encoders

    work = Path(tempfile.mkdtemp(prefix=f"stbir-bench-{preset}-", dir=args.workdir))
    try:
        log(f"[{preset}] building and exporting a random-init model (fp32 + int8) ...")
        with common.Stopwatch() as sw:
            export, model = common.random_export(preset, work)
        enc32 = Encoders(export, threads=args.threads, precision="fp32")
        enc8 = Encoders(export, threads=args.threads, precision="int8")
        sizes = {e: {"fp32_mb": enc32.graph_file(e).stat().st_size / 1e6,
                     "int8_mb": enc8.graph_file(e).stat().st_size / 1e6} for e in ENCODERS}
        inputs = make_inputs(enc32, max(args.batches))
        info = {"preset": preset, "clip_model": enc32.clip_model, "embed_dim": enc32.embed_dim,
                "sketch_backbone": model.spec.sketch_backbone,
                "input_size": {"sketch": enc32.spec("sketch")["size"],
                               "image": enc32.spec("image")["size"],
                               "text_context": int(inputs["ids"].shape[1])},
                "export_seconds": round(sw.seconds, 1), "graph_sizes": sizes, "cells": [],
                "int8_methods": {e: r["method"] for e, r in
                                 enc32.manifest["quantization"]["int8"]["encoders"].items()}}
        for encoder in ENCODERS:
            for b in args.batches:
                fns = runners(model, enc32, enc8, inputs, encoder, b)
                outs = {k: f() for k, f in fns.items()}
                stats = common.measure_alternating(fns, items=b, warmup=args.warmup,
                                                   repeats=args.repeats, budget_s=args.budget)
                cell = {"encoder": encoder, "batch": b, **{k: stats[k] for k in BACKENDS},
                        "ratio_fp32_to_torch": stats["ort-fp32"]["p50_ms"] / stats["torch"]["p50_ms"],
                        "ratio_int8_to_fp32": stats["ort-int8"]["p50_ms"] / stats["ort-fp32"]["p50_ms"],
                        "cos_fp32_to_torch_min": min_cosine(outs["ort-fp32"], outs["torch"]),
                        "cos_int8_to_fp32_min": min_cosine(outs["ort-int8"], outs["ort-fp32"])}
                info["cells"].append(cell)
                log(f"[{preset}] {encoder:6s} b{b:<3d} torch {stats['torch']['p50_ms']:8.2f} ms  "
                    f"fp32 {stats['ort-fp32']['p50_ms']:8.2f} ms  int8 {stats['ort-int8']['p50_ms']:8.2f} ms"
                    f"  ({stats['torch']['repeats']} calls each)")
        del enc32, enc8, model
        return info
    finally:
        if args.keep_exports is not None and (work / f"{preset}-export").is_dir():
            keep = args.keep_exports / f"{preset}-export"
            args.keep_exports.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(keep, ignore_errors=True)
            shutil.move(str(work / f"{preset}-export"), keep)
        shutil.rmtree(work, ignore_errors=True)


def targets_for(info: dict) -> list[dict]:
    out = []
    p = info["preset"]
    for c in info["cells"]:
        if c["batch"] != 1:
            continue
        e = c["encoder"]
        big = max((x for x in info["cells"] if x["encoder"] == e), key=lambda x: x["batch"])
        out.append(common.target(f"{p} {e} b1: ort fp32 / torch time", c["ratio_fp32_to_torch"], 0.6))
        method = info.get("int8_methods", {}).get(e, "?")
        out.append(common.target(f"{p} {e} b1: int8 ({method}) / fp32 time",
                                 c["ratio_int8_to_fp32"], 0.5))
        out.append(common.target(f"{p} {e}: int8 cosine to fp32 (min of {big['batch']})",
                                 min(c["cos_int8_to_fp32_min"], big["cos_int8_to_fp32_min"]),
                                 0.995, ">="))
    return out


def markdown(result: dict) -> str:
    parts = common.md_header("### Encoders: torch eager vs onnxruntime fp32 vs int8", result["machine"])
    for info in result["presets"]:
        sz = info["input_size"]
        parts.append(f"**{info['preset']}** preset ({info['clip_model']} towers, "
                     f"{info['sketch_backbone']} sketch tower, {info['embed_dim']}-d; inputs: sketch "
                     f"{sz['sketch']} px, image {sz['image']} px, text {sz['text_context']} tokens); "
                     f"p50 ms per call (p95), items/s at the median:")
        parts.append("")
        rows = []
        for c in info["cells"]:
            rows.append([c["encoder"], c["batch"]]
                        + [f"{c[k]['p50_ms']:.2f} ({c[k]['p95_ms']:.2f})" for k in BACKENDS]
                        + [f"{c[k]['items_per_s']:.0f}" for k in BACKENDS]
                        + [f"{c['ratio_fp32_to_torch']:.2f}", f"{c['ratio_int8_to_fp32']:.2f}",
                           f"{c['cos_fp32_to_torch_min']:.5f}", f"{c['cos_int8_to_fp32_min']:.4f}"])
        parts.append(common.md_table(
            ["encoder", "batch", "torch ms", "ort fp32 ms", "ort int8 ms", "torch it/s",
             "fp32 it/s", "int8 it/s", "fp32/torch", "int8/fp32", "cos fp32~torch",
             "cos int8~fp32"], rows))
        sizes = ", ".join(f"{e} {s['fp32_mb']:.1f} -> {s['int8_mb']:.1f} MB"
                          for e, s in info["graph_sizes"].items())
        methods = ", ".join(f"{e} {m}" for e, m in info["int8_methods"].items())
        parts += ["", f"Graph files fp32 -> int8: {sizes}. int8 per tower (the export's "
                  f"measured choice): {methods}.", ""]
    parts += ["Targets (batch 1):", "", common.targets_table(result["targets"])]
    return "\n".join(parts)


def main(argv=None) -> dict:
    args = parse(argv)
    result, t_start = common.begin("encoders", args.threads)
    import torch

    torch.set_num_threads(args.threads)
    result.update({"settings": {"batches": args.batches, "repeats_max": args.repeats,
                           "warmup": args.warmup, "budget_s_per_cell": args.budget,
                           "quick": args.quick, "timing": "2 passes of per-backend blocks (warm-up "
                           "+ timed calls); p50/p95 over the timed calls of one cell"},
                   "presets": []})
    for preset in args.presets:
        result["presets"].append(bench_preset(preset, args, common.log))
    result["targets"] = [t for info in result["presets"] for t in targets_for(info)]
    common.finish("encoders", result, args.out, markdown(result), t_start)
    return result


if __name__ == "__main__":
    main()
