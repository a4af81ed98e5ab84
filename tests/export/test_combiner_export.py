"""combiner.onnx: a fourth verified graph, written only when the checkpoint's fusion is the Combiner."""

import types

import numpy as np
import pytest
import torch

from models import load_model
from models.combiner import Combiner
from stbir_export import combiner as C
from stbir_export.errors import ExportError
from stbir_export.verify import MAX_ABS_DIFF, MIN_COSINE, session
from stbir_infer.contract import COMBINER_FILE, COMBINER_FORMAT_VERSION, SUPPORTED_EXPORT_VERSIONS


def test_the_combiner_graph_matches_torch_to_the_export_tolerance(combiner_export):
    out, manifest, ckpt = combiner_export
    check = manifest["verification"]["combiner"]
    assert check["min_cosine"] >= MIN_COSINE and check["max_abs_diff"] <= MAX_ABS_DIFF
    assert check["reference_min_cosine"] >= MIN_COSINE and check["batch_sizes"] == [1, 4]
    model, _ = load_model(ckpt)  # and again, independently, on other inputs
    g = torch.Generator().manual_seed(7)
    s, t = (torch.nn.functional.normalize(torch.randn(9, 128, generator=g), dim=-1) for _ in range(2))
    got = session(out / COMBINER_FILE).run(None, {"sketch": s.numpy(), "text": t.numpy()})[0]
    with torch.no_grad():
        want = model.combiner(s, t).numpy()
    assert np.abs(got - want).max() <= MAX_ABS_DIFF
    fused = torch.nn.functional.normalize(0.6 * s + 0.4 * t, dim=-1).numpy()
    assert np.abs(got - fused).max() > 1e-3  # a real Combiner, not the mean in disguise


def test_export_json_says_which_fusion_and_carries_the_threshold(combiner_export):
    out, manifest, _ = combiner_export
    assert manifest["format_version"] == COMBINER_FORMAT_VERSION in SUPPORTED_EXPORT_VERSIONS
    assert manifest["fusion"]["method"] == "combiner" and manifest["fusion"]["default_weight"] == 0.6
    assert manifest["fusion_weight"] == 0.6
    assert manifest["combiner"]["inputs"][0]["shape"] == ["batch", 128]
    assert COMBINER_FILE in manifest["files"] and (out / COMBINER_FILE).is_file()
    assert manifest["score_threshold"]["far"] == 1e-3
    assert manifest["score_threshold"]["modes"] == {"sketch": 0.2, "text": 0.2, "sketch+text": 0.2}


def test_fusion_choice_follows_the_checkpoint_unless_forced():
    with_c = types.SimpleNamespace(combiner=Combiner(8))
    assert C.method_for(with_c, "auto") == "weighted_mean"  # validation did not prefer it
    with_c.combiner.preferred.fill_(1.0)
    assert C.method_for(with_c, "auto") == "combiner" and C.method_for(with_c, "mean") == "weighted_mean"
    with pytest.raises(ExportError, match="has no Combiner"):
        C.method_for(types.SimpleNamespace(combiner=None), "combiner")
    assert C.threshold_entry({}, 1e-3) is None  # an old checkpoint: no threshold, still exports
    with pytest.raises(ExportError, match="thresholds at FAR 0.01"):
        C.threshold_entry({"score_thresholds": {"modes": {"sketch": {"0.01": 0.5}}}}, 1e-3)
