"""Mix: weighted sum by hand, context union, diagnostics under component names."""

import math

import pytest
import torch

from selfdistill.learner.objectives import (
    GrpoConfig,
    MixComponent,
    MixConfig,
    ObjectiveInputs,
    OpsdConfig,
    PmiConfig,
    TeacherTensors,
    build_objective,
)

HALF, QUARTER, THREE_QUARTERS = math.log(0.5), math.log(0.25), math.log(0.75)


def _inputs():
    # one prompt, rewards [1, 0]; response 0 has 1 token, response 1 has 2; token 0 sampled everywhere
    student = torch.tensor([[[QUARTER, THREE_QUARTERS], [HALF, HALF]], [[HALF, HALF], [HALF, HALF]]])
    teacher = TeacherTensors(torch.zeros(2, 2), torch.zeros(2, 2), full_logprobs=torch.full((2, 2, 2), HALF))
    return ObjectiveInputs(
        student_logprobs=student,
        tokens=torch.zeros(2, 2, dtype=torch.long),
        mask=torch.tensor([[1.0, 0.0], [1.0, 1.0]]),
        old_logprobs=torch.tensor([[QUARTER, HALF], [HALF, HALF]]),
        rewards=torch.tensor([1.0, 0.0]),
        group_ids=torch.tensor([0, 0]),
        teacher={"full": teacher},
    )


def _mix(*components):
    return build_objective(MixConfig(components=[MixComponent(weight=w, objective=c) for w, c in components]))


def test_weighted_sum_by_hand():
    mix = _mix((2.0, OpsdConfig(clip=None)), (0.5, GrpoConfig(loss_agg="token_mean")))
    loss, metrics = mix(_inputs())
    # opsd: KL per real token [0.143841, 0, 0], token mean 0.047947
    # grpo: A = +-0.707107, ratio 1, token mean of -A: (-0.707107 + 2 * 0.707107) / 3 = 0.235702
    # 2 * 0.047947 + 0.5 * 0.235702
    assert loss.item() == pytest.approx(0.213745, abs=1e-5)
    assert metrics["loss/opsd"] == pytest.approx(0.047947, abs=1e-5)
    assert metrics["loss/grpo"] == pytest.approx(0.235702, abs=1e-5)
    assert metrics["opsd/teacher_student_kl/full"] == pytest.approx(0.047947, abs=1e-5)
    assert metrics["teacher_student_kl/full"] == pytest.approx(0.047947, abs=1e-5)
    assert "grpo/pg_clipfrac" in metrics and "entropy" in metrics


def test_contexts_are_the_union_in_order():
    mix = _mix((1.0, OpsdConfig(support="teacher_topk")), (1.0, PmiConfig(support="teacher_topk")), (1.0, GrpoConfig()))
    assert mix.contexts == ("full", "reference_only", "none")
    assert not mix.needs_full_vocab
    assert _mix((1.0, GrpoConfig()), (1.0, OpsdConfig())).needs_full_vocab


def test_repeated_names_get_their_index():
    mix = _mix((1.0, OpsdConfig(clip=None)), (1.0, OpsdConfig(beta=1.0, clip=None)))
    _, metrics = mix(_inputs())
    assert {"loss/opsd0", "loss/opsd1", "opsd0/frac_pushed_away", "opsd1/frac_pushed_away"} <= set(metrics)
    # reverse KL of the one mismatched token: 0.25 ln(0.25/0.5) + 0.75 ln(0.75/0.5) = 0.130812, over 3 tokens
    assert metrics["loss/opsd1"] == pytest.approx(0.130812 / 3, abs=1e-5)
