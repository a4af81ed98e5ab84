"""Run every benchmark at the ``make bench`` sizes and write ``benchmarks/results/summary.md``.

Each script runs as its own process (so its thread settings apply from the start and one failure
does not stop the rest), writes ``benchmarks/results/<name>.json`` and prints its tables; this
collects them into one markdown page: the machine, the command, every table, and all targets.

    python benchmarks/run_all.py [--threads N] [--quick] [--no-seed]
                                 [--checkpoint CKPT --config CONFIG]   # int8 recall row

Without ``--checkpoint`` (or ``--export``) and ``--config``, the int8-recall check uses `make demo`'s
model (runs/demo/export + runs/demo/data/config.yaml) when it is there, else it is skipped with a
note. ``--no-seed`` leaves out the seed-sized encoder preset (its export takes about a minute and
600 MB of temp disk).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

ORDER = ("encoders", "quantization", "sessions", "index", "query", "enroll", "server_load",
         "human_sketches")


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=common.default_threads(),
                   help="threads for every benchmark (default: the cores available, %(default)s)")
    p.add_argument("--quick", action="store_true", help="smoke-test sizes (not a measurement)")
    p.add_argument("--no-seed", action="store_true",
                   help="skip the seed-sized preset in encoders.py")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="trained checkpoint for the int8 recall check (quantization.py)")
    p.add_argument("--export", type=Path, default=None,
                   help="or: an export dir with int8 graphs for that check")
    p.add_argument("--config", type=Path, default=None, help="the checkpoint's training config")
    p.add_argument("--only", default=",".join(ORDER),
                   help="comma-separated subset of %(default)s")
    p.add_argument("--summary-only", action="store_true",
                   help="rebuild summary.md from the JSON files of the last run (after re-running "
                        "one script by hand)")
    p.add_argument("--results", type=Path, default=common.RESULTS,
                   help="directory for the JSON files and summary.md (default: %(default)s)")
    args = p.parse_args(argv)
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = [s for s in args.only if s not in ORDER]
    if bad:
        p.error(f"unknown benchmark(s): {', '.join(bad)}")
    return args


def demo_model() -> tuple[Path, Path] | None:
    """`make demo`'s export (with int8 graphs) and training config, when they are there."""
    base = common.REPO / "runs" / "demo"
    export, config = base / "export", base / "data" / "config.yaml"
    try:
        manifest = json.loads((export / "export.json").read_text())
    except (OSError, ValueError):
        return None
    has_int8 = all("int8_file" in e for e in manifest.get("encoders", {}).values())
    return (export, config) if has_int8 and config.is_file() else None


def jobs(args, tmp: Path) -> list[tuple[str, str, list[str]]]:
    """(result name, script, extra arguments) in run order."""
    seed = not (args.no_seed or args.quick)
    out = []
    if "encoders" in args.only:
        out.append(("encoders", "encoders",
                    ["--presets", "small,seed" if seed else "small", "--keep-exports", str(tmp)]))
    if "quantization" in args.only:
        extra = []
        for flag in ("checkpoint", "export", "config"):
            if getattr(args, flag):
                extra += [f"--{flag}", str(getattr(args, flag))]
        if not extra and not args.quick and (demo := demo_model()):
            print(f"int8 recall check: using the `make demo` model ({demo[0]})", flush=True)
            extra = ["--export", str(demo[0]), "--config", str(demo[1])]
        out.append(("quantization", "quantization", extra))
    if "sessions" in args.only:  # spinning on / off, quiet and next to a busy process
        out.append(("sessions", "sessions", []))
    if "index" in args.only:
        out.append(("index", "index", []))
    if "query" in args.only:
        out.append(("query", "query", []))
    if "enroll" in args.only:
        # The built-in dataset's photos; camera-sized JPEGs (decode cost); the seed-sized model
        # (reusing the export encoders.py kept, when it ran).
        out.append(("enroll", "enroll", []))
        out.append(("enroll-camera", "enroll", ["--images", "100", "--photo-size", "1024",
                                                "--format", "jpg", "--target", "0.5"]))
        if seed:
            model = tmp / "seed-export"
            out.append(("enroll-seed", "enroll", ["--images", "150", "--repeats", "2"]
                        + (["--model", str(model), "--label", "random-init seed preset"]
                           if "encoders" in args.only else ["--preset", "seed"])))
    if "server_load" in args.only:  # 8 clients, 2,000 sketch+text queries; stops by itself
        out.append(("server_load", "server_load", []))
    if "human_sketches" in args.only:  # sketchy-dev25 on the real-photo model (`make real`)
        if why := human_sketches_missing():
            print(f"human_sketches: skipped: {why}", flush=True)
        else:
            out.append(("human_sketches", "human_sketches", ["--export", str(REAL_EXPORT)]))
    return out


REAL_EXPORT = common.REPO / "runs" / "real8k" / "export"
SKETCHY = common.REPO.parent / "shared" / "data" / "sketchy-dev25"


def human_sketches_missing() -> str | None:
    """Why the human-sketch benchmark cannot run here (None: it can)."""
    if not (SKETCHY / "photo").is_dir():
        return f"{SKETCHY} (the sketchy-dev25 data set) is absent"
    if not (REAL_EXPORT / "export.json").is_file():
        return f"{REAL_EXPORT} is absent (the real-photo model: `make real`)"
    return None


def run_jobs(args) -> dict:
    """Run the scripts; returns (and stores as run_all.json) what the summary needs."""
    import shutil
    import tempfile

    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="stbir-bench-all-"))
    status = {}
    try:
        for name, script, extra in jobs(args, tmp):
            cmd = [sys.executable, str(common.BENCH_DIR / f"{script}.py"), "--threads",
                   str(args.threads), "--out", str(args.results / f"{name}.json")] + extra
            if args.quick:
                cmd.append("--quick")
            print(f"\n===== {name}: {' '.join(cmd[1:])}", flush=True)
            t = time.perf_counter()
            rc = subprocess.run(cmd).returncode
            status[name] = {"rc": rc, "seconds": round(time.perf_counter() - t, 1)}
            if rc != 0:
                print(f"===== {name} FAILED (exit {rc})", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    argv = args.argv
    run = {"command": "python benchmarks/run_all.py" + (" " + " ".join(argv) if argv else ""),
           "quick": args.quick, "finished": time.strftime("%Y-%m-%d %H:%M %Z"),
           "total_seconds": round(time.perf_counter() - t0, 1), "jobs": status}
    common.write_json(args.results / "run_all.json", run)
    return run


def summary(results: Path, run: dict) -> str:
    sections, targets, machine = [], [], None
    for name, st in run["jobs"].items():
        path = results / f"{name}.json"
        if st["rc"] != 0 or not path.is_file():
            sections.append(f"### {name}\n\nFAILED (exit {st['rc']}); see the console.")
            continue
        data = json.loads(path.read_text())
        machine = machine or data.get("machine")
        lines = [line for line in data["markdown"].splitlines() if not line.startswith("Machine: ")]
        if lines and lines[0].startswith("### ") and name != data.get("benchmark"):
            lines[0] += f" ({name})"
        # Each section's own targets table is repeated below in one list; keep the section short.
        md = "\n".join(lines).split("\nTargets")[0].rstrip()
        sections.append(md + f"\n\n({st['seconds']} s)")
        for t in data.get("targets", []):
            targets.append({**t, "target": f"{name}: {t['target']}"})
    met = sum(1 for t in targets if t["met"])
    short = sum(1 for t in targets if t["met"] is False)
    head = ["## Benchmarks", "",
            f"Machine: {common.machine_line(machine)}" if machine else "Machine: (no result)",
            f"Command: `{run['command']}` ({'quick smoke run' if run['quick'] else 'make bench'}); "
            f"{run['finished']}; total {run['total_seconds'] / 60:.1f} min.",
            "Timings on a shared machine are noisy: compare ratios within one run, not absolute "
            "numbers across runs.", ""]
    tail = ["", "### Targets", "", f"{met} met, {short} short, "
            f"{len(targets) - met - short} not measured.", "", common.targets_table(targets)]
    return "\n".join(head) + "\n" + "\n\n".join(sections) + "\n" + "\n".join(tail) + "\n"


def main(argv=None) -> int:
    args = parse(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.summary_only:
        try:
            run = json.loads((args.results / "run_all.json").read_text())
        except (OSError, ValueError):
            raise SystemExit(f"{args.results / 'run_all.json'}: no earlier run to summarise") from None
    else:
        run = run_jobs(args)
    text = summary(args.results, run)
    (args.results / "summary.md").write_text(text, encoding="utf-8")
    print("\n" + text)
    print(f"(run_all: {run['total_seconds']:.0f} s; wrote {args.results / 'summary.md'})")
    return 0 if all(s["rc"] == 0 for s in run["jobs"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
