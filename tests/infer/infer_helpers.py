"""Helpers of the stbir_infer tests (imported by name: tests/infer is on sys.path under pytest)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
from click.testing import CliRunner

from stbir_infer.cli import main
from stbir_infer.contract import fingerprint
from stbir_infer.gallery import GalleryIndex

FORBIDDEN = ("torch", "torchvision", "open_clip", "models", "stbir_train", "stbir_export", "tqdm")


def make_photos(folder: Path, names: list[str], seed: int = 0) -> dict[str, object]:
    """Synthetic photos (PNG) at ``folder/name``; returns name -> synth item."""
    from stbir_train.synth import render_photo, sample_item

    items = {}
    for i, name in enumerate(names):
        rng = np.random.default_rng([seed, i])
        item = sample_item(rng, name)
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        render_photo(item, rng).save(path)
        items[name] = item
    return items


def make_sketch(path: Path, item, seed: int = 0) -> Path:
    from stbir_train.synth import render_sketch

    render_sketch(item, np.random.default_rng(seed)).save(path)
    return path


def run_cli(*args, env=None):
    return CliRunner().invoke(main, [str(a) for a in args], env=env)


def paths_in(idx_dir: Path) -> set[str]:
    return set(GalleryIndex.load(idx_dir).files)


def leftovers(idx_dir: Path) -> list[str]:
    """Temp files or dirs a writer left in the index dir."""
    return [p.name for p in idx_dir.iterdir()
            if p.name.startswith(".tmp-") or p.name.startswith(".CURRENT.")]


def one_error_line(stderr: str) -> bool:
    lines = stderr.strip().splitlines()
    return len(lines) == 1 and lines[0].startswith("stbir-infer: error: ")


def linked_export(src: Path, dst: Path) -> Path:
    """A copy of the export dir ``src`` at ``dst`` whose files are hard links (no disk space for
    the graphs); export.json is a real copy. Unlink a file before rewriting it: writing through
    a link would change ``src`` too."""
    shutil.copytree(src, dst, copy_function=os.link)
    (dst / "export.json").unlink()
    shutil.copy(src / "export.json", dst / "export.json")
    return dst


def refingerprint(manifest: dict) -> dict:
    """``manifest`` (an export.json dict) with its fingerprint recomputed from its files map, as
    the exporter writes it. The runtime refuses an export whose fingerprint does not match its
    files; a test that rewrites a file and its sha256 to test something else calls this."""
    manifest["fingerprint"] = fingerprint(manifest["files"])
    return manifest


def another_identity(export: Path) -> str:
    """Give the export dir ``export`` (a copy) another identity, as a new export of other weights
    has: one more file listed in export.json, so its files map and fingerprint differ. Returns the
    new fingerprint (the graphs and the ``space`` are unchanged)."""
    import hashlib
    import json

    data = b"another export\n"
    (export / "identity.txt").write_bytes(data)
    path = export / "export.json"
    manifest = json.loads(path.read_text())
    manifest["files"]["identity.txt"] = hashlib.sha256(data).hexdigest()
    refingerprint(manifest)
    path.unlink()  # it may be a hard link (linked_export copies it, but be safe)
    path.write_text(json.dumps(manifest))
    return manifest["fingerprint"]
