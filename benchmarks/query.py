"""End-to-end query latency of the runtime (``stbir_infer.Searcher.query``), split into phases,
and the cold start of a ``stbir-infer query`` process.

Set-up (unless ``--model`` / ``--index`` are given): a random-init export of ``--preset`` (default
small, the demo's towers) in a temp dir, and an index of ``--gallery`` built-in-style photos
enrolled with ``Searcher.enroll``. Queries are built-in-style sketches (PNG files) and captions.

Per mode, blocks of step-by-step queries time the phases by calling the same functions
``Searcher.query`` calls (``Encoders.preprocess`` -> ``encode_pixels`` for the sketch;
``Encoders.text_feeds`` (tokenize, trim, token-table lookup) -> the text graph;
``Fusion.combine``; ``GalleryIndex.search``), and blocks of ``Searcher.query`` calls on the same
queries time the whole (two passes of each). Overhead = p50(total) - p50(encoding) -
p50(search), as a share of p50(total):
it holds preprocessing (decode, resize, tokenize), fusion and the Searcher's own bookkeeping
(argument checks, index-generation check, building the hits).

Cold start: wall time of ``stbir-infer query --sketch ... --text ...`` as a new process (median of
``--cold-runs``), next to a bare ``python -c pass`` and a process that only imports the runtime.
The OS file cache is warm (the export was just read), as on a device that queries now and then.

Batch queries (sketch+text, fp32): ``Searcher.query_many`` over ``--batch-queries`` queries
against one ``Searcher.query`` call each, in one process; and one ``stbir-infer query --batch
FILE`` process answering them all against one ``stbir-infer query`` process per query (queries/s =
1 / its cold start). Target: the batch process >= 3x the queries/s of a process per query.

    python benchmarks/query.py [--preset small] [--gallery 500] [--threads N] [--quick]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

MODES = ("sketch", "text", "sketch+text")
TOP_K = 10


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    common.model_args(p)
    common.index_args(p)
    p.add_argument("--precisions", default="fp32,int8", help="fp32 and/or int8 (default %(default)s)")
    p.add_argument("--repeats", type=int, default=100, help="timed rounds per mode")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--cold-runs", type=int, default=5, help="process starts to time")
    p.add_argument("--batch-queries", type=int, default=200,
                   help="sketch+text queries for the batch comparison")
    p.add_argument("--workdir", type=Path, default=None, help="temp files go here (deleted after)")
    common.add_common_args(p, "query")
    args = p.parse_args(argv)
    args.precisions = [s.strip() for s in args.precisions.split(",") if s.strip()]
    if any(s not in ("fp32", "int8") for s in args.precisions):
        p.error("--precisions takes fp32 and/or int8")
    common.check_index_args(p, args)
    if args.quick:
        args.gallery, args.repeats, args.warmup, args.cold_runs = 64, 15, 2, 2
        args.batch_queries = 40
    return args


def cli_command() -> list[str]:
    exe = Path(sys.executable).parent / "stbir-infer"
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "stbir_infer"]


def time_process(cmd: list[str], runs: int) -> dict:
    """Median wall seconds of ``cmd`` run ``runs`` times (one untimed run first)."""
    import statistics

    times, err = [], None
    for i in range(runs + 1):
        t0 = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True)
        dt = time.perf_counter() - t0
        if r.returncode != 0:
            err = (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1][:300]
            break
        if i:
            times.append(dt)
    if err:
        return {"error": err, "command": " ".join(cmd)}
    return {"median_s": statistics.median(times), "min_s": min(times), "runs": len(times),
            "command": " ".join(cmd)}


def runners(searcher, gidx, queries: list[dict], mode: str):
    """(phases, total): ``phases()`` runs one query step by step and returns the seconds of each
    step; ``total()`` runs the same kind of query through ``Searcher.query``."""
    enc = searcher.encoders
    text_cfg = enc.manifest["encoders"]["text"]
    out_name = text_cfg.get("output", "embedding")
    ef = searcher.ef_search or gidx.params.ef_search
    perf = time.perf_counter
    cycle = {"phases": 0, "total": 0}

    def next_query(which):
        q = queries[cycle[which] % len(queries)]
        cycle[which] += 1
        return (str(q["sketch"]) if mode != "text" else None,
                q["text"] if mode != "sketch" else None)

    def phases():
        sketch, text = next_query("phases")
        t = {"pre_sketch": 0.0, "enc_sketch": 0.0, "pre_text": 0.0, "enc_text": 0.0}
        s_vec = t_vec = None
        if sketch is not None:
            t0 = perf()
            x = enc.preprocess("sketch", [sketch])
            t1 = perf()
            s_vec = enc.encode_pixels("sketch", x)[0]
            t2 = perf()
            t["pre_sketch"], t["enc_sketch"] = t1 - t0, t2 - t1
        if text is not None:
            t0 = perf()
            feeds = enc.text_feeds([text])
            t1 = perf()
            t_vec = enc.session("text").run([out_name], feeds)[0][0]
            t2 = perf()
            t["pre_text"], t["enc_text"] = t1 - t0, t2 - t1
        t0 = perf()
        vec = searcher.fusion.combine(s_vec, t_vec)
        t1 = perf()
        gidx.search(vec, TOP_K, ef=ef)
        t2 = perf()
        t["fuse"], t["search"] = t1 - t0, t2 - t1
        return t

    def total():
        sketch, text = next_query("total")
        t0 = perf()
        searcher.query(sketch=sketch, text=text, top_k=TOP_K)
        return perf() - t0
    return phases, total


def bench_mode(searcher, gidx, queries, mode: str, args) -> dict:
    """Two passes of [a block of step-by-step rounds, a block of Searcher.query calls], each
    block warmed up (alternating call by call would let one session's spinning worker threads
    slow the other's next call, which is not what a caller sees)."""
    import numpy as np

    phases, total = runners(searcher, gidx, queries, mode)
    rounds, totals = [], []
    per = max(1, args.repeats // 2)
    for _ in range(2):
        for _ in range(args.warmup):
            phases()
        rounds += [phases() for _ in range(per)]
        for _ in range(args.warmup):
            total()
        totals += [total() for _ in range(per)]
    s = {k: common.summarize([r[k] for r in rounds]) for k in rounds[0]}
    s["total"] = common.summarize(totals)
    enc = common.summarize([r["enc_sketch"] + r["enc_text"] for r in rounds])
    pre = common.summarize([r["pre_sketch"] + r["pre_text"] for r in rounds])
    tot, search = s["total"]["p50_ms"], s["search"]["p50_ms"]
    steps = float(np.median([sum(r.values()) for r in rounds])) * 1e3
    # The same at the fastest call of each (min): on a busy machine, closer to a quiet one.
    fastest = s["total"]["min_ms"] - enc["min_ms"] - s["search"]["min_ms"]
    return {"mode": mode, "phases": s, "preprocess": pre, "encode": enc,
            "steps_total_ms": steps, "overhead_ms": tot - enc["p50_ms"] - search,
            "overhead_share": (tot - enc["p50_ms"] - search) / tot,
            "overhead_share_min": fastest / s["total"]["min_ms"],
            "searcher_own_ms": tot - steps}


def setup(args, work: Path, log) -> tuple[Path, Path, list[dict]]:
    """(export dir, index dir, queries) -- generated where not given."""
    queries = common.synth_images(work / "queries", 20, seed=99, sketches=True)
    model, index = common.model_and_index(args, work, quantize="int8" in args.precisions,
                                         say=log)
    return model, index, queries


def cold_start(model: Path, index: Path, q: dict, args) -> dict:
    py = sys.executable
    base = cli_command() + ["query", "--model", str(model), "--index", str(index),
                            "--threads", str(args.threads), "--top-k", str(TOP_K)]
    return {
        "python -c pass": time_process([py, "-c", "pass"], args.cold_runs),
        "import runtime": time_process([py, "-c", "import numpy, onnxruntime, hnswlib, PIL.Image; "
                                        "import stbir_infer.searcher, stbir_infer.cli"],
                                       args.cold_runs),
        "stbir-infer query (text)": time_process(base + ["--text", q["text"]], args.cold_runs),
        "stbir-infer query (sketch+text)": time_process(
            base + ["--sketch", str(q["sketch"]), "--text", q["text"]], args.cold_runs),
    }


def batch_queries(model: Path, index: Path, queries: list[dict], args, work: Path) -> dict:
    """queries/s of Searcher.query_many vs one Searcher.query each (in process), and of one
    `stbir-infer query --batch` process vs one `stbir-infer query` process per query."""
    import json

    from stbir_infer.searcher import Searcher

    qs = [{"sketch": str(q["sketch"]), "text": q["text"], "top_k": TOP_K}
          for q in (queries[i % len(queries)] for i in range(args.batch_queries))]
    s = Searcher(model, index, threads=args.threads)
    s.query_many(qs[:32])  # warm-up: sessions open
    for q in qs[:5]:
        s.query(**q)
    t0 = time.perf_counter()
    s.query_many(qs)
    t_many = time.perf_counter() - t0
    t0 = time.perf_counter()
    for q in qs:
        s.query(**q)
    t_one = time.perf_counter() - t0
    src = work / "queries.jsonl"
    src.write_text("".join(json.dumps(q) + "\n" for q in qs))
    base = cli_command() + ["query", "--model", str(model), "--index", str(index),
                            "--threads", str(args.threads), "--top-k", str(TOP_K)]
    proc = time_process(base + ["--batch", str(src)], max(1, args.cold_runs // 2))
    single = time_process(base + ["--sketch", qs[0]["sketch"], "--text", qs[0]["text"]],
                          args.cold_runs)
    out = {"queries": len(qs), "query_many_qps": len(qs) / t_many, "query_qps": len(qs) / t_one,
           "batch_process": proc, "single_process": single}
    if "error" not in proc and "error" not in single:
        out["batch_process_qps"] = len(qs) / proc["median_s"]
        out["single_process_qps"] = 1 / single["median_s"]
    return out


def targets_for(result: dict) -> list[dict]:
    out = [common.target(f"{r['precision']} {r['mode']}: overhead beyond encoders + search",
                         r["overhead_share"], 0.10, "<=",
                         f"{r['overhead_ms']:.2f} of {r['phases']['total']['p50_ms']:.2f} ms; "
                         f"{100 * r['overhead_share_min']:.1f}% at the fastest calls")
           for r in result["modes"]]
    b = result.get("batch", {})
    ratio = (b["batch_process_qps"] / b["single_process_qps"]) if "batch_process_qps" in b else None
    out.append(common.target("stbir-infer query --batch / a process per query, queries/s", ratio,
                             3.0, ">=", f"{b.get('queries')} sketch+text queries"))
    return out


def markdown(result: dict) -> str:
    st = result["settings"]
    parts = [*common.md_header("### Query latency: Searcher.query end to end, by phase",
                               result["machine"]),
             f"{st['model']}; gallery of {result['gallery_size']} images; top {TOP_K}; "
             f"{st['repeats']} queries per mode for the steps and as many for Searcher.query; p50 ms. "
             "Overhead = Searcher.query - encoding - search (preprocessing, fusion, the "
             "Searcher's own bookkeeping); at min: the same from each one's fastest call (on a "
             "busy machine nearer what a quiet one gives).", ""]
    rows = []
    for r in result["modes"]:
        p = r["phases"]
        rows.append([r["precision"], r["mode"],
                     f"{p['pre_sketch']['p50_ms']:.2f}", f"{p['pre_text']['p50_ms']:.2f}",
                     f"{p['enc_sketch']['p50_ms']:.2f}", f"{p['enc_text']['p50_ms']:.2f}",
                     f"{p['fuse']['p50_ms']:.3f}", f"{p['search']['p50_ms']:.3f}",
                     f"{r['steps_total_ms']:.2f}", f"{r['searcher_own_ms']:+.2f}",
                     f"{p['total']['p50_ms']:.2f} ({p['total']['p95_ms']:.2f})",
                     f"{100 * r['overhead_share']:.1f}%",
                     f"{100 * r['overhead_share_min']:.1f}%"])
    parts.append(common.md_table(["precision", "mode", "pre sketch", "pre text", "enc sketch",
                                  "enc text", "fuse", "search", "sum of steps", "Searcher.query - sum",
                                  "Searcher.query p50 (p95)",
                                  "overhead", "overhead at min"], rows))
    parts += ["", "Cold start (new process, median wall time):", ""]
    rows = []
    for name, c in result["cold_start"].items():
        rows.append([name, "error: " + c["error"] if "error" in c else f"{c['median_s'] * 1e3:.0f} ms",
                     "-" if "error" in c else f"{c['min_s'] * 1e3:.0f} ms"])
    parts.append(common.md_table(["process", "median", "min"], rows))
    b = result.get("batch")
    if b:
        parts += ["", f"Batch queries ({b['queries']} sketch+text queries, fp32, queries/s):", ""]
        rows = [["Searcher.query, one call each", f"{b['query_qps']:.0f}"],
                ["Searcher.query_many", f"{b['query_many_qps']:.0f}"]]
        for name, key in (("stbir-infer query, one process per query", "single_process"),
                          ("stbir-infer query --batch FILE, one process", "batch_process")):
            rows.append([name, f"{b[key + '_qps']:.1f}" if key + "_qps" in b
                         else "error: " + b[key].get("error", "?")])
        parts.append(common.md_table(["how", "queries/s"], rows))
    parts += ["", "Targets:", "", common.targets_table(result["targets"])]
    return "\n".join(parts)


def main(argv=None) -> dict:
    args = parse(argv)
    result, t_start = common.begin("query", args.threads)
    from stbir_infer import gallery as _gallery
    from stbir_infer.searcher import Searcher

    work = Path(tempfile.mkdtemp(prefix="stbir-bench-query-", dir=args.workdir))
    try:
        model, index, queries = setup(args, work, common.log)
        result.update({"settings": {"model": str(args.model) if args.model else
                               f"random-init {args.preset} preset", "repeats": args.repeats,
                               "warmup": args.warmup, "top_k": TOP_K, "quick": args.quick,
                               "cold_runs": args.cold_runs},
                       "modes": []})
        gidx = _gallery.GalleryIndex.load(index, threads=args.threads)
        result["gallery_size"] = len(gidx)
        for precision in args.precisions:
            searcher = Searcher(model, index, threads=args.threads, precision=precision)
            for mode in MODES:
                r = {"precision": precision, **bench_mode(searcher, gidx, queries, mode, args)}
                result["modes"].append(r)
                common.log(f"[{precision}] {mode:11s} total {r['phases']['total']['p50_ms']:7.2f} ms, "
                    f"encode {r['encode']['p50_ms']:7.2f}, search {r['phases']['search']['p50_ms']:.3f}"
                    f", overhead {100 * r['overhead_share']:.1f}%")
        common.log("timing process cold starts ...")
        result["cold_start"] = cold_start(model, index, queries[0], args)
        common.log("batch queries ...")
        result["batch"] = batch_queries(model, index, queries, args, work)
        result["targets"] = targets_for(result)
        common.finish("query", result, args.out, markdown(result), t_start)
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
