"""Masked reductions, loss aggregation and input checks shared by every objective."""

import math

import pytest
import torch

from selfdistill.learner.objectives.base import (
    ObjectiveInputs,
    TeacherTensors,
    aggregate_loss,
    kl_terms,
    masked_mean,
    teacher_context,
    teacher_student_kl,
    token_entropy,
)


def _inputs(B=2, T=3, V=4, **overrides):
    fields = dict(
        student_logprobs=torch.randn(B, T, V).log_softmax(-1),
        tokens=torch.zeros(B, T, dtype=torch.long),
        mask=torch.ones(B, T),
        old_logprobs=torch.zeros(B, T),
        rewards=torch.zeros(B),
        group_ids=torch.zeros(B, dtype=torch.long),
        teacher={},
    )
    fields.update(overrides)
    return ObjectiveInputs(**fields)


def test_masked_mean_over_all_and_per_row():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    # (1 + 2 + 4) / 3
    assert masked_mean(values, mask).item() == pytest.approx(7 / 3)
    # rows: (1 + 2) / 2, 4 / 1, empty row -> 0
    assert masked_mean(values, mask, dim=-1).tolist() == pytest.approx([1.5, 4.0, 0.0])
    assert masked_mean(values, torch.zeros_like(mask)).item() == 0.0


def test_nan_and_inf_in_padded_slots_do_not_spread():
    values = torch.tensor([[1.0, math.nan], [math.inf, 3.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # (1 + 3) / 2; per row 1 and 3
    assert masked_mean(values, mask).item() == pytest.approx(2.0)
    assert masked_mean(values, mask, dim=-1).tolist() == pytest.approx([1.0, 3.0])
    for mode in ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum"):
        loss = aggregate_loss(values, mask, mode, max_response_len=2)
        loss.backward()
        assert math.isfinite(loss.item()), mode
        # gradient 0 on padding, finite on real tokens
        assert torch.isfinite(values.grad).all() and values.grad[0, 1] == 0 and values.grad[1, 0] == 0, mode
        values.grad = None


# per-token losses [[1, 2, 3], [4, -, -], [100 (masked), -, -]]
PER_TOKEN = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0], [100.0, 100.0, 100.0]])
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])


def test_aggregate_token_mean():
    # (1 + 2 + 3 + 4) / 4 tokens
    assert aggregate_loss(PER_TOKEN, MASK, "token_mean").item() == pytest.approx(2.5)


def test_aggregate_seq_mean_token_mean_skips_empty_responses():
    # ((1 + 2 + 3) / 3 + 4 / 1) / 2 responses = (2 + 4) / 2
    assert aggregate_loss(PER_TOKEN, MASK, "seq_mean_token_mean").item() == pytest.approx(3.0)


def test_aggregate_seq_mean_token_sum_divides_by_constant():
    # (6 / 4 + 4 / 4) / 2 responses with max_response_len = 4
    assert aggregate_loss(PER_TOKEN, MASK, "seq_mean_token_sum", max_response_len=4).item() == pytest.approx(1.25)
    # without a constant the sums are not divided: (6 + 4) / 2
    assert aggregate_loss(PER_TOKEN, MASK, "seq_mean_token_sum").item() == pytest.approx(5.0)


def test_aggregate_scales_tokens_by_importance_weights_but_keeps_the_mask_normaliser():
    weights = torch.tensor([[0.5, 2.0, 0.0], [1.0, 7.0, 7.0], [3.0, 3.0, 3.0]])
    # token_mean: (0.5*1 + 2*2 + 0*3 + 1*4) / 4 tokens
    assert aggregate_loss(PER_TOKEN, MASK, "token_mean", weights=weights).item() == pytest.approx(8.5 / 4)
    # seq_mean_token_mean: ((0.5 + 4 + 0) / 3 + 4 / 1) / 2
    assert aggregate_loss(PER_TOKEN, MASK, "seq_mean_token_mean", weights=weights).item() == pytest.approx(2.75)


def test_importance_weights_must_match_the_batch_shape():
    with pytest.raises(ValueError, match=r"is_weights must have shape \(2, 3\)"):
        _inputs(is_weights=torch.ones(2, 4))


def test_aggregate_rejects_unknown_mode():
    with pytest.raises(ValueError, match="loss_agg must be one of"):
        aggregate_loss(PER_TOKEN, MASK, "sum")


def test_aggregate_of_empty_mask_is_zero_and_keeps_graph():
    per_token = torch.ones(2, 2, requires_grad=True)
    loss = aggregate_loss(per_token, torch.zeros(2, 2), "seq_mean_token_mean")
    loss.backward()
    assert loss.item() == 0.0
    assert per_token.grad.abs().sum().item() == 0.0


def test_token_entropy_by_hand():
    # uniform over 2: ln 2 = 0.693147; one-hot: 0
    logprobs = torch.tensor([[math.log(0.5), math.log(0.5)], [0.0, -math.inf]])
    assert token_entropy(logprobs).tolist() == pytest.approx([0.693147, 0.0], abs=1e-6)


def test_kl_terms_are_finite_where_teacher_has_minus_inf():
    teacher = torch.tensor([0.0, -math.inf])
    student = torch.tensor([math.log(0.5), math.log(0.5)])
    # KL(one-hot || uniform) = 1 * ln(1 / 0.5) = 0.693147; the zero-prob entry adds 0
    assert kl_terms(teacher, student).sum().item() == pytest.approx(0.693147, abs=1e-6)


def test_teacher_student_kl_prefers_full_rows_then_support():
    student = torch.tensor([[[math.log(0.25), math.log(0.75), -50.0]]])
    full = torch.tensor([[[math.log(0.5), math.log(0.5), -50.0]]])
    mask = torch.ones(1, 1)
    # 0.5 ln(0.5 / 0.25) + 0.5 ln(0.5 / 0.75) = 0.346574 - 0.202733
    scores = TeacherTensors(torch.zeros(1, 1), torch.zeros(1, 1), full_logprobs=full)
    assert teacher_student_kl(scores, student, mask) == pytest.approx(0.143841, abs=1e-5)
    # support {0, 1}, both renormalised there: the same two-way distributions
    ids = torch.tensor([[[0, 1]]])
    on_support = TeacherTensors(torch.zeros(1, 1), torch.zeros(1, 1), ids, full.gather(-1, ids))
    assert teacher_student_kl(on_support, student, mask) == pytest.approx(0.143841, abs=1e-5)
    assert teacher_student_kl(TeacherTensors(torch.zeros(1, 1), torch.zeros(1, 1)), student, mask) is None


def test_inputs_reject_wrong_shapes_naming_the_field():
    with pytest.raises(ValueError, match=r"mask must have shape \(2, 3\)"):
        _inputs(mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"group_ids must have shape \(2,\)"):
        _inputs(group_ids=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="student_logprobs must be"):
        _inputs(student_logprobs=torch.zeros(2, 3))
    with pytest.raises(ValueError, match="tokens must be int64"):
        _inputs(tokens=torch.zeros(2, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="mask must be a float"):
        _inputs(mask=torch.ones(2, 3, dtype=torch.long))


def test_inputs_reject_teacher_tensors_naming_context_and_field():
    good = dict(token_logprobs=torch.zeros(2, 3), entropy=torch.zeros(2, 3))
    bad_support = TeacherTensors(
        **good, support_ids=torch.zeros(2, 3, 5, dtype=torch.long), support_logprobs=torch.zeros(2, 3, 4)
    )
    with pytest.raises(ValueError, match=r"teacher\['full'\]\.support_logprobs must have shape \(2, 3, 5\)"):
        _inputs(teacher={"full": bad_support})
    with pytest.raises(ValueError, match=r"teacher\['partial'\]\.full_logprobs must have shape \(2, 3, 4\)"):
        _inputs(teacher={"partial": TeacherTensors(**good, full_logprobs=torch.zeros(2, 3, 7))})
    with pytest.raises(ValueError, match="support_ids and support_logprobs must be given together"):
        _inputs(teacher={"full": TeacherTensors(**good, support_ids=torch.zeros(2, 3, 2, dtype=torch.long))})


def test_missing_teacher_context_names_it():
    x = _inputs(teacher={"none": TeacherTensors(torch.zeros(2, 3), torch.zeros(2, 3))})
    with pytest.raises(KeyError, match=r"objective 'opsd' needs teacher context 'full'; the batch has \['none'\]"):
        teacher_context(x, "full", "opsd")
