"""Math verifier: answer extraction, equivalences, deadlines, threads, Ray actors (CPU only)."""

from __future__ import annotations

import multiprocessing
import os
import threading
import time

import pytest
from pydantic import ValidationError

from selfdistill.rewards import (
    MathVerifier,
    RewardConfig,
    VerifyResult,
    build_reward,
    extract_boxed,
    status_counts,
)
from selfdistill.rewards.deadline_pool import DeadlinePool
from selfdistill.rewards.math_check import arithmetic_value
from selfdistill.rewards.math_verifier import quick_status

TIMEOUT_S = 1.0  # for the tests that hit it; equivalences get the default 5 s (loaded CI)


def _started(verifier: MathVerifier) -> MathVerifier:
    verifier.score(["\\boxed{\\frac{1}{2}}"], ["0.5"])  # start the workers outside the timed tests
    return verifier


@pytest.fixture(scope="module")
def verifier():
    with MathVerifier() as v:
        yield _started(v)


@pytest.fixture(scope="module")
def short_timeout_verifier():
    # No answer limits: these tests reach the worker deadline, the last line behind the guard.
    with MathVerifier(timeout_s=TIMEOUT_S, num_workers=2, limits=None) as v:
        yield _started(v)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so \\boxed{42}.", "42"),
        ("\\boxed{1} then \\boxed{2}", "2"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\fbox{7}", "7"),
        ("\\boxed {3}", "3"),
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
        ("\\boxed{\\boxed{5}}", "5"),
        ("\\boxed{4} and a truncated \\boxed{12", "4"),
        ("no box at all", None),
        ("\\boxed", None),
        ("", None),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


def test_extract_boxed_is_linear_on_adversarial_nesting():
    start = time.monotonic()
    assert extract_boxed("\\boxed{" * 50_000) is None
    assert extract_boxed("\\boxed{" + "{" * 50_000 + "}" * 50_000 + "}") == "{" * 50_000 + "}" * 50_000
    assert time.monotonic() - start < 1.0


@pytest.mark.parametrize(
    "gold, predicted, expected",
    [
        ("72", "72", "correct"),
        ("72", "073", "wrong"),
        ("1000", "1,000", "correct"),
        ("-0", "0", "correct"),
        ("18", "\\$18", "correct"),
        ("12", "12 \\text{ cm}", "correct"),
        ("9" * 10_000, "9" * 10_000, "correct"),
        ("9" * 10_000, "9" * 9_999 + "8", "wrong"),
        ("\\frac{1}{2}", "0.5", None),
        ("3", "x=3", None),
    ],
)
def test_quick_status(gold, predicted, expected):
    assert quick_status(gold, predicted) == expected


@pytest.mark.parametrize(
    "text, value",
    [
        ("1e3", 1000),
        ("2**10", 1024),
        ("2^{10}", 1024),
        ("1\\,000", 1000),
        ("-\\frac{3}{4}", -0.75),
        ("0.1", 0.1),
        ("3 \\cdot 10^{4}", 30000),
    ],
)
def test_arithmetic_value_is_exact(text, value):
    from fractions import Fraction

    result = arithmetic_value(text)
    assert result is not None and Fraction(result.p, result.q) == Fraction(str(value))


@pytest.mark.parametrize("text", ["1/0", "x+1", "9^{9^{9^{9}}}", "1e99999", "2**0.5", "__import__('os')", ""])
def test_arithmetic_value_refuses(text):
    assert arithmetic_value(text) is None


@pytest.mark.parametrize(
    "response, gold, status",
    [
        ("\\boxed{0.5}", "\\frac{1}{2}", "correct"),
        ("\\boxed{\\frac{1}{2}}", "0.5", "correct"),
        ("\\boxed{2.0}", "2", "correct"),
        ("\\boxed{x=3}", "3", "correct"),
        ("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{1}{\\sqrt{2}}", "correct"),
        ("\\boxed{(x+1)^2}", "x^2+2x+1", "correct"),
        ("\\boxed{1e3}", "1000", "correct"),  # math-verify reads e as Euler's number: fallback
        ("\\boxed{2**10}", "1024", "correct"),
        ("The answer is \\boxed{72}", "$\\boxed{72}$", "correct"),
        ("\\boxed{0.4}", "\\frac{1}{2}", "wrong"),
        ("\\boxed{x=4}", "3", "wrong"),
        ("\\boxed{73}", "72", "wrong"),
        ("\\boxed{\\sqrt{3}}", "\\sqrt{2}", "wrong"),
        ("The answer is 72.", "72", "unparsable"),
        ("\\boxed{ }", "72", "unparsable"),
        ("\\boxed{72}", "", "error"),
    ],
)
def test_equivalences(verifier, response, gold, status):
    (result,) = verifier.score([response], [gold])
    assert result == VerifyResult(1.0 if status == "correct" else 0.0, status)


ADVERSARIAL = {
    "deep_braces": "\\boxed{" + "{" * 5000 + "1" + "}" * 5000 + "}",
    "unclosed_boxes": "\\boxed{" * 20_000,
    "power_tower": "\\boxed{9^{9^{9^{9}}}}",
    "huge_factorial": "\\boxed{(10^{10})!}",
    "big_factorial": "\\boxed{100000!}",
    "huge_power": "\\boxed{2^{2^{40}}}",
    "division_by_zero": "\\boxed{1/0}",
    "long_boxed_sum": "\\boxed{" + "1+" * 50_000 + "1}",
    "long_unboxed": "x" * 100_000,
    "long_integer": "\\boxed{" + "7" * 100_000 + "}",
    "unicode_junk": "\\boxed{\u2603\U0001f600\u0000\ufffd\u202e}",
    "empty": "",
}


@pytest.mark.parametrize("name", ADVERSARIAL)
def test_adversarial_answers_finish_and_score_zero(short_timeout_verifier, name):
    start = time.monotonic()
    (result,) = short_timeout_verifier.score([ADVERSARIAL[name]], ["5"])
    assert time.monotonic() - start < TIMEOUT_S + 3
    assert result.reward == 0.0
    assert result.status in ("timeout", "unparsable", "wrong")


def test_hung_answer_reports_timeout(short_timeout_verifier):
    (result,) = short_timeout_verifier.score([ADVERSARIAL["power_tower"]], ["5"])
    assert result.status == "timeout"


def test_batch_of_fifty_mixed_answers(short_timeout_verifier):
    cases = [
        ("\\boxed{72}", "72", "correct"),
        ("\\boxed{71}", "72", "wrong"),
        ("\\boxed{\\frac{3}{6}}", "0.5", "correct"),
        ("\\boxed{0.25}", "\\frac{1}{2}", "wrong"),
        ("no answer", "3", "unparsable"),
    ]
    batch = cases * 9 + [(ADVERSARIAL["power_tower"], "5", "timeout")] * 2 + [("\\boxed{x=3}", "3", "correct")] * 3
    start = time.monotonic()
    results = short_timeout_verifier.score([r for r, _, _ in batch], [g for _, g, _ in batch])
    assert time.monotonic() - start < 30
    assert [r.status for r in results] == [s for _, _, s in batch]
    assert status_counts(results) == {"correct": 21, "wrong": 18, "unparsable": 9, "refused": 0,
                                     "timeout": 2, "error": 0}


def test_integer_answers_never_start_workers():
    before = set(multiprocessing.active_children())
    with MathVerifier(timeout_s=TIMEOUT_S) as v:
        results = v.score(["\\boxed{12}", "\\boxed{1,000}", "\\boxed{-3}", "none"], ["12", "1000", "3", "4"])
        assert set(multiprocessing.active_children()) == before
    assert [r.status for r in results] == ["correct", "correct", "wrong", "unparsable"]


def test_works_from_a_non_main_thread(short_timeout_verifier):
    out: list = []
    responses = ["\\boxed{\\frac{2}{4}}", ADVERSARIAL["power_tower"]]
    thread = threading.Thread(target=lambda: out.append(short_timeout_verifier.score(responses, ["0.5", "5"])))
    thread.start()
    thread.join(timeout=TIMEOUT_S + 30)
    assert [r.status for r in out[0]] == ["correct", "timeout"]


def test_concurrent_calls_from_threads_get_their_own_answers(verifier):
    out: dict[int, list[VerifyResult]] = {}

    def score(i: int) -> None:
        out[i] = verifier.score([f"\\boxed{{\\frac{{{i}}}{{1}}}}", "\\boxed{\\frac{1}{3}}"], [str(i), "0.5"])

    threads = [threading.Thread(target=score, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert {i: [r.status for r in rs] for i, rs in out.items()} == {i: ["correct", "wrong"] for i in range(4)}


def test_score_rejects_mismatched_lengths(verifier):
    with pytest.raises(ValueError, match="2 responses but 1 golds"):
        verifier.score(["\\boxed{1}", "\\boxed{2}"], ["1"])


def test_pool_reports_timeouts_errors_and_dead_workers_then_recovers():
    pool = DeadlinePool("time.sleep", num_workers=1, timeout_s=1.0)
    try:
        assert pool.map([30, 0]) == [("timeout", None), ("ok", None)]
    finally:
        pool.close()
    pool = DeadlinePool("os._exit", num_workers=1, timeout_s=5.0)
    try:
        assert pool.map([3]) == [("error", "worker died (exit code 3)")]
    finally:
        pool.close()
    pool = DeadlinePool("math.sqrt", num_workers=2, timeout_s=5.0)
    try:
        assert pool.map([4.0, -1.0]) == [("ok", 2.0), ("error", "ValueError: math domain error")]
        pool.close()
        with pytest.raises(RuntimeError, match="after close"):
            pool.map([1.0])
    finally:
        pool.close()


def test_pool_raises_when_workers_cannot_start():
    pool = DeadlinePool("selfdistill.no_such_module.check", num_workers=1, timeout_s=1.0)
    try:
        with pytest.raises(RuntimeError, match="died while starting"):
            pool.map(["x"])
    finally:
        pool.close()


def test_reward_config_and_registry():
    cfg = RewardConfig(timeout_s=1.5, num_workers=1)
    with build_reward(cfg) as reward:
        assert isinstance(reward, MathVerifier)
        assert [r.status for r in reward.score(["\\boxed{3}"], ["3"])] == ["correct"]
    with pytest.raises(ValidationError, match="timeout_s"):
        RewardConfig(timeout_s=0)
    with pytest.raises(ValidationError, match="extra_forbidden"):
        RewardConfig(timeout=5)
    with pytest.raises(ValidationError, match="name"):
        RewardConfig(name="exact_match")


def test_works_inside_ray_actors():
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=1, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)

    class Scorer:  # defined here so Ray pickles it by value
        def __init__(self, timeout_s: float):
            self.verifier = MathVerifier(timeout_s=timeout_s, num_workers=1, limits=None)

        def score(self, responses: list[str], golds: list[str]) -> list[str]:
            return [r.status for r in self.verifier.score(responses, golds)]

    try:
        # A threaded actor: math-verify's own signal-based timeouts would fail here.
        actor = ray.remote(num_cpus=0, max_concurrency=4)(Scorer).remote(TIMEOUT_S)
        responses, golds = ["\\boxed{\\frac{1}{2}}", ADVERSARIAL["power_tower"], "\\boxed{2}"], ["0.5", "5", "2"]
        assert ray.get(actor.score.remote(responses, golds)) == ["correct", "timeout", "correct"]
        ray.kill(actor)
    finally:
        if started:
            ray.shutdown()
