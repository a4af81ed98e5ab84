"""Query fusion and score thresholds at run time (export.json's ``fusion``, ``combiner`` and
``score_threshold``; exports without them get the weighted mean and no "auto" threshold).

Fusion of a sketch vector ``s`` and a text vector ``t`` with sketch weight ``w`` in [0, 1]
(``w`` None: the export's default, picked on validation at training time):

- weighted mean (no Combiner in the export): normalize(w * s + (1 - w) * t);
- Combiner (``combiner.onnx``): at the default weight ``w0`` the Combiner's vector ``c``; above it
  an interpolation toward the sketch-only vector, ``normalize((1 - a) c + a s)`` with
  ``a = (w - w0) / (1 - w0)``; below it toward the text-only vector with ``a = (w0 - w) / w0``.
  So ``w = 1`` is exactly the sketch-only query and ``w = 0`` the text-only one, as for the mean.

An example photo (``--image``, "more like this") is mixed into that vector with its own weight
(``Fusion.query``). A query's mode names its inputs (``sketch``, ``text``, ``sketch+text``,
``image``, ``image+text``...: ``query_spec.mode_of``); the export's thresholds are per mode
(sketch-only scores sit lower than fused ones), calibrated on validation at the default weight;
modes with a photo have none (a photo's own neighbours score far above any text or sketch).
"""

from __future__ import annotations

import math
import threading

import numpy as np

from stbir_infer.contract import COMBINER_INPUTS, GRAPH_OUTPUT, MANIFEST, QUERY_NEEDS_INPUT
from stbir_infer.errors import ExportDirError, QueryError, first_line
from stbir_infer.query_spec import AUTO, check_weight, parse_min_score
from stbir_infer.session import open_session

# The example photo's share in a photo + text (or + sketch) query: picked on Flickr8k validation
# by benchmarks/image_weight.py (results/image_weight.json).
DEFAULT_IMAGE_WEIGHT = 0.5


def _normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class Fusion:
    """The export's fusion (weighted mean or Combiner graph) and its score thresholds."""

    def __init__(self, encoders):
        self.encoders = encoders
        m = encoders.manifest
        where = encoders.model_dir / MANIFEST
        self.embed_dim = int(encoders.embed_dim)
        fusion = m.get("fusion") if isinstance(m.get("fusion"), dict) else {}
        self.default_weight = check_weight(fusion.get("default_weight", m["fusion_weight"]))
        self.entry = m.get("combiner")
        self.method = "combiner" if self.entry is not None else "weighted_mean"
        self.thresholds = self._thresholds(m.get("score_threshold"), where)
        self._session = None
        self._lock = threading.Lock()
        if self.entry is not None:
            self._check_entry(where)
            self.session()  # small; opened now so a graph that does not fit fails at load

    def _check_entry(self, where) -> None:
        e = self.entry
        if not isinstance(e, dict) or not isinstance(e.get("file"), str) or \
                not isinstance(e.get("inputs"), list) or len(e["inputs"]) != len(COMBINER_INPUTS):
            raise ExportDirError(f"{where}: combiner entry is incomplete (file, two inputs)")
        for spec in e["inputs"]:
            shape = spec.get("shape") if isinstance(spec, dict) else None
            if not isinstance(shape, list) or len(shape) != 2 or shape[1] != self.embed_dim:
                name = spec.get("name") if isinstance(spec, dict) else spec
                raise ExportDirError(f"{where}: the combiner's input {name!r} "
                                     f"has shape {shape}, but the encoders give {self.embed_dim}-d vectors")

    @staticmethod
    def _thresholds(rec, where) -> dict | None:
        if rec is None:
            return None
        modes = rec.get("modes") if isinstance(rec, dict) else None
        if not isinstance(modes, dict) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                for v in modes.values()):
            raise ExportDirError(f"{where}: score_threshold.modes is not a map of mode to number")
        return {**rec, "modes": {k: float(v) for k, v in modes.items()}}

    def session(self):
        with self._lock:
            if self._session is None:
                self._session = self._open()
            return self._session

    def _open(self):
        enc = self.encoders
        path = enc.model_dir / self.entry["file"]
        data = enc.read_verified(self.entry["file"])  # checked against export.json's sha256
        sess = open_session(data, enc.session_settings, label=str(path))
        got = [i.shape[-1] if i.shape else None for i in sess.get_inputs()]
        if len(got) != len(COMBINER_INPUTS) or any(d != self.embed_dim for d in got):
            raise ExportDirError(f"{path}: the combiner takes inputs of size {got}, but the "
                                 f"encoders give {self.embed_dim}-d vectors")
        return sess

    def combiner(self, sketch: np.ndarray, text: np.ndarray) -> np.ndarray:
        s = np.asarray(sketch, np.float32).reshape(-1, self.embed_dim)
        t = np.asarray(text, np.float32).reshape(-1, self.embed_dim)
        names = [i["name"] for i in self.entry["inputs"]]
        path = self.encoders.model_dir / self.entry["file"]
        try:
            out = np.asarray(self.session().run([self.entry.get("output", GRAPH_OUTPUT)],
                                                {names[0]: s, names[1]: t})[0], np.float32)
        except (ExportDirError, QueryError):
            raise
        except Exception as exc:  # noqa: BLE001 - onnxruntime's own types (an edited graph)
            raise ExportDirError(f"{path}: onnxruntime could not run it ({first_line(exc)})") from None
        if out.shape != s.shape:  # a wrong width would reach hnswlib as a query of another dim
            raise ExportDirError(f"{path}: the combiner gave output shape {out.shape}, expected "
                                 f"{s.shape}")
        if not np.isfinite(out).all():
            raise QueryError("the combiner gave NaN or Inf for this query")
        return _normalize(out)

    def combine(self, sketch: np.ndarray | None, text: np.ndarray | None,
                weight: float | None = None) -> np.ndarray:
        """One query vector [D], or a batch [B, D] of them (see the module's docstring); one
        half alone is the query."""
        weight = check_weight(weight)
        if sketch is None and text is None:
            raise QueryError(QUERY_NEEDS_INPUT)
        if sketch is None or text is None:
            return np.asarray(text if sketch is None else sketch, np.float32)
        s, t = np.asarray(sketch, np.float32), np.asarray(text, np.float32)
        w0 = self.default_weight
        w = w0 if weight is None else weight
        if self.entry is None:
            return _normalize(w * s + (1 - w) * t)
        c = self.combiner(s, t).reshape(s.shape)
        if w > w0:
            a = (w - w0) / max(1 - w0, 1e-12)
            return _normalize((1 - a) * c + a * s)
        if w < w0:
            a = (w0 - w) / max(w0, 1e-12)
            return _normalize((1 - a) * c + a * t)
        return c

    def query(self, sketch: np.ndarray | None, text: np.ndarray | None,
              image: np.ndarray | None = None, sketch_weight: float | None = None,
              image_weight: float | None = None) -> np.ndarray:
        """One query vector [D] from any of the three inputs: sketch and text fused by
        ``combine``, then an example photo's image-tower vector mixed in with ``image_weight``
        (None: ``DEFAULT_IMAGE_WEIGHT``): normalize((1 - wi) q + wi img). The photo vectors
        of the index come from the same tower, so a photo alone is its own exact query."""
        if image is None:
            return self.combine(sketch, text, sketch_weight)
        img = np.asarray(image, np.float32)
        if sketch is None and text is None:
            return img
        w = check_weight(image_weight, "image_weight")
        w = DEFAULT_IMAGE_WEIGHT if w is None else w
        return _normalize((1 - w) * self.combine(sketch, text, sketch_weight) + w * img)

    def min_score(self, value, mode: str) -> float | None:
        """The score a hit must reach: None (keep all), a number, or "auto" -> the export's
        validation threshold for the query's mode (QueryError when the export has none)."""
        value = parse_min_score(value)
        if value != AUTO:
            return value
        if self.thresholds is None or mode not in self.thresholds["modes"]:
            raise QueryError("min_score auto: this export has no score threshold for "
                             f"{mode} queries (export a checkpoint trained with validation, or "
                             "give a number)")
        return self.thresholds["modes"][mode]

    def describe(self) -> dict:
        out = {"method": self.method, "default_weight": self.default_weight}
        if self.thresholds is not None:
            out["score_threshold"] = {"far": self.thresholds.get("far"),
                                      "modes": self.thresholds["modes"]}
        return out


__all__ = ["DEFAULT_IMAGE_WEIGHT", "Fusion"]
