"""Model construction: presets, weights sources and their errors (no downloads, ever)."""

import logging
import os
import subprocess
import sys

import pytest
import torch

from models import ModelError, ModelSpec, build_model


def test_small_preset_outputs_unit_vectors_in_one_space():
    m = build_model(ModelSpec()).eval()
    with torch.no_grad():
        s = m.encode_sketch(torch.randn(2, 1, 64, 64))
        i = m.encode_image(torch.randn(2, 3, 64, 64))
        t = m.encode_text(m.tokenizer()(["red", "a blue striped star"]))
    for v in (s, i, t):
        assert v.shape == (2, 128)
        assert torch.allclose(v.norm(dim=-1), torch.ones(2), atol=1e-5)


@pytest.mark.parametrize("backbone, taps, dim", [
    ("resnet18", ("layer3", "layer4"), 4 * (256 + 512)),
    ("mobilenet_v2", ("features.13", "features.16"), 4 * (96 + 160)),  # stride 16, 32 (160 ch)
    ("mobilenet_v3_small", ("features.8", "features.10"), 4 * (48 + 96)),
])
def test_the_drawing_descriptor_taps_two_mid_level_maps(backbone, taps, dim):
    """The sketch tower's drawing descriptor: a stride-16 and a stride-32 feature map, each
    pooled to a 2x2 grid and unit-normalised, joined: one pass with the embedding, unit length,
    and a dot product of two descriptors is the mean of the two maps' cosines."""
    import torch.nn.functional as F

    from models.towers import DRAWING_GRID, SketchEncoder

    torch.manual_seed(0)
    enc = SketchEncoder(backbone, 32).eval()
    names = {m: n for n, m in enc.backbone.named_modules()}
    assert tuple(names[m] for m in enc.taps) == taps and enc.drawing_dim == dim
    # the probe pass that finds the strides ran in eval mode: BatchNorm statistics untouched
    assert all(float(m.running_mean.abs().max()) == 0 for m in enc.modules()
               if isinstance(m, torch.nn.BatchNorm2d))
    x = torch.randn(3, 1, 96, 96)
    with torch.no_grad():
        emb, drawing = enc.with_drawing(x)
        assert torch.allclose(emb, enc(x), atol=1e-6) and drawing.shape == (3, dim)
        assert torch.allclose(drawing.norm(dim=-1), torch.ones(3), atol=1e-5)
        maps = []
        hooks = [m.register_forward_hook(lambda _m, _i, out: maps.append(out)) for m in enc.taps]
        enc(x)
        for h in hooks:
            h.remove()
    parts = [F.normalize(F.adaptive_avg_pool2d(f, DRAWING_GRID).flatten(1), dim=-1) for f in maps]
    want = sum(p[0] @ p[1] for p in parts) / 2
    assert float(drawing[0] @ drawing[1]) == pytest.approx(float(want), abs=1e-5)
    assert not any(enc._forward_hooks for enc in enc.taps)  # with_drawing removed its hooks


@pytest.mark.parametrize("spec, message", [
    (dict(pretrained="/no/such/weights.pt"), "pretrained: weights file /no/such/weights.pt does not exist"),
    (dict(pretrained="laion2b"), "is not an open_clip tag for stbir-small"),
    (dict(sketch_pretrained="/no/such/resnet.pth"), "sketch_pretrained: weights file /no/such/resnet.pth"),
    (dict(sketch_backbone="vgg11"), "sketch_backbone 'vgg11' is not one of"),
    (dict(clip_model="nope"), "clip_model 'nope' is not an open_clip architecture"),
])
def test_bad_weights_or_names_are_clear_errors(spec, message):
    with pytest.raises(ModelError, match=message.replace(".", r"\.").replace("(", r"\(")):
        build_model(ModelSpec(**spec))


def test_local_weights_file_is_loaded(tmp_path):
    torch.manual_seed(3)
    source = build_model(ModelSpec())
    torch.save(source.clip.state_dict(), tmp_path / "clip.pt")
    loaded = build_model(ModelSpec(pretrained=str(tmp_path / "clip.pt")))
    assert torch.equal(loaded.clip.visual.attnpool.c_proj.weight, source.clip.visual.attnpool.c_proj.weight)


def test_uncached_open_clip_tag_fails_fast_offline(tmp_path):
    """A real tag whose weights are not in the (empty) cache: an error, not a download or a hang."""
    code = ("from models import ModelSpec, build_model, ModelError\n"
            "try:\n    build_model(ModelSpec(clip_model='ViT-B-32', pretrained='openai'))\n"
            "except ModelError as e:\n    print('ERR', e)\n")
    env = {**os.environ, "HF_HOME": str(tmp_path), "XDG_CACHE_HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert "ERR pretrained: weights ViT-B-32/openai are not available offline" in proc.stdout, proc.stderr[-1000:]


def test_build_model_leaves_the_callers_logging_and_hub_settings_alone(tmp_path):
    """A fresh process (open_clip and huggingface_hub imported for the first time inside)."""
    code = (
        "import logging, os\n"
        "logging.disable(logging.INFO)\n"
        "from models import ModelSpec, build_model\n"
        "build_model(ModelSpec())\n"
        "import huggingface_hub.constants as c\n"
        "print(os.environ.get('HF_HUB_OFFLINE'), c.HF_HUB_OFFLINE, logging.root.manager.disable,\n"
        "      logging.getLogger('open_clip').level, len(logging.getLogger().filters))\n")
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.stdout.split() == ["None", "False", str(logging.INFO), "0", "0"], proc.stderr[-1000:]


@pytest.mark.parametrize("offline", ["0", "1"])
def test_a_callers_hf_hub_offline_value_is_kept(monkeypatch, offline):
    monkeypatch.setenv("HF_HUB_OFFLINE", offline)
    previous = logging.root.manager.disable
    build_model(ModelSpec())
    assert os.environ["HF_HUB_OFFLINE"] == offline
    assert logging.root.manager.disable == previous


def test_open_clip_noise_is_scoped_not_disabled(caplog):
    import open_clip

    from models import open_clip_scope

    with caplog.at_level(logging.WARNING):
        open_clip.create_model("stbir-small", pretrained=None)  # unscoped: open_clip warns
        assert any("initialized randomly" in r.getMessage() for r in caplog.records)
        caplog.clear()
        build_model(ModelSpec())
        with open_clip_scope():
            logging.warning("the caller's own warning")
        logging.getLogger("open_clip").warning("after the block")
    messages = [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "initialized randomly" in m]
    assert "the caller's own warning" in messages and "after the block" in messages
