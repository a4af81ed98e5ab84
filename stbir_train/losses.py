"""The four training losses. All embeddings are unit vectors; similarities are cosines."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def info_nce(query: torch.Tensor, gallery: torch.Tensor, temperature: float,
             extra_gallery: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE: row i of ``query`` should pick row i of ``gallery`` among all rows
    (plus ``extra_gallery``, e.g. manifest hard negatives, as extra wrong answers), and vice versa.
    """
    candidates = gallery if extra_gallery is None else torch.cat([gallery, extra_gallery])
    target = torch.arange(len(query), device=query.device)
    q2g = F.cross_entropy(query @ candidates.T / temperature, target)
    g2q = F.cross_entropy(gallery @ query.T / temperature, target)
    return (q2g + g2q) / 2


def cosine_triplet(anchor: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor,
                   margin: float) -> torch.Tensor:
    """mean_i max(0, margin - cos(a_i, p_i) + max_j cos(a_i, n_ij)), negatives [B, K, D].

    The hardest of each anchor's negatives sets the loss, so a pair only stops contributing
    once its positive beats every negative by ``margin``.
    """
    pos = (anchor * positive).sum(-1)
    neg = torch.einsum("bd,bkd->bk", anchor, negatives).max(dim=1).values
    return F.relu(margin - pos + neg).mean()


def in_batch_negatives(x: torch.Tensor) -> torch.Tensor:
    """[B, D] -> [B, B-1, D]: for each row, every other row of the batch."""
    b = len(x)
    keep = ~torch.eye(b, dtype=torch.bool, device=x.device)
    return x.unsqueeze(0).expand(b, -1, -1)[keep].view(b, b - 1, -1)


def fuse_quad(photo: torch.Tensor, sketch: torch.Tensor, photo_spec: dict,
              sketch_spec: dict) -> torch.Tensor:
    """The fused visual input of the image-sketch consistency loss (the seed's ``_fuse_quad``).

    A 2x2 mosaic at the photo's size: the top-left and bottom-right quadrants are the photo's, the
    top-right and bottom-left are the sketch's (its strokes, un-normalised to [0, 1], repeated over
    RGB and normalised with the photo's mean/std so the image tower sees ordinary pixels).
    """
    size = photo.shape[-1]
    sk = sketch * torch.tensor(sketch_spec["std"], device=sketch.device).view(1, -1, 1, 1) \
        + torch.tensor(sketch_spec["mean"], device=sketch.device).view(1, -1, 1, 1)
    if sk.shape[-1] != size:
        sk = F.interpolate(sk, size=(size, size), mode="bilinear", align_corners=False)
    mean = torch.tensor(photo_spec["mean"], device=photo.device).view(1, -1, 1, 1)
    std = torch.tensor(photo_spec["std"], device=photo.device).view(1, -1, 1, 1)
    sk = (sk.expand(-1, photo.shape[1], -1, -1) - mean) / std
    h = size // 2
    mosaic = photo.clone()
    mosaic[..., :h, h:] = sk[..., :h, h:]
    mosaic[..., h:, :h] = sk[..., h:, :h]
    return mosaic


def fusion_consistency(fused_visual: torch.Tensor, photo: torch.Tensor,
                       sketch: torch.Tensor) -> torch.Tensor:
    """Pull the image tower's embedding of the photo/sketch mosaic (``fuse_quad``) towards both
    the photo's embedding and the sketch tower's embedding of the same item:
    mean(1 - (cos(f, photo) + cos(f, sketch)) / 2). Half the mosaic is strokes, so the image tower
    has to read the object's outline where the sketch has it, and the sketch tower is held to the
    same place in the space."""
    return (1 - ((fused_visual * photo).sum(-1) + (fused_visual * sketch).sum(-1)) / 2).mean()


def arcface_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over ArcFace margin logits (``models.model.ArcFaceHead.logits``)."""
    return F.cross_entropy(logits, labels)
