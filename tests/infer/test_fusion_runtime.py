"""Query fusion at run time: the Combiner when the export has one, per-query sketch weight,
score thresholds ("no match"), and the one-line refusals of bad values."""

from __future__ import annotations

import json
import shutil
import types

import numpy as np
import pytest
from infer_helpers import make_photos, make_sketch, one_error_line, refingerprint, run_cli

from stbir_infer.contract import MANIFEST, file_sha256
from stbir_infer.errors import ExportDirError, QueryError
from stbir_infer.searcher import Searcher

TEXT = "a red striped star"


@pytest.fixture(scope="module")
def setup(tmp_path_factory, small_export, combiner_export):
    tmp = tmp_path_factory.mktemp("fusion")
    items = make_photos(tmp / "photos", [f"p{i}.png" for i in range(8)])
    sketch = make_sketch(tmp / "sketch.png", items["p3.png"])
    out = {"sketch": sketch, "tmp": tmp}
    for name, export in (("mean", small_export), ("combiner", combiner_export[0])):
        Searcher(export, tmp / f"idx-{name}").enroll(tmp / "photos")
        out[name] = Searcher(export, tmp / f"idx-{name}")
    return out


def _ranked(hits):
    return [(h.path, round(h.score, 5)) for h in hits]


def test_the_runtime_picks_the_combiner_when_the_export_has_one(setup):
    mean, comb = setup["mean"], setup["combiner"]
    assert mean.fusion.method == "weighted_mean" and comb.fusion.method == "combiner"
    assert comb.fusion_weight == 0.6 and comb.info()["export"]["fusion"]["method"] == "combiner"
    enc = comb.encoders
    s, t = enc.sketch([setup["sketch"]])[0], enc.text([TEXT])[0]
    c = comb.fusion.combiner(s, t)[0]
    np.testing.assert_allclose(comb.fusion.combine(s, t), c, atol=1e-6)
    assert np.abs(c - comb.fusion.combine(s, t, 0.6001)).max() < 1e-2  # continuous at the default
    w = 0.6 * s + 0.4 * t
    assert np.abs(c - w / np.linalg.norm(w)).max() > 1e-3  # not the weighted mean
    hits = comb.query(sketch=setup["sketch"], text=TEXT, top_k=8)
    assert _ranked(hits) == _ranked(comb.search(c, top_k=8))


@pytest.mark.parametrize("which", ["mean", "combiner"])
def test_sketch_weight_1_is_sketch_only_and_0_is_text_only(setup, which):
    s = setup[which]
    sk = setup["sketch"]
    assert _ranked(s.query(sketch=sk, text=TEXT, top_k=8, sketch_weight=1)) == \
        _ranked(s.query(sketch=sk, top_k=8))
    assert _ranked(s.query(sketch=sk, text=TEXT, top_k=8, sketch_weight=0)) == \
        _ranked(s.query(text=TEXT, top_k=8))
    if which == "mean":  # the weight replaces the default: normalize(w s + (1 - w) t)
        enc = s.encoders
        v = 0.3 * enc.sketch([sk])[0] + 0.7 * enc.text([TEXT])[0]
        assert _ranked(s.query(sketch=sk, text=TEXT, top_k=8, sketch_weight=0.3)) == \
            _ranked(s.search(v / np.linalg.norm(v), top_k=8))
    for bad in (2, -0.1, float("nan"), "0.5", True):
        with pytest.raises(QueryError, match="sketch_weight"):
            s.query(sketch=sk, text=TEXT, sketch_weight=bad)


def test_min_score_keeps_only_hits_at_or_above_it(setup, tmp_path):
    s = setup["combiner"]
    hits = s.query(sketch=setup["sketch"], text=TEXT, top_k=8)
    cut = hits[2].score
    assert _ranked(s.query(sketch=setup["sketch"], text=TEXT, top_k=8, min_score=cut)) == _ranked(hits[:3])
    assert s.min_score_for("auto", sketch=setup["sketch"]) == 0.2  # the export's, per mode
    with pytest.raises(QueryError, match="no score threshold"):
        setup["mean"].query(text=TEXT, min_score="auto")  # an export without one
    common = ["--model", s.encoders.model_dir, "--index", s.index_dir, "--sketch", setup["sketch"],
              "--text", TEXT]
    res = run_cli("query", *common, "--min-score", "1.5")
    assert res.exit_code == 0 and res.stdout.strip() == "no match above 1.5000"
    res = run_cli("query", *common, "--min-score", "1.5", "--json")
    data = json.loads(res.stdout)
    assert res.exit_code == 0 and data["results"] == [] and data["query"]["min_score"] == 1.5
    res = run_cli("query", *common, "--min-score", "auto", "--json", "--sketch-weight", "0.25")
    data = json.loads(res.stdout)
    assert data["query"]["min_score"] == 0.2 and data["query"]["fusion_weight"] == 0.25
    assert data["query"]["fusion"] == "combiner" and all(r["score"] >= 0.2 for r in data["results"])


@pytest.mark.parametrize("args, words", [
    (["--sketch-weight", "2"], "--sketch-weight"), (["--min-score", "abc"], "--min-score"),
    (["--min-score", "nan"], "--min-score")])
def test_bad_values_are_one_line_and_exit_2(setup, args, words):
    s = setup["mean"]
    res = run_cli("query", "--model", s.encoders.model_dir, "--index", s.index_dir,
                  "--text", TEXT, *args)
    assert res.exit_code == 2 and one_error_line(res.stderr) and words in res.stderr, res.stderr
    res = run_cli("query", "--model", s.encoders.model_dir, "--index", s.index_dir,
                  "--text", TEXT, "--min-score", "auto")  # no threshold in this export
    assert res.exit_code == 2 and one_error_line(res.stderr) and "no score threshold" in res.stderr


def _rewrite(export, edit):
    m = json.loads((export / MANIFEST).read_text())
    edit(m)
    m["files"] = {k: file_sha256(export / k) for k in m["files"]}
    (export / MANIFEST).write_text(json.dumps(refingerprint(m)))


@pytest.mark.parametrize("where", ["manifest", "graph"])
def test_a_combiner_of_another_size_is_refused_in_one_line(combiner_export, tmp_path, where):
    import torch  # the test builds the wrong graph; the runtime under test stays torch-free

    from models.combiner import Combiner
    from stbir_export.combiner import export_raw

    export = tmp_path / "export"
    shutil.copytree(combiner_export[0], export)
    if where == "manifest":
        _rewrite(export, lambda m: m["combiner"]["inputs"][0].update(shape=["batch", 64]))
    else:  # export.json still says 128; the graph itself takes 64
        torch.manual_seed(0)
        fake = types.SimpleNamespace(combiner=Combiner(64), embed_dim=64, eval=lambda: None)
        (export / "combiner.onnx").write_bytes(export_raw(fake, 17).SerializeToString())
        _rewrite(export, lambda m: None)
    with pytest.raises(ExportDirError, match="128-d"):
        Searcher(export, tmp_path / "idx")
    res = run_cli("query", "--model", export, "--index", tmp_path / "idx", "--text", TEXT)
    assert res.exit_code == 2 and one_error_line(res.stderr) and "combiner" in res.stderr


def test_an_export_from_before_fusion_keys_still_loads(small_export, tmp_path):
    export = tmp_path / "old"
    shutil.copytree(small_export, export)
    m = json.loads((export / MANIFEST).read_text())
    for key in ("fusion", "combiner", "score_threshold"):
        m.pop(key, None)
    (export / MANIFEST).write_text(json.dumps(m))
    s = Searcher(export, tmp_path / "idx")
    assert m["format_version"] == 1 and s.fusion.method == "weighted_mean"
    assert s.fusion_weight == m["fusion_weight"] and s.fusion.thresholds is None
