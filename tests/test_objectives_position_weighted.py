"""PW-OPSD: position weights at stated points and the per-response weighted mean, by hand."""

import math

import pytest
import torch

from selfdistill.learner.objectives import ObjectiveInputs, PositionWeightedConfig, TeacherTensors, build_objective
from selfdistill.learner.objectives.position_weighted import position_weights


def test_weights_at_stated_points():
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0, 0.0]])
    weights = position_weights(mask, w_min=0.25, tau=0.30, s=0.10)
    # T_i = 5: f_t = (t - 0.5) / 5 = [0.1, 0.3, 0.5, 0.7, 0.9]
    # t=1: 0.25 + 0.75 * sigmoid(-2) = 0.25 + 0.75 * 0.119203
    # t=2: f = tau -> w_min + (1 - w_min) / 2 = 0.625
    # t=3: 0.25 + 0.75 * sigmoid(2) = 0.25 + 0.75 * 0.880797; padding -> 0
    assert weights[0].tolist() == pytest.approx([0.339402, 0.625, 0.910598, 0.986510, 0.998146, 0.0], abs=1e-6)


def test_weights_use_each_responses_own_length():
    mask = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    weights = position_weights(mask, w_min=0.0, tau=0.5, s=0.1)
    # a one-token response sits at f = 0.5 = tau -> 0.5; the last of three at f = 5/6
    assert weights[0, 0].item() == pytest.approx(0.5)
    assert weights[1, 2].item() == pytest.approx(1 / (1 + math.exp(-(5 / 6 - 0.5) / 0.1)), abs=1e-6)


def test_weights_rise_between_w_min_and_one():
    weights = position_weights(torch.ones(1, 200), w_min=0.25, tau=0.3, s=0.1)[0]
    # first token: f = 0.0025 -> 0.25 + 0.75 * sigmoid(-2.975) = 0.25 + 0.75 * 0.048556
    assert weights[0].item() == pytest.approx(0.286417, abs=1e-5)
    assert weights[-1].item() == pytest.approx(1.0, abs=1e-3)
    assert bool((weights[1:] > weights[:-1]).all())


def test_position_weighted_loss_by_hand():
    half, quarter, three_quarters = math.log(0.5), math.log(0.25), math.log(0.75)
    # response 0: 1 token, KL([.5, .5] || [.25, .75]) = 0.143841 at f = 0.5
    # response 1: 2 tokens, the same KL at f = 0.25, then teacher == student (KL 0) at f = 0.75
    student = torch.tensor([[[quarter, three_quarters], [half, half]], [[quarter, three_quarters], [half, half]]])
    teacher_rows = torch.full((2, 2, 2), half)
    mask = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    x = ObjectiveInputs(
        student_logprobs=student,
        tokens=torch.zeros(2, 2, dtype=torch.long),
        mask=mask,
        old_logprobs=torch.zeros(2, 2),
        rewards=torch.zeros(2),
        group_ids=torch.zeros(2, dtype=torch.long),
        teacher={"full": TeacherTensors(torch.zeros(2, 2), torch.zeros(2, 2), full_logprobs=teacher_rows)},
    )
    loss, metrics = build_objective(PositionWeightedConfig(clip=None))(x)
    # w(f=0.5) = 0.910598, w(f=0.25) = 0.25 + 0.75 * sigmoid(-0.5) = 0.533156
    # response sums over lengths: 0.910598 * 0.143841 / 1 = 0.130981; 0.533156 * 0.143841 / 2 = 0.038345
    # mean over responses: (0.130981 + 0.038345) / 2
    assert loss.item() == pytest.approx(0.084663, abs=1e-5)
    # weights of the 3 real tokens: (0.910598 + 0.533156 + 0.991760) / 3
    assert metrics["mean_weight"] == pytest.approx(0.811838, abs=1e-5)
    clipped, _ = build_objective(PositionWeightedConfig())(x)
    # with the default clip 0.05, each KL's terms [0.346574, -0.202733] become [0.05, -0.202733]: -0.152733
    # (0.910598 * -0.152733 + 0.533156 * -0.152733 / 2) / 2
    assert clipped.item() == pytest.approx(-0.089897, abs=1e-5)
