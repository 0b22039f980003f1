"""GRPO / DAPO / Dr.GRPO / RLOO: advantages, clipped PG loss, DAPO shaping, by hand."""

import math

import pytest
import torch

from selfdistill.learner.objectives import DapoConfig, DrGrpoConfig, GrpoConfig, ObjectiveInputs, build_objective
from selfdistill.learner.objectives.rlvr import (
    RlooConfig,
    clipped_pg_loss,
    group_advantages,
    groups_with_reward_variance,
    overlong_penalty,
    rloo_advantages,
)


def _on_policy_inputs(rewards, group_ids, lengths, V=3, seed=0):
    """Random student rows, one token per position, old log-probs equal to current (ratio 1)."""
    torch.manual_seed(seed)
    B, T = len(rewards), max(lengths)
    logits = torch.randn(B, T, V, requires_grad=True)
    student = logits.log_softmax(-1)
    tokens = torch.zeros(B, T, dtype=torch.long)
    mask = torch.tensor([[1.0] * n + [0.0] * (T - n) for n in lengths])
    x = ObjectiveInputs(
        student_logprobs=student,
        tokens=tokens,
        mask=mask,
        old_logprobs=student.detach()[..., 0],
        rewards=torch.tensor(rewards),
        group_ids=torch.tensor(group_ids),
    )
    return x, logits


def test_group_advantages_scaled_by_unbiased_std():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.3])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 2])
    # group 0: mean 0.5, centred +-0.5, unbiased var 4 * 0.25 / 3 = 1/3, std 0.57735 -> +-0.866025
    # group 1: all equal -> 0; group 2: one response -> 0
    expected = [0.866025, -0.866025, -0.866025, 0.866025, 0.0, 0.0, 0.0]
    assert group_advantages(rewards, groups, scale_by_std=True, eps=1e-6).tolist() == pytest.approx(expected, abs=1e-5)


def test_group_advantages_without_std_and_with_unsorted_ids():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.5])
    groups = torch.tensor([7, 3, 7, 3])
    # group 7: [1, 0] mean 0.5 -> [0.5, -0.5]; group 3: [0, 0.5] mean 0.25 -> [-0.25, 0.25]
    assert group_advantages(rewards, groups, scale_by_std=False, eps=1e-6).tolist() == pytest.approx(
        [0.5, -0.25, -0.5, 0.25]
    )


def test_rloo_leave_one_out_baseline():
    rewards = torch.tensor([1.0, 0.0, 0.5, 2.0])
    groups = torch.tensor([0, 0, 0, 1])
    # 1 - (0 + 0.5)/2 = 0.75; 0 - (1 + 0.5)/2 = -0.75; 0.5 - (1 + 0)/2 = 0; lone response -> 0
    assert rloo_advantages(rewards, groups).tolist() == pytest.approx([0.75, -0.75, 0.0, 0.0])


def test_groups_with_reward_variance():
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0])
    groups = torch.tensor([0, 0, 1, 1, 2, 2])
    assert groups_with_reward_variance(rewards, groups).tolist() == [False, False, True, True, False, False]


def test_overlong_penalty_is_zero_then_linear_then_flat():
    lengths = torch.tensor([5, 6, 7, 8, 10, 12])
    # max_len 10, buffer 4: free up to 6 tokens, then -(len - 6) / 4, floor -1 at 10 and beyond
    assert overlong_penalty(lengths, max_len=10, buffer_len=4, factor=1.0).tolist() == pytest.approx(
        [0.0, 0.0, -0.25, -0.5, -1.0, -1.0]
    )
    # factor 0.5 halves it: 8 tokens -> -0.5 * 2 / 4
    assert overlong_penalty(torch.tensor([8]), 10, 4, 0.5).item() == pytest.approx(-0.25)
    with pytest.raises(ValueError, match="buffer_len must be in"):
        overlong_penalty(lengths, max_len=10, buffer_len=0, factor=1.0)


def test_clipped_pg_loss_values_and_clip_mask():
    ratios = torch.tensor([1.0, 1.5, 0.5, 1.5, 0.5])
    advantages = torch.tensor([1.0, 1.0, -1.0, -1.0, 1.0])
    logprobs = ratios.log().requires_grad_()
    loss, clipped = clipped_pg_loss(logprobs, torch.zeros(5), advantages, clip_low=0.2, clip_high=0.2)
    # ratio 1, A=+1: -1 | 1.5, A=+1: max(-1.5, -1.2) = -1.2 clipped | 0.5, A=-1: max(0.5, 0.8) = 0.8 clipped
    # 1.5, A=-1: max(1.5, 1.2) = 1.5 (no clip when it would be optimistic) | 0.5, A=+1: max(-0.5, -0.8) = -0.5
    assert loss.tolist() == pytest.approx([-1.0, -1.2, 0.8, 1.5, -0.5])
    assert clipped.tolist() == [False, True, True, False, False]
    loss.sum().backward()
    # d/dlogprob of -A * ratio = -A * ratio; the clipped tokens get exactly 0
    assert logprobs.grad.tolist() == pytest.approx([-1.0, 0.0, 0.0, 1.5, -0.5])


def test_clip_higher_allows_a_larger_increase():
    ratio = torch.tensor([1.25]).log()
    # clip_high 0.2 clips 1.25 at 1.2; DAPO's 0.28 does not
    assert clipped_pg_loss(ratio, torch.zeros(1), torch.ones(1), 0.2, 0.2)[1].item()
    assert not clipped_pg_loss(ratio, torch.zeros(1), torch.ones(1), 0.2, 0.28)[1].item()


def test_grpo_positive_advantage_raises_the_token_logprob():
    x, logits = _on_policy_inputs([1.0, 0.0], [0, 0], [1, 1])
    loss, _ = build_objective(GrpoConfig())(x)
    loss.backward()
    with torch.no_grad():
        after = (logits - 0.5 * logits.grad).log_softmax(-1)[..., 0]
    before = x.student_logprobs.detach()[..., 0]
    assert after[0, 0] > before[0, 0]  # reward 1 -> A > 0 -> up
    assert after[1, 0] < before[1, 0]  # reward 0 -> A < 0 -> down


def test_grpo_loss_reductions_by_hand():
    # one group, rewards [1, 0] -> A = +-0.5 / std([1, 0]) = +-0.5 / 0.707107 = +-0.707107
    # ratio 1 so each token's loss is -A; response 0 has 1 token, response 1 has 2
    x, _ = _on_policy_inputs([1.0, 0.0], [0, 0], [1, 2])
    seq_mean, metrics = build_objective(GrpoConfig())(x)
    assert seq_mean.item() == pytest.approx(0.0, abs=1e-6)  # (-0.707107 + 0.707107) / 2
    token_mean, _ = build_objective(GrpoConfig(loss_agg="token_mean"))(x)
    # (-0.707107 * 1 + 0.707107 * 2) / 3 tokens
    assert token_mean.item() == pytest.approx(0.235702, abs=1e-5)
    assert metrics["ratio_mean"] == pytest.approx(1.0)
    assert metrics["pg_clipfrac"] == 0.0
    # token-level advantages [0.707107, -0.707107, -0.707107]: mean -0.235702
    assert metrics["adv_mean"] == pytest.approx(-0.235702, abs=1e-5)


def test_dr_grpo_sums_tokens_over_a_constant():
    x, _ = _on_policy_inputs([1.0, 0.0], [0, 0], [1, 2])
    loss, _ = build_objective(DrGrpoConfig(max_response_len=4))(x)
    # A = r - mean = +-0.5 (no std); per response token sum / 4: (-0.5 * 1 / 4 + 0.5 * 2 / 4) / 2 = 0.0625
    assert loss.item() == pytest.approx(0.0625)


def test_rloo_objective_by_hand():
    x, _ = _on_policy_inputs([1.0, 0.0, 0.5], [0, 0, 0], [1, 2, 1])
    loss, _ = build_objective(RlooConfig(loss_agg="token_mean"))(x)
    # A = [0.75, -0.75, 0]; token mean of -A: (-0.75 * 1 + 0.75 * 2 + 0 * 1) / 4
    assert loss.item() == pytest.approx(0.1875)


def test_dapo_gives_equal_reward_groups_zero_weight():
    x, logits = _on_policy_inputs([1.0, 0.0, 1.0, 1.0], [0, 0, 1, 1], [2, 1, 1, 3])
    loss, _ = build_objective(DapoConfig())(x)
    # group 1 is dropped, tokens of group 0 only: (-0.707107 * 2 + 0.707107 * 1) / 3 tokens
    assert loss.item() == pytest.approx(-0.235702, abs=1e-5)
    loss.backward()
    assert logits.grad[2:].abs().sum().item() == 0.0
    assert logits.grad[:2].abs().sum().item() > 0.0


def test_dapo_overlong_penalty_shapes_the_reward():
    x, _ = _on_policy_inputs([1.0, 0.0], [0, 0], [2, 4])
    cfg = DapoConfig(scale_rewards=False, max_response_len=4, overlong_buffer_len=2, overlong_penalty_factor=0.5)
    loss, _ = build_objective(cfg)(x)
    # lengths 2 and 4 against max 4, buffer 2: penalties 0 and -0.5 -> rewards [1, -0.5]
    # mean 0.25 -> A = [0.75, -0.75]; token mean of -A: (-0.75 * 2 + 0.75 * 4) / 6 = 0.25
    assert loss.item() == pytest.approx(0.25)


def test_stale_samples_are_clipped_in_the_objective():
    x, logits = _on_policy_inputs([1.0, 0.0], [0, 0], [1, 1])
    # the sampling policy gave both tokens log-prob 0.5 lower: ratio e^0.5 = 1.6487 > 1.2
    stale = ObjectiveInputs(**{**x.__dict__, "old_logprobs": x.old_logprobs - 0.5})
    loss, metrics = build_objective(GrpoConfig())(stale)
    loss.backward()
    # response 0 (A > 0) is clipped -> no gradient; response 1 (A < 0) is not
    assert logits.grad[0].abs().sum().item() == 0.0
    assert logits.grad[1].abs().sum().item() > 0.0
    assert metrics["pg_clipfrac"] == pytest.approx(0.5)
    assert metrics["ratio_mean"] == pytest.approx(math.exp(0.5), abs=1e-5)
