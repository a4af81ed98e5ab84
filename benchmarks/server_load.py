"""`stbir-infer serve` under load on loopback, against the same queries through
``Searcher.query_many`` in one process.

Set-up (unless ``--model`` / ``--index`` are given): a random-init export of ``--preset`` and an
index of ``--gallery`` built-in-style photos. Queries: ``--distinct`` built-in-style sketches,
each with its caption (sketch+text), cycled up to ``--queries``.

- in process: ``Searcher.query_many`` over all the queries (sketch files, batches of
  ``--batch-size``), and for reference one ``Searcher.query`` call each;
- server: ``stbir-infer serve --port 0`` as its own process (loaded and warmed up before the
  clock), and ``--clients`` client threads in this process, each on one keep-alive connection,
  posting JSON queries (the sketch PNG base64-encoded, as the web page sends it) until
  ``--queries`` are answered or ``--max-seconds`` pass, whichever is first. Every answer is
  checked (status 200, a JSON list of results); anything else counts as an error.

Reported: queries/s of each, the server's per-request latency p50 / p99 (client side: from
sending the request to the last byte of the answer), errors. The clients share the machine's
cores with the server, as a browser on the same device would. Also queries per CPU second
(server process + clients, from /proc and ``time.process_time``, against the in-process run's):
on a busy machine a server process and its clients get a larger share of the cores than one
process does, which flatters the wall-clock ratio; the CPU ratio is not affected.

    python benchmarks/server_load.py [--clients 8] [--queries 2000] [--threads N] [--quick]
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

TOP_K = 10


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    common.model_args(p)
    common.index_args(p)
    p.add_argument("--distinct", type=int, default=50, help="distinct sketch+text queries")
    p.add_argument("--queries", type=int, default=2000, help="queries sent to the server")
    p.add_argument("--clients", type=int, default=8, help="concurrent client connections")
    p.add_argument("--batch-size", type=int, default=32, help="Searcher.query_many batch size")
    p.add_argument("--max-seconds", type=float, default=300.0,
                   help="stop the load after this long even if not all queries are answered")
    p.add_argument("--workdir", type=Path, default=None, help="temp files go here (deleted after)")
    common.add_common_args(p, "server_load")
    args = p.parse_args(argv)
    common.check_index_args(p, args)
    if args.quick:
        args.gallery, args.distinct, args.queries = 64, 10, 200
    return args


def setup(args, work: Path) -> tuple[Path, Path, list[dict]]:
    """(export dir, index dir, distinct queries {sketch path, text})."""
    rows = common.synth_images(work / "queries", args.distinct, seed=99, sketches=True)
    queries = [{"sketch": str(r["sketch"]), "text": r["text"]} for r in rows]
    return (*common.model_and_index(args, work, quantize=False), queries)


def in_process(model: Path, index: Path, queries: list[dict], args) -> dict:
    """queries/s of Searcher.query_many over all the queries, and of one query() call each."""
    from stbir_infer.searcher import Searcher

    s = Searcher(model, index, threads=args.threads)
    batch = [{**q, "top_k": TOP_K} for q in queries]
    s.query_many(batch[:args.batch_size], batch_size=args.batch_size)  # warm-up
    c0, t0 = time.process_time(), time.perf_counter()
    s.query_many(batch, batch_size=args.batch_size)
    t_many, c_many = time.perf_counter() - t0, time.process_time() - c0
    few = batch[:min(len(batch), 400)]
    for q in few[:10]:
        s.query(**q)
    t0 = time.perf_counter()
    for q in few:
        s.query(**q)
    t_one = time.perf_counter() - t0
    return {"query_many_qps": len(batch) / t_many, "query_many_seconds": t_many,
            "query_many_cpu_seconds": c_many,
            "query_qps": len(few) / t_one, "queries": len(batch)}


def start_server(model: Path, index: Path, args) -> tuple[subprocess.Popen, str, int]:
    from query import cli_command  # the same `stbir-infer` executable query.py times

    cmd = cli_command() + ["serve", "--model", str(model), "--index", str(index), "--port", "0",
                           "--threads", str(args.threads), "-q"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    deadline = time.monotonic() + 120
    seen = []
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        seen.append(line.strip())
        m = re.search(r"serving .* at http://([^:/]+):([0-9]+)/", line)
        if m:
            # Keep draining stderr, so a chatty server never blocks on a full pipe.
            threading.Thread(target=proc.stderr.read, daemon=True).start()
            return proc, m.group(1), int(m.group(2))
    proc.kill()
    raise SystemExit("stbir-infer serve did not start: " + " | ".join(seen[-5:]))


def health(host: str, port: int) -> dict:
    conn = http.client.HTTPConnection(host, port, timeout=30)
    try:
        conn.request("GET", "/api/health", headers={"Host": f"localhost:{port}"})
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` and its threads so far (Linux /proc)."""
    import os

    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load(host: str, port: int, bodies: list[bytes], args, warmup: int = 0) -> dict:
    """``args.clients`` threads post ``bodies`` (cycled) until ``args.queries`` are answered or
    ``args.max_seconds`` pass. Returns latencies, errors and the wall time."""
    total = warmup or args.queries
    lock = threading.Lock()
    state = {"next": 0, "errors": [], "latencies": []}
    stop_at = time.monotonic() + args.max_seconds
    headers = {"Content-Type": "application/json", "Host": f"localhost:{port}"}

    def client():
        conn = http.client.HTTPConnection(host, port, timeout=60)
        lat, errs = [], []
        try:
            while time.monotonic() < stop_at:
                with lock:
                    i = state["next"]
                    if i >= total:
                        break
                    state["next"] = i + 1
                t0 = time.perf_counter()
                try:
                    conn.request("POST", "/api/query", body=bodies[i % len(bodies)],
                                 headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    ok = resp.status == 200 and isinstance(json.loads(data).get("results"), list)
                except (OSError, http.client.HTTPException, ValueError) as exc:
                    ok, data = False, repr(exc).encode()
                    conn.close()
                    conn = http.client.HTTPConnection(host, port, timeout=60)
                lat.append(time.perf_counter() - t0)
                if not ok:
                    errs.append(data[:200].decode("utf-8", "replace"))
        finally:
            conn.close()
            with lock:
                state["latencies"] += lat
                state["errors"] += errs

    threads = [threading.Thread(target=client) for _ in range(args.clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "answered": len(state["latencies"]), "errors": state["errors"],
            "latencies": state["latencies"], "timed_out": len(state["latencies"]) < total}


def main(argv=None) -> dict:
    args = parse(argv)
    result, t_start = common.begin("server_load", args.threads)
    import numpy as np

    work = Path(tempfile.mkdtemp(prefix="stbir-bench-serve-", dir=args.workdir))
    proc = None
    try:
        model, index, distinct = setup(args, work)
        queries = [distinct[i % len(distinct)] for i in range(args.queries)]
        common.log(f"in process: Searcher.query_many over {len(queries)} queries ...")
        local = in_process(model, index, queries, args)
        bodies = [json.dumps({"sketch": base64.b64encode(Path(q["sketch"]).read_bytes()).decode(),
                              "text": q["text"], "top_k": TOP_K}).encode() for q in distinct]
        common.log("starting stbir-infer serve ...")
        proc, host, port = start_server(model, index, args)
        load(host, port, bodies, args, warmup=4 * args.clients)
        common.log(f"{args.clients} clients, {args.queries} queries ...")
        c_srv, c_cli = cpu_seconds(proc.pid), time.process_time()
        runs0 = health(host, port)["batching"]
        run = load(host, port, bodies, args)
        c_srv, c_cli = cpu_seconds(proc.pid) - c_srv, time.process_time() - c_cli
        runs1 = health(host, port)["batching"]
        per_run = ((runs1["queries"] - runs0["queries"]) / max(1, runs1["runs"] - runs0["runs"]))
        per_cpu = run["answered"] / (c_srv + c_cli)
        per_cpu_local = len(queries) / local["query_many_cpu_seconds"]
        ms = np.asarray(run["latencies"]) * 1e3
        p50, p99 = (float(np.percentile(ms, q)) for q in (50, 99)) if len(ms) else (None, None)
        qps = run["answered"] / run["wall_s"]
        result.update({
            "settings": {"model": str(args.model) if args.model else
                         f"random-init {args.preset} preset", "clients": args.clients,
                         "queries": args.queries, "distinct": args.distinct, "top_k": TOP_K,
                         "batch_size": args.batch_size, "quick": args.quick,
                         "max_seconds": args.max_seconds},
            "in_process": local,
            "server": {"qps": qps, "p50_ms": p50, "p99_ms": p99, "answered": run["answered"],
                       "errors": len(run["errors"]), "first_errors": run["errors"][:5],
                       "wall_s": run["wall_s"], "stopped_by_time": run["timed_out"],
                       "cpu_seconds_server": c_srv, "cpu_seconds_clients": c_cli,
                       "queries_per_encoder_run": per_run},
            "ratio_server_to_query_many": qps / local["query_many_qps"],
            "queries_per_cpu_second": {"server_and_clients": per_cpu, "query_many": per_cpu_local},
            "ratio_per_cpu_second": per_cpu / per_cpu_local})
        srv = result["server"]
        result["targets"] = [
            common.target("server / Searcher.query_many queries/s",
                          result["ratio_server_to_query_many"], 0.7, ">=",
                          f"per CPU second: {result['ratio_per_cpu_second']:.2f}x"),
            common.target("server errors", srv["errors"], 0, "<=",
                          f"{srv['answered']} answered"),
            common.target("server p99 / p50 latency", p99 / p50 if p50 else None, 5.0, "<=",
                          f"p50 {p50:.1f} ms, p99 {p99:.1f} ms" if p50 else "")]
        md = [*common.md_header("### Server under load: stbir-infer serve vs Searcher.query_many",
                                result["machine"]),
              f"{result['settings']['model']}; {len(distinct)} distinct sketch+text queries "
              f"cycled to {args.queries}; top {TOP_K}; {args.clients} keep-alive clients on "
              f"loopback (JSON, sketch PNG in base64); query_many batch {args.batch_size}. "
              f"The server answered {per_run:.1f} queries per encoder run on average "
              "(`/api/health` batching).", "",
              common.md_table(["path", "queries/s", "p50 ms", "p99 ms", "errors",
                               "vs query_many", "queries / CPU s"], [
                  ["Searcher.query_many, one process", f"{local['query_many_qps']:.0f}", "-", "-",
                   "-", "1.00x", f"{per_cpu_local:.0f}"],
                  ["Searcher.query, one call each", f"{local['query_qps']:.0f}", "-", "-", "-",
                   f"{local['query_qps'] / local['query_many_qps']:.2f}x", "-"],
                  [f"stbir-infer serve, {args.clients} clients", f"{qps:.0f}",
                   f"{p50:.1f}" if p50 else "-", f"{p99:.1f}" if p99 else "-",
                   str(srv["errors"]), f"{result['ratio_server_to_query_many']:.2f}x",
                   f"{per_cpu:.0f} ({result['ratio_per_cpu_second']:.2f}x)"]]),
              "", "Targets:", "", common.targets_table(result["targets"])]
        common.finish("server_load", result, args.out, "\n".join(md), t_start)
        return result
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
