"""Does each exported graph compute what the torch model computes?

Each graph runs in onnxruntime (batch 1 and the full verification batch, from one graph) and in
onnx's ReferenceEvaluator (a second, independent runtime), and is compared with the torch model
row by row. The text graph is fed through the detached table exactly as the runtime will: ids
from the tokenizer, rows looked up in token_embedding.npy, eot position = argmax of the ids;
torch's side is the reference path from ids, ``model.encode_text(tokens)``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from models.scoped import quiet_logs
from stbir_export.errors import ExportError
from stbir_infer.contract import DRAWING_OUTPUT

MIN_COSINE = 0.99999
MAX_ABS_DIFF = 1e-4
INT8_WARN_COSINE = 0.99
INT8_OP_TYPES = ["MatMul", "Gemm"]  # ConvInteger measured slower than fp32 Conv on CPU
TEXTS = ["a red circle", "", "a small blue square made of wood, on a white table",
         " ".join(["a very long caption that will be truncated"] * 12), "green triangle",
         "Caf\u00e9 &amp; THE yellow star", "two black lines"]


def verification_batch(model, encoder: str, batch: int) -> dict[str, torch.Tensor]:
    """Deterministic inputs: token ids of captions for text (one empty, one truncated), random
    normalised pixels for the image towers."""
    g = torch.Generator().manual_seed(1234)
    if encoder == "text":
        return text_inputs(model, [TEXTS[i % len(TEXTS)] for i in range(batch)])
    spec = model.input_specs()[encoder]
    return {"pixels": torch.randn(batch, spec["channels"], spec["size"], spec["size"], generator=g)}


@torch.no_grad()
def torch_embeddings(model, encoder: str, inputs: dict) -> np.ndarray:
    model.eval()
    if encoder == "text":
        return model.encode_text(inputs["tokens"]).numpy()
    return getattr(model, f"encode_{encoder}")(inputs["pixels"]).numpy()


def text_inputs(model, texts: list[str]) -> dict:
    """Token ids of ``texts``, and for an HF tower its padding id (the mask is ids != it)."""
    out = {"tokens": model.tokenizer()(texts)}
    if model.hf_text:
        out["pad_id"] = model.clip.text.config.pad_token_id
    return out


def onnx_feeds(encoder: str, inputs: dict, table: np.ndarray | None) -> dict[str, np.ndarray]:
    """What a runtime feeds the graph; for text, the lookup in the shipped table happens here:
    with the end-of-text positions (open_clip's tower) or the attention mask (an HF tower)."""
    if encoder == "text":
        ids = inputs["tokens"].numpy()
        if "pad_id" in inputs:
            return {"token_embeddings": table[ids],
                    "attention_mask": (ids != inputs["pad_id"]).astype(np.int64)}
        return {"token_embeddings": table[ids], "eot_position": ids.argmax(-1).astype(np.int64)}
    return {"pixels": inputs["pixels"].numpy()}


def trimmed(feeds: dict[str, np.ndarray], rows=slice(None)) -> dict[str, np.ndarray]:
    """``feeds`` of ``rows`` cut after the last real token of those rows (what the runtime
    feeds when export.json says ``trim_tokens``)."""
    emb = feeds["token_embeddings"][rows]
    if "attention_mask" in feeds:
        mask = feeds["attention_mask"][rows]
        n = int(mask.sum(1).max())
        return {"token_embeddings": emb[:, :n], "attention_mask": mask[:, :n]}
    eot = feeds["eot_position"][rows]
    return {"token_embeddings": emb[:, :int(eot.max()) + 1], "eot_position": eot}


def compare(got: np.ndarray, want: np.ndarray) -> tuple[float, float]:
    """(lowest row cosine, largest absolute difference)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    cos = (got * want).sum(-1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(want, axis=-1)
                                  + 1e-12)
    return float(cos.min()), float(np.abs(got - want).max())


def session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def run(sess, feeds: dict, output: str | None = None) -> np.ndarray:
    """The graph's first output, or the one named ``output``."""
    return sess.run(None if output is None else [output], feeds)[0]


def verify_graph(model, encoder: str, path: Path, table: np.ndarray | None, batch: int) -> dict:
    """Compare onnxruntime and ReferenceEvaluator with torch; raise ExportError out of bounds.
    The sketch graph's drawing descriptor is checked the same way (under ``drawing``)."""
    inputs = verification_batch(model, encoder, batch)
    feeds = onnx_feeds(encoder, inputs, table)
    result = parity(path, feeds, torch_embeddings(model, encoder, inputs), f"{encoder} encoder")
    if encoder == "sketch":
        with torch.no_grad():
            want = model.encode_sketch_graph(inputs["pixels"])[1].numpy()
        result["drawing"] = parity(path, feeds, want, "sketch drawing descriptor", DRAWING_OUTPUT)
    return result


def trim_cosine(model, path: Path, table: np.ndarray) -> float:
    """The text graph fed only the tokens up to the last end-of-text (of a batch of short
    captions, and of each alone) against the same graph fed all ``context_length`` of them:
    lowest row cosine (0 when the graph does not take fewer tokens). Near 1 only where the
    attention is causal; then the runtime may trim (export.json ``trim_tokens``)."""
    feeds = onnx_feeds("text", text_inputs(model, [t for t in TEXTS if len(t) < 60]), table)
    sess = session(path)
    want = run(sess, feeds)
    worst = 1.0
    for rows in [slice(None)] + [slice(i, i + 1) for i in range(len(want))]:
        try:
            got = run(sess, trimmed(feeds, rows))
        except Exception:  # noqa: BLE001 - a graph with a fixed token axis refuses the shape
            return 0.0
        worst = min(worst, compare(got, want[rows])[0])
    return worst


def parity(path: Path, feeds: dict, want: np.ndarray, what: str, output: str | None = None) -> dict:
    """The graph at ``path`` in onnxruntime (the feeds' batch and batch 1) and ReferenceEvaluator
    against torch's ``want`` (its first output, or ``output``); raise ExportError naming ``what``
    out of bounds."""
    from onnx.reference import ReferenceEvaluator

    batch = len(want)
    sess = session(path)
    full = compare(run(sess, feeds, output), want)
    one = compare(run(sess, {k: v[:1] for k, v in feeds.items()}, output), want[:1])
    ref = compare(run(ReferenceEvaluator(str(path)), feeds, output), want)
    result = {"min_cosine": min(full[0], one[0]), "max_abs_diff": max(full[1], one[1]),
              "reference_min_cosine": ref[0], "reference_max_abs_diff": ref[1],
              "batch_sizes": [1, batch]}
    for runtime, (cos, diff) in (("onnxruntime", (result["min_cosine"], result["max_abs_diff"])),
                                 ("onnx ReferenceEvaluator", ref)):
        if not (cos >= MIN_COSINE and diff <= MAX_ABS_DIFF):
            raise ExportError(
                f"verification failed: {what} in {runtime} vs torch: min cosine "
                f"{cos:.7f} (needs >= {MIN_COSINE}), max abs diff {diff:.2e} "
                f"(needs <= {MAX_ABS_DIFF:g})")
    return result


def quantize_int8(src: Path, dst: Path) -> None:
    """onnxruntime dynamic quantisation: int8 weights, activations quantised at run time.

    Per output channel: one scale per weight column instead of one per tensor. On the trained
    MiniLM text tower (real Flickr8k captions) that lifted the lowest cosine to fp32 from 0.957
    to 0.990 at the same speed (1.9 vs 1.7 ms; fp32 4.0); per tensor cost text R@10 1.5 points."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with quiet_logs("onnxruntime"):  # its "consider pre-processing" advice is noise here
        quantize_dynamic(src, dst, weight_type=QuantType.QInt8, op_types_to_quantize=INT8_OP_TYPES,
                         per_channel=True)


def int8_cosine(model, encoder: str, fp32: Path, int8: Path, table: np.ndarray | None,
                batch: int) -> float:
    """Lowest row cosine between the int8 and the fp32 graph on the verification batch."""
    feeds = onnx_feeds(encoder, verification_batch(model, encoder, batch), table)
    return compare(run(session(int8), feeds), run(session(fp32), feeds))[0]
