"""The fusion part of an export: which fusion the runtime uses, the Combiner graph when that is
the one, and the validation score threshold.

``fusion``: "auto" follows the checkpoint (the Combiner only where validation measured it better,
``combiner.preferred``), "combiner" forces it (the model must have one), "mean" leaves it out.
The Combiner graph goes through the same checks as the towers: onnxsim, onnx.checker, and
onnxruntime + ReferenceEvaluator against torch at batch 1 and the verification batch.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from stbir_export import graphs
from stbir_export import verify as verification
from stbir_export.errors import ExportError
from stbir_infer.contract import COMBINER_FILE, COMBINER_INPUTS, GRAPH_OUTPUT

FUSIONS = ("auto", "combiner", "mean")


class _Combine(nn.Module):
    def __init__(self, combiner: nn.Module):
        super().__init__()
        self.combiner = combiner

    def forward(self, sketch: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return self.combiner(sketch, text)


def input_specs(model) -> list[dict]:
    return [{"name": n, "shape": ["batch", int(model.embed_dim)], "dtype": "float32"}
            for n in COMBINER_INPUTS]


def unit_vectors(dim: int, batch: int, seed: int) -> np.ndarray:
    x = torch.randn(batch, dim, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.normalize(x, dim=-1).numpy()


def export_raw(model, opset: int):
    import onnx

    module = _Combine(model.combiner).eval()
    example = tuple(torch.from_numpy(unit_vectors(model.embed_dim, 2, s)) for s in (0, 1))
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, example, buf, dynamo=False, opset_version=opset,
                          input_names=list(COMBINER_INPUTS), output_names=[GRAPH_OUTPUT],
                          dynamic_axes={n: {0: "batch"} for n in (*COMBINER_INPUTS, GRAPH_OUTPUT)},
                          do_constant_folding=True)
    model.eval()
    return onnx.load_from_string(buf.getvalue())


@torch.no_grad()
def verify_graph(model, path: Path, batch: int) -> dict:
    """onnxruntime (batch 1 and ``batch``) and ReferenceEvaluator vs torch, the towers' bounds."""
    feeds = {n: unit_vectors(model.embed_dim, batch, 1234 + i) for i, n in enumerate(COMBINER_INPUTS)}
    model.eval()
    want = model.combiner(*(torch.from_numpy(feeds[n]) for n in COMBINER_INPUTS)).numpy()
    return verification.parity(path, feeds, want, "combiner")


def method_for(model, fusion: str) -> str:
    if fusion not in FUSIONS:
        raise ExportError(f"fusion must be one of {', '.join(FUSIONS)} (got {fusion!r})")
    has = getattr(model, "combiner", None) is not None
    if fusion == "combiner" and not has:
        raise ExportError("--fusion combiner: the checkpoint has no Combiner (train with "
                          "model.combiner: true and a combiner stage)")
    if fusion == "auto":
        return "combiner" if has and bool(model.combiner.preferred) else "weighted_mean"
    return "combiner" if fusion == "combiner" else "weighted_mean"


def threshold_entry(meta: dict, far: float) -> dict | None:
    """export.json's ``score_threshold``: the checkpoint's validation thresholds at ``far``."""
    rec = meta.get("score_thresholds")
    if not rec:
        return None
    key = f"{far:g}"
    modes = {m: v[key] for m, v in rec.get("modes", {}).items() if key in v}
    if not modes:
        known = sorted({k for v in rec.get("modes", {}).values() for k in v})
        raise ExportError(f"--threshold-far {far:g}: the checkpoint has thresholds at FAR "
                          f"{', '.join(known) or 'none'}")
    return {"far": float(far), "split": rec.get("split", "val"), "modes": modes,
            "rule": "a hit is kept when its score >= the threshold of the query's mode"}


def build(model, meta: dict, tmp: Path, *, fusion: str, far: float, opset: int, verify: bool,
          batch: int, log) -> tuple[dict, dict | None]:
    """Export.json additions ({fusion, combiner?, score_threshold?}) and the Combiner's parity
    figures (None without a Combiner graph or without verification)."""
    method = method_for(model, fusion)
    weight = round(float(model.query_sketch_weight), 6)  # a float32 buffer: 0.4 is 0.4000000059...
    out = {"fusion": {"method": method, "default_weight": weight,
                      "validation": meta.get("fusion_selection")}}
    check = None
    if method == "combiner":
        raw = export_raw(model, opset)
        simplified = graphs.simplify(raw, "combiner")
        size = graphs.write(simplified, tmp / COMBINER_FILE)
        log(graphs.op_table(COMBINER_FILE, raw, simplified, raw.ByteSize(), size))
        if verify:
            check = verify_graph(model, tmp / COMBINER_FILE, batch)
            log(f"  verify combiner: onnxruntime min cosine {check['min_cosine']:.7f}, max abs "
                f"diff {check['max_abs_diff']:.1e}; ReferenceEvaluator min cosine "
                f"{check['reference_min_cosine']:.7f}, max abs diff "
                f"{check['reference_max_abs_diff']:.1e} (batch 1 and {batch})")
        out["combiner"] = {"file": COMBINER_FILE, "inputs": input_specs(model),
                           "output": GRAPH_OUTPUT, "neutral_weight": weight}
    threshold = threshold_entry(meta, far)
    if threshold is not None:
        out["score_threshold"] = threshold
    log(f"  fusion: {method} (default sketch weight {weight:g})"
        + (f"; score threshold at FAR {far:g}: " + ", ".join(
            f"{m} {t:.4f}" for m, t in threshold["modes"].items()) if threshold else
           "; no score threshold (the checkpoint has no validation figures)"))
    return out, check


__all__ = ["FUSIONS", "build", "method_for", "threshold_entry"]
