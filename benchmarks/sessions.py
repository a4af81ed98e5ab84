"""onnxruntime session settings: batch-1 encoder latency with worker-thread spinning on and off,
with the machine as it is and next to one more busy process, to choose
``stbir_infer.session.SPINNING``.

onnxruntime's intra-op worker threads busy-wait after each call (``session.intra_op.allow_spinning``
1, its default) so the next call starts sooner. On a device with few cores that only pays when
nothing else wants the cores: a spinning worker takes a core from whatever else runs (the web
server's other threads, a second process), and the next call waits for its own workers.

For each condition (``alone``: nothing added, so quiet when the machine is, the load average is in
the JSON; ``busy``: one extra process spinning in a Python loop, pinned to the last core) and
each encoder (sketch, image, text, and a sketch+text query's two encoders back to
back), the runtime's ``Encoders`` with spinning on and off are timed in alternating blocks
(``common.measure_alternating``), each block warmed up. Reported: p50 / p95 ms, off/on ratio.

    python benchmarks/sessions.py [--model EXPORT] [--precision fp32|int8] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

TASKS = ("sketch", "image", "text", "sketch+text")
SETTINGS = {"spin on": True, "spin off": False}
BUSY = "while True: pass"


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None,
                   help="an export dir (default: a random-init small preset, exported to a "
                        "temp dir)")
    p.add_argument("--precision", default="fp32", choices=("fp32", "int8"))
    p.add_argument("--repeats", type=int, default=200, help="timed calls per cell (max)")
    p.add_argument("--budget", type=float, default=6.0, help="seconds per cell, both settings")
    common.add_common_args(p, "sessions")
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.budget = 20, 0.5
    return args


def busy_process() -> subprocess.Popen:
    """One process spinning in Python, pinned to the last core the benchmark may use."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    pin = (lambda: os.sched_setaffinity(0, {cores[-1]})) if cores else None
    proc = subprocess.Popen([sys.executable, "-c", BUSY], preexec_fn=pin)
    time.sleep(0.5)  # let it reach the loop
    return proc


def runners(enc, inputs: dict) -> dict:
    """Batch-1 calls of each task on ``enc`` (token lookup + graph for text, as the runtime)."""
    sketch, image, text = inputs["sketch"][:1], inputs["image"][:1], inputs["text"][:1]
    return {"sketch": lambda: enc.encode_pixels("sketch", sketch),
            "image": lambda: enc.encode_pixels("image", image),
            "text": lambda: enc.text(text),
            "sketch+text": lambda: (enc.encode_pixels("sketch", sketch), enc.text(text))}


def make_inputs(enc) -> dict:
    import numpy as np

    from stbir_train.synth import caption, render_photo, render_sketch, sample_item

    rng = np.random.default_rng(7)
    item = sample_item(rng, "q")
    return {"sketch": enc.preprocess("sketch", [render_sketch(item, rng)]),
            "image": enc.preprocess("image", [render_photo(item, rng)]),
            "text": [caption(item, rng)]}


def measure(export: Path, args, condition: str) -> list[dict]:
    from stbir_infer.encoders import Encoders

    encs = {k: Encoders(export, threads=args.threads, precision=args.precision, spinning=v)
            for k, v in SETTINGS.items()}
    inputs = make_inputs(encs["spin on"])
    calls = {k: runners(e, inputs) for k, e in encs.items()}
    rows = []
    proc = busy_process() if condition == "busy" else None
    try:
        for task in TASKS:
            stats = common.measure_alternating({k: calls[k][task] for k in SETTINGS},
                                               warmup=5, repeats=args.repeats,
                                               budget_s=args.budget)
            ratio = stats["spin off"]["p50_ms"] / stats["spin on"]["p50_ms"]
            rows.append({"condition": condition, "task": task, **stats, "ratio_off_to_on": ratio})
            common.log(f"[{condition}] {task:11s} spin on {stats['spin on']['p50_ms']:.3f} ms, "
                       f"off {stats['spin off']['p50_ms']:.3f} ms")
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()
    return rows


def markdown(result: dict) -> str:
    parts = common.md_header("### Session settings: worker-thread spinning on vs off",
                             result["machine"])
    parts.append(f"{result['model']}, {result['precision']}, {result['machine']['threads']} "
                 "intra-op threads; batch 1, p50 ms (p95); alone = nothing added (load average "
                 f"{result['machine']['load_avg_1_5_15_at_start'][0]} at the start), busy = one "
                 "extra process spinning on one core:")
    parts.append("")
    rows = [[r["condition"], r["task"]]
            + [f"{r[k]['p50_ms']:.3f} ({r[k]['p95_ms']:.3f})" for k in SETTINGS]
            + [f"{r['ratio_off_to_on']:.2f}"] for r in result["rows"]]
    parts.append(common.md_table(["machine", "encoder", "spin on", "spin off", "off/on"], rows))
    parts += ["", f"Default chosen (stbir_infer.session.SPINNING): "
              f"{'on' if result['default_spinning'] else 'off'}.", "", "Targets:", "",
              common.targets_table(result["targets"])]
    return "\n".join(parts)


def targets(rows: list[dict], default_spinning: bool) -> list[dict]:
    """On a sketch+text query (the interactive call): the default must not lose next to a busy
    process, and cost at most 15% without it."""
    mine, other = ("spin on", "spin off") if default_spinning else ("spin off", "spin on")
    out = []
    for condition, limit in (("busy", 1.0), ("alone", 1.15)):
        r = next(r for r in rows if r["condition"] == condition and r["task"] == "sketch+text")
        out.append(common.target(f"{condition}: default ({mine}) / {other}, sketch+text query",
                                 r[mine]["p50_ms"] / r[other]["p50_ms"], limit))
    return out


def main(argv=None) -> dict:
    args = parse(argv)
    result, t_start = common.begin("sessions", args.threads)
    from stbir_infer.session import SPINNING

    work = Path(tempfile.mkdtemp(prefix="stbir-bench-sessions-"))
    try:
        export = args.model
        if export is None:
            export, _ = common.random_export("small", work, quantize=args.precision == "int8")
        result.update(model=str(args.model or "random-init small preset"),
                      precision=args.precision, default_spinning=SPINNING, rows=[])
        for condition in ("alone", "busy"):
            result["rows"] += measure(export, args, condition)
        result["targets"] = targets(result["rows"], SPINNING)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    common.finish("sessions", result, args.out, markdown(result), t_start)
    return result


if __name__ == "__main__":
    main()
