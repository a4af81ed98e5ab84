"""The export dir as the runtime trusts it: export.json checked, every file it names inside the
folder and read only after its sha256 matches the record.

The bytes are read once, hashed, and those same bytes are handed to onnxruntime / numpy /
tokenizers, so nothing parses an unverified file and nothing can swap it between check and use.
A file this process has already verified (same device, inode, size, mtime and ctime) is not
hashed again.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import stat
from pathlib import Path, PurePosixPath

import numpy as np

from stbir_infer.contract import (
    BRANCHES,
    EXPORT_FORMAT,
    MANIFEST,
    SUPPORTED_EXPORT_VERSIONS,
    TOKEN_EMBEDDING,
    fingerprint,
)
from stbir_infer.errors import ExportDirError
from stbir_infer.hf_tokenizer import TOKENIZER_FILE, TOKENIZER_TYPE
from stbir_infer.tokenizer import DEFAULT_BPE_FILE

_SHA256 = re.compile(r"[0-9a-f]{64}")
TAMPERED = "sha256 does not match export.json; the export is corrupted or was modified"
MAX_EMBED_DIM = 65536
MAX_DRAWING_DIM = 65536  # the sketch graph's drawing descriptor (a resnet50: 4 x 3,072)
MAX_CONTEXT_LENGTH = 4096   # far past any text tower's (CLIP 77, BERT 512)
MAX_TOKEN_ID = 2**31 - 1


def _integer(lo: int, hi: int):
    return (lambda v: isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi,
            f"an integer from {lo} to {hi}")


def _number(lo: float, hi: float):
    # the range first: math.isfinite of an int past a float's range raises OverflowError
    return (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
            and lo <= v <= hi and math.isfinite(v), f"a number from {lo:g} to {hi:g}")


# export.json values the runtime computes with: (path of keys, required, (test, what it must be)).
# Checked when the export is loaded, so a string, a bool, NaN or an absurd size is one line and
# exit 2 there, not an internal error (or a huge allocation) at the first query.
_VALUE_CHECKS = (
    (("embed_dim",), True, _integer(1, MAX_EMBED_DIM)),
    (("fusion_weight",), True, _number(0, 1)),
    (("fusion", "default_weight"), False, _number(0, 1)),
    (("tokenizer", "type"), False, (lambda v: v in ("clip_bpe", TOKENIZER_TYPE),
                                    f"'clip_bpe' or {TOKENIZER_TYPE!r}")),
    (("tokenizer", "context_length"), False, _integer(2, MAX_CONTEXT_LENGTH)),
    (("tokenizer", "vocab_size"), False, _integer(1, MAX_TOKEN_ID)),
    (("tokenizer", "num_merges"), False, _integer(0, MAX_TOKEN_ID)),
    (("tokenizer", "sot_token_id"), False, _integer(0, MAX_TOKEN_ID)),
    (("tokenizer", "eot_token_id"), False, _integer(0, MAX_TOKEN_ID)),
    (("tokenizer", "pad_token_id"), False, _integer(0, MAX_TOKEN_ID)),
)


def check_values(manifest: dict, where) -> None:
    """ExportDirError (one line) for the first export.json value of ``_VALUE_CHECKS`` that has the
    wrong type or is out of range; an optional value may be absent or null."""
    if not isinstance(manifest.get("tokenizer"), dict):
        raise ExportDirError(f"{where}: tokenizer is not a map")
    if manifest.get("fusion") is not None and not isinstance(manifest["fusion"], dict):
        raise ExportDirError(f"{where}: fusion is not a map")
    for keys, required, (ok, what) in _VALUE_CHECKS:
        parent = manifest.get(keys[0]) if len(keys) > 1 else manifest
        value = parent.get(keys[-1]) if isinstance(parent, dict) else None
        if value is None and not required:
            continue
        if not ok(value):
            raise ExportDirError(f"{where}: {'.'.join(keys)} is {repr(value)[:40]}, not {what}")


def export_path(model_dir: str | Path, rel) -> Path:
    """``model_dir / rel`` for a file name taken from export.json; ExportDirError when the name is
    absolute, climbs out with ``..``, or resolves (through a symlink) outside the export dir."""
    model_dir = Path(model_dir)
    where = model_dir / MANIFEST
    if not isinstance(rel, str) or not rel or "\\" in rel or "\x00" in rel:
        raise ExportDirError(f"{where}: file name {rel!r} is not a relative path")
    pure = PurePosixPath(rel)
    if pure.is_absolute() or ".." in pure.parts:
        raise ExportDirError(f"{where}: file name {rel!r} leaves the export folder")
    path = model_dir.joinpath(*pure.parts)
    try:
        path.resolve().relative_to(model_dir.resolve())
    except ValueError:
        raise ExportDirError(f"{where}: file {rel!r} resolves outside the export folder") from None
    return path


# (st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns, sha256) of files verified by this process.
_VERIFIED: set[tuple] = set()


def _stat_key(st: os.stat_result, digest: str) -> tuple:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, digest)


def npy_from_bytes(data: bytes) -> np.ndarray:
    """A read-only array over ``data`` (a .npy file), without copying; never unpickles."""
    fmt = np.lib.format
    buf = io.BytesIO(data)
    version = fmt.read_magic(buf)
    if version not in ((1, 0), (2, 0)):
        raise ValueError(f"unsupported .npy version {version}")
    read_header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
    shape, fortran, dtype = read_header(buf)
    if dtype.hasobject:
        raise ValueError("object arrays (pickled data) are not allowed")
    count = int(np.prod(shape, dtype=np.int64))
    if buf.tell() + count * dtype.itemsize != len(data):
        raise ValueError("file size does not match the header")
    arr = np.frombuffer(data, dtype, count, offset=buf.tell())
    return arr.reshape(shape, order="F" if fortran else "C")


def required_files(manifest: dict, precision: str = "fp32") -> list[str]:
    """The export.json file names the runtime reads at this precision."""
    enc = manifest["encoders"]
    key = "int8_file" if precision == "int8" else "file"
    names = [enc[b][key] for b in BRANCHES if enc[b].get(key)]
    names.append(enc["text"].get("token_embedding", TOKEN_EMBEDDING))
    tok = manifest.get("tokenizer")
    tok = tok if isinstance(tok, dict) else {}
    if tok.get("type") == TOKENIZER_TYPE:
        names.append(tok.get("file", TOKENIZER_FILE))
    else:
        names.append(tok.get("bpe_file", DEFAULT_BPE_FILE))
    return names


def read_export_manifest(model_dir: str | Path) -> dict:
    """Load and check export.json; raise ExportDirError naming what is wrong."""
    model_dir = Path(model_dir)
    path = model_dir / MANIFEST
    if not model_dir.is_dir():
        raise ExportDirError(f"{model_dir}: model dir not found (pass --model or set STBIR_MODEL)")
    if not path.is_file():
        raise ExportDirError(f"{model_dir}: not an STBIR export dir (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # ValueError: bad UTF-8, bad JSON, a 5000-digit number
        raise ExportDirError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != EXPORT_FORMAT:
        raise ExportDirError(f"{path}: not an STBIR export manifest (format is not {EXPORT_FORMAT!r})")
    version = manifest.get("format_version")
    if version not in SUPPORTED_EXPORT_VERSIONS:
        raise ExportDirError(f"{path}: export format version {version} is not supported "
                             f"(this runtime reads {', '.join(map(str, SUPPORTED_EXPORT_VERSIONS))})")
    for key in ("embed_dim", "fusion_weight", "encoders", "tokenizer", "fingerprint", "files"):
        if key not in manifest:
            raise ExportDirError(f"{path}: missing key {key!r}")
    files = manifest["files"]
    if not isinstance(files, dict) or not all(
            isinstance(v, str) and _SHA256.fullmatch(v) for v in files.values()):
        raise ExportDirError(f"{path}: files is not a map of file name to sha256")
    if manifest["fingerprint"] != fingerprint(files):
        # An index records the fingerprint (and space) of the export that built it: an edited
        # files map under the old fingerprint would pass for that export.
        raise ExportDirError(f"{path}: fingerprint does not match its files (sha256 of the "
                             "files map); the export was modified after it was written")
    check_values(manifest, path)
    if not isinstance(manifest["encoders"], dict):
        raise ExportDirError(f"{path}: encoders is not a map")
    for rel in files:
        export_path(model_dir, rel)
    for branch in BRANCHES:
        enc = manifest["encoders"].get(branch)
        if not isinstance(enc, dict) or "file" not in enc or "inputs" not in enc:
            raise ExportDirError(f"{path}: encoders.{branch} is missing or incomplete")
        if branch != "text" and "preprocess" not in enc:
            raise ExportDirError(f"{path}: encoders.{branch}.preprocess is missing")
        if not export_path(model_dir, enc["file"]).is_file():
            raise ExportDirError(f"{model_dir}: {enc['file']} is missing")
    drawing = manifest["encoders"]["sketch"].get("drawing")
    if drawing is not None and not (  # optional: exports before issue 27 have none
            isinstance(drawing, dict) and set(drawing) == {"output", "dim"}
            and isinstance(drawing["output"], str) and drawing["output"]
            and type(drawing["dim"]) is int and 0 < drawing["dim"] <= MAX_DRAWING_DIM):
        raise ExportDirError(f"{path}: encoders.sketch.drawing must be {{output: a name, dim: "
                             f"1..{MAX_DRAWING_DIM}}}")
    if not export_path(model_dir, manifest["encoders"]["text"].get("token_embedding",
                                                                  TOKEN_EMBEDDING)).is_file():
        raise ExportDirError(f"{model_dir}: token embedding table is missing")
    for rel in required_files(manifest):
        export_path(model_dir, rel)
        if rel not in files:
            raise ExportDirError(f"{path}: {rel} is not listed in files (no sha256 to verify it)")
    return manifest


def verify_files(model_dir: Path, manifest: dict) -> list[str]:
    """export.json's files that are missing, not regular files, or whose sha256 differs from
    the record (empty list: all intact). Reads every file."""
    bad = []
    for rel, digest in manifest["files"].items():
        p = export_path(model_dir, rel)
        try:
            with open(p, "rb") as f:
                if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                    raise OSError("not a regular file")
                h = hashlib.sha256()
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
        except OSError:
            bad.append(rel)
            continue
        if h.hexdigest() != digest:
            bad.append(rel)
    return bad


def read_verified(model_dir: Path, manifest: dict, rel: str) -> bytes:
    """The bytes of export.json's file ``rel``, after checking them against its sha256.

    A file this process has already verified (same device, inode, size, mtime and ctime,
    taken from the open descriptor; ctime cannot be set back by a writer) is not hashed
    again, so a second Encoders on the same export costs no hashing."""
    path = export_path(model_dir, rel)
    digest = manifest["files"].get(rel)
    if digest is None:
        raise ExportDirError(f"{path}: not listed in export.json's files (no sha256 to verify it)")
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise ExportDirError(f"{path}: not a regular file")
            data = f.read()
            key = _stat_key(st, digest)
            fresh = (key in _VERIFIED and len(data) == st.st_size
                     and _stat_key(os.fstat(f.fileno()), digest) == key)
    except OSError as exc:
        raise ExportDirError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    if not fresh:
        if hashlib.sha256(data).hexdigest() != digest:
            raise ExportDirError(f"{path}: {TAMPERED}")
        _VERIFIED.add(key)
    return data


__all__ = ["MAX_CONTEXT_LENGTH", "MAX_EMBED_DIM", "TAMPERED", "check_values", "export_path",
           "npy_from_bytes", "read_export_manifest", "read_verified", "required_files",
           "verify_files"]
