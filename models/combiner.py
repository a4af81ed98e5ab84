"""The learned query fusion (CLIP4Cir's Combiner, seed 001): sketch + text unit vectors -> query.

Both inputs are projected (linear + ReLU), concatenated, and fed to two heads: a gate ``g`` in
(0, 1) (a small MLP + sigmoid) and a residual (MLP). The output is

    normalize(residual + g * sketch + (1 - g) * text)

i.e. a per-query mix of the two inputs plus a learned correction. It starts out *exactly* as the
weighted mean it replaces: the residual's last layer is zero and the gate's bias is the logit of
the configured fusion weight, so a Combiner stage can only move away from a known point.

The module also carries ``preferred`` (a buffer, so it is saved with the weights): 1 when
validation measured the Combiner better than the best weighted mean, 0 otherwise. Evaluation and
export use the Combiner as the default fusion only where ``preferred`` is 1.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class Combiner(nn.Module):
    def __init__(self, dim: int, init_weight: float = 0.5, proj_dim: int | None = None,
                 hidden_dim: int | None = None, dropout: float = 0.1):
        super().__init__()
        proj, hidden = proj_dim or 2 * dim, hidden_dim or 4 * dim
        self.dim = dim
        self.sketch_proj = nn.Linear(dim, proj)
        self.text_proj = nn.Linear(dim, proj)
        self.combine = nn.Linear(2 * proj, hidden)
        self.output = nn.Linear(hidden, dim)
        self.gate_hidden = nn.Linear(2 * proj, hidden)
        self.gate = nn.Linear(hidden, 1)
        self.dropout = nn.Dropout(dropout)
        w = min(max(float(init_weight), 1e-3), 1 - 1e-3)
        with torch.no_grad():  # start as the weighted mean with init_weight
            self.output.weight.zero_()
            self.output.bias.zero_()
            self.gate.weight.zero_()
            self.gate.bias.fill_(math.log(w / (1 - w)))
        self.register_buffer("preferred", torch.tensor(0.0))

    def forward(self, sketch: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        x = torch.cat([F.relu(self.sketch_proj(sketch)), F.relu(self.text_proj(text))], dim=-1)
        x = self.dropout(x)
        g = torch.sigmoid(self.gate(self.dropout(F.relu(self.gate_hidden(x)))))
        residual = self.output(self.dropout(F.relu(self.combine(x))))
        return F.normalize(residual + g * sketch + (1 - g) * text, dim=-1)


__all__ = ["Combiner"]
