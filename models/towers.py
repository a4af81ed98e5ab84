"""The sketch tower (a torchvision CNN on one-channel sketches) and the ArcFace head; the image
and text towers are open_clip's (``models.model``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.errors import ModelError
from models.weights import read_state_dict, strip_module


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
