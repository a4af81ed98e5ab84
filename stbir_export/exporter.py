"""checkpoint -> export dir (see docs/ARCHITECTURE.md, "The export dir").

The dir is built in a temporary folder beside OUT_DIR and renamed into place only after every
graph is written, checked and verified, so a failed export never leaves a half-written dir, and
``force`` replaces an old export only once the new one is complete.

``fingerprint`` in export.json is the sha256 of the canonical JSON (sorted keys, no spaces) of the
``files`` dict; indexes record it to refuse vectors made by a different export. ``space`` is the
embedding space (``models.space``): a model's own, or for a distilled student its teacher's, so
the runtime can let a student query an index the teacher enrolled.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from models import CheckpointError, ModelError, load_model, open_clip_scope
from models.space import embedding_space
from stbir_export import combiner as combiner_export
from stbir_export import graphs
from stbir_export.errors import ExportError

# Functions by name: the parameters `quantize` and `verify` would shadow the modules.
from stbir_export.quantize import Calibration, calibration_set, quantize_tower
from stbir_export.tokenizer import write_tokenizer
from stbir_export.verify import MIN_COSINE, trim_cosine, verify_graph
from stbir_infer.contract import (
    COMBINER_FORMAT_VERSION,
    DRAWING_OUTPUT,
    EXPORT_FORMAT,
    EXPORT_FORMAT_VERSION,
    GRAPH_FILES,
    GRAPH_OUTPUT,
    MANIFEST,
    TOKEN_EMBEDDING,
    file_sha256,
    fingerprint,
)

QUANTIZE = ("int8",)


def export_checkpoint(checkpoint, out_dir, *, opset: int = 17, quantize: str | None = None,
                      verify: bool = True, force: bool = False, batch: int = 4,
                      fusion: str = "auto", threshold_far: float = 1e-3,
                      calibration: str | Path | None = None,
                      log: Callable[[str], object] = print) -> dict:
    """Export ``checkpoint`` into ``out_dir``; returns the export.json dict.

    ``calibration`` (with ``quantize="int8"``): "auto" or a folder of images, for static int8 of
    the sketch and image towers where it measures faster (``stbir_export.quantize``); None:
    dynamic int8 only.

    Raises ExportError for a bad checkpoint, a non-empty ``out_dir`` without ``force``, an
    unwritable ``out_dir``, or a graph that fails verification.
    """
    checkpoint, out = Path(checkpoint), Path(out_dir).expanduser().absolute()
    if quantize is not None and quantize not in QUANTIZE:
        raise ExportError(f"quantize must be one of {', '.join(QUANTIZE)} (got {quantize!r})")
    if calibration is not None and quantize is None:
        raise ExportError("calibration images are for --quantize int8; pass it too")
    if not graphs.MIN_OPSET <= int(opset) <= graphs.MAX_OPSET:
        raise ExportError(f"opset {opset} is not supported "
                          f"(choose {graphs.MIN_OPSET}..{graphs.MAX_OPSET})")
    if int(batch) < 1:
        raise ExportError(f"the verification batch must be at least 1 (got {batch})")
    if fusion not in combiner_export.FUSIONS:
        raise ExportError(f"fusion must be one of {', '.join(combiner_export.FUSIONS)} (got {fusion!r})")
    _check_out_dir(out, force, checkpoint)
    tmp = _temp_dir(out)
    try:
        log(f"loading {checkpoint}")
        model = _load(checkpoint)
        calib = None if calibration is None else calibration_set(
            calibration, model.export_meta.get("run_checkpoint") or checkpoint,
            model.export_meta.get("config"), model.input_specs())
        manifest = _build(model, tmp, checkpoint=checkpoint, opset=int(opset), quantize=quantize,
                          verify=verify, batch=int(batch), log=log, fusion=fusion,
                          threshold_far=float(threshold_far), calibration=calib)
        _install(tmp, out, force)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"exported to {out} (fingerprint {manifest['fingerprint'][:16]})")
    return manifest


def _check_out_dir(out: Path, force: bool, checkpoint: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a directory")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not force:
        raise ExportError(f"{out} is not empty; pass --force to replace it")
    here = Path.cwd().resolve()
    target = out.resolve()
    if target == here or target in here.parents:
        raise ExportError(f"refusing to replace {out}: it holds the current directory")
    if target in checkpoint.expanduser().absolute().resolve().parents:
        raise ExportError(f"refusing to replace {out}: it holds the checkpoint")


def _temp_dir(out: Path) -> Path:
    """The build folder, beside OUT_DIR so the final rename stays on one file system."""
    blocked = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if blocked is not None:
        raise ExportError(f"cannot write to {out}: {blocked} is not a directory")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as exc:
        raise ExportError(f"cannot write to {out}: {exc.strerror or exc}") from None
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp's 0700 would otherwise become OUT_DIR's mode
    return tmp


def _load(checkpoint: Path):
    try:
        with open_clip_scope():  # open_clip warns "initialized randomly": weights come next
            model, meta = load_model(checkpoint)
            model.export_meta = {k: meta.get(k) for k in ("fusion_selection", "score_thresholds",
                                                           "config")}
            # a sketch-tuned checkpoint keeps its run's training config; that run's checkpoint
            # locates the config's folder (--calibration auto)
            tuned_from = (meta.get("sketch_tune") or {}).get("checkpoint")
            model.export_meta["run_checkpoint"] = Path(tuned_from) if isinstance(tuned_from, str) else None
            model.export_meta["space"] = embedding_space(model, meta)
            teacher = (meta.get("distill") or {}).get("teacher")
            model.export_meta["teacher"] = ({k: teacher.get(k) for k in ("file", "sha256")}
                                            if isinstance(teacher, dict) else None)
    except CheckpointError as exc:
        raise ExportError(str(exc)) from None
    except ModelError as exc:
        raise ExportError(f"{checkpoint}: {exc}") from None
    except (KeyError, TypeError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"{checkpoint}: the weights do not fit the checkpoint's model spec "
                          f"({first})") from None
    return model


def _install(tmp: Path, out: Path, force: bool) -> None:
    """Rename the finished build into place, swapping out an old export only now."""
    if not out.exists():
        os.rename(tmp, out)
        return
    if any(out.iterdir()) and not force:  # something appeared while we worked
        raise ExportError(f"{out} is not empty; pass --force to replace it")
    old = out.parent / f".{out.name}.old-{secrets.token_hex(4)}"
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _build(model, tmp: Path, *, checkpoint: Path, opset: int, quantize: str | None,
           verify: bool, batch: int, log, fusion: str = "auto", threshold_far: float = 1e-3,
           calibration: Calibration | None = None) -> dict:
    np.save(tmp / TOKEN_EMBEDDING, model.token_table.detach().float().numpy())
    table = np.load(tmp / TOKEN_EMBEDDING, allow_pickle=False)  # verification uses what ships
    tokenizer = write_tokenizer(model, tmp)
    if table.shape[0] != tokenizer["vocab_size"]:
        raise ExportError(f"token table has {table.shape[0]} rows but the tokenizer "
                          f"{tokenizer['vocab_size']} ids")
    specs = model.input_specs()
    encoders, checks, int8s = {}, {}, {}
    for enc in graphs.ENCODERS:
        name = GRAPH_FILES[enc]
        raw = graphs.export_raw(model, enc, opset)
        simplified = graphs.simplify(raw, enc)
        size = graphs.write(simplified, tmp / name)
        if enc == "text" and graphs.vocab_tables(simplified, table.shape[0]):
            raise ExportError("the text graph holds the vocabulary table; it must ship apart")
        log(graphs.op_table(name, raw, simplified, raw.ByteSize(), size))
        lookup = table if enc == "text" else None
        entry = {"file": name}
        if verify:
            checks[enc] = verify_graph(model, enc, tmp / name, lookup, batch)
            c = checks[enc]
            log(f"  verify {enc}: onnxruntime min cosine {c['min_cosine']:.7f}, max abs diff "
                f"{c['max_abs_diff']:.1e}; ReferenceEvaluator min cosine "
                f"{c['reference_min_cosine']:.7f}, max abs diff {c['reference_max_abs_diff']:.1e}"
                f" (batch 1 and {batch})")
        if quantize == "int8":
            entry["int8_file"] = name.replace(".onnx", ".int8.onnx")
            int8s[enc] = quantize_tower(
                model, enc, tmp / name, tmp / entry["int8_file"], calibration, lookup, batch, log)
        entry.update(inputs=graphs.input_specs(model, enc), output=GRAPH_OUTPUT)
        if enc == "sketch":
            entry["drawing"] = {"output": DRAWING_OUTPUT, "dim": int(model.sketch.drawing_dim)}
        if enc == "text":
            entry["token_embedding"] = TOKEN_EMBEDDING
            cos = trim_cosine(model, tmp / name, table)
            entry["trim_tokens"] = cos >= MIN_COSINE
            log(f"  text: {'trims' if entry['trim_tokens'] else 'does not trim'} the tokens after "
                f"the last end-of-text at run time (min cosine to all tokens {cos:.7f})")
        else:
            entry["preprocess"] = specs[enc]
        encoders[enc] = entry

    meta = getattr(model, "export_meta", {})
    extra, combiner_check = combiner_export.build(
        model, meta, tmp, fusion=fusion, far=threshold_far,
        opset=opset, verify=verify, batch=batch, log=log)
    if combiner_check is not None:
        checks["combiner"] = combiner_check
    files = {p.relative_to(tmp).as_posix(): file_sha256(p)
             for p in sorted(tmp.rglob("*")) if p.is_file() and p.name != MANIFEST}
    manifest = {
        "format": EXPORT_FORMAT,
        "format_version": COMBINER_FORMAT_VERSION if "combiner" in extra else EXPORT_FORMAT_VERSION,
        "embed_dim": int(model.embed_dim), "fusion_weight": round(float(model.query_sketch_weight), 6),
        "opset": opset, "clip_model": model.spec.clip_model,
        "encoders": encoders, "tokenizer": tokenizer, "files": files,
        "source_checkpoint": {"sha256": file_sha256(checkpoint), "file": checkpoint.name},
        "fingerprint": fingerprint(files), **extra,
    }
    if meta.get("space"):  # a student's is its teacher's (stbir-train distill)
        manifest["space"] = meta["space"]
    if meta.get("teacher"):
        manifest["teacher"] = meta["teacher"]
    if quantize == "int8":
        manifest["quantization"] = {"int8": {  # per tower: static or dynamic, and why
            "encoders": int8s, "cosine_to_fp32": {e: r["cosine_to_fp32"] for e, r in int8s.items()},
            "calibration": calibration.describe() if calibration else None}}
    manifest["verification"] = checks if verify else None
    manifest["producer"] = _versions()
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")  # the dir is renamed whole
    return manifest


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("torch", "open_clip_torch", "onnx", "onnxsim", "onnxruntime"):
        with contextlib.suppress(PackageNotFoundError):
            out[pkg] = version(pkg)
    return out
