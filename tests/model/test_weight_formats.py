"""model.pretrained formats (open_clip file / open_clip checkpoint / OpenAI state dict with its
QuickGELU / torchvision mobilenet_v2 for the edge preset) and sketch_pretrained for
mobilenet_v2. Every file is built here from a random model: nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models import PRESETS, ModelError, ModelSpec, build_model
from models.weights import detect_format

MOBILENET = Path(__file__).resolve().parents[2].parent / "shared/data/weights/mobilenet_v2_imagenet.pt"


@pytest.fixture(scope="module")
def source():
    torch.manual_seed(5)
    return build_model(ModelSpec())


def _same_clip(a, b) -> None:
    sa, sb = a.clip.state_dict(), b.clip.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_open_clip_training_checkpoint_with_ddp_prefix(source, tmp_path):
    sd = {f"module.{k}": v for k, v in source.clip.state_dict().items()}
    torch.save({"epoch": 7, "name": "run", "state_dict": sd}, tmp_path / "epoch_7.pt")
    assert detect_format(torch.load(tmp_path / "epoch_7.pt", weights_only=True)) == "open_clip-checkpoint"
    _same_clip(build_model(ModelSpec(pretrained=str(tmp_path / "epoch_7.pt"))), source)


def _openai_state_dict(model) -> dict:
    """What OpenAI's released models' state_dict() looks like: the same tensor names, fp16, and
    the three extra entries that open_clip's converters drop."""
    sd = {k: v.half() if v.is_floating_point() else v for k, v in model.clip.state_dict().items()}
    sd.update(input_resolution=torch.tensor(64), context_length=torch.tensor(32),
              vocab_size=torch.tensor(49408))
    return sd


def test_openai_state_dict_needs_quick_gelu_and_says_what_to_set(source, tmp_path):
    torch.save(_openai_state_dict(source), tmp_path / "openai.pt")
    assert detect_format(torch.load(tmp_path / "openai.pt", weights_only=True)) == "openai"
    with pytest.raises(ModelError, match=r"OpenAI CLIP state dict.*QuickGELU; set model.quick_gelu: true"):
        build_model(ModelSpec(pretrained=str(tmp_path / "openai.pt")))


def test_openai_state_dict_loads_into_a_quick_gelu_model(tmp_path):
    torch.manual_seed(6)
    src = build_model(ModelSpec(quick_gelu=True))
    assert type(src.clip.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"
    torch.save(_openai_state_dict(src), tmp_path / "openai.pt")
    loaded = build_model(ModelSpec(quick_gelu=True, pretrained=str(tmp_path / "openai.pt")))
    assert type(loaded.clip.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"
    tokens = loaded.tokenizer()(["a red star"])
    src.eval(), loaded.eval()
    with torch.no_grad():  # fp16 round trip: close, not equal
        assert torch.nn.functional.cosine_similarity(src.encode_text(tokens),
                                                     loaded.encode_text(tokens)).item() > 0.999


def _torchvision_mobilenet_file(tmp_path) -> tuple[Path, torch.nn.Module]:
    import torchvision

    torch.manual_seed(8)
    net = torchvision.models.mobilenet_v2(weights=None).eval()
    torch.save(net.state_dict(), tmp_path / "mnv2.pt")
    return tmp_path / "mnv2.pt", net


@pytest.mark.parametrize("preset", ["edge", "medium", "tiny"])
def test_mobilenet_presets_take_torchvision_mobilenet_v2_weights(tmp_path, preset):
    path, net = _torchvision_mobilenet_file(tmp_path)
    model = build_model(ModelSpec(**PRESETS[preset], pretrained=str(path), sketch_pretrained=str(path)))
    model.eval()
    size = PRESETS[preset]["sketch_size"]
    assert model.input_specs()["image"]["size"] == size  # both towers at the preset's size
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert torch.allclose(model.clip.visual.trunk(x), net.features(x).mean((2, 3)), atol=1e-5)
        gray = torch.randn(2, 1, size, size)  # the one-channel stem is exact for gray input
        assert torch.allclose(model.sketch.backbone(gray), net.features(gray.expand(-1, 3, -1, -1)).mean((2, 3)),
                              atol=1e-4)
    assert model.input_specs()["image"]["mean"] == [0.5, 0.5, 0.5]
    with pytest.raises(ModelError, match="mobilenet_v2 weights, which fit only .* not stbir-small"):
        build_model(ModelSpec(pretrained=str(path)))


@pytest.mark.skipif(not MOBILENET.is_file(), reason=f"{MOBILENET} absent (shared data not mounted)")
def test_real_imagenet_mobilenet_v2_weights_load_into_the_edge_preset():
    spec = dict(clip_model="stbir-edge", sketch_backbone="mobilenet_v2", sketch_size=96)
    model = build_model(ModelSpec(**spec, pretrained=str(MOBILENET), sketch_pretrained=str(MOBILENET)))
    real = torch.load(MOBILENET, weights_only=True)
    assert torch.equal(model.clip.visual.trunk.conv_stem.weight, real["features.0.0.weight"])
    assert torch.equal(model.sketch.backbone.features[0][0].weight, real["features.0.0.weight"].sum(1, keepdim=True))
