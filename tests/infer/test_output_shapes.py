"""Issue 26, item 2: a combiner (or encoder) graph whose output is not [B, embed_dim] is refused
on every run, in one line, before its vector reaches hnswlib (output [B, 7] used to abort with
heap corruption, [B, 4096] returned garbage)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from infer_helpers import linked_export, make_photos, make_sketch, one_error_line, refingerprint, run_cli

from stbir_infer.contract import MANIFEST, file_sha256
from stbir_infer.errors import ExportDirError, QueryError
from stbir_infer.gallery import GalleryIndex
from stbir_infer.searcher import Searcher

TEXT = "a red striped star"


def _graph(manifest: dict, width: int, fill: float = 0.01) -> bytes:
    """A combiner taking export.json's inputs ([B, D] each) and giving [B, width]."""
    import onnx
    from onnx import TensorProto, helper

    entry, dim = manifest["combiner"], manifest["embed_dim"]
    names = [i["name"] for i in entry["inputs"]]
    out = entry.get("output", "embedding")
    w = helper.make_tensor("w", TensorProto.FLOAT, [dim, width], [fill] * (dim * width))
    graph = helper.make_graph(
        [helper.make_node("Add", names, ["sum"]), helper.make_node("MatMul", ["sum", "w"], [out])],
        "combiner", [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", dim])
                     for n in names],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["batch", width])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


@pytest.fixture(scope="module")
def gallery(tmp_path_factory, combiner_export):
    tmp = tmp_path_factory.mktemp("shapes")
    items = make_photos(tmp / "photos", [f"p{i}.png" for i in range(6)])
    Searcher(combiner_export[0], tmp / "idx").enroll(tmp / "photos")
    return tmp, make_sketch(tmp / "sketch.png", items["p2.png"])


def _export_with(combiner_export, tmp_path, graph: bytes):
    export = linked_export(combiner_export[0], tmp_path / "export")
    (export / "combiner.onnx").unlink()  # a hard link: writing through it would change the original
    (export / "combiner.onnx").write_bytes(graph)
    m = json.loads((export / MANIFEST).read_text())
    m["files"] = {k: file_sha256(export / k) for k in m["files"]}  # the checksum proves nothing
    (export / MANIFEST).write_text(json.dumps(refingerprint(m)))  # nor does the fingerprint
    return export, m


@pytest.mark.parametrize("width", [7, 4096])
def test_a_combiner_of_another_output_width_is_one_line_exit_2(combiner_export, gallery, tmp_path,
                                                               width):
    tmp, sketch = gallery
    manifest = json.loads((combiner_export[0] / MANIFEST).read_text())
    export, _ = _export_with(combiner_export, tmp_path, _graph(manifest, width))
    with pytest.raises(ExportDirError, match=f"output shape \\(1, {width}\\)"):
        Searcher(export, tmp / "idx").query(sketch=sketch, text=TEXT)
    # the CLI in a child: a heap corruption would be a signal, not an exit status
    proc = subprocess.run([sys.executable, "-m", "stbir_infer", "query", "--model", str(export),
                           "--index", str(tmp / "idx"), "--sketch", str(sketch), "--text", TEXT],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and one_error_line(proc.stderr), (proc.returncode, proc.stderr)
    assert "combiner" in proc.stderr


def test_a_combiner_of_the_right_width_still_answers(combiner_export, gallery, tmp_path):
    tmp, sketch = gallery
    manifest = json.loads((combiner_export[0] / MANIFEST).read_text())
    export, _ = _export_with(combiner_export, tmp_path, _graph(manifest, manifest["embed_dim"]))
    hits = Searcher(export, tmp / "idx").query(sketch=sketch, text=TEXT)
    assert hits and all(np.isfinite(h.score) for h in hits)


def test_the_gallery_refuses_a_query_or_vectors_of_another_size(tmp_path):
    g = GalleryIndex.create(dim=8, model={"fingerprint": "f" * 64})
    with pytest.raises(ValueError):
        g.add_vectors(np.ones((1, 7), np.float32), ["a"])
    with pytest.raises(ValueError):
        g.add_vectors(np.full((1, 8), np.nan, np.float32), ["a"])
    v = np.ones((1, 8), np.float32) / np.sqrt(8)
    g.add_vectors(v, ["a"])
    for bad in (np.ones(7), np.ones(4096), np.full(8, np.inf)):
        with pytest.raises(QueryError):
            g.search(bad, 1)
    assert g.search(v[0], 1)[0][0] == 0


def test_an_encoder_of_another_output_width_is_one_line_exit_2(small_export, tmp_path):
    """The encoders' own check (Encoders._run), pinned: a sketch graph giving [B, 7]."""
    from onnx import TensorProto, helper

    export = linked_export(small_export, tmp_path / "export")
    m = json.loads((export / MANIFEST).read_text())
    enc = m["encoders"]["sketch"]
    name, shape = enc["inputs"][0]["name"], enc["inputs"][0]["shape"]
    out = enc.get("output", "embedding")
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", [name], ["m"], axes=[2, 3], keepdims=0),
         helper.make_node("Tile", ["m", "reps"], [out])], "sketch",
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", *shape[1:]])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["batch", 7])],
        [helper.make_tensor("reps", TensorProto.INT64, [2], [1, 7])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    (export / enc["file"]).unlink()  # a hard link (linked_export)
    (export / enc["file"]).write_bytes(model.SerializeToString())
    m["files"] = {k: file_sha256(export / k) for k in m["files"]}
    (export / MANIFEST).write_text(json.dumps(refingerprint(m)))
    photos = tmp_path / "photos"
    items = make_photos(photos, ["a.png", "b.png"])
    Searcher(small_export, tmp_path / "idx").enroll(photos)
    sketch = make_sketch(tmp_path / "s.png", items["a.png"])
    r = run_cli("query", "--model", export, "--index", tmp_path / "idx", "--sketch", sketch)
    assert r.exit_code == 2 and one_error_line(r.stderr) and "output shape" in r.stderr, r.stderr
