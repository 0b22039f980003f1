"""PMI targets: zero when the teachers agree, target by hand for both bounds, support form, direction."""

import math

import pytest
import torch

from selfdistill.learner.objectives import ObjectiveInputs, PmiConfig, TeacherTensors, build_objective
from selfdistill.learner.objectives.pmi import pmi_target_logprobs

HALF = math.log(0.5)


def _scores(rows=None, support_ids=None, support_logprobs=None, B=1, T=1):
    return TeacherTensors(torch.zeros(B, T), torch.zeros(B, T), support_ids, support_logprobs, rows)


def _inputs(student_logprobs, full, reference):
    B, T, _ = student_logprobs.shape
    return ObjectiveInputs(
        student_logprobs=student_logprobs,
        tokens=torch.zeros(B, T, dtype=torch.long),
        mask=torch.ones(B, T),
        old_logprobs=torch.zeros(B, T),
        rewards=torch.zeros(B),
        group_ids=torch.zeros(B, dtype=torch.long),
        teacher={"full": full, "reference_only": reference},
    )


def test_loss_is_zero_when_both_teachers_agree_up_to_a_constant():
    logits = torch.randn(2, 3, 5, requires_grad=True)
    full_rows = torch.randn(2, 3, 5).log_softmax(-1)
    x = _inputs(logits.log_softmax(-1), _scores(full_rows, B=2, T=3), _scores(full_rows - 0.7, B=2, T=3))
    loss, _ = build_objective(PmiConfig())(x)
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    assert logits.grad.abs().max().item() < 1e-6


def test_tanh_clip_target_and_loss_by_hand():
    student = torch.tensor([[[HALF, HALF]]])
    # Delta = q_full - q_ref = [1, -1] (mean 0): bounded 10 * tanh(0.1) = 0.996680
    full = _scores(torch.tensor([[[HALF + 1.0, HALF - 1.0]]]))
    reference = _scores(torch.tensor([[[HALF, HALF]]]))
    loss, _ = build_objective(PmiConfig())(_inputs(student, full, reference))
    # target = softmax(ln 0.5 + [0.996680, -0.996680]) = [sigmoid(1.993360), .] = [0.880098, 0.119902]
    # KL(target || [0.5, 0.5]) = 0.880098 ln(1.760196) + 0.119902 ln(0.239804)
    assert loss.item() == pytest.approx(0.326418, abs=1e-5)


def test_hard_clip_and_beta():
    student = torch.tensor([[[HALF, HALF]]])
    target = pmi_target_logprobs(student, torch.tensor([[[1.0, -1.0]]]), beta=1.0, clip=0.5, form="hard_clip")
    # clamp([1, -1], -0.5, 0.5) = [0.5, -0.5] -> target [sigmoid(1), sigmoid(-1)] = [0.731059, 0.268941]
    assert target.exp().flatten().tolist() == pytest.approx([0.731059, 0.268941], abs=1e-6)
    halved = pmi_target_logprobs(student, torch.tensor([[[1.0, -1.0]]]), beta=2.0, clip=10.0, form="tanh_clip")
    # beta 2 halves the shift: [0.498340, -0.498340] -> target [sigmoid(0.996680), .] = [0.730405, 0.269595]
    assert halved.exp().flatten().tolist() == pytest.approx([0.730405, 0.269595], abs=1e-6)


def test_target_form_rejects_unknown_names():
    with pytest.raises(ValueError, match="target_form must be one of"):
        pmi_target_logprobs(torch.zeros(1, 2), torch.zeros(1, 2), 1.0, 1.0, "soft")


def test_teacher_topk_support_by_hand():
    # student [0.1, 0.2, 0.3, 0.4]; the full-context teacher's support {0, 1} with log-probs [ln .5, ln .3]
    # the reference-only teacher scored the same ids: [ln .25, ln .3]
    student = torch.tensor([[[0.1, 0.2, 0.3, 0.4]]]).log()
    ids = torch.tensor([[[0, 1]]])
    full = _scores(support_ids=ids, support_logprobs=torch.tensor([[[0.5, 0.3]]]).log())
    reference = _scores(support_ids=ids.clone(), support_logprobs=torch.tensor([[[0.25, 0.3]]]).log())
    cfg = PmiConfig(support="teacher_topk", top_k=2, target_form="hard_clip")
    loss, _ = build_objective(cfg)(_inputs(student, full, reference))
    # Delta = [ln 2, 0], centred [0.346574, -0.346574]; student on the support [1/3, 2/3]
    # target ∝ [1/3 * sqrt 2, 2/3 / sqrt 2] = [0.5, 0.5]; KL = 0.5 ln 1.5 + 0.5 ln 0.75 = 0.202733 - 0.143841
    assert loss.item() == pytest.approx(0.058892, abs=1e-5)


def test_teacher_topk_needs_the_reference_teacher_on_the_same_ids():
    student = torch.tensor([[[0.1, 0.2, 0.3, 0.4]]]).log()
    full = _scores(support_ids=torch.tensor([[[0, 1]]]), support_logprobs=torch.zeros(1, 1, 2))
    reference = _scores(support_ids=torch.tensor([[[0, 2]]]), support_logprobs=torch.zeros(1, 1, 2))
    with pytest.raises(ValueError, match=r"teacher\['reference_only'\] to score the same ids"):
        build_objective(PmiConfig(support="teacher_topk", top_k=2))(_inputs(student, full, reference))


def test_step_moves_student_toward_the_token_the_question_adds():
    logits = torch.zeros(1, 1, 3, requires_grad=True)
    # the question raises token 2 relative to the reference-only view
    full = _scores(torch.tensor([[[0.2, 0.2, 0.6]]]).log())
    reference = _scores(torch.tensor([[[0.4, 0.4, 0.2]]]).log())
    loss, metrics = build_objective(PmiConfig())(_inputs(logits.log_softmax(-1), full, reference))
    loss.backward()
    with torch.no_grad():
        stepped = (logits - logits.grad).softmax(-1)
    assert stepped[0, 0, 2] > 1 / 3
    assert set(metrics) >= {"teacher_student_kl/full", "teacher_student_kl/reference_only", "pmi_spread"}
