"""Build a small index and rewrite its live generation the way an attacker who can write the index
dir would: any bytes of index.bin or any field of meta.json, with the checksum recomputed so the
sha256 check passes (issue 26)."""

from __future__ import annotations

import hashlib
import json
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

HEADER = struct.Struct("<QQQQQQiIQQQdQ")
FIELDS = ("offsetLevel0", "max_elements", "cur_element_count", "size_data_per_element",
          "label_offset", "offsetData", "maxlevel", "enterpoint_node", "maxM", "maxM0", "M",
          "mult", "ef_construction")
MODEL = {"fingerprint": "f" * 64, "clip_model": "test", "model_dir": "/m", "embed_dim": 8}


def build_index(idx_dir: Path, n: int = 300, dim: int = 8, removed: int = 5) -> None:
    """``n`` photos (one vector each) under /g, ``removed`` of them then removed (deleted slots)."""
    from stbir_infer import gallery

    rng = np.random.default_rng(0)
    g = gallery.GalleryIndex.create(dim=dim, model={**MODEL, "embed_dim": dim})
    vecs = rng.standard_normal((n, dim)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    shas = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(n)]
    g.add_root("/g")
    g.add_vectors(vecs, shas)
    for i, sha in enumerate(shas):
        g.set_file(f"/g/{i}.png", sha, 10 + i, 20 + i)
    for i in range(removed):
        g.remove_file(f"/g/{i}.png")
    saved = gallery.MAX_DELETED_SHARE
    gallery.MAX_DELETED_SHARE = 1.0  # keep the deleted slots
    try:
        g.save(idx_dir)
    finally:
        gallery.MAX_DELETED_SHARE = saved


def live_gen(idx_dir: Path) -> Path:
    return idx_dir / (idx_dir / "CURRENT").read_text().strip()


def rewrite(idx_dir: Path, *, index_bin: bytes | None = None, meta: dict | None = None) -> None:
    """Replace the live generation's files, recomputing meta.json's checksum of index.bin."""
    gen = live_gen(idx_dir)
    if index_bin is not None:
        (gen / "index.bin").write_bytes(index_bin)
    if meta is None:
        meta = json.loads((gen / "meta.json").read_text())
    data = (gen / "index.bin").read_bytes()
    meta.setdefault("checksums", {})["index.bin"] = {
        "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (gen / "meta.json").write_text(json.dumps(meta))


def with_header_field(data: bytes, field: str, value) -> bytes:
    values = list(HEADER.unpack_from(data, 0))
    values[FIELDS.index(field)] = value
    try:
        return HEADER.pack(*values) + data[HEADER.size:]
    except struct.error:
        return data


HEADER_VALUES = {
    "Q": (0, 1, 7, 2**31, 2**32 + 1, 2**63, 2**64 - 1),
    "i": (-2, -1, 0, 1, 5, 1000, 2**31 - 1, -2**31),
    "I": (0, 1, 299, 300, 2**31, 2**32 - 1),
    "d": (0.0, -1.0, 1e300, float("inf"), float("nan"), 0.5, 100.0),
}


def header_cases(data: bytes) -> list[tuple[str, bytes]]:
    """Every header field set to boundary values (the file's own value left out)."""
    out = []
    for field, code in zip(FIELDS, HEADER.format[1:]):
        own = HEADER.unpack_from(data, 0)[FIELDS.index(field)]
        for value in HEADER_VALUES[code]:
            if value != own or (code == "d" and value != value):
                out.append((f"{field}={value}", with_header_field(data, field, value)))
    return out


CHILD = textwrap.dedent("""
    import json, sys
    import numpy as np
    from stbir_infer.errors import StbirInferError
    from stbir_infer.gallery import GalleryIndex

    out = {}
    for idx in sys.argv[1:]:
        try:
            g = GalleryIndex.load(idx)
            q = np.asarray(g.hnsw.get_items(sorted(g.items)[:3]), np.float32)
            hits = [g.search(v, 5) for v in q]
            g.hnsw.get_items(sorted(g.items))
            rng = np.random.default_rng(1)
            v = rng.standard_normal((2, g.dim)).astype(np.float32)
            g.add_vectors(v / np.linalg.norm(v, axis=1, keepdims=True), ["x1", "x2"])
            out[idx] = ["loaded", [[(l, round(s, 5)) for l, s in h] for h in hits]]
        except StbirInferError as exc:
            out[idx] = ["refused", str(exc).splitlines()[0], len(str(exc).splitlines())]
        except Exception as exc:
            out[idx] = ["traceback", f"{type(exc).__name__}: {exc}"[:300]]
        print(json.dumps([idx, out[idx]]), flush=True)
""")


def load_in_child(index_dirs: list[Path], timeout: float = 120) -> tuple[dict, int]:
    """{index dir: [outcome, ...]} for each dir loaded (and searched, read, added to) in one child
    process, and the child's return code (a negative one: killed by that signal)."""
    proc = subprocess.run([sys.executable, "-c", CHILD, *map(str, index_dirs)],
                          capture_output=True, text=True, timeout=timeout)
    results = {}
    for line in proc.stdout.splitlines():
        idx, outcome = json.loads(line)
        results[idx] = outcome
    return results, proc.returncode
