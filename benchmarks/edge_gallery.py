"""What the edge gallery costs: enroll time, index size, sketch-query latency (issue 27).

    python benchmarks/edge_gallery.py [--export runs/real8k/export] [--photos N] [--scale N]

1. Enroll: ``--photos`` real photos (flickr8k-1k, copied to a temp dir) into an index without and
   one with the edge gallery (``Searcher.enroll(edge_gallery=...)``), each twice (alternating,
   the faster run kept): seconds, seconds per photo, the pipeline's stages, the index's bytes.
2. Query: sketch-only queries (sketchy-dev25 sketches) through ``Searcher.query`` (top 10) on both
   indexes, in alternating blocks (``common.measure_alternating``): p50 / p95 ms.
3. Search alone at scale: a GalleryIndex of ``--scale`` random unit vectors (the export's
   embed_dim, edge rows of embed_dim + the drawing descriptor's size) with and without the edge
   gallery; ``GalleryIndex.search`` against
   ``edge_gallery.search`` (hnswlib top-100 + the exact edge scores + rescoring) for one vector.

Writes benchmarks/results/edge_gallery.json and prints the tables.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import common  # noqa: E402

DATA = REPO.parent / "shared" / "data"


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--export", type=Path, default=REPO / "runs" / "real8k" / "export")
    p.add_argument("--images", type=Path, default=DATA / "flickr8k-1k" / "images")
    p.add_argument("--sketches", type=Path, default=DATA / "sketchy-dev25" / "sketch")
    p.add_argument("--photos", type=int, default=300, help="photos to enroll (default %(default)s)")
    p.add_argument("--queries", type=int, default=25, help="sketch queries (default %(default)s)")
    p.add_argument("--repeats", type=int, default=100, help="timed queries per index")
    p.add_argument("--scale", type=int, default=20000, help="vectors of the search-alone index")
    common.add_common_args(p, "edge_gallery")
    args = p.parse_args(argv)
    if args.quick:
        args.photos, args.queries, args.repeats, args.scale = 20, 5, 10, 2000
    return args


def enroll_runs(args, photos: Path, work: Path) -> dict:
    from stbir_infer import Searcher

    out = {}
    for attempt in range(2):
        for edge in (False, True):
            index = work / f"idx-{edge}-{attempt}"
            s = Searcher(args.export, index, threads=args.threads)
            t0 = time.perf_counter()
            report = s.enroll(photos, edge_gallery=edge)
            seconds = time.perf_counter() - t0
            row = {"seconds": round(seconds, 2), "ms_per_photo": round(1000 * seconds / report.total, 1),
                   "stages": report.stages.to_dict(), "index_bytes": common.dir_bytes(index),
                   "photos": report.total, "index": str(index)}
            key = "edge gallery" if edge else "photos only"
            if key not in out or seconds < out[key]["seconds"]:
                out[key] = row
    return out


def query_latency(args, enrolled: dict) -> dict:
    from PIL import Image

    from stbir_infer import Searcher

    sketches = sorted(args.sketches.glob("*/*.png"))[:: max(1, 625 // args.queries)][:args.queries]
    images = [Image.open(p).convert("L") for p in sketches]
    searchers = {k: Searcher(args.export, v["index"], threads=args.threads)
                 for k, v in enrolled.items()}
    state = {k: 0 for k in searchers}

    def one(k):
        def run():
            state[k] += 1
            searchers[k].query(sketch=images[state[k] % len(images)], top_k=10)
        return run

    return common.measure_alternating({k: one(k) for k in searchers}, repeats=args.repeats,
                                      warmup=5)


def search_at_scale(args, dim: int, drawing_dim: int) -> dict:
    """Search alone over random unit vectors: the photo vectors and the edge rows (an embedding
    and, where the export has one, a drawing descriptor of the export's size), scored as the
    Searcher scores them."""
    import numpy as np

    from stbir_infer import edge_gallery
    from stbir_infer.gallery import GalleryIndex

    rng = np.random.default_rng(0)

    def unit(n, d=dim):
        v = rng.standard_normal((n, d)).astype(np.float32)
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    photos = unit(args.scale)
    edges = np.concatenate([unit(args.scale)] + ([unit(args.scale, drawing_dim)] if drawing_dim else []), 1)
    shas = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(args.scale)]
    idx = GalleryIndex.create(dim=dim, model={"fingerprint": "x", "embed_dim": dim})
    idx.edges = edge_gallery.EdgeVectors(dim, drawing_dim=drawing_dim)
    idx.hnsw.set_num_threads(args.threads)
    t0 = time.perf_counter()
    idx.add_vectors(photos, shas, edges)
    build = time.perf_counter() - t0
    queries = np.concatenate([unit(64)] + ([unit(64, drawing_dim)] if drawing_dim else []), 1)
    state = {"i": 0}

    def plain():
        state["i"] += 1
        idx.search(queries[state["i"] % 64, :dim], 10, ef=64)

    def with_edges():
        state["i"] += 1
        q = queries[state["i"] % 64]
        edge_gallery.search(idx, q[:dim], q, 10, weight=edge_gallery.DEFAULT_WEIGHT, ef=64,
                            drawing=drawing_dim > 0)

    timed = common.measure_alternating({"photo vectors (hnswlib)": plain,
                                        "photo + edge vectors": with_edges},
                                       repeats=args.repeats, warmup=5)
    return {"vectors": args.scale, "dim": dim, "drawing_dim": drawing_dim, "build_seconds": round(build, 1),
            "edge_bytes": int(edges.nbytes), "timings": timed}


def markdown(r: dict) -> str:
    e = r["enroll"]
    rows = [[k, v["photos"], f"{v['seconds']:.2f}", f"{v['ms_per_photo']:.1f}",
             f"{v['index_bytes'] / 1024:.0f}", f"{r['query'][k]['p50_ms']:.2f}",
             f"{r['query'][k]['p95_ms']:.2f}"] for k, v in e.items()]
    s = r["scale"]
    srows = [[k, f"{v['p50_ms']:.3f}", f"{v['p95_ms']:.3f}"] for k, v in s["timings"].items()]
    return "\n".join([
        f"### Edge gallery cost ({r['export']})", "",
        common.md_table(["index", "photos", "enroll s", "ms / photo", "index KiB",
                         "sketch query p50 ms", "p95 ms"], rows), "",
        f"Search alone, {s['vectors']:,} vectors of {s['dim']} dims, edge rows of "
        f"{s['dim']} + {s.get('drawing_dim', 0)} (drawing descriptor) dims ("
        f"{s['edge_bytes'] / 2**20:.1f} MiB in memory and on disk), top 10, ef 64:", "",
        common.md_table(["search", "p50 ms", "p95 ms"], srows)])


def main(argv=None) -> int:
    args = parse(argv)
    if not args.images.is_dir() or not args.sketches.is_dir() or not args.export.is_dir():
        print(f"edge_gallery: skipped: needs {args.images}, {args.sketches} and {args.export}")
        return 0
    result, t0 = common.begin("edge_gallery", args.threads)
    result["export"] = str(args.export)
    with tempfile.TemporaryDirectory(prefix="stbir-edge-") as tmp:
        photos = Path(tmp) / "photos"
        photos.mkdir()
        for p in sorted(args.images.glob("*.jpg"))[:args.photos]:
            shutil.copyfile(p, photos / p.name)
        common.log(f"enroll {args.photos} photos, with and without the edge gallery (x2)")
        result["enroll"] = enroll_runs(args, photos, Path(tmp))
        common.log("sketch query latency")
        result["query"] = query_latency(args, result["enroll"])
        for v in result["enroll"].values():
            del v["index"]
    from stbir_infer.encoders import Encoders

    common.log(f"search alone at {args.scale} vectors")
    encoders = Encoders(args.export)
    result["scale"] = search_at_scale(args, encoders.embed_dim, encoders.drawing_dim)
    common.finish("edge_gallery", result, args.out, markdown(result), t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
