"""Which embedding space a model's vectors live in (seed 004: enroll with a big model, query with
a small one distilled into its space).

A model trained on its own defines its own space, identified by ``weights_fingerprint``: the
sha256 of the three towers' tensors (names, dtypes, shapes, bytes), so the same weights give the
same fingerprint whichever file holds them, and the ArcFace head, the Combiner and the fusion
weight (which do not move a single vector) are left out. A student made by ``stbir-train
distill`` records its teacher's space in its checkpoint (``distill.space``) and answers with that.
"""

from __future__ import annotations

import hashlib

import torch

TOWER_PREFIXES = ("sketch.", "clip.")  # the sketch tower and the open_clip image + text towers


def weights_fingerprint(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if not name.startswith(TOWER_PREFIXES):
            continue
        t = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(tensor.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def embedding_space(model: torch.nn.Module, checkpoint: dict | None = None) -> str:
    """The space of a loaded checkpoint: its teacher's where it was distilled, else its own."""
    recorded = ((checkpoint or {}).get("distill") or {}).get("space")
    return recorded if isinstance(recorded, str) and recorded else weights_fingerprint(model)
