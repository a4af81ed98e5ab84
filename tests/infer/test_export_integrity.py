"""Issue 13.5: a tampered or malformed export is refused before a native library or numpy reads
it, and no NaN/Inf vector ever leaves the encoders."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stbir_infer.contract import fingerprint
from stbir_infer.encoders import Encoders
from stbir_infer.errors import ExportDirError, NonFiniteEmbeddingError, QueryError

TAMPERED = "sha256 does not match export.json"
PHOTO = Image.new("RGB", (64, 64), (200, 40, 40))
SKETCH = Image.new("L", (64, 64), 255)


def _link_or_copy(src, dst):
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def clone(src: Path, dst: Path) -> Path:
    """A copy of the export whose files are hard links (cheap). Only ever change a file through
    ``replace`` (unlink, then write), so the shared fixture is never modified."""
    shutil.copytree(src, dst, copy_function=_link_or_copy)
    return dst


def replace(path: Path, data: bytes) -> None:
    path.unlink()
    path.write_bytes(data)


def edit_manifest(export: Path, change, *, refingerprint: bool = True) -> dict:
    """Apply ``change`` to export.json; the fingerprint is then recomputed from the files map (as
    whoever rewrote a file and its sha256 would), unless ``refingerprint`` is False."""
    manifest = json.loads((export / "export.json").read_text())
    change(manifest)
    if refingerprint and isinstance(manifest.get("files"), dict):
        manifest["fingerprint"] = fingerprint(manifest["files"])
    replace(export / "export.json", json.dumps(manifest).encode())
    return manifest


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def nan_in_weights(graph: bytes) -> bytes:
    """The same graph, same size, with NaN written over the start of its largest weight."""
    import onnx

    model = onnx.load_from_string(graph)
    raw = max((t.raw_data for t in model.graph.initializer), key=len)
    at = graph.find(raw[:256])
    assert at > 0 and len(raw) >= 64
    nan = np.full(16, np.nan, np.float32).tobytes()
    out = graph[:at] + nan + graph[at + len(nan):]
    assert len(out) == len(graph) and out != graph
    return out


def test_flipped_bytes_in_a_graph_are_refused_at_first_use(small_export, tmp_path):
    ex = clone(small_export, tmp_path / "ex")
    graph = ex / "image_encoder.onnx"
    replace(graph, nan_in_weights(graph.read_bytes()))
    enc = Encoders(ex, threads=1)  # opening reads no graph
    with pytest.raises(ExportDirError, match=TAMPERED) as info:
        enc.image([PHOTO])
    assert "image_encoder.onnx" in str(info.value) and "\n" not in str(info.value)
    assert enc.sketch([SKETCH]).shape == (1, enc.embed_dim)  # the intact graphs still work
    assert enc.verify_files() == ["image_encoder.onnx"]
    with pytest.raises(ExportDirError, match="image_encoder.onnx"):
        enc.verify()
    assert Encoders(small_export).verify() == {"files": 5, "bytes": pytest.approx(
        sum(p.stat().st_size for p in small_export.rglob("*") if p.is_file()
            and p.name != "export.json"))}


def test_in_place_change_after_a_verified_load_is_caught(small_export, tmp_path):
    """The per-process cache of verified files keys on ctime too: restoring mtime does not hide
    an in-place rewrite."""
    ex = tmp_path / "ex"
    shutil.copytree(small_export, ex)  # real copies: this test writes in place
    first = Encoders(ex, threads=1)
    first.image([PHOTO])
    graph = ex / "image_encoder.onnx"
    st = graph.stat()
    bad = nan_in_weights(graph.read_bytes())
    with open(graph, "r+b") as f:
        f.write(bad)
    os.utime(graph, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert graph.stat().st_mtime_ns == st.st_mtime_ns and graph.stat().st_size == st.st_size
    with pytest.raises(ExportDirError, match=TAMPERED):
        Encoders(ex, threads=1).image([PHOTO])


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
def test_files_outside_the_export_folder_are_refused(small_export, tmp_path, how):
    ex = clone(small_export, tmp_path / "ex")
    data = (ex / "image_encoder.onnx").read_bytes()
    outside = tmp_path / "outside.onnx"
    outside.write_bytes(data)
    if how == "symlink":
        (ex / "image_encoder.onnx").unlink()
        (ex / "image_encoder.onnx").symlink_to(outside)
    else:
        name = "../outside.onnx" if how == "dotdot" else str(outside)

        def point_outside(m):
            m["encoders"]["image"]["file"] = name
            m["files"][name] = m["files"].pop("image_encoder.onnx")

        edit_manifest(ex, point_outside)
    with pytest.raises(ExportDirError, match="export folder") as info:
        Encoders(ex, threads=1).image([PHOTO])
    assert "\n" not in str(info.value)


def test_a_file_the_runtime_needs_must_be_listed(small_export, tmp_path):
    ex = clone(small_export, tmp_path / "ex")
    edit_manifest(ex, lambda m: m["files"].pop("token_embedding.npy"))
    with pytest.raises(ExportDirError, match="token_embedding.npy is not listed"):
        Encoders(ex, threads=1)
    edit_manifest(ex, lambda m: m.pop("files"))
    with pytest.raises(ExportDirError, match="files"):
        Encoders(ex, threads=1)


class _Payload:
    """Unpickling this would create ``marker``: proof that a pickle was executed."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_token_table_is_verified_before_numpy_parses_it(small_export, tmp_path, monkeypatch):
    ex = clone(small_export, tmp_path / "ex")
    marker = tmp_path / "unpickled"
    evil = pickle.dumps(_Payload(marker))
    replace(ex / "token_embedding.npy", evil)
    parsed = []
    real_load = np.load
    monkeypatch.setattr(np, "load", lambda *a, **k: parsed.append(a) or real_load(*a, **k))
    with pytest.raises(ExportDirError, match=TAMPERED) as info:
        Encoders(ex, threads=1).text(["a red star"])
    assert "token_embedding.npy" in str(info.value)
    assert parsed == [] and not marker.exists()
    # export.json rewritten to match (whoever changed the table changed the manifest too):
    # still refused, as not a .npy table, and the pickle never runs.
    edit_manifest(ex, lambda m: m["files"].update({"token_embedding.npy": sha(evil)}))
    with pytest.raises(ExportDirError, match="not a readable .npy"):
        Encoders(ex, threads=1).text(["a red star"])
    assert not marker.exists()
    # A real .npy of objects (pickled inside) likewise.
    import io

    buf = io.BytesIO()
    np.save(buf, np.array([_Payload(marker), 1], dtype=object), allow_pickle=True)
    replace(ex / "token_embedding.npy", buf.getvalue())
    edit_manifest(ex, lambda m: m["files"].update({"token_embedding.npy": sha(buf.getvalue())}))
    with pytest.raises(ExportDirError, match="not a readable .npy"):
        Encoders(ex, threads=1).text(["a red star"])
    assert not marker.exists()


def nan_graph(input_name: str, channels: int, dim: int) -> bytes:
    """A valid ONNX graph [B, C, S, S] -> [B, dim] whose every output is NaN (0 / 0)."""
    import onnx
    from onnx import TensorProto, helper

    zeros = helper.make_tensor("w", TensorProto.FLOAT, [channels, dim], [0.0] * (channels * dim))
    nodes = [helper.make_node("ReduceMean", [input_name], ["m"], axes=[2, 3], keepdims=0),
             helper.make_node("MatMul", ["m", "w"], ["z"]),
             helper.make_node("Div", ["z", "z"], ["embedding"])]
    graph = helper.make_graph(
        nodes, "nan", [helper.make_tensor_value_info(input_name, TensorProto.FLOAT,
                                                     ["batch", channels, 64, 64])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", dim])], [zeros])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def test_nan_from_a_graph_is_refused(small_export, tmp_path):
    ex = clone(small_export, tmp_path / "ex")
    enc = Encoders(small_export, threads=1)
    data = nan_graph("pixels", 1, enc.embed_dim)
    replace(ex / "sketch_encoder.onnx", data)
    edit_manifest(ex, lambda m: m["files"].update({"sketch_encoder.onnx": sha(data)}))
    bad = Encoders(ex, threads=1)
    with pytest.raises(NonFiniteEmbeddingError) as info:
        bad.sketch([SKETCH, SKETCH])
    assert info.value.branch == "sketch" and info.value.rows == [0, 1]
    assert isinstance(info.value, QueryError) and info.value.exit_code == 2
    with pytest.raises(QueryError, match="NaN"):
        bad.sketch([SKETCH])
    assert np.isfinite(bad.text(["a red star"])).all()  # the text half is intact


def test_one_non_finite_row_names_that_row(small_export, monkeypatch):
    """A batch caller (enroll) learns which rows to skip and gets the finite ones."""
    enc = Encoders(small_export, threads=1)
    real = enc.session("image")

    class HalfBroken:
        def run(self, names, feeds):
            out = real.run(names, feeds)[0].copy()
            out[1, 3] = np.inf
            return [out]

    monkeypatch.setitem(enc._sessions, "image", HalfBroken())
    with pytest.raises(NonFiniteEmbeddingError) as info:
        enc.image([PHOTO, PHOTO, PHOTO])
    err = info.value
    assert err.rows == [1] and err.vectors.shape == (3, enc.embed_dim)
    assert np.isfinite(err.vectors[[0, 2]]).all()

