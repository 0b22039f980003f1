"""PMI targets: anchored on the frozen base, by hand for both bounds, support form, guards, fixed point."""

import math

import pytest
import torch

from selfdistill.config import ConfigError, load_config
from selfdistill.learner.objectives import ObjectiveInputs, PmiConfig, TeacherTensors, build_objective
from selfdistill.learner.objectives.base import kl_terms
from selfdistill.learner.objectives.pmi import pmi_target_logprobs

HALF = math.log(0.5)


def _scores(rows=None, support_ids=None, support_logprobs=None, B=1, T=1):
    return TeacherTensors(torch.zeros(B, T), torch.zeros(B, T), support_ids, support_logprobs, rows)


def _inputs(student_logprobs, full, reference, anchor):
    B, T, _ = student_logprobs.shape
    return ObjectiveInputs(
        student_logprobs=student_logprobs,
        tokens=torch.zeros(B, T, dtype=torch.long),
        mask=torch.ones(B, T),
        old_logprobs=torch.zeros(B, T),
        rewards=torch.zeros(B),
        group_ids=torch.zeros(B, dtype=torch.long),
        teacher={"full": full, "reference_only": reference, "none": anchor},
    )


def test_reads_three_contexts():
    assert build_objective(PmiConfig()).contexts == ("full", "reference_only", "none")


def test_target_is_the_anchor_when_both_teachers_agree_up_to_a_constant():
    anchor_rows = torch.randn(2, 3, 5).log_softmax(-1)
    full_rows = torch.randn(2, 3, 5).log_softmax(-1)
    target = pmi_target_logprobs(anchor_rows, full_rows - (full_rows - 0.7), 1.0, 10.0, "tanh_clip")
    assert torch.allclose(target, anchor_rows, atol=1e-6)
    # a student at the anchor has nothing to learn; a student elsewhere is pulled to the anchor, not to itself
    logits = anchor_rows.clone().requires_grad_()
    x = _inputs(logits.log_softmax(-1), _scores(full_rows, B=2, T=3), _scores(full_rows - 0.7, B=2, T=3),
                _scores(anchor_rows, B=2, T=3))
    loss, metrics = build_objective(PmiConfig())(x)
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    assert logits.grad.abs().max().item() < 1e-6
    assert metrics["target_student_kl"] == pytest.approx(0.0, abs=1e-6)
    moved = torch.randn(2, 3, 5)
    x = _inputs(moved.log_softmax(-1), _scores(full_rows, B=2, T=3), _scores(full_rows - 0.7, B=2, T=3),
                _scores(anchor_rows, B=2, T=3))
    assert build_objective(PmiConfig())(x)[0].item() > 1e-3


def test_tanh_clip_target_and_kl_loss_by_hand():
    # student uniform; anchor pi_0 = [0.8, 0.2]; Delta = q_full - q_ref = [1, -1] (mean 0): 10 tanh(0.1) = 0.996680
    student = torch.tensor([[[HALF, HALF]]])
    full = _scores(torch.tensor([[[HALF + 1.0, HALF - 1.0]]]))
    reference = _scores(torch.tensor([[[HALF, HALF]]]))
    anchor = _scores(torch.tensor([[[0.8, 0.2]]]).log())
    loss, _ = build_objective(PmiConfig(jsd_beta=0.0))(_inputs(student, full, reference, anchor))
    # target ∝ [0.8 e^0.996680, 0.2 e^-0.996680] = [0.967063, 0.032937]
    # KL(target || [0.5, 0.5]) = 0.967063 ln(1.934125) + 0.032937 ln(0.065875)
    assert loss.item() == pytest.approx(0.548338, abs=1e-5)


def test_jsd_loss_by_hand():
    # target [0.8, 0.2] (teachers agree, anchor [0.8, 0.2]), student [0.5, 0.5], jsd_beta 0.5: M = [0.65, 0.35]
    # 0.5 KL(T || M) = 0.5 (0.8 ln(0.8/0.65) + 0.2 ln(0.2/0.35)) = 0.5 * 0.054176
    # 0.5 KL(S || M) = 0.5 (0.5 ln(0.5/0.65) + 0.5 ln(0.5/0.35)) = 0.5 * 0.047159
    student = torch.tensor([[[HALF, HALF]]])
    same = _scores(torch.tensor([[[HALF, HALF]]]))
    anchor = _scores(torch.tensor([[[0.8, 0.2]]]).log())
    loss, _ = build_objective(PmiConfig(jsd_beta=0.5))(_inputs(student, same, same, anchor))
    assert loss.item() == pytest.approx(0.050668, abs=1e-5)


def test_hard_clip_and_beta():
    anchor = torch.tensor([[[HALF, HALF]]])
    target = pmi_target_logprobs(anchor, torch.tensor([[[1.0, -1.0]]]), beta=1.0, clip=0.5, form="hard_clip")
    # clamp([1, -1], -0.5, 0.5) = [0.5, -0.5] -> target [sigmoid(1), sigmoid(-1)] = [0.731059, 0.268941]
    assert target.exp().flatten().tolist() == pytest.approx([0.731059, 0.268941], abs=1e-6)
    halved = pmi_target_logprobs(anchor, torch.tensor([[[1.0, -1.0]]]), beta=2.0, clip=10.0, form="tanh_clip")
    # beta 2 halves the shift: [0.498340, -0.498340] -> target [sigmoid(0.996680), .] = [0.730405, 0.269595]
    assert halved.exp().flatten().tolist() == pytest.approx([0.730405, 0.269595], abs=1e-6)


def test_target_form_rejects_unknown_names():
    with pytest.raises(ValueError, match="target_form must be one of"):
        pmi_target_logprobs(torch.zeros(1, 2), torch.zeros(1, 2), 1.0, 1.0, "soft")


def test_minus_inf_teacher_logprobs_give_finite_loss_and_gradients():
    # token 2 filtered out (-inf) by both teachers and the anchor; token 1 only by the reference-only probe
    inf = -math.inf
    student = torch.zeros(1, 1, 3, requires_grad=True)
    full = _scores(torch.tensor([[[HALF, HALF, inf]]]))
    reference = _scores(torch.tensor([[[0.0, inf, inf]]]))
    anchor = _scores(torch.tensor([[[HALF, HALF, inf]]]))
    for jsd_beta in (0.0, 0.5, 1.0):
        loss, metrics = build_objective(PmiConfig(jsd_beta=jsd_beta))(_inputs(student.log_softmax(-1), full,
                                                                               reference, anchor))
        loss.backward()
        assert math.isfinite(loss.item()) and torch.isfinite(student.grad).all(), jsd_beta
        assert all(math.isfinite(v) for v in metrics.values()), metrics
        student.grad = None


def test_teacher_topk_support_by_hand():
    # student [0.1, 0.2, 0.3, 0.4]; the full-context teacher's support {0, 1} with log-probs [ln .5, ln .3];
    # the reference-only probe scored the same ids: [ln .25, ln .3]; the anchor: full rows [.1, .2, .3, .4]
    student = torch.tensor([[[0.1, 0.2, 0.3, 0.4]]]).log()
    ids = torch.tensor([[[0, 1]]])
    full = _scores(support_ids=ids, support_logprobs=torch.tensor([[[0.5, 0.3]]]).log())
    reference = _scores(support_ids=ids.clone(), support_logprobs=torch.tensor([[[0.25, 0.3]]]).log())
    anchor = _scores(torch.tensor([[[0.1, 0.2, 0.3, 0.4]]]).log())
    cfg = PmiConfig(support="teacher_topk", top_k=2, target_form="hard_clip", jsd_beta=0.0)
    loss, _ = build_objective(cfg)(_inputs(student, full, reference, anchor))
    # Delta = [ln 2, 0], centred [0.346574, -0.346574]; anchor and student on the support [1/3, 2/3]
    # target ∝ [1/3 * sqrt 2, 2/3 / sqrt 2] = [0.5, 0.5]; KL = 0.5 ln 1.5 + 0.5 ln 0.75 = 0.202733 - 0.143841
    assert loss.item() == pytest.approx(0.058892, abs=1e-5)


def test_teacher_topk_needs_the_other_passes_on_the_same_ids():
    student = torch.tensor([[[0.1, 0.2, 0.3, 0.4]]]).log()
    full = _scores(support_ids=torch.tensor([[[0, 1]]]), support_logprobs=torch.zeros(1, 1, 2))
    other = _scores(support_ids=torch.tensor([[[0, 2]]]), support_logprobs=torch.zeros(1, 1, 2))
    same = _scores(support_ids=torch.tensor([[[0, 1]]]), support_logprobs=torch.zeros(1, 1, 2))
    cfg = PmiConfig(support="teacher_topk", top_k=2)
    with pytest.raises(ValueError, match=r"teacher\['reference_only'\] to score the same ids"):
        build_objective(cfg)(_inputs(student, full, other, same))
    with pytest.raises(ValueError, match=r"teacher\['none'\] to score the same ids"):
        build_objective(cfg)(_inputs(student, full, same, other))


def test_step_moves_student_toward_the_token_the_question_adds():
    logits = torch.zeros(1, 1, 3, requires_grad=True)
    # the question raises token 2 relative to the reference-only view; the anchor is uniform
    full = _scores(torch.tensor([[[0.2, 0.2, 0.6]]]).log())
    reference = _scores(torch.tensor([[[0.4, 0.4, 0.2]]]).log())
    anchor = _scores(torch.full((1, 1, 3), 1 / 3).log())
    loss, metrics = build_objective(PmiConfig())(_inputs(logits.log_softmax(-1), full, reference, anchor))
    loss.backward()
    with torch.no_grad():
        stepped = (logits - logits.grad).softmax(-1)
    assert stepped[0, 0, 2] > 1 / 3
    assert set(metrics) >= {"teacher_student_kl/full", "teacher_student_kl/reference_only", "pmi_spread",
                            "target_student_kl"}


@pytest.mark.parametrize("jsd_beta", [0.0, 0.5])
def test_fixed_point_with_frozen_teachers(jsd_beta):
    """A free logit table trained by Adam with frozen teachers converges to the target and stays there."""
    torch.manual_seed(0)
    T, V = 6, 8
    full_rows, reference_rows, anchor_rows = (torch.randn(1, T, V).mul(2).log_softmax(-1) for _ in range(3))
    objective = build_objective(PmiConfig(jsd_beta=jsd_beta))
    logits = anchor_rows.clone().requires_grad_()  # the student starts at the frozen base
    opt = torch.optim.Adam([logits], lr=0.05)
    losses, kls = [], []
    for _ in range(600):
        x = _inputs(logits.log_softmax(-1), _scores(full_rows, T=T), _scores(reference_rows, T=T),
                    _scores(anchor_rows, T=T))
        loss, metrics = objective(x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        kls.append(metrics["target_student_kl"])
    target = pmi_target_logprobs(anchor_rows, full_rows - reference_rows, 1.0, 10.0, "tanh_clip")
    assert kls[0] > 0.1  # there was something to learn
    assert kls[-1] < 1e-3 and losses[-1] < 1e-3
    # no drift: the distance to the target keeps shrinking over the last 300 steps (the old student-anchored
    # target moved with every step and took the student to a token the teacher gave 0.017)
    tail = kls[-300:]
    assert all(b <= a + 1e-7 for a, b in zip(tail, tail[1:]))
    final = logits.detach().log_softmax(-1)
    assert kl_terms(target, final).sum(-1).max().item() < 1e-3
    # the student ends at the target, not at the full-context teacher (the reference-induced part is removed)
    assert kl_terms(full_rows, final).sum(-1).mean().item() > 0.05


@pytest.mark.parametrize("weights", ["live", "ema"])
def test_config_refuses_a_teacher_that_is_not_frozen(weights):
    with pytest.raises(ConfigError, match="needs teacher.weights: frozen"):
        load_config(None, ["objective.name=pmi", f"teacher.weights={weights}"])
    mix = {"name": "mix", "components": [{"weight": 1.0, "objective": {"name": "pmi"}}]}
    with pytest.raises(ConfigError, match="needs teacher.weights: frozen"):
        load_config(None, [f"teacher.weights={weights}", f"objective={mix}".replace("'", '"')])


def test_config_with_a_frozen_teacher_loads():
    assert load_config(None, ["objective.name=pmi"]).teacher.weights == "frozen"
