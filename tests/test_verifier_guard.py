"""Adversarial verifier inputs are refused in the caller, before any worker process is started."""

from __future__ import annotations

import multiprocessing

import pytest

from selfdistill.rewards import AnswerLimits, MathVerifier, RewardConfig, build_reward, status_counts
from selfdistill.rewards.guard import refusal

MEGABYTE = 1 << 20

# name -> (response, the rule that refuses it, as a substring of the reason)
ADVERSARIAL = {
    "power_tower": ("\\boxed{9^{9^{9^{9}}}}", "too large"),
    "power_tower_unbraced": ("\\boxed{9^9^9^9}", "too large"),
    "power_tower_python": ("\\boxed{9**9**9**9}", "too large"),
    "tall_small_tower": ("\\boxed{2^{2^{2^{2}}}}", "power tower of height 3"),
    "huge_exponent": ("\\boxed{2^{2^{40}}}", "too large"),
    "symbolic_huge_exponent": ("\\boxed{x^{10^{100}}}", "too large"),
    "huge_power_of_power": ("\\boxed{(10^{9999})^{9999}}", "a number of about"),
    "huge_factorial": ("\\boxed{(10^{10})!}", "factorial"),
    "big_factorial": ("\\boxed{100000!}", "factorial"),
    "integral_huge_limit": ("\\boxed{\\int_{0}^{10^{100}} e^{-x^2} dx}", "too large"),
    "sum_huge_limit": ("\\boxed{\\sum_{n=1}^{10^{12}} \\frac{1}{n^2}}", "too large"),
    "product_huge_limit": ("\\boxed{\\prod_{k=1}^{99999999} k}", "too large"),
    "deep_braces": ("\\boxed{" + "{" * 5000 + "1" + "}" * 5000 + "}", "longer than"),
    "deep_parentheses": ("\\boxed{" + "(" * 40 + "1" + ")" * 40 + "}", "nesting deeper"),
    "deep_fractions": ("\\boxed{" + "\\frac{1}{" * 20 + "2" + "}" * 20 + "}", "nesting deeper"),
    "long_boxed_sum": ("\\boxed{" + "1+" * 50_000 + "1}", "longer than"),
    "megabyte_response": ("x" * MEGABYTE + "\\boxed{1/3}", "response longer than"),
    "megabyte_answer": ("\\boxed{" + "a" * MEGABYTE + "}", "longer than"),
    "nul_byte": ("\\boxed{\\frac{1}{2}\x00}", "control character"),
    "escape_sequence": ("\\boxed{\x1b[2J 1/2}", "control character"),
    "fullwidth_digits": ("\\boxed{\uff14\uff12.5}", "U+FF14"),
    "arabic_indic_digits": ("\\boxed{\u0664\u0662/7}", "U+0664"),
    "cyrillic_x": ("\\boxed{\u0445^2+1}", "U+0445"),
    "bidi_override": ("\\boxed{\u202e1/2}", "U+202E"),
    "zero_width_space": ("\\boxed{1\u200b/2}", "U+200B"),
    "emoji": ("\\boxed{\U0001f600+1}", "U+1F600"),
    "unbalanced_escaped_brace": ("\\boxed{\\{1, 2}", "unbalanced"),
    "left_without_right": ("\\boxed{\\left( \\frac{1}{2}}", "\\left / \\right"),
    "stray_closing_brace": ("\\boxed{1 \\} + 2}", "unbalanced \\}"),
}


@pytest.mark.parametrize("name", ADVERSARIAL)
def test_refusal_names_the_rule(name):
    response, rule = ADVERSARIAL[name]
    with MathVerifier(timeout_s=1.0, num_workers=1) as verifier:
        (result,) = verifier.score([response], ["5"])
        assert verifier.workers_started == 0
    assert (result.reward, result.status) == (0.0, "refused")
    assert rule in result.reason


def test_batch_of_64_adversarial_answers_never_starts_a_worker():
    responses = [response for response, _ in ADVERSARIAL.values()]
    responses = (responses * 3)[:64]
    before = set(multiprocessing.active_children())
    with build_reward(RewardConfig(timeout_s=5.0, num_workers=2)) as verifier:
        results = verifier.score(responses, ["5"] * 64)
        assert verifier.workers_started == 0
        assert set(multiprocessing.active_children()) == before
    assert status_counts(results)["refused"] == 64


@pytest.mark.parametrize(
    "answer",
    ["\\frac{\\sqrt{2}}{2}", "x^2+2x+1", "2^{2023}", "10^{100}", "2^{2^{10}}", "(0, 1]", "\\{1, 2\\}", "3\\sqrt{2}",
     "\\left(1, 2\\right)", "x = 3", "12 \\text{ cm}", "2**10", "1e3", "\u22125", "\u03b1+\u03b2", "\\infty",
     "45^\\circ", "\\pi r^2", "\\sum_{n=1}^{100} n", "20!", "\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}",
     "\\dfrac{a+b}{c}", "[-1, 1)", "3 \\times 10^{8}"],
)
def test_ordinary_answers_pass_the_guard(answer):
    assert refusal(answer, AnswerLimits()) is None


def test_ordinary_answers_still_verify_with_the_guard_on():
    cases = [("\\boxed{0.5}", "\\frac{1}{2}", "correct"), ("\\boxed{2^{10}}", "1024", "correct"),
             ("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{1}{\\sqrt{2}}", "correct"), ("\\boxed{x=4}", "3", "wrong"),
             ("\\boxed{" + "7" * 5000 + "}", "7" * 5000, "correct"), ("\\boxed{9^{9^{9^{9}}}}", "5", "refused")]
    with MathVerifier(timeout_s=5.0, num_workers=1) as verifier:
        results = verifier.score([r for r, _, _ in cases], [g for _, g, _ in cases])
    assert [r.status for r in results] == [s for _, _, s in cases]


def test_limits_are_configurable():
    limits = AnswerLimits(max_answer_chars=5)
    assert "longer than 5" in refusal("123456", limits)
    assert refusal("2^{20000}", AnswerLimits(max_exponent=1e5)) is None
    assert refusal("2^{20000}", AnswerLimits()) is not None
