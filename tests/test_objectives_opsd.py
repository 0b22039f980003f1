"""OPSD: generalised JSD by hand at both ends and the middle, clip, supports, direction; opd_sampled."""

import math

import pytest
import torch

from selfdistill.config import ConfigError, load_config
from selfdistill.learner.objectives import (
    ObjectiveInputs,
    OpdSampledConfig,
    OpsdConfig,
    TeacherTensors,
    build_objective,
)
from selfdistill.learner.objectives.opsd import distributions_on_support, generalized_jsd

LOG = math.log
TEACHER = torch.tensor([LOG(0.5), LOG(0.5)])
STUDENT = torch.tensor([LOG(0.25), LOG(0.75)])


def _teacher(rows=None, token_logprobs=None, support_ids=None, support_logprobs=None):
    B, T = (rows if rows is not None else token_logprobs if token_logprobs is not None else support_ids).shape[:2]
    return TeacherTensors(
        token_logprobs=token_logprobs if token_logprobs is not None else torch.zeros(B, T),
        entropy=torch.zeros(B, T),
        support_ids=support_ids,
        support_logprobs=support_logprobs,
        full_logprobs=rows,
    )


def _inputs(student_logprobs, teacher, tokens=None, mask=None, rewards=None, group_ids=None):
    B, T, _ = student_logprobs.shape
    tokens = tokens if tokens is not None else torch.zeros(B, T, dtype=torch.long)
    return ObjectiveInputs(
        student_logprobs=student_logprobs,
        tokens=tokens,
        mask=mask if mask is not None else torch.ones(B, T),
        old_logprobs=student_logprobs.detach().gather(-1, tokens[..., None]).squeeze(-1),
        rewards=rewards if rewards is not None else torch.zeros(B),
        group_ids=group_ids if group_ids is not None else torch.zeros(B, dtype=torch.long),
        teacher={"full": teacher},
    )


def test_beta_zero_is_forward_kl():
    # KL(T || S) = 0.5 ln(0.5/0.25) + 0.5 ln(0.5/0.75) = 0.346574 - 0.202733
    assert generalized_jsd(TEACHER, STUDENT, beta=0.0).item() == pytest.approx(0.143841, abs=1e-6)


def test_beta_one_is_reverse_kl():
    # KL(S || T) = 0.25 ln(0.25/0.5) + 0.75 ln(0.75/0.5) = -0.173287 + 0.304099
    assert generalized_jsd(TEACHER, STUDENT, beta=1.0).item() == pytest.approx(0.130812, abs=1e-6)


def test_beta_half_uses_the_mixture():
    # M = [0.375, 0.625]
    # KL(T || M) = 0.5 ln(0.5/0.375) + 0.5 ln(0.5/0.625) = 0.143841 - 0.111572 = 0.032269
    # KL(S || M) = 0.25 ln(0.25/0.375) + 0.75 ln(0.75/0.625) = -0.101366 + 0.136741 = 0.035375
    # JSD = 0.5 * 0.032269 + 0.5 * 0.035375
    assert generalized_jsd(TEACHER, STUDENT, beta=0.5).item() == pytest.approx(0.033822, abs=1e-6)


def test_beta_quarter_weights_the_mixture_toward_the_student():
    # M = 0.25 T + 0.75 S = [0.3125, 0.6875]; KL(T||M) = 0.075775, KL(S||M) = 0.009473
    # JSD = 0.25 * 0.075775 + 0.75 * 0.009473
    assert generalized_jsd(TEACHER, STUDENT, beta=0.25).item() == pytest.approx(0.026048, abs=1e-6)


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_jsd_is_zero_for_equal_distributions(beta):
    rows = torch.tensor([[LOG(0.2), LOG(0.3), LOG(0.5)]])
    assert generalized_jsd(rows, rows.clone(), beta).item() == pytest.approx(0.0, abs=1e-7)


def test_pointwise_clip_caps_each_vocabulary_term():
    # forward terms [0.346574, -0.202733]; clip 0.05 caps the first only: 0.05 - 0.202733
    # (capping from above leaves negative terms, as the OPSD reference code does)
    assert generalized_jsd(TEACHER, STUDENT, 0.0, clip=0.05).item() == pytest.approx(-0.152733, abs=1e-6)
    # a clip above every term changes nothing
    assert generalized_jsd(TEACHER, STUDENT, 0.0, clip=1.0).item() == pytest.approx(0.143841, abs=1e-6)


def test_clipped_term_passes_no_gradient():
    student = STUDENT.clone().requires_grad_()
    generalized_jsd(TEACHER, student, 0.0, clip=0.05).backward()
    # only entry 1 is unclipped: d/ds_1 of -p_T1 * s_1 = -0.5
    assert student.grad.tolist() == pytest.approx([0.0, -0.5])


def test_generalized_jsd_rejects_beta_outside_unit_interval():
    with pytest.raises(ValueError, match="beta must be in"):
        generalized_jsd(TEACHER, STUDENT, 1.5)


@pytest.mark.parametrize("beta", [1e-6, 0.005, 0.995, 1 - 1e-6])
def test_beta_near_an_end_is_refused_naming_the_field(beta):
    # beta 1e-6 would give about 1e-6 * KL (0.000) where beta 0 gives the full KL (0.144): a jump
    with pytest.raises(ValueError, match="within 0.01 of an end"):
        generalized_jsd(TEACHER, STUDENT, beta)
    with pytest.raises(ConfigError, match=r"objective\.beta.*within 0.01 of an end"):
        load_config(None, [f"objective.beta={beta}"])


@pytest.mark.parametrize("beta", [0.0, 0.01, 0.99, 1.0])
def test_beta_at_the_ends_or_inside_the_margin_is_accepted(beta):
    assert load_config(None, [f"objective.beta={beta}"]).objective.beta == beta
    assert math.isfinite(generalized_jsd(TEACHER, STUDENT, beta).item())


def test_minus_inf_teacher_entries_give_finite_jsd_and_gradients():
    teacher = torch.tensor([0.0, -math.inf])
    for beta in (0.0, 0.5, 1.0):
        student = STUDENT.clone().requires_grad_()
        value = generalized_jsd(teacher, student, beta)
        value.backward()
        assert math.isfinite(value.item()) and torch.isfinite(student.grad).all(), beta


# V = 4, one token: teacher [0.4, 0.3, 0.2, 0.1], student [0.1, 0.2, 0.3, 0.4]
TEACHER_ROW = torch.tensor([[[0.4, 0.3, 0.2, 0.1]]]).log()
STUDENT_ROW = torch.tensor([[[0.1, 0.2, 0.3, 0.4]]]).log()
MASK = torch.ones(1, 1)


def test_teacher_topk_renormalises_both_on_the_teacher_support():
    # teacher's top-2 = ids {0, 1}: teacher [4/7, 3/7], student [0.1, 0.2] -> [1/3, 2/3]
    # KL = 4/7 ln(12/7) + 3/7 ln(9/14) = 0.307998 - 0.189357
    expected = 0.118641
    from_rows = distributions_on_support(STUDENT_ROW, _teacher(TEACHER_ROW), "teacher_topk", 2, MASK, "full")
    assert generalized_jsd(*from_rows, 0.0).item() == pytest.approx(expected, abs=1e-5)
    # the same from a compact support of 3 ids (top-2 picked by log-prob)
    ids = torch.tensor([[[2, 0, 1]]])
    compact = _teacher(support_ids=ids, support_logprobs=TEACHER_ROW.gather(-1, ids))
    on_support = distributions_on_support(STUDENT_ROW, compact, "teacher_topk", 2, MASK, "full")
    assert generalized_jsd(*on_support, 0.0).item() == pytest.approx(expected, abs=1e-5)
    with pytest.raises(ValueError, match=r"top_k=4 but teacher\['full'\]\.support_ids holds only 3 ids"):
        distributions_on_support(STUDENT_ROW, compact, "teacher_topk", 4, MASK, "full")


def test_student_topk_with_tail_bucket():
    # student's top-2 = ids {3, 2}: student [0.4, 0.3 | tail 0.3], teacher [0.1, 0.2 | tail 0.7]
    # KL(T || S) = 0.1 ln(0.1/0.4) + 0.2 ln(0.2/0.3) + 0.7 ln(0.7/0.3) = -0.138629 - 0.081093 + 0.593109
    expected = 0.373386
    from_rows = distributions_on_support(STUDENT_ROW, _teacher(TEACHER_ROW), "student_topk_tail", 2, MASK, "full")
    assert generalized_jsd(*from_rows, 0.0).item() == pytest.approx(expected, abs=1e-5)
    # teacher scored the student's top-2 ids (any order)
    ids = torch.tensor([[[2, 3]]])
    scored = _teacher(support_ids=ids, support_logprobs=TEACHER_ROW.gather(-1, ids))
    on_support = distributions_on_support(STUDENT_ROW, scored, "student_topk_tail", 2, MASK, "full")
    assert generalized_jsd(*on_support, 0.0).item() == pytest.approx(expected, abs=1e-5)
    # reverse KL over the same three buckets: 0.4 ln 4 + 0.3 ln 1.5 + 0.3 ln(3/7)
    assert generalized_jsd(*on_support, 1.0).item() == pytest.approx(0.421968, abs=1e-5)


def test_student_topk_rejects_support_that_is_not_the_students_topk():
    wrong_ids = torch.tensor([[[0, 1]]])
    scored = _teacher(support_ids=wrong_ids, support_logprobs=TEACHER_ROW.gather(-1, wrong_ids))
    with pytest.raises(ValueError, match=r"not the student's top-2 ids at 1 of 1 response tokens"):
        distributions_on_support(STUDENT_ROW, scored, "student_topk_tail", 2, MASK, "full")
    duplicated = torch.tensor([[[3, 3]]])
    scored = _teacher(support_ids=duplicated, support_logprobs=TEACHER_ROW.gather(-1, duplicated))
    with pytest.raises(ValueError, match="not the student's top-2 ids"):
        distributions_on_support(STUDENT_ROW, scored, "student_topk_tail", 2, MASK, "full")
    # a mismatch on a padding position is ignored
    distributions_on_support(
        STUDENT_ROW,
        _teacher(support_ids=wrong_ids, support_logprobs=torch.zeros(1, 1, 2)),
        "student_topk_tail",
        2,
        torch.zeros(1, 1),
        "full",
    )


def test_full_support_needs_full_rows():
    compact = _teacher(support_ids=torch.tensor([[[0, 1]]]), support_logprobs=torch.zeros(1, 1, 2))
    with pytest.raises(ValueError, match=r"support='full' needs teacher\['full'\]\.full_logprobs"):
        distributions_on_support(STUDENT_ROW, compact, "full", 2, MASK, "full")


def test_opsd_objective_value_and_aggregation():
    # two tokens: (T, S) = (TEACHER, STUDENT) then equal rows; token mean = (0.143841 + 0) / 2
    student = torch.stack([STUDENT, TEACHER])[None]
    teacher = _teacher(torch.stack([TEACHER, TEACHER])[None])
    loss, metrics = build_objective(OpsdConfig(clip=None))(_inputs(student, teacher))
    assert loss.item() == pytest.approx(0.0719205, abs=1e-6)
    assert metrics["teacher_student_kl/full"] == pytest.approx(0.0719205, abs=1e-6)
    assert metrics["frac_pushed_away"] == 0.0


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("support", ["full", "teacher_topk", "student_topk_tail"])
def test_opsd_step_moves_student_toward_teacher(beta, support):
    teacher_rows = torch.tensor([[[0.7, 0.2, 0.1]]]).log()
    logits = torch.zeros(1, 1, 3, requires_grad=True)
    objective = build_objective(OpsdConfig(beta=beta, support=support, top_k=2, clip=None))
    loss, _ = objective(_inputs(logits.log_softmax(-1), _teacher(teacher_rows)))
    loss.backward()
    with torch.no_grad():
        stepped = (logits - 1.0 * logits.grad).log_softmax(-1)
        before = generalized_jsd(teacher_rows, logits.log_softmax(-1), 0.0)
        after = generalized_jsd(teacher_rows, stepped, 0.0)
    assert after.item() < before.item()
    assert stepped[0, 0, 0] > math.log(1 / 3)  # the teacher's favourite token gains


def test_opd_sampled_advantage_and_gradient_by_hand():
    # student rows [0.5, 0.5] and [0.8, 0.2]; sampled tokens 0 then 1
    student = torch.tensor([[[0.5, 0.5], [0.8, 0.2]]]).log().requires_grad_()
    tokens = torch.tensor([[0, 1]])
    teacher = _teacher(token_logprobs=torch.tensor([[LOG(0.8), LOG(0.1)]]))
    loss, metrics = build_objective(OpdSampledConfig())(_inputs(student, teacher, tokens=tokens))
    # A = [ln(0.8/0.5), ln(0.1/0.2)] = [0.470004, -0.693147]; ratio 1 so loss_t = -A; token mean
    assert loss.item() == pytest.approx((-0.470004 + 0.693147) / 2, abs=1e-6)
    assert metrics["adv_mean"] == pytest.approx((0.470004 - 0.693147) / 2, abs=1e-6)
    assert metrics["frac_pushed_away"] == 0.0
    loss.backward()
    # gradient -A_t / 2 on each sampled token's log-prob, nothing elsewhere
    assert student.grad.flatten().tolist() == pytest.approx([-0.235002, 0.0, 0.0, 0.346574], abs=1e-6)


def test_opd_sampled_adds_the_verifier_advantage():
    # two responses of one prompt, one token each; teacher agrees with the student (gap 0)
    student = torch.tensor([[[0.5, 0.5]], [[0.5, 0.5]]]).log()
    teacher = _teacher(token_logprobs=torch.full((2, 1), LOG(0.5)))
    x = _inputs(student, teacher, rewards=torch.tensor([1.0, 0.0]))
    cfg = OpdSampledConfig(add_to_verifier_advantage=True, verifier="dr_grpo")
    loss, metrics = build_objective(cfg)(x)
    # A = 0 + (r - mean) = [0.5, -0.5]; token mean of -A = 0; adv_std = 0.5
    assert loss.item() == pytest.approx(0.0, abs=1e-7)
    assert metrics["adv_std"] == pytest.approx(0.5)
