"""A tower's locked part, split off so that it can run once per input instead of every step.

``stbir_train.pretrain`` caches what these return: with the real-photo recipe (the sentence
encoder locked, the top MobileNetV2 layers learning) a pretrain epoch then costs seconds. Each
split is exact: ``rest(prefix(x))`` is what the model's own encoder returns (tested).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def image_split(model) -> tuple[nn.Module, object] | None:
    """(prefix, rest) of the image tower with ``model.encode_image(x) == rest(prefix(x))`` where
    nothing in ``prefix`` learns (the locked layers of a timm MobileNet/EfficientNet trunk,
    in eval mode), so its output can be computed once per photo; None for other towers or
    when the whole trunk learns."""
    visual = model.clip.visual
    trunk = getattr(visual, "trunk", None)
    if trunk is None or not all(hasattr(trunk, a) for a in ("conv_stem", "bn1", "blocks")):
        return None
    if model.spec.image_unlocked_layers < 0:
        return None
    blocks = [b for stage in trunk.blocks for b in stage]
    frozen = [trunk.conv_stem, trunk.bn1]
    if any(p.requires_grad for m in frozen for p in m.parameters()):
        return None
    k = 0
    while k < len(blocks) and not any(p.requires_grad for p in blocks[k].parameters()):
        k += 1
    prefix = nn.Sequential(*frozen, *blocks[:k]).eval()

    def rest(x: torch.Tensor) -> torch.Tensor:
        for block in blocks[k:]:
            x = block(x)
        x = trunk.forward_head(trunk.bn2(trunk.conv_head(x)))
        return F.normalize(visual.head(x), dim=-1)

    return prefix, rest

def text_split(model) -> tuple[object, object] | None:
    """(features, rest) of a locked HF text tower: ``model.encode_text(ids) ==
    rest(features(ids))``, ``features`` (the pooled sentence vector) fixed while only the
    projection learns; None otherwise."""
    if not model.hf_text or model.spec.text_unlocked_layers != 0:
        return None
    text = model.clip.text

    @torch.no_grad()
    def features(ids: torch.Tensor) -> torch.Tensor:
        was = text.transformer.training
        text.transformer.eval()
        real = (ids != text.config.pad_token_id).sum(1)
        ids = ids[:, :max(1, int(real.max()))] if len(ids) else ids
        mask = (ids != text.config.pad_token_id).long()
        out = text.pooler(text.transformer(input_ids=ids, attention_mask=mask), mask)
        text.transformer.train(was)
        return out

    return features, lambda pooled: F.normalize(text.proj(pooled), dim=-1)
