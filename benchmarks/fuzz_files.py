"""Crafted index and export files, the way someone who can write the index or export dir would make
them (issue 26): the checksum that sits beside each file is recomputed, so it proves nothing.

Index cases (seeded): a generation of a 200-vector index with deleted slots, rewritten with
- one header field of index.bin at a boundary or random value,
- a neighbour id, link count, link-list size, label, deleted mark or vector component set to a
  boundary value, random bytes overwritten anywhere, the file cut or extended,
- one field of meta.json anywhere in its tree (items, files, skipped, hnsw, model ...) replaced by
  a boundary value of another type or range, or deleted, or a record added,
- sometimes both at once.
Each is loaded, searched, read, added to, saved and reloaded in a child process. Counted: refused
(one-line errors of the runtime's family), accepted, signals (the child died: SIGSEGV, SIGABRT),
tracebacks (any other exception), and wrong answers: an accepted index that answers a label it
does not hold, a label without a file, a non-finite score, a score that is not the cosine to the
vector it stores, or out of order, or that cannot be saved and reloaded as it is.

Graph cases (``graph_cases``, with an export): combiner.onnx and sketch_encoder.onnx replaced by
graphs whose output is [B, k] for other k, [B, 1, D], or NaN, export.json's sha256 and fingerprint
updated: every query must be refused in one line (a hit is a wrong answer).

    python benchmarks/fuzz.py --files 10000   (benchmarks/fuzz.py runs these after its own cases)
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HEADER = struct.Struct("<QQQQQQiIQQQdQ")
N_VECTORS, DIM, M = 200, 16, 16
BOUNDARY_INTS = (0, 1, -1, 2, 7, 199, 200, 201, 255, 256, 65535, 65536, 2**31 - 1, 2**31,
                 2**32 - 1, 2**32, 2**53, 2**63 - 1, 2**63, 2**64 - 1, 10**12, -2**63)
BOUNDARY_VALUES = (*BOUNDARY_INTS, 0.5, 1e308, -0.0, "", "0", "x" * 300, None, True, False, [],
                   {}, [0], {"a": 1}, "\udcff", "../../etc/passwd", "/dev/zero")

RECORD_FIELDS = ("sha256", "size", "mtime_ns", "label", "tags", "reason", "M", "ef_construction",
                 "ef_search", "fingerprint", "embed_dim", "bytes")


def new_counts() -> dict:
    return {"cases": 0, "refused": 0, "accepted": 0, "signals": 0, "tracebacks": 0,
            "wrong_answers": 0, "kinds": {}, "examples": []}


# -- the base index -----------------------------------------------------------------------------

def build_base(idx_dir: Path) -> None:
    import numpy as np

    from stbir_infer import gallery

    rng = np.random.default_rng(0)
    g = gallery.GalleryIndex.create(dim=DIM, model={"fingerprint": "f" * 64, "embed_dim": DIM},
                                    params=gallery.HnswParams(M=M))
    vecs = rng.standard_normal((N_VECTORS, DIM)).astype(np.float32)
    shas = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(N_VECTORS)]
    g.add_root("/g")
    g.add_vectors(vecs / np.linalg.norm(vecs, axis=1, keepdims=True), shas)
    for i, sha in enumerate(shas):
        g.set_file(f"/g/{i % 7}/{i}.png", sha, 100 + i, 10**18 + i, )
    g.mark_skipped("/g/notes.txt", 5, 6, "not an image")
    for i in range(10):
        g.remove_file(f"/g/{i % 7}/{i}.png")
    g.save(idx_dir)


def _gen(idx_dir: Path) -> Path:
    return idx_dir / (idx_dir / "CURRENT").read_text().strip()


# -- mutations ----------------------------------------------------------------------------------

def _mutate_bin(rng: random.Random, data: bytes) -> tuple[str, bytes]:
    b = bytearray(data)
    h = HEADER.unpack_from(data, 0)
    count, per, links0, data_at, label_at = h[2], h[3], h[5], h[5], h[4]
    upper = HEADER.size + count * per
    kind = rng.choice(("header", "header", "link", "link", "label", "deleted", "vector",
                       "upper", "bytes", "size"))
    if kind == "header":
        i = rng.randrange(13)
        code = HEADER.format[1 + i]
        values = list(h)
        pool = {"d": (0.0, -1.0, 1e308, math.inf, math.nan, 0.1, 1 / math.log(M) * 1.000001,
                      1 / math.log(2))}.get(code, BOUNDARY_INTS)
        values[i] = rng.choice(pool) if rng.random() < 0.8 else rng.getrandbits(64)
        try:
            b[:HEADER.size] = HEADER.pack(*values)
        except struct.error:
            values[i] = values[i] % (2**31 if code == "i" else 2**32 if code == "I" else 2**64)
            b[:HEADER.size] = HEADER.pack(*values)
        return f"header field {i}", bytes(b)
    e = rng.randrange(count)
    row = HEADER.size + e * per
    if kind == "link":
        off = row + 4 * rng.randrange(links0 // 4)
        b[off:off + 4] = (rng.choice(BOUNDARY_INTS) % 2**32).to_bytes(4, "little")
    elif kind == "label":
        value = rng.choice((*BOUNDARY_INTS, *range(0, 12)))
        b[row + label_at:row + label_at + 8] = (value % 2**64).to_bytes(8, "little")
    elif kind == "deleted":
        b[row + 2] = rng.choice((0, 1, 2, 255))
    elif kind == "vector":
        off = row + data_at + 4 * rng.randrange(DIM)
        b[off:off + 4] = struct.pack("<f", rng.choice((math.nan, math.inf, 0.0, 1e30, -1.0, 0.5)))
    elif kind == "upper":
        if len(b) - upper >= 4:
            off = upper + 4 * rng.randrange((len(b) - upper) // 4)
            b[off:off + 4] = (rng.choice(BOUNDARY_INTS) % 2**32).to_bytes(4, "little")
    elif kind == "bytes":
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(len(b))] = rng.randrange(256)
    else:
        cut = rng.randrange(len(b))
        b = b[:cut] if rng.random() < 0.6 else b + bytes(rng.randrange(256)
                                                         for _ in range(rng.randint(1, 600)))
    return f"index.bin {kind}", bytes(b)


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*prefix, i))


def _mutate_meta(rng: random.Random, meta: dict) -> tuple[str, dict]:
    meta = json.loads(json.dumps(meta))
    paths = [p for p in _paths(meta) if p and p[0] != "checksums"]
    # fields of a record weigh as much as the top-level keys
    path = rng.choice(paths if rng.random() < 0.5 else [p for p in paths if len(p) == 1])
    parent = meta
    for key in path[:-1]:
        parent = parent[key]
    key = path[-1]
    op = rng.random()
    if op < 0.75:
        parent[key] = rng.choice(BOUNDARY_VALUES)
    elif op < 0.9:
        parent.pop(key) if isinstance(parent, dict) else parent.pop(key)
    elif isinstance(parent, dict):
        parent[rng.choice(("999", "-1", "x", "/abs", ""))] = rng.choice(
            ({"sha256": "a" * 64}, {"sha256": "a" * 64, "size": 1, "mtime_ns": 1, "label": 3}, 1))
    else:
        parent.append(rng.choice(BOUNDARY_VALUES))
    field = path[-1] if path[-1] in RECORD_FIELDS else "record" * (len(path) > 1)
    return f"meta {path[0]}" + (f".{field}" if field else ""), meta


def make_case(rng: random.Random, base_bin: bytes, base_meta: dict) -> tuple[str, bytes, dict]:
    r = rng.random()
    data, meta, kinds = base_bin, base_meta, []
    if r < 0.55 or r >= 0.9:
        kind, data = _mutate_bin(rng, data)
        kinds.append(kind)
    if r >= 0.55:
        kind, meta = _mutate_meta(rng, meta)
        kinds.append(kind)
    return " + ".join(kinds), data, meta


def write_case(idx_dir: Path, data: bytes, meta: dict) -> None:
    gen = _gen(idx_dir)
    (gen / "index.bin").write_bytes(data)
    meta = json.loads(json.dumps(meta))
    if isinstance(meta.get("checksums"), dict):  # recomputed: the checksum proves nothing
        meta["checksums"]["index.bin"] = {"bytes": len(data),
                                          "sha256": hashlib.sha256(data).hexdigest()}
    (gen / "meta.json").write_text(json.dumps(meta))


# -- one case, in the child ------------------------------------------------------------------------

def _wrong(g, queries) -> str | None:
    import numpy as np

    for q in queries:
        hits = g.search(q, 10)
        scores = [s for _, s in hits]
        if scores != sorted(scores, reverse=True) or not all(math.isfinite(s) for s in scores):
            return "scores not finite or out of order"
        for label, score in hits:
            if label not in g.items or not g.paths.get(label):
                return f"label {label} not held or without a file"
            v = np.asarray(g.hnsw.get_items([label]), np.float64)[0]
            cos = float(v @ q) / max(float(np.linalg.norm(v)), 1e-12)
            if abs(cos - score) > 1e-3:
                return f"score {score} is not the stored vector's cosine {cos}"
    if not np.isfinite(np.asarray(g.hnsw.get_items(sorted(g.items)))).all():
        return "a stored vector is not finite"
    return None


def run_case(idx_dir: Path, scratch: Path, queries) -> tuple[str, str]:
    """(outcome, detail): refused / accepted / traceback / wrong."""
    import numpy as np

    from stbir_infer.errors import StbirInferError
    from stbir_infer.gallery import GalleryIndex

    try:
        g = GalleryIndex.load(idx_dir)
    except StbirInferError as exc:
        lines = str(exc).splitlines()
        return ("refused", "") if len(lines) == 1 else ("traceback", f"{len(lines)}-line error")
    except Exception as exc:  # noqa: BLE001 - counted
        return "traceback", f"load: {type(exc).__name__}: {str(exc)[:200]}"
    try:
        why = _wrong(g, queries)
        if why:
            return "wrong", why
        v = np.random.default_rng(1).standard_normal((1, g.dim)).astype(np.float32)
        g.add_vectors(v / np.linalg.norm(v), ["new-content"])
        g.set_file("/g/new.png", "new-content", 1, 1)
        if g.files:
            g.remove_file(sorted(g.files)[0])
        shutil.rmtree(scratch, ignore_errors=True)
        g.save(scratch)
        h = GalleryIndex.load(scratch)
        if (h.items, h.files) != (g.items, g.files):
            return "wrong", "saved and reloaded, it differs"
    except StbirInferError:
        return "refused", "after loading"
    except Exception as exc:  # noqa: BLE001 - counted
        return "traceback", f"use: {type(exc).__name__}: {str(exc)[:200]}"
    return "accepted", ""


def run_file_cases(n_cases: int, seed: int, work: str, start: int = 0,
                   state_file: str | None = None) -> dict:
    import numpy as np

    work = Path(work)
    base = work / "base"
    if not base.exists():
        build_base(base)
    base_bin = (_gen(base) / "index.bin").read_bytes()
    base_meta = json.loads((_gen(base) / "meta.json").read_text())
    vecs = np.frombuffer(base_bin, np.uint8)
    h = HEADER.unpack_from(base_bin, 0)
    rows = vecs[HEADER.size:HEADER.size + h[2] * h[3]].reshape(h[2], h[3])
    queries = np.ascontiguousarray(rows[:5, h[5]:h[4]]).view(np.float32).astype(np.float64)
    case_dir = work / "case"
    if not case_dir.exists():
        shutil.copytree(base, case_dir)
    state = Path(state_file) if state_file else None
    counts = json.loads(state.read_text())["counts"] if state and state.exists() else new_counts()
    for i in range(start, n_cases):
        rng = random.Random(seed * 1_000_003 + i)
        kind, data, meta = make_case(rng, base_bin, base_meta)
        if state:
            state.write_text(json.dumps({"case": i, "kind": kind, "counts": counts}))
        write_case(case_dir, data, meta)
        outcome, detail = run_case(case_dir, work / "scratch", queries)
        counts["cases"] += 1
        key = {"refused": "refused", "accepted": "accepted", "traceback": "tracebacks",
               "wrong": "wrong_answers"}[outcome]
        counts[key] += 1
        counts["kinds"].setdefault(kind.split(" + ")[0], {}).setdefault(outcome, 0)
        counts["kinds"][kind.split(" + ")[0]][outcome] += 1
        if outcome in ("traceback", "wrong") and len(counts["examples"]) < 20:
            counts["examples"].append(f"case {i} [{kind}]: {detail}")
    return counts


_CHILD = ("import json, sys; sys.path.insert(0, {bench!r}); import fuzz_files as f; "
          "print('RESULT ' + json.dumps(f.run_file_cases({n}, {seed}, {work!r}, {start}, "
          "{state!r})))")


def run_in_child(n_cases: int, seed: int = 0, *, timeout: float = 3600,
                 max_signals: int = 50) -> dict:
    """``run_file_cases`` in a child; a child that dies is a counted signal at its case, and a new
    child goes on at the next case."""
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="stbir-fuzz-files-") as work:
        state = Path(work) / "state.json"
        start, dead = 0, []
        while True:
            code = _CHILD.format(bench=str(Path(__file__).resolve().parent), n=n_cases, seed=seed,
                                 work=work, start=start, state=str(state))
            try:
                proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                      timeout=max(1.0, timeout - (time.time() - t0)))
                rc, out = proc.returncode, proc.stdout
            except subprocess.TimeoutExpired:
                rc, out = "timeout", ""
            lines = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
            if rc == 0 and lines:
                result = json.loads(lines[-1][len("RESULT "):])
                break
            st = json.loads(state.read_text()) if state.exists() else None
            if st is None or rc == "timeout" or len(dead) >= max_signals:
                result = st["counts"] if st else new_counts()
                result["aborted"] = True
                break
            dead.append({"case": st["case"], "kind": st["kind"], "returncode": rc})
            st["counts"]["cases"] += 1
            st["counts"]["signals"] += 1
            state.write_text(json.dumps(st))
            start = st["case"] + 1
            if start >= n_cases:
                result = st["counts"]
                break
    result["signaled_cases"] = dead
    result["seconds"] = round(time.time() - t0, 1)
    return result


# -- graphs with other output shapes -------------------------------------------------------------

def _graph(inputs: list[tuple[str, list]], output: str, out_shape: list, fill: float) -> bytes:
    """A graph that sums its inputs' means and broadcasts the result to ``out_shape`` (batch
    first), times ``fill`` (NaN: a NaN output)."""
    from onnx import TensorProto, helper

    nodes, sums = [], []
    for i, (name, shape) in enumerate(inputs):
        axes = list(range(1, len(shape)))
        nodes.append(helper.make_node("ReduceMean", [name], [f"m{i}"], axes=axes, keepdims=0))
        sums.append(f"m{i}")
    nodes.append(helper.make_node("Sum", sums, ["s"]))
    nodes.append(helper.make_node("Unsqueeze", ["s", "ax"], ["u"]))
    nodes.append(helper.make_node("Expand", ["u", "shape"], ["e"]))
    nodes.append(helper.make_node("Mul", ["e", "k"], [output]))
    ranks = len(out_shape)
    init = [helper.make_tensor("ax", TensorProto.INT64, [ranks - 1], list(range(1, ranks))),
            helper.make_tensor("shape", TensorProto.INT64, [ranks], [1, *out_shape[1:]]),
            helper.make_tensor("k", TensorProto.FLOAT, [], [fill])]
    graph = helper.make_graph(
        nodes, "crafted",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", *s[1:]]) for n, s in inputs],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, ["batch", *out_shape[1:]])], init)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model.SerializeToString()


def graph_cases(export_dir: str | Path, photos: str | Path, sketch: str | Path) -> dict:
    """Every crafted graph through a query (see the module docstring), in this process (a signal
    kills the run, which is the result then)."""
    from stbir_infer.contract import COMBINER_INPUTS, GRAPH_OUTPUT, MANIFEST, file_sha256, fingerprint
    from stbir_infer.errors import StbirInferError
    from stbir_infer.searcher import Searcher

    counts = new_counts()
    export_dir = Path(export_dir)
    manifest = json.loads((export_dir / MANIFEST).read_text())
    d = int(manifest["embed_dim"])
    with tempfile.TemporaryDirectory(prefix="stbir-fuzz-graphs-") as tmp:
        tmp = Path(tmp)
        Searcher(export_dir, tmp / "idx").enroll(photos)
        shapes = [[1, k] for k in (1, 7, d - 1, d + 1, 2 * d, 4096)] + [[1, 1, d], [1, d]]
        for branch in ("combiner", "sketch"):
            for shape in shapes:
                for fill in ((0.01, math.nan) if shape == [1, d] else (0.01,)):
                    export = tmp / "export"
                    shutil.rmtree(export, ignore_errors=True)
                    shutil.copytree(export_dir, export)
                    m = json.loads((export / MANIFEST).read_text())
                    if branch == "combiner":
                        entry = m.get("combiner") or {"file": "combiner.onnx", "neutral_weight": 0.5,
                                                      "inputs": [{"name": n, "shape": ["batch", d]}
                                                                 for n in COMBINER_INPUTS],
                                                      "output": GRAPH_OUTPUT}
                        m["combiner"], m["format_version"] = entry, 2
                        m.setdefault("fusion", {})["method"] = "combiner"
                        inputs = [(i["name"], [1, d]) for i in entry["inputs"]]
                        name, out = entry["file"], entry.get("output", GRAPH_OUTPUT)
                    else:
                        enc = m["encoders"]["sketch"]
                        inputs = [(enc["inputs"][0]["name"], enc["inputs"][0]["shape"])]
                        name, out = enc["file"], enc.get("output", GRAPH_OUTPUT)
                        enc.pop("int8_file", None)
                    (export / name).write_bytes(_graph(inputs, out, shape, fill))
                    m["files"] = {**{k: v for k, v in m["files"].items()
                                     if (export / k).exists()}, name: file_sha256(export / name)}
                    m["fingerprint"] = fingerprint(m["files"])  # as an attacker would, too
                    (export / MANIFEST).write_text(json.dumps(m))
                    counts["cases"] += 1
                    kind = f"{branch} output {shape} x {fill}"
                    try:
                        hits = Searcher(export, tmp / "idx").query(sketch=sketch, text="a red star")
                        counts["accepted"] += 1
                        if shape != [1, d] or fill != fill:
                            counts["wrong_answers"] += 1
                            counts["examples"].append(f"{kind}: answered {len(hits)} hits")
                    except StbirInferError:
                        counts["refused"] += 1
                    except Exception as exc:  # noqa: BLE001 - counted
                        counts["tracebacks"] += 1
                        counts["examples"].append(f"{kind}: {type(exc).__name__}: {exc}"[:300])
    return counts


__all__ = ["graph_cases", "make_case", "run_file_cases", "run_in_child"]

if __name__ == "__main__":  # python benchmarks/fuzz_files.py N: index cases only
    print(json.dumps(run_in_child(int(sys.argv[1]) if len(sys.argv) > 1 else 200), indent=1))
    os._exit(0)
