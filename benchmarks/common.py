"""Shared helpers for the benchmark scripts: thread pinning, timing, machine info, JSON, tables.

Imports only the standard library at module level, so a script can pin thread counts (BLAS/OpenMP
read their environment variables once, when numpy / torch / onnxruntime load) before importing
anything heavy. Every script follows the same shape::

    args = parser.parse_args(argv)
    common.pin_threads(args.threads)      # before numpy / torch / onnxruntime
    ... measure ...
    common.finish("encoders", result, args.out)   # JSON + printed markdown

Timings are wall-clock (time.perf_counter). p50 / p95 are numpy percentiles (linear
interpolation) over the timed repeats, after warm-up calls that are not recorded.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS = BENCH_DIR / "results"
_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")


def default_threads() -> int:
    """The cores this process may run on (what a device user would give the tool)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def add_common_args(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    parser.add_argument("--threads", type=int, default=default_threads(),
                        help="threads for torch, onnxruntime, hnswlib, faiss and BLAS "
                             "(default: the cores available, %(default)s here)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes and few repeats: a smoke run, not a measurement")
    parser.add_argument("--out", type=Path, default=RESULTS / f"{name}.json",
                        help="JSON result file (default: %(default)s)")
    return parser


def pin_threads(threads: int) -> None:
    """Set the BLAS / OpenMP thread variables; call before numpy, torch or onnxruntime load."""
    if threads < 1:
        raise SystemExit(f"--threads must be >= 1 (got {threads})")
    loaded = [m for m in ("numpy", "torch", "onnxruntime") if m in sys.modules]
    if loaded:  # a programming error in a script, not a user error
        print(f"warning: {', '.join(loaded)} loaded before pin_threads; BLAS thread count may "
              "not follow --threads", file=sys.stderr)
    for var in _THREAD_VARS:
        os.environ[var] = str(threads)


# -- timing -----------------------------------------------------------------------------------------

def summarize(seconds: Sequence[float], items: int = 1) -> dict:
    """p50 / p95 / mean / min in ms over the timed calls, and items/s at the median."""
    import numpy as np

    ms = np.asarray(seconds, np.float64) * 1000.0
    p50 = float(np.percentile(ms, 50))
    return {"p50_ms": p50, "p95_ms": float(np.percentile(ms, 95)), "mean_ms": float(ms.mean()),
            "min_ms": float(ms.min()), "repeats": int(len(ms)), "items_per_call": int(items),
            "items_per_s": float(items / (p50 / 1000.0)) if p50 > 0 else float("inf")}


def measure(fn: Callable[[], object], *, items: int = 1, warmup: int = 3, repeats: int = 30,
            budget_s: float | None = None, min_repeats: int = 5) -> dict:
    """Call ``fn`` ``warmup`` times untimed, then up to ``repeats`` times timed; with
    ``budget_s``, stop early once ``min_repeats`` calls are in and the budget is spent (so a slow
    model does not eat the run). Returns :func:`summarize`'s dict."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < repeats:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if budget_s is not None and len(times) >= min_repeats and time.perf_counter() - start > budget_s:
            break
    return summarize(times, items)


def measure_alternating(fns: dict[str, Callable[[], object]], *, items: int = 1, warmup: int = 3,
                        repeats: int = 30, budget_s: float | None = None, passes: int = 2,
                        min_repeats: int = 3) -> dict[str, dict]:
    """:func:`measure` for several alternatives, in ``passes`` passes of A, B, C blocks (each block:
    ``warmup`` untimed calls, then its share of ``repeats``), so load from other processes that
    comes and goes is shared between them, while each block starts after its own warm-up.

    Blocks rather than one call of each per round: onnxruntime's and torch's (OpenMP) worker
    threads spin for a while after a call, and on a machine with few cores the next call of the
    *other* runtime pays for that spinning. ``budget_s`` is for all alternatives together.
    """
    times: dict[str, list[float]] = {k: [] for k in fns}
    per_block = max(1, -(-repeats // passes))
    block_budget = None if budget_s is None else budget_s / (passes * len(fns))
    for _ in range(passes):
        for k, fn in fns.items():
            for _ in range(warmup):
                fn()
            start = time.perf_counter()
            for i in range(per_block):
                t0 = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t0)
                if block_budget is not None and i + 1 >= min_repeats \
                        and time.perf_counter() - start > block_budget:
                    break
    return {k: summarize(v, items) for k, v in times.items()}


class Stopwatch:
    """``with Stopwatch() as sw: ...`` then ``sw.seconds``."""

    def __enter__(self) -> Stopwatch:
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.t0


# -- machine ----------------------------------------------------------------------------------------

def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mem_total_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("numpy", "onnxruntime", "torch", "open_clip_torch", "onnx", "hnswlib", "faiss-cpu",
                "pillow"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def _git_commit() -> str | None:
    try:
        r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                           text=True, timeout=5)
        return r.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info(threads: int) -> dict:
    """What a reader needs to compare runs: CPU, cores, threads used, load, versions."""
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {"cpu_model": _cpu_model(), "cores": os.cpu_count(), "cores_available": default_threads(),
            "threads": int(threads), "memory_gib": _mem_total_gib(),
            "platform": platform.platform(), "load_avg_1_5_15_at_start": load,
            "versions": _versions(), "git_commit": _git_commit(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def machine_line(machine: dict) -> str:
    v = machine["versions"]
    load = machine.get("load_avg_1_5_15_at_start")
    return (f"{machine['cpu_model']}, {machine['cores']} cores, {machine['threads']} threads used, "
            f"{machine.get('memory_gib')} GiB; onnxruntime {v.get('onnxruntime')}, "
            f"torch {v.get('torch')}, numpy {v.get('numpy')}, hnswlib {v.get('hnswlib')}, "
            f"faiss-cpu {v.get('faiss-cpu') or 'not installed'}; load avg at start "
            f"{load[0] if load else '?'}")


# -- output -----------------------------------------------------------------------------------------

def fmt(x, digits: int = 2) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "NO"
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        if x != x:
            return "nan"
        if abs(x) >= 1000:
            return f"{x:,.0f}"
        if abs(x) >= 100:
            return f"{x:.0f}" if digits <= 2 else f"{x:.1f}"
        return f"{x:.{digits}f}"
    return str(x)


def md_table(headers: Sequence[str], rows: Iterable[Sequence]) -> str:
    rows = [[c if isinstance(c, str) else fmt(c) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
    out = [line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in rows]
    return "\n".join(out)


def target(name: str, value: float | None, threshold: float, op: str = "<=", note: str = "") -> dict:
    """One target row: ``value op threshold`` -> met (None when there is no value)."""
    met = None if value is None else (value <= threshold if op == "<=" else value >= threshold)
    return {"target": name, "value": value, "op": op, "threshold": threshold, "met": met,
            "note": note}


def targets_table(targets: Sequence[dict]) -> str:
    rows = [[t["target"], fmt(t["value"], 3), f"{t['op']} {fmt(t['threshold'], 3)}",
             "-" if t["met"] is None else ("met" if t["met"] else "SHORT"), t.get("note", "")]
            for t in targets]
    return md_table(["target", "measured", "wanted", "status", "note"], rows)


def write_json(path: Path, data: dict) -> Path:
    """Atomic write (temp file + rename), so a killed run leaves the old result intact."""
    from stbir_infer.contract import atomic_write_text  # torch- and numpy-free

    return atomic_write_text(path, json.dumps(data, indent=2, default=_json_default) + "\n")


def _json_default(o):
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:
        pass
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def model_args(p: argparse.ArgumentParser) -> None:
    """--preset / --model: a random-init preset, or an export dir to measure instead."""
    p.add_argument("--preset", default="small", choices=("small", "seed"),
                   help="random-init model preset when no --model (default %(default)s)")
    p.add_argument("--model", type=Path, default=None, help="use this export dir instead")


def index_args(p: argparse.ArgumentParser) -> None:
    """--index / --gallery: a given index (its export given by --model), or a generated gallery.
    After parsing, :func:`check_index_args` refuses --index without --model."""
    p.add_argument("--index", type=Path, default=None,
                   help="use this index dir (with --model) instead of enrolling a generated gallery")
    p.add_argument("--gallery", type=int, default=500, help="generated photos to enroll")


def check_index_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.index is not None and args.model is None:
        p.error("--index needs --model (the export the index was built with)")


def md_header(title: str, machine: dict) -> list[str]:
    """The first lines of every benchmark's markdown: its title and the machine it ran on."""
    return [title, f"Machine: {machine_line(machine)}", ""]


def begin(name: str, threads: int) -> tuple[dict, float]:
    """Pin the thread count and start a result record: ({benchmark, command, machine}, t0)."""
    pin_threads(threads)
    t_start = time.perf_counter()
    return {"benchmark": name, "command": command_line(), "machine": machine_info(threads)}, t_start


def finish(name: str, result: dict, out: Path, markdown: str, t_start: float) -> None:
    """Stamp the end time, store the markdown with the JSON, write it, print the tables."""
    result["markdown"] = markdown
    result["seconds_total"] = round(time.perf_counter() - t_start, 1)
    with contextlib.suppress(OSError, KeyError):
        result["machine"]["load_avg_1_5_15_at_end"] = [round(x, 2) for x in os.getloadavg()]
    path = write_json(out, result)
    print(markdown)
    print(f"\n({name}: {result['seconds_total']} s; wrote {_rel(path)})")


def _rel(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def command_line() -> str:
    return " ".join([Path(sys.executable).name, *[_rel(Path(a)) if a.endswith(".py") else a
                                                  for a in sys.argv]])


# -- shared fixtures ----------------------------------------------------------------------------------

def model_and_index(args, work: Path, *, quantize: bool,
                    say: Callable[[str], object] | None = None) -> tuple[Path, Path]:
    """(export dir, index dir) to measure: --model / --index as given, else a random-init
    --preset export and --gallery generated photos enrolled with it, under ``work``."""
    from stbir_infer.searcher import Searcher

    say = say or log
    model = args.model
    if model is None:
        say(f"exporting a random-init {args.preset} model ...")
        model, _ = random_export(args.preset, work, quantize=quantize)
    index = args.index
    if index is None:
        say(f"generating and enrolling {args.gallery} photos ...")
        synth_images(work / "gallery", args.gallery, seed=1)
        index = work / "index"
        Searcher(model, index, threads=args.threads).enroll(work / "gallery")
    return model, index


def synth_data(out: Path, per_category: int) -> tuple[Path, object]:
    """The built-in dataset at ``per_category`` photos (100 test photos per category) and its
    manifests under ``out``, made once and reused; returns (data dir, its loaded config)."""
    from stbir_train.config import load_config
    from stbir_train.manifest import build_manifests, manifest_paths
    from stbir_train.synth import write_dataset

    data = out / f"data-{per_category}"
    if not (data / "config.yaml").is_file():
        write_dataset(data, per_category, 100, 1, 0)
    cfg = load_config(data / "config.yaml")
    if not all(p.is_file() for p in manifest_paths(cfg).values()):
        build_manifests(cfg)
    return data, cfg


def random_export(preset: str, workdir: Path, quantize: bool = True, seed: int = 0,
                  log: Callable[[str], object] = lambda *a, **k: None,
                  calibration_images: int = 128) -> tuple[Path, object]:
    """Random-init model of ``preset`` -> checkpoint -> export dir under ``workdir``.

    Latency does not depend on the weights, so random init is honest for timing. Returns
    (export dir, the torch model in eval mode). Verification is skipped (the benchmark measures
    its own cosines); int8 graphs are written when ``quantize``, calibrated (static int8 where it
    measures faster) on ``calibration_images`` built-in-style photos and sketches.
    """
    import torch

    from models import PRESETS, ModelSpec, build_model, save_checkpoint
    from stbir_export import export_checkpoint

    torch.manual_seed(seed)
    model = build_model(ModelSpec(**PRESETS[preset])).eval()  # quiet: models scopes open_clip
    ckpt = save_checkpoint(workdir / f"{preset}.pt", model, config={}, metrics={})
    out = workdir / f"{preset}-export"
    calib = None
    if quantize:  # photos/ and sketches/: each tower calibrates on its own kind of image
        calib = workdir / "calibration"
        synth_images(calib / "photos", calibration_images, size=128, seed=seed + 1, sketches=True)
        (calib / "photos-sketches").rename(calib / "sketches")
    export_checkpoint(ckpt, out, quantize="int8" if quantize else None, verify=False, log=log,
                      calibration=calib)
    ckpt.unlink()
    return out, model


def synth_images(out_dir: Path, n: int, *, size: int = 96, seed: int = 0, sketches: bool = False,
                 fmt_ext: str = "png") -> list[dict]:
    """``n`` built-in-style photos (and optionally one sketch each) under ``out_dir``; returns
    rows {photo, sketch, text}. ``size`` is the photo's side in pixels (above 256, rendered at
    256 and scaled up)."""
    import numpy as np

    from stbir_train.synth import caption, render_photo, render_sketch, sample_item

    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        item = sample_item(rng, f"item_{i:06d}")
        photo = out_dir / f"{item.name}.{fmt_ext}"
        # Rendering costs grow with the square of the size (336 ms at 1024 px): render at most
        # 256 px and scale up; decoding cost depends on the pixel count, not the detail.
        img = render_photo(item, rng, size=min(size, 256))
        if img.size[0] != size:
            from PIL import Image

            img = img.resize((size, size), Image.Resampling.BICUBIC)
        img.save(photo, quality=90) if fmt_ext == "jpg" else img.save(photo)
        row = {"photo": photo, "text": caption(item, rng), "sketch": None}
        if sketches:
            sk = out_dir.parent / f"{out_dir.name}-sketches" / f"{item.name}.png"
            sk.parent.mkdir(parents=True, exist_ok=True)
            render_sketch(item, rng, size=min(size, 256)).save(sk)
            row["sketch"] = sk
        rows.append(row)
    return rows


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def log(msg: str) -> None:
    """Progress goes to stderr, so stdout holds only the markdown table."""
    print(msg, file=sys.stderr, flush=True)


def set_dotted(config: dict, overrides: dict) -> dict:
    """Apply {"training.batch_size": 32, ...} to a config dict loaded from YAML (in place)."""
    for key, value in overrides.items():
        node = config
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return config


def run_config(data_dir: Path, out: Path, name: str, overrides: dict) -> Path:
    """Write out/<name>.yaml: the synthetic data's config.yaml with its data root and
    ``output_dir`` (out/<name>) pinned, then ``overrides`` (dotted keys, see :func:`set_dotted`)."""
    import yaml

    d = yaml.safe_load((data_dir / "config.yaml").read_text())
    d["output_dir"] = str(out / name)
    d["data"]["root"] = str(data_dir)
    set_dotted(d, overrides)
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


def checkpoint_recall(cfg_path: Path, checkpoint: str) -> dict:
    """{mode: {"R@1", "R@10"}} of a checkpoint on its config's test split (torch, all modes)."""
    from models import load_model
    from stbir_train.config import load_config
    from stbir_train.data import ImageCache
    from stbir_train.evaluate import evaluate_rows
    from stbir_train.manifest import manifest_paths, read_manifest_rows

    cfg = load_config(cfg_path)
    model, _ = load_model(checkpoint)
    res = evaluate_rows(model, read_manifest_rows(manifest_paths(cfg)["test"]),
                        ImageCache(cfg.resolve(cfg.data.root)))
    return {m: {k: res["modes"][m]["overall"][k] for k in ("R@1", "R@10")} for m in res["modes"]}
