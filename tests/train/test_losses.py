"""Each loss against a value worked out by hand."""

import math

import pytest
import torch

from models.model import ArcFaceHead, weighted_mean
from stbir_train import losses as L


def test_info_nce_hand_value():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # logits per row are [1, 0] / [0, 1]: CE = log(1 + e^-1) in both directions
    assert L.info_nce(q, q.clone(), temperature=1.0).item() == pytest.approx(math.log(1 + math.e ** -1), abs=1e-6)


def test_info_nce_extra_negatives_add_to_the_denominator():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    extra = torch.tensor([[1.0, 0.0]])  # as good as row 0's positive, a wrong answer for it
    # row 0: logits [1, 0, 1] -> log(1 + e^-1 + 1); row 1: [0, 1, 0] -> log(1 + 2e^-1)
    q2g = (math.log(2 + math.e ** -1) + math.log(1 + 2 * math.e ** -1)) / 2
    g2q = math.log(1 + math.e ** -1)
    assert L.info_nce(q, q.clone(), 1.0, extra).item() == pytest.approx((q2g + g2q) / 2, abs=1e-6)


def test_cosine_triplet_hand_value():
    anchor = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    positive = torch.tensor([[0.6, 0.8], [1.0, 0.0]])
    negatives = torch.tensor([[[0.0, 1.0], [0.8, 0.6]],    # hardest cos 0.8 -> 0.2 - 0.6 + 0.8 = 0.4
                              [[0.0, 1.0], [0.0, -1.0]]])  # 0.2 - 1 + 0 < 0 -> 0
    assert L.cosine_triplet(anchor, positive, negatives, margin=0.2).item() == pytest.approx(0.2, abs=1e-6)


def test_fusion_consistency_hand_value():
    f = torch.tensor([[1.0, 0.0]])
    photo = torch.tensor([[0.6, 0.8]])
    sketch = torch.tensor([[0.0, 1.0]])
    assert L.fusion_consistency(f, photo, sketch).item() == pytest.approx(1 - 0.3, abs=1e-6)


def test_arcface_hand_value():
    head = ArcFaceHead(2, 2, scale=2.0, margin=0.5)
    with torch.no_grad():
        head.weight.copy_(torch.eye(2))
    # cos to the classes: [0.6, 0.8]; the true class 0 gets cos(acos(0.6) + 0.5)
    logits = head.logits(torch.tensor([[0.6, 0.8]]), torch.tensor([0]))
    target = math.cos(math.acos(0.6) + 0.5)
    assert logits[0].tolist() == pytest.approx([2 * target, 2 * 0.8], abs=1e-5)
    expected = math.log(1 + math.exp(2 * 0.8 - 2 * target))
    assert L.arcface_loss(logits, torch.tensor([0])).item() == pytest.approx(expected, abs=1e-5)


def test_fuse_quad_takes_diagonal_quadrants_from_each_input():
    spec = {"mean": [0.5], "std": [0.5]}
    photo_spec = {"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]}
    photo = torch.full((1, 3, 4, 4), 7.0)
    sketch = torch.full((1, 1, 4, 4), 1.0)  # normalised 1.0 -> pixel value 1.0
    m = L.fuse_quad(photo, sketch, photo_spec, spec)
    assert (m[..., :2, :2] == 7).all() and (m[..., 2:, 2:] == 7).all()
    assert (m[..., :2, 2:] == 1).all() and (m[..., 2:, :2] == 1).all()


def test_fuse_is_weighted_mean_renormalised_and_accepts_one_half():
    s = torch.tensor([[1.0, 0.0]])
    t = torch.tensor([[0.0, 1.0]])
    out = weighted_mean(s, t, 0.75)
    assert out[0].tolist() == pytest.approx([0.75 / math.hypot(0.75, 0.25), 0.25 / math.hypot(0.75, 0.25)])
    assert weighted_mean(s, None, 0.75) is s and weighted_mean(None, t, 0.75) is t
    with pytest.raises(ValueError):
        weighted_mean(None, None, 0.5)


def test_in_batch_negatives_are_every_other_row():
    x = torch.arange(6.0).view(3, 2)
    neg = L.in_batch_negatives(x)
    assert neg.shape == (3, 2, 2)
    assert neg[1].tolist() == [[0.0, 1.0], [4.0, 5.0]]
