"""Retrieval metrics on tiny similarity matrices with answers worked out by hand."""

import numpy as np
import pytest

from stbir_train.metrics import metrics_by_group, ranks_of_relevant, retrieval_metrics


def one_hot(n_gallery, targets):
    rel = np.zeros((len(targets), n_gallery), bool)
    rel[np.arange(len(targets)), targets] = True
    return rel


def test_perfect_first_and_positive_ranked_last():
    scores = np.array([[0.9, 0.5, 0.1],
                       [0.9, 0.5, 0.1]])
    m = retrieval_metrics(scores, one_hot(3, [0, 2]))
    # query 0: rank 1; query 1: its positive scores lowest -> rank 3 (last)
    assert m["R@1"] == 0.5 and m["R@5"] == 1.0
    assert m["mAP"] == pytest.approx((1 + 1 / 3) / 2)
    assert m["median_rank"] == 2.0 and m["mean_rank"] == 2.0


def test_ties_count_against_the_query():
    scores = np.array([[0.5, 0.5, 0.5, 0.1]])
    m = retrieval_metrics(scores, one_hot(4, [1]))
    assert m["R@1"] == 0.0
    assert m["median_rank"] == 3.0  # two wrong items tie with it and rank ahead
    assert m["mAP"] == pytest.approx(1 / 3)


def test_constant_scores_give_last_rank():
    scores = np.zeros((2, 5))
    m = retrieval_metrics(scores, one_hot(5, [0, 4]))
    assert m["mean_rank"] == 5.0 and m["R@1"] == 0.0


def test_average_precision_with_several_relevant_items():
    scores = np.array([[0.9, 0.8, 0.7, 0.6]])
    rel = np.array([[True, False, True, False]])
    assert [r.tolist() for r in ranks_of_relevant(scores, rel)] == [[1, 3]]
    assert retrieval_metrics(scores, rel)["mAP"] == pytest.approx((1 / 1 + 2 / 3) / 2)


def test_recall_at_5_and_10_boundaries():
    g = 12
    scores = np.tile(-np.arange(g, dtype=float), (3, 1))  # item j ranks j+1
    m = retrieval_metrics(scores, one_hot(g, [4, 5, 10]))  # ranks 5, 6, 11
    assert m["R@1"] == 0.0
    assert m["R@5"] == pytest.approx(1 / 3)
    assert m["R@10"] == pytest.approx(2 / 3)
    assert m["median_rank"] == 6.0


def test_per_category_breakdown():
    scores = np.array([[0.9, 0.1], [0.9, 0.1], [0.1, 0.9]])
    res = metrics_by_group(scores, one_hot(2, [0, 1, 1]), ["a", "b", "b"])
    assert res["per_category"]["a"]["R@1"] == 1.0
    assert res["per_category"]["b"]["R@1"] == 0.5
    assert res["overall"]["R@1"] == pytest.approx(2 / 3)
    assert res["overall"]["queries"] == 3


def test_query_without_relevant_item_is_an_error():
    with pytest.raises(ValueError):
        retrieval_metrics(np.zeros((1, 2)), np.zeros((1, 2), bool))
