"""The text transformer's blocks written so that a traced ONNX graph takes any token count.

nn.MultiheadAttention's forward computes its reshapes from Python ints, so the TorchScript
exporter bakes the traced sequence length into the graph. ``run_blocks`` computes the same
attention with shape-free reshapes (``unflatten`` / ``flatten``) and
``scaled_dot_product_attention``, so the exported text graph also runs on fewer tokens: with the
causal mask, the ones after the last end-of-text change no vector, and the runtime trims them
(export.json ``trim_tokens``, measured at export). A block of another kind (separate q/k/v
weights, key/value norms) runs as open_clip wrote it; the export's check then keeps trimming off.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _plain(block) -> bool:
    from open_clip.transformer import ResidualAttentionBlock

    attn = getattr(block, "attn", None)
    return (type(block).forward is ResidualAttentionBlock.forward
            and type(block).attention is ResidualAttentionBlock.attention
            and isinstance(attn, nn.MultiheadAttention) and attn.in_proj_weight is not None
            and attn._qkv_same_embed_dim and not hasattr(block, "ln_1_kv"))


def _attention(attn: nn.MultiheadAttention, x: torch.Tensor, mask) -> torch.Tensor:
    """``attn(x, x, x, attn_mask=mask)[0]`` for x [B, L, D] (eval: no dropout)."""
    q, k, v = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    heads = lambda t: t.unflatten(-1, (attn.num_heads, -1)).transpose(1, 2)  # noqa: E731
    out = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), attn_mask=mask)
    return attn.out_proj(out.transpose(1, 2).flatten(2))


def run_blocks(transformer, x: torch.Tensor, mask) -> torch.Tensor:
    """``transformer(x, attn_mask=mask)`` for x [B, L, D], any L."""
    if not all(_plain(b) for b in transformer.resblocks):
        return transformer(x, attn_mask=mask)  # open_clip's Transformer takes [B, L, D] too
    mask = None if mask is None else mask.to(x.dtype)
    for b in transformer.resblocks:
        x = x + b.ls_1(_attention(b.attn, b.ln_1(x), mask))
        x = x + b.ls_2(b.mlp(b.ln_2(x)))
    return x
