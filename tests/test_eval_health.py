"""Reasoning-health metrics on small hand-made responses."""

import math

import pytest

from selfdistill.eval.health import (HealthConfig, count_reflections, health_metrics, mean_entropy, mean_surprisal,
                                     repeated_ngram_share, repetition_rate, truncation_rate)


def test_repeated_ngram_share_by_hand():
    # 4-grams: abcd bcda cdab dabc abcd -> 5, of which 1 repeats an earlier one
    assert repeated_ngram_share("a b c d a b c d".split(), 4) == pytest.approx(1 / 5)
    assert repeated_ngram_share("a b c".split(), 4) == 0.0
    assert repeated_ngram_share([1, 1, 1, 1], 2) == pytest.approx(2 / 3)  # token ids work too


def test_repetition_rate_is_mean_over_responses_of_lowercased_words():
    assert repetition_rate(["A b C d a B c D", "x y"], 4) == pytest.approx((1 / 5 + 0) / 2)
    assert repetition_rate(["so so so so so"], 2) == pytest.approx(3 / 4)


def test_reflection_markers_case_insensitive_on_word_boundaries():
    text = "Wait, let me check. Hmm... await the waiting. LET ME   VERIFY it. double-check"
    assert count_reflections(text) == 5  # wait, let me check, hmm, let me verify, double-check
    assert count_reflections("Let me double-check this.") == 1  # the longer marker wins, once
    assert count_reflections("On second\nthought, no.") == 1
    assert count_reflections("Eureka! eureka, EUREKA", ["eureka"]) == 3
    assert count_reflections("wait", []) == 0


def test_truncation_and_token_means_pool_tokens():
    assert truncation_rate(["stop", "length", "length", "stop"]) == 0.5
    assert mean_surprisal([[-1.0, -2.0], [-3.0]]) == pytest.approx(2.0)  # pooled, not (1.5 + 3) / 2
    assert mean_entropy([[0.5, 1.5], [1.0]]) == pytest.approx(1.0)
    assert math.isnan(mean_entropy([[], []]))


def test_health_metrics_by_hand():
    texts = ["12+7=19\nWait, 19*3=57\n\\boxed{57}", "go go go go go go"]
    out = health_metrics(texts, [20, 30], ["stop", "length"], logprobs=[[-1.0], [-2.0, -3.0]],
                         cfg=HealthConfig(ngram=2))
    assert out == pytest.approx({
        "length": 25.0,
        "truncation_rate": 0.5,
        "repetition_rate": (0 + 4 / 5) / 2,  # 2-grams of six "go": 5, four repeat
        "reflection_rate": 0.5,
        "reflections_per_response": 0.5,
        "surprisal": 2.0,
    })
    assert "entropy" not in out and "surprisal" not in health_metrics(["x"], [1], ["stop"])
    assert health_metrics(["x"], [1], ["stop"], entropies=[[0.25]])["entropy"] == 0.25
    with pytest.raises(ValueError):
        health_metrics(["x"], [1, 2], ["stop"])
