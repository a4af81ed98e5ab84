"""Model construction: presets, weights sources and their errors (no downloads, ever)."""

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
