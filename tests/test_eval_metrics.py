"""Benchmark metrics against values worked out by hand."""

from fractions import Fraction
from math import comb

import pytest

from selfdistill.eval.metrics import avg_at_k, maj_at_k, macro_average, majority_vote, pass_at_k, pass_at_k_curve


@pytest.mark.parametrize(
    "k, expected",
    # n=5, c=2: 1 - C(3,k)/C(5,k) = 1 - 3/5, 1 - 3/10, 1 - 1/10, 1 - 0, 1 - 0
    [(1, Fraction(2, 5)), (2, Fraction(7, 10)), (3, Fraction(9, 10)), (4, Fraction(1)), (5, Fraction(1))],
)
def test_pass_at_k_by_hand(k, expected):
    assert pass_at_k(5, 2, k) == pytest.approx(float(expected), rel=1e-12, abs=1e-15)


def test_pass_at_k_edges():
    assert [pass_at_k(4, 0, k) for k in range(1, 5)] == [0.0] * 4
    assert [pass_at_k(4, 4, k) for k in range(1, 5)] == [1.0] * 4
    assert pass_at_k(1, 1, 1) == 1.0 and pass_at_k(1, 0, 1) == 0.0
    for bad in [(5, 2, 6), (5, 2, 0), (5, 6, 1), (5, -1, 1), (0, 0, 1)]:
        with pytest.raises(ValueError):
            pass_at_k(*bad)


def test_pass_at_k_stable_for_large_n():
    # exact value from big-integer binomials; the product form never builds them
    n, c, k = 300, 20, 50
    exact = 1 - Fraction(comb(n - c, k), comb(n, k))
    assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-12)
    assert pass_at_k(100_000, 1, 1) == pytest.approx(1e-5, rel=1e-9)
    assert 0.0 <= pass_at_k(100_000, 50_000, 1000) <= 1.0


def test_pass_at_k_curve_means_over_problems():
    assert pass_at_k_curve([[1, 0], [0, 0]]) == {1: 0.25, 2: 0.5}
    curve = pass_at_k_curve([[True, False, False], [False, True]])  # k up to the fewest samples (2)
    assert curve == pytest.approx({1: (1 / 3 + 1 / 2) / 2, 2: (2 / 3 + 1) / 2})
    with pytest.raises(ValueError):
        pass_at_k_curve([[1, 0]], ks=[3])
    with pytest.raises(ValueError):
        pass_at_k_curve([])


def test_avg_at_k():
    assert avg_at_k([[1, 0, 0, 1], [1, 1, 1, 1], [0, 0, 0, 0]]) == pytest.approx(0.5)
    assert avg_at_k([[True], [True, False]]) == pytest.approx(0.75)  # per-problem mean first
    with pytest.raises(ValueError):
        avg_at_k([[1], []])


def test_majority_vote_ties_go_to_first_occurrence():
    assert majority_vote(["3", "4", "4", "3"]) == 0
    assert majority_vote(["4", None, "3", "3"]) == 2
    assert majority_vote([None, "", None]) is None
    # normalised answers vote together: \dfrac = \frac, spaces and $ ignored
    assert majority_vote(["7", "\\frac{1}{2}", "$\\dfrac{1}{2}$", "7 "]) == 0  # 2-2 tie: "7" came first
    assert majority_vote(["7", "\\frac{1}{2}", "\\dfrac{1}{2}"]) == 1


def test_maj_at_k():
    answers = [["3", "4", "4"], ["1", "2", None], [None, None, None]]
    correct = [[False, True, True], [False, True, False], [False, False, False]]
    # problem 1: "4" wins (correct); problem 2: tie 1-1, "1" first (wrong); problem 3: no answer
    assert maj_at_k(answers, correct) == pytest.approx(1 / 3)
    assert maj_at_k(answers, correct, k=1) == 0.0  # first sample only
    with pytest.raises(ValueError):
        maj_at_k(answers, correct, k=4)
    with pytest.raises(ValueError):
        maj_at_k(answers[:2], correct)


def test_macro_average_weights_each_dataset_once():
    per_dataset = {
        "big": {"n_problems": 500, "avg@2": 0.5, "pass@k": {"1": 0.5, "2": 1.0}},
        "small": {"n_problems": 10, "avg@2": 0.0, "pass@k": {"1": 0.0, "2": 0.5}, "only_here": 1.0},
    }
    macro = macro_average(per_dataset)
    assert macro["avg@2"] == pytest.approx(0.25)
    assert macro["pass@k"] == pytest.approx({"1": 0.25, "2": 0.75})
    assert "only_here" not in macro
    with pytest.raises(ValueError):
        macro_average({})
