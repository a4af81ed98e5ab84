"""torch encoders -> three separate, simplified ONNX graphs with a dynamic batch axis.

Separate graphs, not one: a device loads only the towers it runs (enrolment needs the image
tower, a query the sketch and text towers), and each can be quantised or compiled on its own.
"""

from __future__ import annotations

import collections
import io
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from stbir_export.errors import ExportError
from stbir_infer.contract import BRANCHES, DRAWING_OUTPUT, GRAPH_OUTPUT

ENCODERS = BRANCHES  # one graph per branch, named by contract.GRAPH_FILES
# The TorchScript exporter (dynamo=False) is used: the dynamo exporter needs onnxscript, and the
# TorchScript one gives compact graphs with a symbolic batch axis from `dynamic_axes`.
MIN_OPSET, MAX_OPSET = 14, 20


class _Encoder(nn.Module):
    """Holds the whole model as a submodule (so its weights become initializers, not traced
    constants) and calls one of its encode_* methods."""

    def __init__(self, model: nn.Module, method: str):
        super().__init__()
        self.model = model
        self.method = method

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return getattr(self.model, self.method)(*inputs)


def input_names(model, encoder: str) -> list[str]:
    return [i["name"] for i in input_specs(model, encoder)]


def input_specs(model, encoder: str) -> list[dict]:
    """The `inputs` entries of export.json ("batch" is the dynamic axis; the token axis takes
    any length up to the context length)."""
    if encoder == "text":
        width = int(model.token_table.shape[1])
        if model.hf_text:  # a Hugging Face encoder: mean pooling over the attention mask
            return [{"name": "token_embeddings", "shape": ["batch", "tokens", width],
                     "dtype": "float32"},
                    {"name": "attention_mask", "shape": ["batch", "tokens"], "dtype": "int64"}]
        return [{"name": "token_embeddings", "shape": ["batch", model.context_length, width],
                 "dtype": "float32"},
                {"name": "eot_position", "shape": ["batch"], "dtype": "int64"}]
    spec = model.input_specs()[encoder]
    return [{"name": "pixels", "shape": ["batch", spec["channels"], spec["size"], spec["size"]],
             "dtype": "float32"}]


def output_names(encoder: str) -> list[str]:
    """The graph's outputs: the embedding; the sketch graph also gives the drawing descriptor."""
    return [GRAPH_OUTPUT, DRAWING_OUTPUT] if encoder == "sketch" else [GRAPH_OUTPUT]


def example_inputs(model, encoder: str, batch: int = 2) -> tuple[torch.Tensor, ...]:
    """Tracing inputs; a batch of 2 so nothing batch-sized gets baked in as a constant 1."""
    g = torch.Generator().manual_seed(0)
    if encoder == "text":
        n = model.context_length
        x = torch.randn(batch, n, int(model.token_table.shape[1]), generator=g)
        if model.hf_text:  # rows of different lengths, so no length is baked in
            mask = (torch.arange(n)[None, :] < torch.arange(n, 0, -1)[:batch, None]).long()
            return x, mask
        return x, torch.arange(batch, dtype=torch.int64) % n
    shape = input_specs(model, encoder)[0]["shape"]
    return (torch.randn(batch, *shape[1:], generator=g),)


def export_raw(model, encoder: str, opset: int) -> onnx.ModelProto:
    """Trace one encoder into an (unsimplified) ONNX model."""
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ExportError(f"opset {opset} is not supported (choose {MIN_OPSET}..{MAX_OPSET})")
    module = _Encoder(model, {"sketch": "encode_sketch_graph", "image": "encode_image",
                              "text": "encode_text_graph"}[encoder])
    module.eval()
    names = input_names(model, encoder)
    outputs = output_names(encoder)
    axes = {n: {0: "batch"} for n in names + outputs}
    if encoder == "text":  # any token count up to the context length (models.causal_text)
        axes["token_embeddings"][1] = "tokens"
        if model.hf_text:
            axes["attention_mask"][1] = "tokens"
    buf = io.BytesIO()
    # No torch.no_grad() here, and the attention fast path off: under no_grad nn.MultiheadAttention
    # takes aten::_native_multi_head_attention, which has no ONNX export.
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, example_inputs(model, encoder), buf, dynamo=False,
                              opset_version=opset, input_names=names, output_names=outputs,
                              dynamic_axes=axes,
                              do_constant_folding=True)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    model.eval()  # the exporter restores the wrapper's (training) mode on the whole model
    return onnx.load_from_string(buf.getvalue())


def simplify(proto: onnx.ModelProto, encoder: str) -> onnx.ModelProto:
    import onnxsim

    try:
        simplified, ok = onnxsim.simplify(proto)
    except Exception as exc:
        raise ExportError(f"onnxsim failed on the {encoder} graph: {exc}") from None
    if not ok:
        raise ExportError(f"onnxsim could not confirm its simplified {encoder} graph matches")
    return simplified


def op_counts(proto: onnx.ModelProto) -> collections.Counter:
    return collections.Counter(node.op_type for node in proto.graph.node)


def op_table(name: str, before: onnx.ModelProto, after: onnx.ModelProto,
             size_before: int, size_after: int) -> str:
    """Per-graph table: op | before | after, a total and a file-size row."""
    b, a = op_counts(before), op_counts(after)
    rows = [(op, str(b.get(op, 0)), str(a.get(op, 0))) for op in sorted(set(b) | set(a))]
    rows.append(("total", str(sum(b.values())), str(sum(a.values()))))
    rows.append(("file size", _size(size_before), _size(size_after)))
    width = max(len(r[0]) for r in rows + [("op",)])
    lines = [name, f"  {'op':<{width}}  {'before':>9}  {'after':>9}"]
    lines += [f"  {op:<{width}}  {x:>9}  {y:>9}" for op, x, y in rows]
    return "\n".join(lines)


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def vocab_tables(proto: onnx.ModelProto, vocab_size: int) -> list[str]:
    """Names of initializers / constants with `vocab_size` rows (the text graph must have none:
    the table ships as token_embedding.npy and the lookup happens outside the graph)."""
    found = [t.name for t in proto.graph.initializer if t.dims and t.dims[0] == vocab_size]
    for node in proto.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.t.dims and attr.t.dims[0] == vocab_size:
                    found.append(node.output[0])
    return found


def write(proto: onnx.ModelProto, path: Path) -> int:
    """Save and run onnx.checker (full check: strict shape inference); returns the file size."""
    data = proto.SerializeToString()
    path.write_bytes(data)
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:
        raise ExportError(f"{path.name} fails onnx.checker: {exc}") from None
    return len(data)
