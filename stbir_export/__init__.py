"""Checkpoint -> export dir: three simplified, verified ONNX graphs plus the assets a torch-free
runtime needs (token table, tokenizer files, export.json). See docs/ARCHITECTURE.md, "The export
dir"."""

from stbir_export.errors import ExportError
from stbir_export.exporter import export_checkpoint
from stbir_infer.contract import fingerprint

__all__ = ["ExportError", "export_checkpoint", "fingerprint"]
