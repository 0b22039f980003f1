"""DASD: masked quantile, gap normalisation, entropy-routed weights and their direction, by hand."""

import math

import pytest
import torch

from selfdistill.learner.objectives import ObjectiveInputs, TeacherTensors, build_objective
from selfdistill.learner.objectives.dasd import (
    DasdConfig,
    entropy_routing_weights,
    masked_quantile,
    normalised_gap,
)


def _inputs(student_logprobs, teacher_token_logprobs, tokens, rewards=None, group_ids=None):
    B, T, _ = student_logprobs.shape
    return ObjectiveInputs(
        student_logprobs=student_logprobs,
        tokens=tokens,
        mask=torch.ones(B, T),
        old_logprobs=student_logprobs.detach().gather(-1, tokens[..., None]).squeeze(-1),
        rewards=rewards if rewards is not None else torch.zeros(B),
        group_ids=group_ids if group_ids is not None else torch.arange(B),
        teacher={"full": TeacherTensors(teacher_token_logprobs, torch.zeros(B, T))},
    )


def test_masked_quantile_interpolates_over_real_tokens_only():
    values = torch.tensor([[3.0, 1.0, 2.0, 100.0], [5.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    # row 0 sorted [1, 2, 3]: q=0.2 at position 0.2 * 2 = 0.4 -> 1 + 0.4 * (2 - 1) = 1.4
    # row 1 has one token -> 5; row 2 is empty -> 0
    assert masked_quantile(values, mask, 0.2).tolist() == pytest.approx([1.4, 5.0, 0.0])
    assert masked_quantile(values, mask, 0.5).tolist() == pytest.approx([2.0, 5.0, 0.0])


def test_normalised_gap_divides_by_root_mean_square():
    gap = torch.tensor([[3.0, -4.0, 9.0], [1.0, 1.0, 1.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    # row 0: sqrt((9 + 16) / 2) = 3.535534 -> [0.848528, -1.131371]; row 1: a constant gap -> 1
    per_trajectory = normalised_gap(gap, mask, "traj_std", eps=0.0)
    assert per_trajectory[0, :2].tolist() == pytest.approx([0.848528, -1.131371], abs=1e-6)
    assert per_trajectory[1].tolist() == pytest.approx([1.0, 1.0, 1.0])
    # micro-batch: sqrt((9 + 16 + 1 + 1 + 1) / 5) = sqrt(5.6) = 2.366432
    assert normalised_gap(gap, mask, "batch_std", eps=0.0)[0, 0].item() == pytest.approx(3 / 2.366432, abs=1e-6)
    assert torch.equal(normalised_gap(gap, mask, "none", eps=0.0), gap)


def test_weights_change_sign_across_the_quantile():
    entropy = torch.tensor([[1.0, 2.0, 3.0]])
    gap = torch.full((1, 3), 2.0)
    mask = torch.ones(1, 3)
    # Q_0.5 = 2, median 2, MAD = median(|[-1, 0, 1]|) = 1; sigmoid(|2| - 1) = 0.731059
    # w = tanh([1, 0, -1]) * 0.731059 = [0.761594, 0, -0.761594] * 0.731059
    low_pulls = entropy_routing_weights(entropy, gap, mask, rho=0.5, side="low_entropy_pulls", eps=0.0)
    assert low_pulls[0].tolist() == pytest.approx([0.556770, 0.0, -0.556770], abs=1e-6)
    high_pulls = entropy_routing_weights(entropy, gap, mask, rho=0.5, side="high_entropy_pulls", eps=0.0)
    assert high_pulls[0].tolist() == pytest.approx([-0.556770, 0.0, 0.556770], abs=1e-6)


def test_small_gaps_are_damped():
    entropy = torch.tensor([[1.0, 2.0, 3.0]])
    mask = torch.ones(1, 3)
    # same token position, gap 0 vs gap 3: sigmoid(-1) = 0.268941 vs sigmoid(2) = 0.880797
    small = entropy_routing_weights(entropy, torch.zeros(1, 3), mask, 0.5, "low_entropy_pulls", 0.0)
    large = entropy_routing_weights(entropy, torch.full((1, 3), 3.0), mask, 0.5, "low_entropy_pulls", 0.0)
    assert small[0, 0].item() == pytest.approx(0.761594 * 0.268941, abs=1e-6)
    assert large[0, 0].item() == pytest.approx(0.761594 * 0.880797, abs=1e-6)


def test_dasd_loss_by_hand():
    # student rows [0.5, 0.5] (H = ln 2 = 0.693147) and [0.9, 0.1] (H = 0.325083); token 0 sampled twice
    student = torch.tensor([[[0.5, 0.5], [0.9, 0.1]]]).log()
    teacher = torch.tensor([[math.log(0.9), math.log(0.95)]])
    cfg = DasdConfig(rho=0.5, beta=1.0, gap_norm="none")
    loss, metrics = build_objective(cfg)(_inputs(student, teacher, torch.zeros(1, 2, dtype=torch.long)))
    # Q_0.5 = median = 0.509115, MAD = 0.184032 -> tanh argument [-1, +1]
    # d = [ln(0.9/0.5), ln(0.95/0.9)] = [0.587787, 0.054067]; sigmoid(d - 1) = [0.398382, 0.279704]
    # w = [-0.761594 * 0.398382, 0.761594 * 0.279704] = [-0.303405, 0.213021]
    # one response in its group -> A_grpo = 0; A = w * d = [-0.178337, 0.011517]
    # on-policy ratio 1 -> token mean of -A = (0.178337 - 0.011517) / 2
    assert loss.item() == pytest.approx(0.083410, abs=1e-5)
    assert metrics["frac_pushed_away"] == pytest.approx(0.5)
    assert metrics["mean_weight"] == pytest.approx((0.303405 + 0.213021) / 2, abs=1e-5)


def test_step_pulls_low_entropy_tokens_toward_teacher_and_pushes_high_entropy_ones_away():
    # three positions with low, middle and high student entropy; the teacher likes each sampled token more
    logits = torch.tensor([[[4.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.1, 0.0, 0.0]]], requires_grad=True)
    student = logits.log_softmax(-1)
    tokens = torch.zeros(1, 3, dtype=torch.long)
    teacher = student.detach()[..., 0] + 0.5
    loss, metrics = build_objective(DasdConfig(rho=0.5))(_inputs(student, teacher, tokens))
    loss.backward()
    with torch.no_grad():
        change = (logits - logits.grad).log_softmax(-1)[..., 0] - student[..., 0]
    assert change[0, 0] > 0  # low entropy, w > 0: toward the teacher
    assert change[0, 1] == 0  # at the quantile, w = 0
    assert change[0, 2] < 0  # high entropy, w < 0: away from the teacher
    assert metrics["frac_pushed_away"] == pytest.approx(1 / 3)


def test_rho_share_sets_which_share_is_pushed_away():
    # Five tokens with entropies 0..4 and a positive gap. rho = 0.2:
    # 'pushed': split at the 0.8-quantile (3.2): only the token with entropy 4 gets w < 0.
    # 'pulled': split at the 0.2-quantile (0.8): only the token with entropy 0 gets w > 0.
    entropy = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0]])
    gap, mask = torch.full((1, 5), 2.0), torch.ones(1, 5)
    pushed = entropy_routing_weights(entropy, gap, mask, rho=1 - 0.2, side="low_entropy_pulls", eps=0.0)
    pulled = entropy_routing_weights(entropy, gap, mask, rho=0.2, side="low_entropy_pulls", eps=0.0)
    assert (pushed < 0).tolist() == [[False, False, False, False, True]]
    assert (pulled > 0).tolist() == [[True, False, False, False, False]]
    assert DasdConfig().rho_share == "pushed"
