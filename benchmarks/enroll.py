"""Enroll throughput (images/s of ``Searcher.enroll`` on a fresh index) against the image
encoder's pure batch throughput on the same images, already decoded.

A folder of ``--images`` built-in-style photos (``--photo-size`` px, PNG or JPEG) is generated,
then, on the same export (random-init ``--preset``, or ``--model``):

- pure encoder: ``Encoders.encode_pixels("image", batch)`` over all images, pre-decoded and
  preprocessed in memory, in batches of ``--batch-size`` (the enroll default, 32);
- enroll: ``Searcher(model, fresh_index).enroll(folder, batch_size)`` -- walk, stat, sha256,
  decode + preprocess (worker threads, ahead of the encoder: ``stbir_infer.enroll_pipeline``),
  encode, hnswlib add, atomic index write; the image graph's onnxruntime session is loaded
  before the clock starts (timed apart: a once-per-process cost). Its per-stage seconds
  (``EnrollReport.stages``: decode, preprocess, encode, index, wait) are printed too;
- the parts of enroll alone, to show where the difference goes: sha256 of every file, decode +
  preprocess on one thread, on ``--workers`` threads and on as many processes (the choice the
  pipeline makes: threads), hnswlib add, index save;
- a refresh: enroll again on the unchanged folder (nothing to encode).

Each is repeated ``--repeats`` times; the median counts. Targets: enroll >= 0.8x pure throughput
(96 px PNGs, the built-in dataset's photos), >= 0.5x on 1024 px JPEGs (``--target 0.5``).

    python benchmarks/enroll.py [--images 300] [--photo-size 96] [--preset small] [--quick]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    common.model_args(p)
    p.add_argument("--label", default=None, help="what to call --model in the tables")
    p.add_argument("--images", type=int, default=300, help="photos to generate (default %(default)s)")
    p.add_argument("--photo-size", type=int, default=96,
                   help="photo side in px (96 = the built-in dataset; try 1024 for camera-like "
                        "decode cost)")
    p.add_argument("--format", default="png", choices=("png", "jpg"))
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--precision", default="fp32", choices=("fp32", "int8"))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", type=int, default=None,
                   help="decode workers for the thread / process comparison (default: enroll's, "
                        "one per --threads)")
    p.add_argument("--target", type=float, default=0.8,
                   help="enroll / pure encoder throughput wanted (default %(default)s)")
    p.add_argument("--workdir", type=Path, default=None, help="temp files go here (deleted after)")
    common.add_common_args(p, "enroll")
    args = p.parse_args(argv)
    if args.quick:
        args.images, args.repeats = 64, 2
    return args


def timed(fn, repeats: int) -> tuple[float, float]:
    """Median wall seconds of ``fn`` and median CPU seconds this process spent in it (all its
    threads: onnxruntime's, hnswlib's, the decode workers')."""
    walls, cpus = [], []
    for _ in range(repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return statistics.median(walls), statistics.median(cpus)


def median_time(fn, repeats: int) -> float:
    return timed(fn, repeats)[0]


def _load_all(paths: list[str], spec: dict):
    """Decode and preprocess ``paths`` (a process pool's task: module level, so it pickles)."""
    from stbir_infer import preprocess as _pre

    return [_pre.load(p, spec) for p in paths]


def decode_in_pools(paths: list[str], spec: dict, workers: int, repeats: int) -> tuple[float, float]:
    """Seconds to decode + preprocess all ``paths`` on ``workers`` threads, and on as many
    processes (started before the clock; the arrays come back pickled), in chunks of 16."""
    from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

    chunks = [paths[i:i + 16] for i in range(0, len(paths), 16)]
    specs = [spec] * len(chunks)
    out = []
    for pool_type in (ThreadPoolExecutor, ProcessPoolExecutor):
        with pool_type(workers) as pool:
            list(pool.map(_load_all, chunks[:workers], specs))  # start the workers
            out.append(median_time(lambda: list(pool.map(_load_all, chunks, specs)), repeats))
    return out[0], out[1]


def main(argv=None) -> dict:
    args = parse(argv)
    result, t_start = common.begin("enroll", args.threads)
    import numpy as np

    from stbir_infer import gallery as _gallery
    from stbir_infer import preprocess as _pre
    from stbir_infer.contract import file_sha256
    from stbir_infer.encoders import Encoders
    from stbir_infer.enroll_pipeline import STAGES, default_workers
    from stbir_infer.searcher import Searcher

    work = Path(tempfile.mkdtemp(prefix="stbir-bench-enroll-", dir=args.workdir))
    try:
        model = args.model
        if model is None:
            common.log(f"exporting a random-init {args.preset} model ...")
            model, _ = common.random_export(args.preset, work, quantize=args.precision == "int8")
        common.log(f"generating {args.images} photos ({args.photo_size} px {args.format}) ...")
        rows = common.synth_images(work / "photos", args.images, size=args.photo_size, seed=5,
                                   fmt_ext=args.format)
        paths = [str(r["photo"]) for r in rows]
        n, bs = len(paths), args.batch_size
        folder_mb = common.dir_bytes(work / "photos") / 1e6
        enc = Encoders(model, threads=args.threads, precision=args.precision)
        spec = enc.spec("image")

        # Parts, each over all n images.
        arrays = np.stack([_pre.load(p, spec) for p in paths])  # also warms the file cache
        t_decode, c_decode = timed(lambda: [_pre.load(p, spec) for p in paths], args.repeats)
        workers = args.workers or default_workers(args.threads)
        t_threads, t_procs = decode_in_pools(paths, spec, workers, args.repeats)
        t_hash, c_hash = timed(lambda: [file_sha256(p) for p in paths], args.repeats)

        def encode_all(b=bs):
            return np.concatenate([enc.encode_pixels("image", arrays[i:i + b])
                                   for i in range(0, n, b)])
        vectors = encode_all()  # warm-up (session creation)
        t_pure, c_pure = timed(encode_all, args.repeats)
        by_batch = {b: n / median_time(lambda: encode_all(b), args.repeats)
                    for b in (8, 16, 32, 64, 128) if b <= n}

        record = enc.model_record()
        hashes = [f"{i:064x}" for i in range(n)]
        state = {}

        def add_all():
            idx = _gallery.GalleryIndex.create(dim=enc.embed_dim, model=record)
            idx.hnsw.set_num_threads(args.threads)
            for i in range(0, n, bs):
                idx.add_vectors(vectors[i:i + bs], hashes[i:i + bs])
            state["idx"] = idx
        t_add, c_add = timed(add_all, args.repeats)
        save_dirs = iter(range(10**6))
        t_save, c_save = timed(lambda: state["idx"].save(work / f"save-{next(save_dirs)}"),
                               args.repeats)

        # Enroll, on a fresh index each time; then a refresh of the last one.
        # The Searcher and its image session are made before the clock starts (a one-off cost,
        # timed apart as "session load"), so enroll and the pure encoder run the same warm graph.
        times, cpus, reports, loads = [], [], [], []
        for r in range(args.repeats):
            s = Searcher(model, work / f"index-{r}", threads=args.threads, precision=args.precision)
            t0 = time.perf_counter()
            s.encoders.session("image")
            loads.append(time.perf_counter() - t0)
            c0, t0 = time.process_time(), time.perf_counter()
            reports.append(s.enroll(work / "photos", batch_size=bs))
            times.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
            state["searcher"] = s
        t_enroll, t_load = statistics.median(times), statistics.median(loads)
        c_enroll = statistics.median(cpus)
        # Enroll's CPU work is its parts'; the encoder's share of it is the best enroll / pure
        # ratio at the CPU the encoder alone used (more only on cores the encoder leaves idle).
        cores = args.threads
        c_parts = {"sha256": c_hash, "decode+preprocess": c_decode, "encode": c_pure,
                   "hnswlib add": c_add, "index save": c_save}
        bound = c_pure / sum(c_parts.values())
        bad = [r for r in reports if r.encoded != n]
        if bad:
            raise SystemExit(f"enroll encoded {bad[0].encoded} of {n} images: {bad[0].summary()}")
        t_refresh = median_time(lambda: state["searcher"].enroll(work / "photos", batch_size=bs),
                                args.repeats)

        stages = {k: statistics.median(getattr(r.stages, k) for r in reports) for k in STAGES}
        parts = {"sha256": t_hash, "decode+preprocess (1 thread)": t_decode,
                 f"decode+preprocess ({workers} threads)": t_threads,
                 f"decode+preprocess ({workers} processes)": t_procs, "encode (pure)": t_pure,
                 "hnswlib add": t_add, "index save": t_save,
                 "image session load (once per process, not in enroll's time)": t_load}
        cpu_of = {"sha256": c_hash, "decode+preprocess (1 thread)": c_decode,
                  "encode (pure)": c_pure, "hnswlib add": c_add, "index save": c_save}
        result.update({
                  "settings": {"model": args.label or (str(args.model) if args.model else
                                                        f"random-init {args.preset} preset"),
                               "images": n,
                               "photo_size": args.photo_size, "format": args.format,
                               "folder_mb": folder_mb, "batch_size": bs,
                               "precision": args.precision, "repeats": args.repeats,
                               "image_input_px": spec["size"], "quick": args.quick},
                  "pure_images_per_s": n / t_pure, "enroll_images_per_s": n / t_enroll,
                  "ratio_enroll_to_pure": t_pure / t_enroll,
                  "enroll_seconds": t_enroll, "refresh_seconds": t_refresh,
                  "parts_seconds": parts, "stages_seconds": stages, "workers": workers,
                  "parts_cpu_seconds": c_parts, "enroll_cpu_seconds": c_enroll,
                  "encoder_share_of_cpu": bound, "pure_images_per_s_by_batch": by_batch,
                  "enroll_minus_pure_seconds": t_enroll - t_pure})
        result["targets"] = [common.target(
            f"enroll / pure encoder throughput ({args.photo_size} px {args.format.upper()})",
            result["ratio_enroll_to_pure"], args.target, ">=",
            f"{n / t_enroll:.0f} vs {n / t_pure:.0f} images/s; the encoder is {bound:.2f} of "
            "enroll's CPU work")]

        st = result["settings"]
        md = [*common.md_header("### Enroll: Searcher.enroll vs the image encoder alone",
                                result["machine"]),
              f"{n} generated photos ({st['photo_size']} px {st['format'].upper()}, "
              f"{folder_mb:.1f} MB), {st['model']} (image input {spec['size']} px, "
              f"{args.precision}), batch {bs}, median of {args.repeats}.", "",
              common.md_table(["path", "seconds", "images/s", "vs pure encoder"], [
                  ["encoder only, pre-decoded arrays", f"{t_pure:.3f}", f"{n / t_pure:.0f}", "1.00x"],
                  ["Searcher.enroll, fresh index", f"{t_enroll:.3f}", f"{n / t_enroll:.0f}",
                   f"{t_pure / t_enroll:.2f}x"],
                  ["Searcher.enroll again, unchanged folder", f"{t_refresh:.3f}", "-", "-"]]),
              "", "Inside enroll (`EnrollReport.stages`, `stbir-infer enroll --json`; decode "
              "and preprocess run on the workers, summed over them; wait: the encoder waited for "
              "decoded images):", "",
              common.md_table(["stage", "seconds", "ms per image", "share of enroll"],
                              [[k, f"{v:.3f}", f"{1e3 * v / n:.2f}", f"{100 * v / t_enroll:.0f}%"]
                               for k, v in stages.items()]),
              "", "Where enroll's time can go (each part alone, over all images; CPU: seconds "
              "of CPU this process spent, all threads):", "",
              common.md_table(["part", "seconds", "CPU seconds", "share of enroll"],
                              [[k, f"{v:.3f}", f"{cpu_of[k]:.3f}" if k in cpu_of else "-",
                                f"{100 * v / t_enroll:.0f}%"] for k, v in parts.items()]),
              "", f"Enroll used {c_enroll:.3f} CPU seconds in {t_enroll:.3f} s "
              f"({c_enroll / t_enroll:.2f} of {cores} cores); the pure encoder {c_pure:.3f} in "
              f"{t_pure:.3f} s ({c_pure / t_pure:.2f} cores). Enroll's parts need "
              f"{sum(c_parts.values()):.3f} CPU seconds, the encoder's share {bound:.2f}: with "
              "the CPU the encoder alone used, enroll reaches at most that ratio (more only on "
              "cores the encoder leaves idle).", "",
              "Pure encoder images/s by batch size: " + ", ".join(
                  f"{b}: {v:.0f}" for b, v in by_batch.items()) + ".",
              "", "Targets:", "", common.targets_table(result["targets"])]
        common.finish("enroll", result, args.out, "\n".join(md), t_start)
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
