"""Adaptive teacher exposure: fixed and scheduled alpha, and the Beta-policy controller (CPU, fast)."""

import json
import math

import numpy as np
import pytest
from pydantic import ValidationError

from selfdistill.teacher.exposure import ExposureConfig, ExposureController

KL = "train/teacher_student_kl/partial"


def controller(total_steps=1000, **kw) -> ExposureController:
    return ExposureController(ExposureConfig(policy="controller", **kw), total_steps)


def test_fixed_alpha_is_constant():
    c = ExposureController(ExposureConfig(alpha=0.3), total_steps=10)
    assert [c.alpha(s) for s in (0, 1, 7, 1000)] == [0.3] * 4
    assert c.observe(3, {"train/loss": 1.0}) == {"exposure/alpha": 0.3}


@pytest.mark.parametrize(
    "kw, total, expected",
    [
        # start 0.2 -> end 1.0 over 8 steps: +0.1 per step, then stays.
        ({"schedule_start": 0.2, "schedule_end": 1.0, "schedule_steps": 8}, 100,
         {0: 0.2, 2: 0.4, 4: 0.6, 8: 1.0, 50: 1.0}),
        # decreasing, over the whole run (schedule_steps=None -> total_steps=10)
        ({"schedule_start": 1.0, "schedule_end": 0.5}, 10, {0: 1.0, 1: 0.95, 5: 0.75, 10: 0.5, 11: 0.5}),
        # defaults: 0.25 -> 1.0 over the run
        ({}, 4, {1: 0.4375, 2: 0.625, 4: 1.0}),
    ],
)
def test_schedule_values(kw, total, expected):
    c = ExposureController(ExposureConfig(policy="schedule", **kw), total)
    for step, alpha in expected.items():
        assert c.alpha(step) == pytest.approx(alpha), step


def test_controller_alpha_bounded_under_adversarial_metrics():
    c = controller(total_steps=300, alpha_min=0.2, alpha_max=0.7, hold_steps=2, lr=0.5)
    rng = np.random.default_rng(0)
    nasty = [math.nan, math.inf, -math.inf, 1e300, -1e300, 0.0, -5.0, 1e-30]
    for step in range(1, 401):
        alpha = c.alpha(step)
        assert math.isfinite(alpha) and 0.2 <= alpha <= 0.7
        metrics = {k: float(rng.choice(nasty)) if rng.random() < 0.5 else float(rng.normal(0, 1e3))
                   for k in ("train/loss", KL, "train/entropy") if rng.random() < 0.8}
        answer = float(rng.choice(nasty)) if rng.random() < 0.5 else None
        out = c.observe(step, metrics, answer_logprob=answer)
        assert all(math.isfinite(v) for v in out.values()), out


def test_alpha_held_for_exactly_hold_steps():
    c = controller(hold_steps=3, alpha_min=0.0)
    alphas, learned = [], []
    for step in range(1, 31):
        alphas.append(c.alpha(step))
        assert c.alpha(step) == alphas[-1]  # asking twice changes nothing
        out = c.observe(step, {"train/loss": 10.0 - step})
        learned.append("exposure/reward" in out)
    windows = [alphas[i:i + 3] for i in range(0, 30, 3)]
    assert all(len(set(w)) == 1 for w in windows)
    assert all(a[0] != b[0] for a, b in zip(windows, windows[1:]))
    assert learned == [False, False, True] * 10  # one update at the end of each window


@pytest.mark.parametrize("staleness", [1, 2, 5])
def test_alpha_may_run_ahead_of_observe_as_the_async_pipeline_calls_it(staleness):
    """max_staleness k: alpha(n + k + 1) is asked before observe(n), across many hold windows."""
    hold, steps = 3, 30
    c = controller(hold_steps=hold, gamma=0.5)
    alphas = {step: c.alpha(step) for step in range(1, staleness + 2)}
    rewards = []
    for step in range(1, steps + 1):
        out = c.observe(step, {"train/loss": 100.0 - step})
        assert out["exposure/alpha"] == alphas[step]
        if "exposure/reward" in out:
            rewards.append((step, out["exposure/reward"]))
        if step + staleness + 1 <= steps:
            alphas[step + staleness + 1] = c.alpha(step + staleness + 1)
        assert c.alpha(step) == alphas[step]  # asking again for an observed step changes nothing
    windows = [[alphas[s] for s in range(w, w + hold)] for w in range(1, steps + 1, hold)]
    assert all(len(set(w)) == 1 for w in windows) and len({w[0] for w in windows}) == len(windows)
    # one update at the end of every window, and each window's reward is its own losses': 1 + 0.5 * 1
    assert rewards == [(end, pytest.approx(1.5)) for end in range(hold, steps + 1, hold)]
    assert len(c._decisions) <= staleness // hold + 2  # finished decisions are let go


def test_controller_in_the_rollout_pipeline_with_max_staleness_one():
    """The call order of launch/train.py: alpha() in the pipeline's thread, observe() then published() in the
    training thread, with the real RolloutPipeline (no Ray), past several hold windows."""
    import threading

    from selfdistill.launch.pipeline import RolloutPipeline

    c, lock, steps = controller(hold_steps=2), threading.Lock(), 12

    def make_batch(step):
        with lock:
            return c.alpha(step)

    learned, seen = [], {}
    with RolloutPipeline(make_batch, 1, steps, max_staleness=1) as pipeline:
        for step in range(1, steps + 1):
            seen[step] = pipeline.get(step)
            with lock:
                out = c.observe(step, {"train/loss": 1.0 / step})
            pipeline.published(step)
            assert out["exposure/alpha"] == seen[step]
            learned.append("exposure/reward" in out)
    assert learned == [False, True] * (steps // 2)
    assert all(seen[s] == seen[s + 1] for s in range(1, steps, 2))


def test_state_dict_with_decisions_ahead_of_observations_resumes_exactly():
    def run(c, steps, staleness=1):
        out = []
        for step in steps:
            c.alpha(step + staleness)
            out.append(c.observe(step, {"train/loss": 1.0 / step})["exposure/alpha"])
        return out

    c = controller(total_steps=100, hold_steps=3)
    c.alpha(1)
    run(c, range(1, 9))  # alpha(9) was asked, step 9 (a new window 7..9 ends there) not yet observed
    resumed = controller(total_steps=100, hold_steps=3)
    resumed.load_state_dict(json.loads(json.dumps(c.state_dict())))
    assert run(resumed, range(9, 40)) == run(c, range(9, 40))


def test_reward_by_hand():
    # H=3, gamma=0.5, lambda=0.1: losses 3, 2, 0.5 and answer log-probs -2, -1, -1
    # R = (3 - 2) + 0.1 * (-1 + 2) + 0.5 * ((2 - 0.5) + 0.1 * 0) = 1.85
    c = controller(hold_steps=3, gamma=0.5, answer_weight=0.1)
    for step, (loss, answer) in enumerate([(3.0, -2.0), (2.0, -1.0), (0.5, -1.0)], start=1):
        c.alpha(step)
        out = c.observe(step, {"train/loss": loss}, answer_logprob=answer)
    assert out["exposure/reward"] == pytest.approx(1.85)
    assert out["exposure/advantage"] == 0.0  # first reward: nothing to compare with yet
    # a NaN loss in the middle breaks both loss pairs; only the answer terms remain
    for step, (loss, answer) in enumerate([(3.0, -2.0), (math.nan, -1.0), (0.5, 0.0)], start=4):
        c.alpha(step)
        out = c.observe(step, {"train/loss": loss}, answer_logprob=answer)
    assert out["exposure/reward"] == pytest.approx(0.1 * 1 + 0.5 * 0.1 * 1)
    # nothing usable at all: the decision is not learned from
    for step in range(7, 10):
        c.alpha(step)
        out = c.observe(step, {})
    assert out["exposure/skipped"] == 1.0 and "exposure/reward" not in out


@pytest.mark.parametrize("high_is_better", [True, False])
def test_controller_follows_its_reward(high_is_better):
    """Synthetic run: each update lowers the loss by alpha (or 1 - alpha) plus noise."""
    decisions, hold = 300, 2
    c = controller(total_steps=decisions * hold, hold_steps=hold, seed=1)
    rng = np.random.default_rng(7)
    loss, drawn, start_mean = 5.0, [], None
    for step in range(1, decisions * hold + 1):
        alpha = c.alpha(step)
        if (step - 1) % hold == 0:
            drawn.append(alpha)
        loss -= (alpha if high_is_better else 1.0 - alpha) + rng.normal(0.0, 0.1)
        out = c.observe(step, {"train/loss": loss, KL: alpha, "train/entropy": 1.0})
        start_mean = out["exposure/beta_mean"] if start_mean is None else start_mean
    assert start_mean == pytest.approx(0.5)
    late = float(np.mean(drawn[-50:]))
    if high_is_better:
        assert late > 0.75 and late > np.mean(drawn[:20]) + 0.15
    else:
        assert late < 0.25 and late < np.mean(drawn[:20]) - 0.15


def test_state_dict_round_trip_reproduces_next_alphas():
    def feed(c, steps):
        out = []
        for step in steps:
            a = c.alpha(step)
            c.observe(step, {"train/loss": 1.0 / step + 0.1 * a, KL: a, "train/entropy": 0.5})
            out.append(a)
        return out

    c = controller(total_steps=100, hold_steps=4)
    feed(c, range(1, 27))  # stops mid-window (window 25..28)
    saved = json.loads(json.dumps(c.state_dict()))  # must survive trainer_state.json
    resumed = controller(total_steps=100, hold_steps=4)
    resumed.load_state_dict(saved)
    expected = feed(c, range(27, 80))
    assert feed(resumed, range(27, 80)) == expected
    assert feed(controller(total_steps=100, hold_steps=4), range(27, 80)) != expected


def test_state_dict_policy_mismatch_is_refused():
    saved = controller().state_dict()
    with pytest.raises(ValueError, match="policy 'controller'"):
        ExposureController(ExposureConfig(policy="fixed"), 10).load_state_dict(saved)


def test_observe_without_decision_says_so():
    with pytest.raises(ValueError, match=r"call alpha\(5\) first"):
        controller().observe(5, {"train/loss": 1.0})


@pytest.mark.parametrize(
    "kw, field",
    [
        ({"alpha": 1.5}, "alpha"),
        ({"alpha": 0.05}, "alpha"),  # below alpha_min = 0.1 (checked for the policy in use)
        ({"alpha_min": 0.6, "alpha_max": 0.4, "alpha": 0.5}, "alpha_min"),
        ({"policy": "schedule", "schedule_end": 0.9, "alpha_max": 0.8, "alpha": 0.5}, "schedule_end"),
        ({"hold_steps": 1}, "hold_steps"),
        ({"gamma": 0.0}, "gamma"),
        ({"lr": -1.0}, "lr"),
        ({"policy": "bandit"}, "policy"),
        ({"hold_step": 3}, "hold_step"),
    ],
)
def test_config_errors_name_the_field(kw, field):
    with pytest.raises(ValidationError) as e:
        ExposureConfig(**kw)
    assert field in str(e.value)


def test_bad_total_steps():
    with pytest.raises(ValueError, match="total_steps"):
        ExposureController(ExposureConfig(), 0)
