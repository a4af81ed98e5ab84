"""EER and FRR at FAR on hand-built score lists (stbir_train.verification), ties included."""

import numpy as np
import pytest

from stbir_train import verification as V


def test_eer_and_frr_at_far_match_hand_worked_values():
    # 4 genuine, 10 impostor scores; accept when score >= t.
    gen = [0.9, 0.8, 0.6, 0.3]
    imp = [0.7, 0.5, 0.4, 0.2, 0.1, 0.0, -0.1, -0.2, -0.3, -0.4]
    # t = 0.6: FRR 1/4 (0.3), FAR 1/10 (0.7)      |diff| 0.15
    # t = 0.7: FRR 2/4, FAR 1/10                    |diff| 0.40
    # t = 0.5: FRR 1/4, FAR 2/10                    |diff| 0.05, mean 0.225 <- chosen
    # t = 0.4: FRR 1/4, FAR 3/10                    |diff| 0.05, mean 0.275 (a tie, worse mean)
    e = V.eer(gen, imp)
    assert e["threshold"] == 0.5 and e["far"] == pytest.approx(0.2) and e["frr"] == 0.25
    assert e["eer"] == pytest.approx(0.225)
    # FAR <= 0.1: lowest t with at most 1 impostor >= t is 0.6 (0.7 is the one) -> FRR 1/4
    r = V.frr_at_far(gen, imp, 0.1)
    assert (r["threshold"], r["far"], r["frr"]) == (0.6, pytest.approx(0.1), 0.25)
    # FAR <= 0.05 (not even one impostor): t just above 0.7 -> 0.8 accepted, FRR 2/4
    r = V.frr_at_far(gen, imp, 0.05)
    assert r["threshold"] == 0.8 and r["far"] == 0.0 and r["frr"] == 0.5


def test_ties_at_the_threshold_are_accepted_or_rejected_together():
    gen = [0.5, 0.5, 0.9]
    imp = [0.5, 0.5, 0.5, 0.1]  # three impostors tie with two genuine scores
    # t = 0.5 accepts all ties: FAR 3/4, FRR 0; t = 0.9: FAR 0, FRR 2/3
    r = V.frr_at_far(gen, imp, 0.5)  # 3/4 > 0.5, so the tied group is rejected whole
    assert r["threshold"] == 0.9 and r["far"] == 0.0 and r["frr"] == pytest.approx(2 / 3)
    e = V.eer(gen, imp)  # |0.75 - 0| vs |0 - 2/3| vs t=0.1: |1 - 0|: 0.9 is the closest
    assert e["threshold"] == 0.9 and e["eer"] == pytest.approx(1 / 3)
    # nothing separable: every score equal -> t at the shared score accepts all (FAR 1, FRR 0),
    # above it rejects all (FAR 0, FRR 1); both |diff| = 1, the lower threshold wins
    e = V.eer([0.3, 0.3], [0.3, 0.3])
    assert e["threshold"] == 0.3 and e["eer"] == 0.5
    above = V.frr_at_far([0.3], [0.3], 1e-3)
    assert above["threshold"] > 0.3 and above["frr"] == 1.0


def test_report_finds_the_hardest_errors_and_sums_the_histograms():
    scores = np.array([[0.9, 0.2, 0.95], [0.1, 0.4, 0.3], [0.0, 0.5, 0.6]])
    target = np.array([0, 1, 2])
    rep = V.report(scores, target, ["q0", "q1", "q2"], ["g0", "g1", "g2"], hardest=2)
    assert rep["genuine"]["count"] == 3 and rep["impostor"]["count"] == 6
    assert sum(rep["genuine"]["histogram"]) == 3 and sum(rep["impostor"]["histogram"]) == 6
    assert [(x["query"], x["gallery"]) for x in rep["hardest_false_accepts"]] == [("q0", "g2"), ("q2", "g1")]
    assert [(x["query"], x["gallery"], x["score"]) for x in rep["hardest_false_rejects"]][0] == ("q1", "g1", 0.4)
    assert set(rep["frr_at_far"]) == {"0.01", "0.001", "0.0001"}
    assert V.thresholds(rep)["0.001"] == rep["frr_at_far"]["0.001"]["threshold"]
