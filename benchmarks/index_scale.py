"""``benchmarks/index.py --scale`` and ``--lifecycle`` (see that script's docstring).

--scale: the runtime's index (``GalleryIndex``: hnswlib, M 16, ef_construction 200) beside faiss
IndexHNSWFlat (same M / efConstruction) and faiss IVF-PQ, at one gallery size. Memory is measured
in a fresh subprocess that loads the saved index (``--probe-load``): resident memory after the
load and the peak during it, both above the process's own baseline (python + numpy + the library);
for the runtime's index dir the peak includes the anonymous in-memory copy that checksum
verification makes when it copies (it is not in the process's RSS: it is shared memory).

--lifecycle: deletes (mark_deleted, then replace_deleted refills) and filtered queries (hnswlib's
filter callback vs exact search of the matching vectors).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import common
import index as ib

GALLERY_ROOT = "/photos"
PHOTOS_PER_FOLDER = 1000


# -- memory of this process ----------------------------------------------------------------------

def _status_mb() -> dict:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) / 1024
    return out


def _memfd_bytes() -> int:
    """Bytes held by this process's anonymous in-memory files (store.verified_file's copy)."""
    total = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:"):
                total += os.fstat(int(fd)).st_size
        except OSError:
            pass
    return total


def probe_load(kind: str, path: str) -> dict:
    """Load one saved index in this (fresh) process; print and return time and memory in MB."""
    import hnswlib
    import numpy  # noqa: F401  (in the baseline, like the library)

    at_load_end = {}
    if kind.startswith("faiss"):
        import faiss
    if kind.startswith("gallery"):
        from functools import partial

        from stbir_infer import store
        from stbir_infer.gallery import GalleryIndex

        class Recording(hnswlib.Index):  # the moment the verified copy (if any) is still held
            def load_index(self, *a, **k):
                super().load_index(*a, **k)
                at_load_end.update(rss=_status_mb()["VmRSS"], memfd=_memfd_bytes() / 2**20)

        hnswlib.Index = Recording
        if kind == "gallery-copy":
            store.verified_file = partial(store.verified_file, private_copy=True)
    base = _status_mb()["VmRSS"]
    t0 = time.perf_counter()
    if kind.startswith("gallery"):
        obj = GalleryIndex.load(path)
        n = len(obj)
    elif kind.startswith("hnswlib:"):
        obj = hnswlib.Index(space="cosine", dim=int(kind.split(":")[1]))
        obj.load_index(path)
        n = obj.element_count
    else:
        obj = faiss.read_index(path)
        n = obj.ntotal
    seconds = time.perf_counter() - t0
    now = _status_mb()
    peak = now["VmHWM"]
    if at_load_end:
        peak = max(peak, at_load_end["rss"] + at_load_end["memfd"])
    out = {"kind": kind, "n": int(n), "load_s": seconds, "rss_mb": now["VmRSS"] - base,
           "peak_mb": peak - base, "verified_copy_mb": at_load_end.get("memfd", 0.0)}
    print(json.dumps(out))
    return out


def _probe(kind: str, path: Path) -> dict:
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("index.py")),
                           "--probe-load", kind, str(path)], capture_output=True, text=True,
                          cwd=common.REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode:
        raise RuntimeError(f"probe {kind} failed: {proc.stderr.strip()[-500:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _disk_mb(path: Path) -> float:
    return (common.dir_bytes(path) if path.is_dir() else path.stat().st_size) / 1e6


# -- the engines -----------------------------------------------------------------------------------

def _sweep(search, Q, truth, settings, apply) -> list[dict]:
    """One query per call, on one thread (hnswlib's knn_query gets num_threads=1 too)."""
    try:
        import faiss
        faiss.omp_set_num_threads(1)
    except ImportError:
        pass
    rows = []
    for setting in settings:
        apply(setting)
        stats, found = ib.one_at_a_time(search, Q)
        rows.append({"setting": setting, "recall@10": ib.recall(found, truth), **stats})
        common.log(f"    {setting}: recall {rows[-1]['recall@10']:.4f}  p50 {stats['p50_ms']:.3f} ms")
    return rows


def runtime_gallery(X, Q, truth, args, work: Path) -> list[dict]:
    """The runtime's own build (GalleryIndex.add_vectors), searched, saved as a real index dir
    with the metadata of len(X) photos (1,000 a folder), then loaded three ways."""
    from stbir_infer.gallery import GalleryIndex, HnswParams

    n, d = X.shape
    g = GalleryIndex.create(dim=d, model={"fingerprint": "0" * 64, "embed_dim": d,
                                          "clip_model": "benchmark"}, params=HnswParams())
    g.hnsw.set_num_threads(args.threads)
    hashes = [hashlib.sha256(i.to_bytes(8, "little")).hexdigest() for i in range(n)]
    with common.Stopwatch() as sw:
        g.add_vectors(X, hashes)
    common.log(f"  hnswlib (GalleryIndex) built in {sw.seconds:.1f} s")
    with common.Stopwatch() as sw_meta:
        for i, sha in enumerate(hashes):
            g.set_file(f"{GALLERY_ROOT}/{i // PHOTOS_PER_FOLDER:05d}/IMG_{i:07d}.jpg", sha,
                       200_000 + i, 1_700_000_000_000_000_000 + i)
        g.add_root(GALLERY_ROOT)
    rows = _sweep(lambda q: g.hnsw.knn_query(q, k=ib.K, num_threads=1)[0][0], Q, truth, args.efs,
                  g.hnsw.set_ef)
    idx_dir = work / "gallery"
    shutil.rmtree(idx_dir, ignore_errors=True)
    with common.Stopwatch() as sw_save:
        g.save(idx_dir)
    raw = work / "hnswlib.bin"
    g.hnsw.save_index(str(raw))
    g = None  # free it before the probes load their copies
    gen = next(p for p in idx_dir.iterdir() if p.name.startswith("gen-"))
    out = {"engine": "hnswlib (runtime)", "params": f"M={ib.M}, efC={ib.EF_CONSTRUCTION}",
           "build_s": sw.seconds, "metadata_s": sw_meta.seconds, "save_s": sw_save.seconds,
           "disk_mb": _disk_mb(gen), "index_bin_mb": _disk_mb(gen / "index.bin"),
           "meta_json_mb": _disk_mb(gen / "meta.json"), "rows": rows,
           "load": {"hnswlib file only": _probe(f"hnswlib:{d}", raw),
                    "GalleryIndex.load": _probe("gallery", idx_dir),
                    "GalleryIndex.load, verified copy": _probe("gallery-copy", idx_dir)}}
    raw.unlink()
    return [out]


def faiss_hnsw(X, Q, truth, args, work: Path) -> list[dict]:
    import faiss

    idx = faiss.IndexHNSWFlat(X.shape[1], ib.M, faiss.METRIC_INNER_PRODUCT)
    idx.hnsw.efConstruction = ib.EF_CONSTRUCTION
    faiss.omp_set_num_threads(args.threads)
    with common.Stopwatch() as sw:
        idx.add(X)
    common.log(f"  faiss HNSW built in {sw.seconds:.1f} s")

    def set_ef(ef):
        idx.hnsw.efSearch = ef

    rows = _sweep(lambda q: idx.search(q, ib.K)[1][0], Q, truth, args.efs, set_ef)
    path = work / "faiss_hnsw.index"
    faiss.write_index(idx, str(path))
    idx = None
    out = {"engine": "faiss HNSW", "params": f"IndexHNSWFlat M={ib.M}, efC={ib.EF_CONSTRUCTION}",
           "build_s": sw.seconds, "disk_mb": _disk_mb(path), "rows": rows,
           "load": {"faiss.read_index": _probe("faiss", path)}}
    path.unlink()
    return [out]


def faiss_ivfpq(X, Q, truth, args, work: Path) -> list[dict]:
    """IVF (sqrt-ish lists) + PQ (d/4 bytes, at most 64), and the same codes re-ranked on the full
    vectors (IndexRefineFlat), which is what it takes to reach the graphs' recall."""
    import faiss
    import numpy as np

    n, d = X.shape
    nlist = 1024 if n >= 300_000 else max(16, int(np.sqrt(n)) // 16 * 16)
    m = min(64, d // 4)
    quantizer = faiss.IndexFlatIP(d)
    ivf = faiss.IndexIVFPQ(quantizer, d, nlist, m, 8, faiss.METRIC_INNER_PRODUCT)
    sample = X[np.random.default_rng(1).choice(n, min(n, 64 * nlist), replace=False)]
    faiss.omp_set_num_threads(args.threads)
    with common.Stopwatch() as sw_train:
        ivf.train(sample)
    refine = faiss.IndexRefineFlat(ivf)
    with common.Stopwatch() as sw_add:
        refine.add(X)  # adds the codes to ivf and the full vectors to the refine stage
    common.log(f"  faiss IVF-PQ trained in {sw_train.seconds:.1f} s, added in {sw_add.seconds:.1f} s")

    def set_probe(p):
        ivf.nprobe = p

    rows = _sweep(lambda q: ivf.search(q, ib.K)[1][0], Q, truth, args.nprobes, set_probe)
    refined = []
    for kf in (4, 16):
        refine.k_factor = kf
        for r in _sweep(lambda q: refine.search(q, ib.K)[1][0], Q, truth, args.nprobes, set_probe):
            refined.append({**r, "setting": f"{r['setting']} x{kf}"})
    p_ivf, p_ref = work / "faiss_ivfpq.index", work / "faiss_ivfpq_refine.index"
    faiss.write_index(ivf, str(p_ivf))
    faiss.write_index(refine, str(p_ref))
    refine = ivf = None
    params = f"IVF{nlist},PQ{m}x8 (trained on {len(sample):,})"
    build = sw_train.seconds + sw_add.seconds
    out = [{"engine": "faiss IVF-PQ", "params": params, "build_s": build,
            "disk_mb": _disk_mb(p_ivf), "rows": rows,
            "load": {"faiss.read_index": _probe("faiss", p_ivf)}},
           {"engine": "faiss IVF-PQ + re-rank", "params": params + " + RefineFlat (k_factor 4, 16)",
            "build_s": build, "disk_mb": _disk_mb(p_ref), "rows": refined,
            "load": {"faiss.read_index": _probe("faiss", p_ref)}}]
    p_ivf.unlink()
    p_ref.unlink()
    return out


ENGINES = {"hnswlib": runtime_gallery, "faiss-hnsw": faiss_hnsw, "faiss-ivfpq": faiss_ivfpq}


def equal_recall(engines: list[dict], targets: list[float]) -> list[dict]:
    """Per recall level, each engine's fastest setting (p50) that reaches it."""
    out = []
    for t in targets:
        for e in engines:
            ok = [r for r in e["rows"] if r["recall@10"] >= t]
            best = min(ok, key=lambda r: r["p50_ms"]) if ok else None
            out.append({"target": t, "engine": e["engine"],
                        "setting": best and best["setting"], "recall@10": best and best["recall@10"],
                        "p50_ms": best and best["p50_ms"], "p95_ms": best and best["p95_ms"]})
    return out


def scale(args, result: dict) -> None:
    n, d = args.sizes[-1], args.dim
    work = args.work / f"{n}-{d}"
    work.mkdir(parents=True, exist_ok=True)
    with common.Stopwatch() as sw:
        X, Q = ib.vectors("clustered", n, args.queries, d, args.seed)
        truth = ib.exact_topk(X, Q, chunk=64)
    common.log(f"[{n:,} x {d}] vectors + exact top-10 in {sw.seconds:.1f} s")
    exact = ib.bench_exact_numpy(X, Q, truth, args)["rows"][0]
    engines = []
    for name in args.engines:
        common.log(f"[{n:,} x {d}] {name}")
        engines += ENGINES[name](X, Q, truth, args, work)
    result.update({"n": n, "dim": d, "vectors_mb": X.nbytes / 1e6,
                   "exact_numpy": {"p50_ms": exact["p50_ms"], "qps": exact["qps"]},
                   "engines": engines, "equal_recall": equal_recall(engines, args.targets)})


# -- lifecycle: deletes and filters ------------------------------------------------------------------

def _hnsw(X, labels, threads):
    import hnswlib

    idx = hnswlib.Index(space="cosine", dim=X.shape[1])
    idx.init_index(max_elements=len(X), M=ib.M, ef_construction=ib.EF_CONSTRUCTION,
                   random_seed=100, allow_replace_deleted=True)
    idx.add_items(X, labels, num_threads=threads)
    return idx


def _search_rows(idx, Q, truth_labels, efs, filt=None) -> list[dict]:
    rows = []
    for ef in efs:
        idx.set_ef(ef)
        failed = [0]

        def search(q):
            try:
                return idx.knn_query(q, k=ib.K, num_threads=1, filter=filt)[0][0]
            except RuntimeError:  # fewer than k found
                failed[0] += 1
                return []

        stats, found = ib.one_at_a_time(search, Q)
        rows.append({"ef": ef, "recall@10": ib.recall([list(f) for f in found], truth_labels),
                     "p50_ms": stats["p50_ms"], "p95_ms": stats["p95_ms"],
                     "fewer_than_k": failed[0]})
    return rows


def deletes(X, Q, args) -> list[dict]:
    import numpy as np

    rng = np.random.default_rng(args.seed + 1)
    n = len(X)
    labels = np.arange(n)
    efs = [e for e in args.efs if e in (16, 32, 64, 128)] or args.efs
    out = []
    for share in (0.1, 0.3, 0.5, 0.7):
        gone = rng.choice(n, int(share * n), replace=False)
        keep = np.setdiff1d(labels, gone)
        truth = keep[ib.exact_topk(X[keep], Q)]
        idx = _hnsw(X, labels, args.threads)
        for label in gone:
            idx.mark_deleted(int(label))
        marked = _search_rows(idx, Q, truth, efs)
        row = {"deleted_share": share, "marked_deleted": marked,
               "rebuilt": _search_rows(_hnsw(X[keep], keep, args.threads), Q, truth, efs)}
        if share == 0.5:  # refill the freed slots with the deleted vectors again
            idx.add_items(X[gone], gone, num_threads=args.threads, replace_deleted=True)
            row["refilled_with_replace_deleted"] = _search_rows(idx, Q, ib.exact_topk(X, Q), efs)
        common.log(f"  deleted {share:.0%}: marked {[round(r['recall@10'], 4) for r in marked]} "
                   f"rebuilt {[round(r['recall@10'], 4) for r in row['rebuilt']]}")
        out.append(row)
    return out


def filters(X, Q, args) -> list[dict]:
    """Filtered queries at several selectivities, the allowed set drawn two ways: at random
    (a tag unrelated to content) and as whole clusters (a folder of one kind of thing)."""
    import numpy as np

    rng = np.random.default_rng(args.seed + 2)
    n = len(X)
    # cluster of each vector = its nearest centre; recover it cheaply by k-means-free grouping:
    # the generator draws clusters uniformly, so group by nearest of 100 random database vectors.
    anchors = X[rng.choice(n, 100, replace=False)]
    group = np.concatenate([np.argmax(X[s:s + 65536] @ anchors.T, axis=1)
                            for s in range(0, n, 65536)])
    idx = _hnsw(X, np.arange(n), args.threads)
    efs = [e for e in args.efs if e in (32, 64, 256)] or args.efs
    out = []
    for how in ("random", "clusters"):
        for sel in (0.01, 0.1, 0.5):
            if how == "random":
                mask = rng.random(n) < sel
            else:
                order = rng.permutation(100)
                sizes = np.bincount(group, minlength=100)[order]
                take = order[: int(np.searchsorted(np.cumsum(sizes), sel * n)) + 1]
                mask = np.isin(group, take)
            allowed_labels = np.flatnonzero(mask)
            allowed = set(allowed_labels.tolist())
            truth = allowed_labels[ib.exact_topk(X[allowed_labels], Q)]
            rows = _search_rows(idx, Q, truth, efs, filt=allowed.__contains__)

            def exact(q, allowed=allowed):  # as the runtime does it (GalleryIndex._exact)
                labels = np.fromiter(allowed, np.int64, len(allowed))
                s = np.asarray(idx.get_items(labels), np.float32) @ q[0]
                part = np.argpartition(-s, ib.K)[:ib.K]
                return labels[part[np.argsort(-s[part])]]

            stats, _ = ib.one_at_a_time(exact, Q[:args.exact_queries])
            out.append({"allowed": how, "selectivity": float(mask.mean()), "hnswlib_filter": rows,
                        "exact_on_matching": {"p50_ms": stats["p50_ms"], "p95_ms": stats["p95_ms"]}})
            common.log(f"  filter {how} {mask.mean():.3f}: " + ", ".join(
                f"ef {r['ef']} recall {r['recall@10']:.4f} {r['p50_ms']:.3f} ms" for r in rows)
                + f"; exact {stats['p50_ms']:.3f} ms")
    return out


def lifecycle(args, result: dict) -> None:
    n, d = args.sizes[0], args.dim
    X, Q = ib.vectors("clustered", n, args.queries, d, args.seed)
    if "deletes" in args.parts:
        common.log(f"[{n:,} x {d}] deletes")
        result["deletes"] = deletes(X, Q, args)
    if "filters" in args.parts:
        common.log(f"[{n:,} x {d}] filters")
        result["filters"] = filters(X, Q, args)
    result.update({"n": n, "dim": d})


# -- report ----------------------------------------------------------------------------------------

def markdown(result: dict) -> str:
    parts = common.md_header("### Vector index at scale / over its life", result["machine"])
    f = common.fmt
    if "engines" in result:
        parts += [f"{result['n']:,} clustered {result['dim']}-d vectors ({result['vectors_mb']:.0f} MB "
                  f"as float32); exact numpy {result['exact_numpy']['p50_ms']:.1f} ms a query.", ""]
        rows = []
        for e in result["engines"]:
            for kind, ld in e["load"].items():
                rows.append([e["engine"], e["params"], f(e["build_s"], 1), f(e["disk_mb"], 0), kind,
                             f(ld["load_s"], 2), f(ld["rss_mb"], 0), f(ld["peak_mb"], 0)])
        parts += [common.md_table(["engine", "params", "build s", "disk MB", "loaded by", "load s",
                                   "RSS MB", "peak MB"], rows), ""]
        rows = [[e["engine"], r["setting"], f"{r['recall@10']:.4f}", f(r["p50_ms"], 3),
                 f(r["p95_ms"], 3)] for e in result["engines"] for r in e["rows"]]
        parts += [common.md_table(["engine", "ef / nprobe (x k_factor)", "recall@10", "p50 ms",
                                   "p95 ms"], rows), ""]
        rows = [[r["target"], r["engine"], r["setting"] if r["setting"] is not None else "not reached",
                 "-" if r["recall@10"] is None else f"{r['recall@10']:.4f}",
                 "-" if r["p50_ms"] is None else f(r["p50_ms"], 3)] for r in result["equal_recall"]]
        parts += ["Equal recall (fastest setting reaching it):", "",
                  common.md_table(["recall >=", "engine", "setting", "recall@10", "p50 ms"], rows)]
    if "deletes" in result:
        rows = []
        for r in result["deletes"]:
            for how in ("marked_deleted", "rebuilt", "refilled_with_replace_deleted"):
                for x in r.get(how, []):
                    rows.append([f"{r['deleted_share']:.0%}", how, x["ef"], f"{x['recall@10']:.4f}",
                                 f(x["p50_ms"], 3), x["fewer_than_k"]])
        parts += [f"Deletes, {result['n']:,} x {result['dim']}:", "",
                  common.md_table(["deleted", "index", "ef", "recall@10", "p50 ms",
                                   "fewer than k"], rows), ""]
    if "filters" in result:
        rows = []
        for r in result["filters"]:
            for x in r["hnswlib_filter"]:
                rows.append([r["allowed"], f"{r['selectivity']:.3f}", x["ef"], f"{x['recall@10']:.4f}",
                             f(x["p50_ms"], 3), x["fewer_than_k"],
                             f(r["exact_on_matching"]["p50_ms"], 3)])
        parts += [f"Filtered queries, {result['n']:,} x {result['dim']} (recall against exact search "
                  "of the matching vectors):", "",
                  common.md_table(["allowed set", "selectivity", "ef", "recall@10", "p50 ms",
                                   "fewer than k", "exact p50 ms"], rows)]
    return "\n".join(parts)


def main(args) -> dict:
    name = "index_scale" if args.scale else "index_lifecycle"
    if args.out == common.RESULTS / "index.json":
        args.out = common.RESULTS / f"{name}.json"
    result, t_start = common.begin(name, args.threads)
    result["settings"] = {"sizes": args.sizes, "dim": args.dim, "queries": args.queries,
                          "efs": args.efs, "nprobes": args.nprobes, "engines": args.engines,
                          "M": ib.M, "ef_construction": ib.EF_CONSTRUCTION, "quick": args.quick}
    if args.scale:
        scale(args, result)
    if args.lifecycle:
        lifecycle(args, result)
    common.finish(name, result, args.out, markdown(result), t_start)
    return result
