"""Vector search: hnswlib (what the runtime uses) vs exact numpy search (what the seed does: a
matrix of features and a matmul) vs faiss-cpu flat and HNSW (when installed).

Synthetic unit vectors of the model's dimension (512 = the seed preset's; ``--dim``):

- ``clustered``: n/100 random unit centres, each vector = centre + N(0, 1/d) noise per dimension,
  normalised (cosine to its centre about 0.7, like photos of the same kind of thing); queries are
  fresh draws from the same mixture, not database vectors.
- ``uniform``: normalised Gaussian vectors, the worst case for any graph index: in 512-d the
  nearest neighbours are barely nearer than everything else (run up to ``--uniform-max``).

Per method and size: build time, memory, recall@10 against the exact top 10, and queries/s with
one query per call (what an interactive query does) as p50 / p95 latency, plus batch queries/s
(all queries in one call, ``--threads`` threads). HNSW: M=16, ef_construction=200 (the runtime's
defaults), ef_search in 16..256. Memory: numpy = the matrix's nbytes; hnswlib = the size of
``save_index``'s file (its in-memory layout, written out as is); faiss = ``serialize_index`` length.

    python benchmarks/index.py [--sizes 10000,100000] [--large] [--dists clustered,uniform]

Two more questions, each its own run (``--out`` names the JSON):

- ``--scale``: one gallery of ``--sizes`` (e.g. 1000000) clustered vectors, the runtime's index
  beside faiss HNSW and faiss IVF-PQ (alone, and re-ranked on full vectors to reach equal
  recall): build time, on-disk size, load time and memory of a fresh process that loads it (a
  subprocess; for the runtime, ``GalleryIndex.load`` of a real index dir with the metadata of
  that many photos, with and without the in-memory copy that checksum verification can make),
  recall@10 and latency per ef / nprobe, and the cheapest setting of each engine reaching equal
  recall (``--targets``).
- ``--lifecycle``: what deletes and filters do to the graph (the runtime's thresholds come from
  here): recall@10 and latency after marking a share of the vectors deleted, against a rebuild
  of what is left; and filtered queries (hnswlib's filter callback) against exact search of the
  matching vectors at several selectivities.

    python benchmarks/index.py --scale --sizes 1000000 --dim 128 --out benchmarks/results/index_scale_1m_128.json
    python benchmarks/index.py --lifecycle --sizes 100000 --dim 128 --out benchmarks/results/index_lifecycle.json
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

K = 10
EFS = (16, 32, 64, 128, 256)
M, EF_CONSTRUCTION = 16, 200


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="10000,100000", help="gallery sizes; default %(default)s")
    p.add_argument("--large", action="store_true", help="add 1,000,000 vectors (~2 GB at 512-d; "
                   "builds take many minutes)")
    p.add_argument("--dim", type=int, default=512, help="vector dimension (default %(default)s)")
    p.add_argument("--dists", default="clustered,uniform",
                   help="vector distributions: clustered, uniform (default %(default)s)")
    p.add_argument("--uniform-max", type=int, default=10_000,
                   help="run uniform vectors only up to this size (default %(default)s: at 100k "
                        "they add ~4 min of builds to show recall near 0.1, the 10k rows already "
                        "make that point)")
    p.add_argument("--queries", type=int, default=1000,
                   help="queries for recall and for timing the HNSW indexes (default %(default)s)")
    p.add_argument("--exact-queries", type=int, default=200,
                   help="one-at-a-time queries timed on the exact searches (default %(default)s)")
    p.add_argument("--efs", default=",".join(map(str, EFS)), help="ef_search values")
    p.add_argument("--no-faiss", action="store_true", help="skip faiss even when installed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", action="store_true", help="the scale run (see above)")
    p.add_argument("--lifecycle", action="store_true", help="deletes and filters (see above)")
    p.add_argument("--parts", default="deletes,filters",
                   help="--lifecycle: which parts (default %(default)s)")
    p.add_argument("--engines", default="hnswlib,faiss-hnsw,faiss-ivfpq",
                   help="--scale: engines to run (default %(default)s)")
    p.add_argument("--nprobes", default="1,4,16,64,256", help="--scale: IVF nprobe values")
    p.add_argument("--targets", default="0.9,0.95,0.99", help="--scale: recall@10 levels to compare at")
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "stbir-index-bench",
                   help="--scale: where the indexes are written (default %(default)s)")
    p.add_argument("--probe-load", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)
    common.add_common_args(p, "index")
    args = p.parse_args(argv)
    args.sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    if args.large and 1_000_000 not in args.sizes:
        args.sizes.append(1_000_000)
    args.dists = [d.strip() for d in args.dists.split(",") if d.strip()]
    if any(d not in ("clustered", "uniform") for d in args.dists):
        p.error("--dists takes clustered and/or uniform")
    args.efs = [int(e) for e in args.efs.split(",")]
    args.nprobes = [int(e) for e in args.nprobes.split(",")]
    args.targets = [float(t) for t in args.targets.split(",")]
    args.engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    if args.quick and (args.scale or args.lifecycle):
        args.sizes, args.queries, args.exact_queries = [20000], 200, 20
    elif args.quick:
        args.sizes, args.queries, args.exact_queries = [2000], 200, 50
        args.dists = args.dists[:1]
    return args


def vectors(dist: str, n: int, nq: int, dim: int, seed: int):
    """(database [n, dim], queries [nq, dim]) float32 unit vectors."""
    import numpy as np

    rng = np.random.default_rng(seed)

    def unit(x):
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x

    if dist == "uniform":
        return (unit(rng.standard_normal((n, dim), np.float32)),
                unit(rng.standard_normal((nq, dim), np.float32)))
    centres = unit(rng.standard_normal((max(10, n // 100), dim), np.float32))

    def draw(m):
        out = np.empty((m, dim), np.float32)
        for s in range(0, m, 65536):  # in chunks: 1M x 512 noise at once would double memory
            e = min(m, s + 65536)
            out[s:e] = centres[rng.integers(0, len(centres), e - s)]
            out[s:e] += rng.standard_normal((e - s, dim), np.float32) / np.float32(np.sqrt(dim))
        return unit(out)

    return draw(n), draw(nq)


def exact_topk(X, Q, k: int = K, chunk: int = 256):
    """Exact top-k ids by inner product, batched (the ground truth)."""
    import numpy as np

    out = np.empty((len(Q), k), np.int64)
    for s in range(0, len(Q), chunk):
        scores = Q[s:s + chunk] @ X.T
        part = np.argpartition(-scores, k, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(scores, part, 1), axis=1)
        out[s:s + chunk] = np.take_along_axis(part, order, 1)
    return out


def recall(found, truth) -> float:
    import numpy as np

    found = np.asarray(found)
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)]))


def one_at_a_time(search, Q) -> tuple[dict, list]:
    """Time ``search(q[None])`` per query -> latency stats, qps (queries / summed time) and
    results. The first few queries run untimed first (warm caches, lazy allocations)."""
    for q in Q[:10]:
        search(q[None])
    times, found = [], []
    t_all = time.perf_counter()
    for q in Q:
        q = q[None]
        t0 = time.perf_counter()
        found.append(search(q))
        times.append(time.perf_counter() - t0)
    total = time.perf_counter() - t_all
    stats = common.summarize(times)
    stats["qps"] = len(Q) / sum(times)
    stats["loop_seconds"] = total
    return stats, found


def batch_qps(search_all, Q, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        search_all(Q)
        best = min(best, time.perf_counter() - t0)
    return len(Q) / best


def bench_exact_numpy(X, Q, truth, args) -> dict:
    import numpy as np

    def search(q):
        s = X @ q[0]
        part = np.argpartition(-s, K)[:K]
        return part[np.argsort(-s[part])]

    stats, found = one_at_a_time(search, Q[:args.exact_queries])
    return {"method": "exact numpy", "params": "matmul + argpartition", "build_s": 0.0,
            "memory_mb": X.nbytes / 1e6, "rows": [{
                "ef": None, "recall@10": recall(found, truth[:args.exact_queries]), **stats,
                "batch_qps": batch_qps(lambda QQ: exact_topk(X, QQ), Q)}]}


def bench_hnswlib(X, Q, truth, args) -> dict:
    import hnswlib

    idx = hnswlib.Index(space="cosine", dim=X.shape[1])
    with common.Stopwatch() as sw:
        idx.init_index(max_elements=len(X), M=M, ef_construction=EF_CONSTRUCTION, random_seed=100)
        idx.add_items(X, num_threads=args.threads)
    with tempfile.TemporaryDirectory() as d:
        idx.save_index(os.path.join(d, "i.bin"))
        mem = os.path.getsize(os.path.join(d, "i.bin"))
    rows = []
    for ef in args.efs:
        idx.set_ef(ef)
        stats, found = one_at_a_time(lambda q: idx.knn_query(q, k=K, num_threads=1)[0][0], Q)
        rows.append({"ef": ef, "recall@10": recall(found, truth), **stats,
                     "batch_qps": batch_qps(lambda QQ: idx.knn_query(QQ, k=K,
                                                                     num_threads=args.threads), Q)})
    return {"method": "hnswlib HNSW", "params": f"M={M}, efC={EF_CONSTRUCTION}, cosine",
            "build_s": sw.seconds, "memory_mb": mem / 1e6, "rows": rows}


def bench_faiss(X, Q, truth, args, kind: str) -> dict:
    import faiss

    faiss.omp_set_num_threads(args.threads)
    d = X.shape[1]
    with common.Stopwatch() as sw:
        if kind == "flat":
            idx = faiss.IndexFlatIP(d)
        else:
            idx = faiss.IndexHNSWFlat(d, M, faiss.METRIC_INNER_PRODUCT)
            idx.hnsw.efConstruction = EF_CONSTRUCTION
        idx.add(X)
    mem = len(faiss.serialize_index(idx))
    rows = []
    for ef in ([None] if kind == "flat" else args.efs):
        if ef is not None:
            idx.hnsw.efSearch = ef
        n = args.exact_queries if kind == "flat" else len(Q)
        stats, found = one_at_a_time(lambda q: idx.search(q, K)[1][0], Q[:n])
        rows.append({"ef": ef, "recall@10": recall(found, truth[:n]), **stats,
                     "batch_qps": batch_qps(lambda QQ: idx.search(QQ, K), Q)})
    name = "faiss IndexFlatIP" if kind == "flat" else "faiss IndexHNSWFlat"
    params = "exact, BLAS" if kind == "flat" else f"M={M}, efC={EF_CONSTRUCTION}, inner product"
    return {"method": name, "params": params, "build_s": sw.seconds, "memory_mb": mem / 1e6,
            "rows": rows}


def have_faiss() -> bool:
    try:
        import faiss
        return hasattr(faiss, "IndexHNSWFlat")
    except ImportError:
        return False


def targets_for(result: dict) -> list[dict]:
    out = []
    for run in result["runs"]:
        if run["n"] != 100_000:
            continue
        exact = next(m for m in run["methods"] if m["method"] == "exact numpy")["rows"][0]["qps"]
        hn = next(m for m in run["methods"] if m["method"] == "hnswlib HNSW")
        ok = [r for r in hn["rows"] if r["recall@10"] >= 0.98]
        best = ok[0] if ok else max(hn["rows"], key=lambda r: r["recall@10"])
        note = (f"ef {best['ef']} (smallest ef with recall >= 0.98)" if ok
                else f"no ef reaches 0.98; best ef {best['ef']}")
        out.append(common.target(f"hnswlib 100k {run['dist']}: recall@10", best["recall@10"], 0.98,
                                 ">=", note))
        out.append(common.target(f"hnswlib 100k {run['dist']}: qps / exact numpy qps",
                                 best["qps"] / exact, 50, ">=", f"at ef {best['ef']}"))
    return out


def markdown(result: dict) -> str:
    s = result["settings"]
    parts = [*common.md_header("### Vector index: hnswlib vs exact numpy vs faiss", result["machine"]),
             f"{s['dim']}-d unit vectors, top {K}, {s['queries']} queries (exact searches timed "
             f"on {s['exact_queries']}); qps = one query per call; batch qps = all queries in one "
             f"call on {result['machine']['threads']} threads. Recall@10 against exact search.",
             ""]
    rows = []
    for run in result["runs"]:
        exact = next(m for m in run["methods"] if m["method"] == "exact numpy")["rows"][0]["qps"]
        for m in run["methods"]:
            for r in m["rows"]:
                rows.append([f"{run['n']:,}", run["dist"], m["method"], "-" if r["ef"] is None else r["ef"],
                             f"{m['build_s']:.1f}", f"{m['memory_mb']:.0f}", f"{r['recall@10']:.4f}",
                             f"{r['p50_ms']:.3f}", f"{r['p95_ms']:.3f}", f"{r['qps']:,.0f}",
                             f"{r['qps'] / exact:.1f}x", f"{r['batch_qps']:,.0f}"])
    parts.append(common.md_table(["n", "vectors", "method", "ef", "build s", "MB", "recall@10",
                                  "p50 ms", "p95 ms", "qps", "vs exact", "batch qps"], rows))
    if not result["faiss"]:
        parts += ["", "faiss-cpu not installed: its rows are skipped (pip install faiss-cpu)."]
    if result["targets"]:
        parts += ["", "Targets:", "", common.targets_table(result["targets"])]
    return "\n".join(parts)


def main(argv=None) -> dict:
    args = parse(argv)
    if args.probe_load:
        import index_scale
        return index_scale.probe_load(*args.probe_load)
    if args.scale or args.lifecycle:
        import index_scale
        return index_scale.main(args)
    result, t_start = common.begin("index", args.threads)
    faiss_ok = result["faiss"] = have_faiss() and not args.no_faiss
    result.update({"settings": {"dim": args.dim, "k": K, "queries": args.queries,
                           "exact_queries": args.exact_queries, "efs": args.efs, "M": M,
                           "ef_construction": EF_CONSTRUCTION, "sizes": args.sizes,
                           "dists": args.dists, "uniform_max": args.uniform_max,
                           "quick": args.quick,
                           "memory": "numpy nbytes; hnswlib save_index file size; faiss "
                                     "serialize_index length"},
                   "runs": []})
    for n in args.sizes:
        for dist in args.dists:
            if dist == "uniform" and n > args.uniform_max:
                common.log(f"[{n:>9,} uniform  ] skipped (above --uniform-max {args.uniform_max:,})")
                continue
            X, Q = vectors(dist, n, args.queries, args.dim, args.seed)
            truth = exact_topk(X, Q)
            run = {"n": n, "dist": dist, "methods": []}
            benches = [("exact numpy", bench_exact_numpy, ()), ("hnswlib", bench_hnswlib, ())]
            if faiss_ok:
                benches += [("faiss flat", bench_faiss, ("flat",)),
                            ("faiss hnsw", bench_faiss, ("hnsw",))]
            for name, fn, extra in benches:
                m = fn(X, Q, truth, args, *extra)
                run["methods"].append(m)
                best = m["rows"][min(2, len(m["rows"]) - 1)]
                common.log(f"[{n:>9,} {dist:9s}] {name:11s} build {m['build_s']:6.1f} s  "
                    f"{m['memory_mb']:7.1f} MB  recall {best['recall@10']:.3f}  "
                    f"{best['qps']:9,.0f} qps" + (f" (ef {best['ef']})" if best["ef"] else ""))
            result["runs"].append(run)
            X = Q = truth = None  # free the vectors before the next size
    result["targets"] = targets_for(result)
    common.finish("index", result, args.out, markdown(result), t_start)
    return result


if __name__ == "__main__":
    main()
