"""The three exported encoders behind one object: images/sketches/texts in, unit vectors out.

Reads only the export dir (export.json + the ONNX graphs + token table + tokenizer assets).
Each graph gets its own onnxruntime session, created on first use, so a text-only caller never
loads the image towers.

Integrity: every file the runtime reads from the export dir goes through ``export_dir`` (listed
in export.json, inside the folder, exactly the recorded sha256, those same bytes handed on).
Every encoder output is checked to be finite (NonFiniteEmbeddingError otherwise).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from stbir_infer import export_dir
from stbir_infer import preprocess as _pre
from stbir_infer.contract import (
    BRANCHES,
    GRAPH_OUTPUT,
    MANIFEST,
    TOKEN_EMBEDDING,
    embedding_space,
)
from stbir_infer.errors import ExportDirError, NonFiniteEmbeddingError, first_line
from stbir_infer.export_dir import TAMPERED, export_path, npy_from_bytes, read_export_manifest, required_files
from stbir_infer.hf_tokenizer import TOKENIZER_TYPE, HFTokenizer
from stbir_infer.session import DEFAULT_PROVIDER, SPINNING, SessionSettings, open_session
from stbir_infer.tokenizer import Tokenizer


class Encoders:
    """Sketch, image and text encoders of one export dir.

    ``threads`` sets onnxruntime's intra-op threads (None: onnxruntime's default).
    ``precision`` "fp32" (default) or "int8" (the export's quantised graphs, where it has them).
    ``provider``: onnxruntime execution provider, short name or full (``stbir_infer.session``:
    one this build lacks falls back to the CPU with a line on stderr); ``spinning``: whether
    idle worker threads busy-wait (default ``session.SPINNING``).
    """

    def __init__(self, model_dir: str | Path, *, threads: int | None = None, precision: str = "fp32",
                 provider: str = DEFAULT_PROVIDER, spinning: bool = SPINNING):
        if precision not in ("fp32", "int8"):
            raise ExportDirError(f"precision {precision!r} is not fp32 or int8")
        if threads is not None and int(threads) < 1:
            raise ExportDirError(f"threads must be >= 1, not {threads}")
        self.model_dir = Path(model_dir)
        self.manifest = read_export_manifest(self.model_dir)
        self.precision = precision
        self.session_settings = SessionSettings(threads=threads, provider=provider, spinning=spinning)
        self.embed_dim = int(self.manifest["embed_dim"])
        self.fingerprint = str(self.manifest["fingerprint"])
        if precision == "int8":
            for branch in BRANCHES:
                f = self.manifest["encoders"][branch].get("int8_file")
                if not f or not export_path(self.model_dir, f).is_file():
                    raise ExportDirError(f"{self.model_dir}: no int8 graph for the {branch} encoder "
                                         "(export with --quantize int8)")
            for rel in required_files(self.manifest, "int8"):
                if rel not in self.manifest["files"]:
                    raise ExportDirError(f"{self.model_dir / MANIFEST}: {rel} is not listed in "
                                         "files (no sha256 to verify it)")
        self._sessions: dict[str, object] = {}
        self._lock = threading.Lock()
        self._tokenizer: Tokenizer | HFTokenizer | None = None
        self._table: np.ndarray | None = None

    # -- what the manifest says ----------------------------------------------------------------
    def spec(self, branch: str) -> dict:
        """The preprocessing spec of the ``sketch`` or ``image`` input."""
        return self.manifest["encoders"][branch]["preprocess"]

    @property
    def drawing_dim(self) -> int:
        """Size of the sketch graph's drawing descriptor (0: an export from before it)."""
        drawing = self.manifest["encoders"]["sketch"].get("drawing")
        return int(drawing["dim"]) if drawing else 0

    @property
    def clip_model(self) -> str | None:
        return self.manifest.get("clip_model")

    def describe(self) -> dict:
        m = self.manifest
        return {"model_dir": str(self.model_dir.resolve()), "fingerprint": self.fingerprint,
                "clip_model": m.get("clip_model"), "embed_dim": self.embed_dim,
                "fusion_weight": m["fusion_weight"], "opset": m.get("opset"),
                "precision": self.precision, "format_version": m.get("format_version")}

    def model_record(self) -> dict:
        """What an index records about the export that built it (to refuse another one, or to
        let a query export in the same embedding space in: ``GalleryIndex.check_model``)."""
        d = self.describe()
        record = {k: d[k] for k in ("fingerprint", "clip_model", "embed_dim", "model_dir", "opset")}
        return {**record, "space": embedding_space(self.manifest)}

    def verify_files(self) -> list[str]:
        """export.json's files that are missing, not regular files, or whose sha256 differs from
        the record (empty list: all intact). Reads every file; ``verify`` raises instead."""
        return export_dir.verify_files(self.model_dir, self.manifest)

    def verify(self) -> dict:
        """Check every file export.json lists against its sha256 (``stbir-infer info --verify``).
        Returns {"files": count, "bytes": total size}; raises ExportDirError naming the bad ones."""
        bad = self.verify_files()
        if bad:
            raise ExportDirError(f"{self.model_dir}: {', '.join(bad)}: missing, or {TAMPERED}")
        files = self.manifest["files"]
        return {"files": len(files),
                "bytes": sum(export_path(self.model_dir, r).stat().st_size for r in files)}

    def read_verified(self, rel: str) -> bytes:
        """The bytes of export.json's file ``rel``, after checking them against its sha256
        (``export_dir.read_verified``)."""
        return export_dir.read_verified(self.model_dir, self.manifest, rel)

    # -- sessions --------------------------------------------------------------------------------
    def session(self, branch: str):
        with self._lock:
            sess = self._sessions.get(branch)
            if sess is None:
                sess = self._sessions[branch] = self._open(branch)
            return sess

    def _graph_name(self, branch: str) -> str:
        enc = self.manifest["encoders"][branch]
        return enc["int8_file"] if self.precision == "int8" else enc["file"]

    def graph_file(self, branch: str) -> Path:
        """The ONNX file this object runs for ``branch`` (the int8 one under precision int8)."""
        return export_path(self.model_dir, self._graph_name(branch))

    def _open(self, branch: str):
        data = self.read_verified(self._graph_name(branch))  # checked bytes, never re-read
        return open_session(data, self.session_settings, label=str(self.graph_file(branch)))

    def _run(self, branch: str, feeds: dict, drawing: bool = False) -> np.ndarray:
        """The graph's embeddings [B, D]; with ``drawing`` (the sketch graph) each row followed
        by its drawing descriptor: [B, D + drawing_dim]."""
        enc = self.manifest["encoders"][branch]
        sess = self.session(branch)
        names = [enc.get("output", GRAPH_OUTPUT)] + ([enc["drawing"]["output"]] if drawing else [])
        width = self.embed_dim + (self.drawing_dim if drawing else 0)
        try:
            outs = [np.asarray(o, np.float32) for o in sess.run(names, feeds)]
        except Exception as exc:  # noqa: BLE001 - onnxruntime's own types: a graph that does not
            # take what export.json says it takes (an edited or mismatched export)
            raise ExportDirError(f"{self.graph_file(branch)}: onnxruntime could not run it "
                                 f"({first_line(exc)})") from None
        batch = len(next(iter(feeds.values())))
        if any(o.ndim != 2 or len(o) != batch for o in outs):  # [B, 1, D] is not [B, D]
            raise ExportDirError(f"{self.graph_file(branch)}: output shapes {[o.shape for o in outs]}, "
                                 f"expected ({batch}, {width}) in all")
        out = np.concatenate(outs, axis=1) if len(outs) > 1 else outs[0]
        if out.shape != (batch, width):
            raise ExportDirError(f"{self.graph_file(branch)}: output shape {out.shape}, expected "
                                 f"({batch}, {width})")
        finite = np.isfinite(out).all(axis=1)
        if not finite.all():
            rows = np.flatnonzero(~finite).tolist()
            raise NonFiniteEmbeddingError(
                f"the {branch} encoder ({self.graph_file(branch).name}) gave NaN or Inf for "
                f"{len(rows)} of {batch} input(s)", branch=branch, rows=rows, vectors=out)
        return out

    # -- encoders --------------------------------------------------------------------------------
    def encode_pixels(self, branch: str, pixels: np.ndarray) -> np.ndarray:
        """Preprocessed float32 [B, C, S, S] -> unit vectors [B, D]."""
        return self._encode(branch, pixels, drawing=False)

    def _encode(self, branch: str, pixels: np.ndarray, drawing: bool) -> np.ndarray:
        """``encode_pixels``; with ``drawing`` (the sketch graph) each row followed by its
        drawing descriptor."""
        if branch not in ("sketch", "image"):
            raise ValueError(f"branch must be sketch or image, not {branch!r}")
        pixels = np.ascontiguousarray(pixels, np.float32)
        if pixels.shape[0] == 0:
            return np.zeros((0, self.embed_dim + (self.drawing_dim if drawing else 0)), np.float32)
        name = self.manifest["encoders"][branch]["inputs"][0]["name"]
        return self._run(branch, {name: pixels}, drawing=drawing)

    def encode_sketch_drawings(self, pixels: np.ndarray) -> np.ndarray:
        """Preprocessed sketches [B, 1, S, S] -> [B, D + drawing_dim]: each unit embedding
        followed by its drawing descriptor (the edge gallery's rows, ``stbir_infer.edge_gallery``);
        an export without a drawing output gives the embeddings alone."""
        return self._encode("sketch", pixels, drawing=self.drawing_dim > 0)

    def preprocess(self, branch: str, images: Iterable) -> np.ndarray:
        """Paths / PIL images -> float32 [B, C, S, S]; raises ImageDecodeError on a bad file."""
        spec = self.spec(branch)
        arrays = [_pre.load(im, spec) for im in images]
        if not arrays:
            s, c = int(spec["size"]), int(spec["channels"])
            return np.zeros((0, c, s, s), np.float32)
        return np.stack(arrays)

    def sketch(self, images: Sequence) -> np.ndarray:
        """Sketch files or PIL images -> unit vectors [B, D]."""
        return self.encode_pixels("sketch", self.preprocess("sketch", images))

    def image(self, images: Sequence) -> np.ndarray:
        """Photo files or PIL images -> unit vectors [B, D]."""
        return self.encode_pixels("image", self.preprocess("image", images))

    @property
    def tokenizer(self) -> Tokenizer | HFTokenizer:
        """open_clip's BPE (``stbir_infer.tokenizer``) or an HF tower's tokenizer.json
        (``stbir_infer.hf_tokenizer``), as export.json's ``tokenizer.type`` says."""
        if self._tokenizer is None:
            cfg = self.manifest["tokenizer"]
            if isinstance(cfg, dict) and cfg.get("type") == TOKENIZER_TYPE:
                self._tokenizer = HFTokenizer.from_export(cfg, read=self.read_verified)
            else:
                self._tokenizer = Tokenizer.from_export(self.model_dir, cfg, read=self.read_verified)
        return self._tokenizer

    @property
    def token_table(self) -> np.ndarray:
        if self._table is None:
            rel = self.manifest["encoders"]["text"].get("token_embedding", TOKEN_EMBEDDING)
            try:
                table = npy_from_bytes(self.read_verified(rel))
            except (OSError, ValueError, EOFError) as exc:
                raise ExportDirError(f"{self.model_dir / rel}: not a readable .npy table "
                                     f"({first_line(exc)})") from None
            if not isinstance(table, np.ndarray) or table.dtype.kind != "f":
                raise ExportDirError(f"{self.model_dir / rel}: not a float .npy table")
            if table.ndim != 2 or table.shape[0] < self.tokenizer.vocab_size:
                raise ExportDirError(f"{self.model_dir / rel}: table shape {table.shape} does not fit "
                                     f"the tokenizer's {self.tokenizer.vocab_size} tokens")
            self._table = table
        return self._table

    def text_feeds(self, texts: str | Sequence[str]) -> dict[str, np.ndarray]:
        """The text graph's inputs: table rows of the ids, and the end-of-text position where the
        graph pools (the argmax of the ids, as in open_clip) or, for a Hugging Face tower, the
        attention mask it mean-pools over. Where the export measured it exact (``trim_tokens``),
        only the tokens up to the batch's last real one are fed: "red" costs 3 positions
        instead of the context length."""
        tok = self.tokenizer
        ids = tok(texts if isinstance(texts, str) else list(texts))
        enc = self.manifest["encoders"]["text"]
        if isinstance(tok, HFTokenizer):  # mean pooling over the mask: padding never counts
            second = tok.attention_mask(ids)
            end = int(second.sum(axis=1).max()) if len(ids) else 0
        else:
            second = ids.argmax(axis=-1).astype(np.int64)
            end = int(second.max()) + 1 if len(ids) else 0
        if enc.get("trim_tokens") and len(ids):
            ids = ids[:, :end]
            second = second[:, :end] if second.ndim == 2 else second
        emb = np.ascontiguousarray(self.token_table[ids], np.float32)
        return dict(zip([i["name"] for i in enc["inputs"]], (emb, second)))

    def text(self, texts: str | Sequence[str]) -> np.ndarray:
        """Texts -> unit vectors [B, D]."""
        feeds = self.text_feeds(texts)
        rows = len(next(iter(feeds.values())))
        return self._run("text", feeds) if rows else np.zeros((0, self.embed_dim), np.float32)


__all__ = ["BRANCHES", "Encoders"]
