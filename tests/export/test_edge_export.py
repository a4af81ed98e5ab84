"""The edge preset (MobileNetV2 image tower via timm, mobilenet_v2 sketch tower) exports into the
same three graphs and verifies against torch; the runtime reads it unchanged."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from models import PRESETS, ModelSpec, build_model, save_checkpoint


@pytest.mark.slow  # about 15 s quiet (45 s on a loaded 2-core machine): make test-slow
def test_edge_preset_exports_verified_graphs_the_runtime_loads(tmp_path):
    from stbir_export import export_checkpoint
    from stbir_infer.encoders import Encoders

    torch.manual_seed(0)
    model = build_model(ModelSpec(**PRESETS["edge"])).eval()
    ckpt = save_checkpoint(tmp_path / "edge.pt", model, config={}, metrics={})
    out = tmp_path / "export"
    export_checkpoint(ckpt, out, log=lambda *a, **k: None)  # verifies against torch, or raises
    manifest = json.loads((out / "export.json").read_text())
    image = manifest["encoders"]["image"]["preprocess"]
    assert image["size"] == 96 and image["mean"] == [0.5, 0.5, 0.5] and image["std"] == [0.5, 0.5, 0.5]
    assert manifest["clip_model"] == "stbir-edge"
    enc = Encoders(out)
    x = np.random.default_rng(0).standard_normal((1, 3, 96, 96)).astype(np.float32)
    with torch.no_grad():
        ref = model.encode_image(torch.from_numpy(x)).numpy()
    assert float((enc.encode_pixels("image", x) * ref).sum()) > 0.9999
