"""Text query latency, batch 1, through the runtime (tokenize + table lookup + onnxruntime):
a real-photo export with the MiniLM text tower next to the small preset's own text tower.

    python benchmarks/text_latency.py runs/real8k/export [--threads 2]

Each export is timed fp32 and int8 on the same queries, alternating (``common.measure_alternating``),
so the ratios come from one run; the small preset's export is a random init (timing does not
depend on the weights). Writes benchmarks/results/text_latency.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import common  # noqa: E402

QUERIES = ["red", "a dog running on grass", "two children in winter coats play in the snow",
           "a man in a blue shirt rides a bicycle down a dirt path next to a field of tall grass"]


def main(argv=None) -> dict:
    from stbir_infer.encoders import Encoders

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("export", type=Path, help="an export with the MiniLM text tower (int8 too)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "text_latency.json")
    args = ap.parse_args(argv)
    record, t0 = common.begin("text_latency", args.threads)
    rows, result = [], {**record, "queries": QUERIES, "exports": {}}
    with tempfile.TemporaryDirectory() as tmp:
        small, _ = common.random_export("small", Path(tmp), quantize=True)
        for name, export in (("MiniLM (real-photo export)", args.export), ("small preset", small)):
            enc = {p: Encoders(export, threads=args.threads, precision=p) for p in ("fp32", "int8")}
            fns = {f"{p} {len(q.split())} words": (lambda e=e, q=q: e.text([q]))
                   for p, e in enc.items() for q in QUERIES}
            timed = common.measure_alternating(fns, repeats=args.repeats, warmup=5)
            result["exports"][name] = timed
            for q in QUERIES:
                n = len(q.split())
                fp32, int8 = timed[f"fp32 {n} words"], timed[f"int8 {n} words"]
                rows.append([name, n, common.fmt(fp32["p50_ms"], 3), common.fmt(int8["p50_ms"], 3),
                             common.fmt(int8["p50_ms"] / fp32["p50_ms"], 2)])
    markdown = "\n".join(common.md_header("Text query latency, batch 1", record["machine"]) + [common.md_table(
        ["text tower", "words", "fp32 p50 ms", "int8 p50 ms", "int8 / fp32"], rows)])
    common.finish("text_latency", result, args.out, markdown, t0)
    return result


if __name__ == "__main__":
    main()
