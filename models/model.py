"""The tri-modal model: a CNN sketch tower plus open_clip image and text towers in one space.

Every encoder returns L2-normalised vectors of ``embed_dim``. ``configure_stage`` picks which
branch learns; the frozen ones are anchors. Query fusion (sketch + text) is a weighted mean of the
two unit vectors, re-normalised, with the weight stored as a buffer so it travels with the
checkpoint and into the export; with ``spec.combiner`` also a learned Combiner (models/combiner.py,
issue 16), which validation makes the default only where it measures better (stbir_train.fusion).
"""

from __future__ import annotations

import copy
import inspect
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from models.causal_text import run_blocks
from models.combiner import Combiner
from models.errors import ModelError
from models.scoped import open_clip_scope
from models.weights import load_clip_weights, read_state_dict, strip_module
from stbir_infer.contract import BRANCHES, QUERY_NEEDS_INPUT

STAGE_TARGETS = BRANCHES + ("all", "combiner")  # combiner: only the learned fusion learns
_CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass
class ModelSpec:
    """Everything needed to rebuild the network; stored in every checkpoint."""

    clip_model: str = "stbir-small"
    pretrained: str | None = None  # null, an open_clip tag, or a local weights file
    sketch_backbone: str = "resnet18"
    sketch_pretrained: str | None = None  # null or a local torchvision state-dict file
    sketch_size: int = 64
    fusion_weight: float = 0.5  # weight of the sketch vector in a sketch+text query
    arcface_classes: int = 0  # set by training from the data; 0 = no head
    arcface_scale: float = 30.0
    arcface_margin: float = 0.3
    quick_gelu: bool = False  # QuickGELU activations (what OpenAI-format CLIP weights need)
    # How each pixel branch fits an image to its square: "shortest" (centre crop) or "pad"
    # (letterbox: white for sketches, the normalisation mean for photos); README, issue 15.
    sketch_resize: str = "shortest"
    image_resize: str = "shortest"
    combiner: bool = False  # a learned query fusion (models/combiner.py) besides the weighted mean

    @classmethod
    def from_dict(cls, d: dict) -> "ModelSpec":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def to_dict(self) -> dict:
        return asdict(self)


# Presets are data: a named set of ModelSpec fields. "seed" is the seed's size (ViT-B-32 towers,
# resnet50 sketch tower, 512-d); "small" trains on two CPU cores in minutes.
PRESETS: dict[str, dict] = {
    "small": dict(clip_model="stbir-small", sketch_backbone="resnet18", sketch_size=64),
    "seed": dict(clip_model="ViT-B-32", sketch_backbone="resnet50", sketch_size=224),
    # MobileNetV2 in both visual towers (timm's mobilenetv2_100 behind open_clip's image tower,
    # torchvision's for sketches): both can start from ImageNet weights (torchvision format).
    "edge": dict(clip_model="stbir-edge", sketch_backbone="mobilenet_v2", sketch_size=96),
    # A distillation teacher (issue 17): the edge towers at 160 px and a 4-layer 256-wide text
    # tower; 3 epochs from ImageNet weights take about 8 minutes on two cores (README).
    "medium": dict(clip_model="stbir-medium", sketch_backbone="mobilenet_v2", sketch_size=160),
    # A distillation student (stbir-train distill): the edge preset's MobileNetV2 towers at
    # 48 px (a quarter of the pixels; they take the same ImageNet weights) and one text layer.
    "tiny": dict(clip_model="stbir-tiny", sketch_backbone="mobilenet_v2", sketch_size=48),
}

# Image normalisation a timm image trunk's pretrained weights expect, where it is not open_clip's
# default (the MobileNetV2 ImageNet weights take inputs in [-1, 1]).
TRUNK_IMAGE_NORM: dict[str, tuple[list[float], list[float]]] = {
    "mobilenetv2_100": ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5]),
}


def _open_clip():
    # The first import happens offline (huggingface_hub reads HF_HUB_OFFLINE when imported);
    # open_clip_scope puts the caller's environment back afterwards.
    with open_clip_scope():
        import open_clip

    if "stbir-small" not in open_clip.list_models():
        open_clip.add_model_config(_CONFIG_DIR)
    return open_clip


class SketchEncoder(nn.Module):
    """A torchvision CNN on one-channel sketches, projected into the shared space."""

    SUPPORTED = ("resnet18", "resnet34", "resnet50", "mobilenet_v2", "mobilenet_v3_small",
                 "mobilenet_v3_large")

    def __init__(self, backbone: str, embed_dim: int, weights_file: str | None = None):
        super().__init__()
        import torchvision

        if backbone not in self.SUPPORTED:
            raise ModelError(f"sketch_backbone {backbone!r} is not one of {', '.join(self.SUPPORTED)}")
        net = getattr(torchvision.models, backbone)(weights=None)
        if weights_file:
            net.load_state_dict(_load_weights_file(weights_file, "sketch_pretrained"))
        if backbone.startswith("resnet"):
            conv = net.conv1
            net.conv1 = _to_one_channel(conv)
            width = net.fc.in_features
            net.fc = nn.Identity()
        else:
            conv = net.features[0][0]
            net.features[0][0] = _to_one_channel(conv)
            width = next(m for m in net.classifier if isinstance(m, nn.Linear)).in_features
            net.classifier = nn.Identity()
        self.backbone = net
        self.proj = nn.Linear(width, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.backbone(x))


def _to_one_channel(conv: nn.Conv2d) -> nn.Conv2d:
    """Sketches are grayscale: sum an RGB stem's filters over colour (exact for gray input)."""
    new = nn.Conv2d(1, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    bias=conv.bias is not None)
    with torch.no_grad():
        new.weight.copy_(conv.weight.sum(1, keepdim=True))
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    return new


def _load_weights_file(path: str, key: str) -> dict:
    sd = read_state_dict(path, key)
    sd = sd["state_dict"] if isinstance(sd.get("state_dict"), dict) else sd
    return strip_module(sd)


class ArcFaceHead(nn.Module):
    """Additive angular margin classifier (Deng et al. 2019) over unit embeddings."""

    def __init__(self, embed_dim: int, num_classes: int, scale: float, margin: float):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_classes, embed_dim) * 0.01)
        self.scale, self.margin = scale, margin

    def logits(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cos = F.linear(F.normalize(emb, dim=-1), F.normalize(self.weight, dim=-1)).clamp(-1, 1)
        theta = torch.acos(cos.clamp(-1 + 1e-7, 1 - 1e-7))
        target = torch.cos(theta + self.margin)
        onehot = F.one_hot(labels, cos.shape[1]).bool()
        return self.scale * torch.where(onehot, target, cos)


def fuse(sketch: torch.Tensor | None, text: torch.Tensor | None, weight: float | torch.Tensor):
    """Sketch+text query vector: weighted mean of the unit vectors, re-normalised.

    Either half may be missing; then the other is the query.
    """
    if sketch is None and text is None:
        raise ValueError(QUERY_NEEDS_INPUT)
    if sketch is None:
        return text
    if text is None:
        return sketch
    return F.normalize(weight * sketch + (1 - weight) * text, dim=-1)


class STBIRModel(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        open_clip = _open_clip()
        if spec.clip_model not in open_clip.list_models():
            raise ModelError(f"clip_model {spec.clip_model!r} is not an open_clip architecture")
        with open_clip_scope():  # it warns that random init has no weights: they come next
            self.clip = open_clip.create_model(spec.clip_model, pretrained=None,
                                               force_quick_gelu=spec.quick_gelu)
        if spec.pretrained:
            _load_clip_weights(self.clip, spec.clip_model, spec.pretrained,
                               spec.quick_gelu or bool((open_clip.get_model_config(
                                   spec.clip_model) or {}).get("quick_gelu")))
        self.clip.logit_scale.requires_grad_(False)  # training uses the config's temperature
        self.embed_dim = int(self.clip.text_projection.shape[1])
        self.context_length = int(self.clip.context_length)
        self.sketch = SketchEncoder(spec.sketch_backbone, self.embed_dim, spec.sketch_pretrained)
        self.register_buffer("fusion_weight", torch.tensor(float(spec.fusion_weight)))
        self.combiner = (Combiner(self.embed_dim, spec.fusion_weight) if spec.combiner else None)
        self.arcface = (ArcFaceHead(self.embed_dim, spec.arcface_classes, spec.arcface_scale,
                                    spec.arcface_margin) if spec.arcface_classes else None)
        self.stage = "all"
        self._input_specs = self._build_input_specs()

    # -- branches -----------------------------------------------------------------------------
    def branch_modules(self, branch: str) -> list[nn.Module | nn.Parameter]:
        c = self.clip
        return {
            "sketch": [self.sketch],
            "image": [c.visual],
            "text": [c.token_embedding, c.positional_embedding, c.transformer, c.ln_final,
                     c.text_projection],
        }[branch]

    def branch_parameters(self, branch: str) -> list[nn.Parameter]:
        out = []
        for m in self.branch_modules(branch):
            out.extend([m] if isinstance(m, nn.Parameter) else m.parameters())
        return out

    def configure_stage(self, target: str) -> None:
        """Make only ``target``'s branch trainable (all three for "all"); the ArcFace head always
        trains. Frozen branches also stay in eval mode, so their BatchNorm statistics are kept."""
        if target not in STAGE_TARGETS:
            raise ModelError(f"stage target {target!r} is not one of {', '.join(STAGE_TARGETS)}")
        self.stage = target
        for branch in BRANCHES:
            on = target in (branch, "all")
            for p in self.branch_parameters(branch):
                p.requires_grad_(on)
        if self.combiner is not None:  # learns in its own stage and jointly with "all"
            self.combiner.requires_grad_(target in ("combiner", "all"))
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        for branch in BRANCHES:
            if self.stage not in (branch, "all"):
                for m in self.branch_modules(branch):
                    if isinstance(m, nn.Module):
                        m.eval()
        if self.combiner is not None and self.stage not in ("combiner", "all"):
            self.combiner.eval()
        return self

    # -- encoders ------------------------------------------------------------------------------
    def encode_sketch(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.sketch(x), dim=-1)

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.clip.encode_image(x), dim=-1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        emb = self.clip.token_embedding(tokens)
        return self.encode_text_embeddings(emb, eot_position(tokens))

    def encode_text_embeddings(self, emb: torch.Tensor, eot: torch.Tensor, *,
                               traceable: bool = False) -> torch.Tensor:
        """Text tower from looked-up token embeddings [B, L, D] and end-of-text positions [B].

        The vocabulary lookup stays outside, and pooling at the end-of-text token is a one-hot
        weighted sum (no Gather on the table). ``traceable``: the exported graph's form
        (``encode_text_graph``): the same attention written so that the graph takes any L up to
        the context length (``models.causal_text``); training keeps open_clip's own blocks.
        """
        c = self.clip
        cast = c.transformer.get_cast_dtype()
        n = emb.shape[1]
        x = emb.to(cast) + c.positional_embedding[:n].to(cast)
        mask = None if c.attn_mask is None else c.attn_mask[:n, :n]
        x = run_blocks(c.transformer, x, mask) if traceable else c.transformer(x, attn_mask=mask)
        x = c.ln_final(x)
        pick = (torch.arange(x.shape[1], device=x.device)[None, :] == eot[:, None]).to(x.dtype)
        x = (x * pick[..., None]).sum(1)
        x = c.text_projection(x) if isinstance(c.text_projection, nn.Linear) else x @ c.text_projection
        return F.normalize(x, dim=-1)

    def encode_text_graph(self, emb: torch.Tensor, eot: torch.Tensor) -> torch.Tensor:
        """What the exported text graph computes (export verifies it against ``encode_text``)."""
        return self.encode_text_embeddings(emb, eot, traceable=True)

    def fuse(self, sketch: torch.Tensor | None, text: torch.Tensor | None) -> torch.Tensor:
        """The training fusion: the Combiner where the model has one, else the weighted mean
        with the configured weight (``spec.fusion_weight``, fixed while training)."""
        if self.combiner is not None and sketch is not None and text is not None:
            return self.combiner(sketch, text)
        return fuse(sketch, text, float(self.spec.fusion_weight))

    @property
    def default_fusion(self) -> str:
        """"combiner" where the model has a Combiner that validation preferred, else "mean"."""
        return "combiner" if self.combiner is not None and bool(self.combiner.preferred) else "mean"

    def query_fuse(self, sketch: torch.Tensor | None, text: torch.Tensor | None,
                   method: str | None = None) -> torch.Tensor:
        """The query-time fusion: ``method`` "combiner" or "mean" (the weighted mean with the
        validation-picked ``fusion_weight`` buffer); None = the default, the Combiner only
        where validation preferred it (``combiner.preferred``)."""
        method = method or self.default_fusion
        if method == "combiner" and sketch is not None and text is not None:
            if self.combiner is None:
                raise ModelError("this model has no Combiner")
            return self.combiner(sketch, text)
        return fuse(sketch, text, self.fusion_weight)

    # -- what export and the data pipeline need ---------------------------------------------------
    def input_specs(self) -> dict[str, dict]:
        """Preprocessing of each pixel input; the one source for training, export and runtime."""
        return copy.deepcopy(self._input_specs)

    def _build_input_specs(self) -> dict[str, dict]:
        oc = _open_clip()
        cfg = oc.get_model_preprocess_cfg(self.clip)
        size = cfg["size"]
        size = size[0] if isinstance(size, (tuple, list)) else size
        trunk = ((oc.get_model_config(self.spec.clip_model) or {}).get("vision_cfg") or {}).get(
            "timm_model_name")
        mean, std = TRUNK_IMAGE_NORM.get(trunk, (cfg["mean"], cfg["std"]))
        image = dict(size=int(size), channels=3, mean=[float(v) for v in mean],
                     std=[float(v) for v in std],
                     interpolation=cfg.get("interpolation", "bicubic"),
                     resize_mode=self.spec.image_resize)
        sketch = dict(size=int(self.spec.sketch_size), channels=1, mean=[0.5], std=[0.5],
                      interpolation="bicubic", resize_mode=self.spec.sketch_resize)
        for name, spec in (("image", image), ("sketch", sketch)):
            if spec["resize_mode"] not in ("shortest", "pad"):
                raise ModelError(f"{name}_resize must be shortest or pad, got {spec['resize_mode']!r}")
            if spec["resize_mode"] == "pad":  # fill that normalises to 0: neutral, like conv padding
                spec["pad_fill"] = [255] if name == "sketch" else [round(m * 255) for m in spec["mean"]]
        return {"image": image, "sketch": sketch}

    def tokenizer(self):
        return _open_clip().get_tokenizer(self.spec.clip_model)


def eot_position(tokens: torch.Tensor) -> torch.Tensor:
    """open_clip's "argmax" pooling: the end-of-text token has the highest id in each row."""
    return tokens.argmax(dim=-1)


def _load_clip_weights(clip: nn.Module, name: str, pretrained: str, quick_gelu: bool) -> None:
    """``pretrained`` is a local file, or an open_clip tag that must already be in the cache.

    Either way the file is read with ``weights_only=True``: a weights file that needs code to
    unpickle is refused, never run."""
    path = Path(pretrained).expanduser()
    open_clip = _open_clip()
    if path.suffix in (".pt", ".pth", ".bin", ".safetensors") or os.sep in pretrained:
        load_clip_weights(clip, name, pretrained, quick_gelu)  # formats: models/weights.py
        return
    if pretrained not in open_clip.list_pretrained_tags_by_model(name):
        raise ModelError(f"pretrained: {pretrained!r} is not an open_clip tag for {name} "
                         f"(known: {', '.join(open_clip.list_pretrained_tags_by_model(name)) or 'none'})")
    try:
        with open_clip_scope():
            cfg = open_clip.get_pretrained_cfg(name, pretrained)
            file = open_clip.download_pretrained(cfg)
        _safe_load_checkpoint(open_clip, clip, file)
    except Exception as exc:
        raise ModelError(f"pretrained: weights {name}/{pretrained} are not available offline; "
                         f"pass a local weights file instead ({type(exc).__name__})") from None


def _safe_load_checkpoint(open_clip, clip: nn.Module, file: str) -> None:
    """open_clip's loader (it converts third-party layouts), made to unpickle weights only.

    Versions whose loader has no ``weights_only`` switch get the file read here instead."""
    if "weights_only" in inspect.signature(open_clip.load_checkpoint).parameters:
        open_clip.load_checkpoint(clip, file, weights_only=True)
        return
    if file.endswith(".safetensors"):
        from safetensors.torch import load_file

        sd = load_file(file, device="cpu")
    else:
        sd = torch.load(file, map_location="cpu", weights_only=True)
    sd = sd.get("state_dict", sd) if isinstance(sd, dict) else sd
    sd = {k[7:] if k.startswith("module.") else k: v for k, v in sd.items()}
    clip.load_state_dict(sd)


def build_model(spec: ModelSpec | dict) -> STBIRModel:
    if isinstance(spec, dict):
        spec = ModelSpec.from_dict(spec)
    return STBIRModel(spec)
