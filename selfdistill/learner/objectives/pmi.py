"""PMI targets: distil only what the question adds to the reference (arXiv 2607.02234).

On long chain-of-thought models plain OPSD is dominated by a reference-induced signal:
the teacher that sees the reference solution favours copying its shortcuts. Three passes
of the frozen base score the same response: the teacher on question + reference
(`context`), a probe on the reference only (`reference_context`) and the base on the plain
question (`anchor_context`, the student's own prompt). Per vocabulary entry v

    Delta_v = log pi_T(v | question, reference) - log pi_T(v | reference)

is PMI(v; question | reference), the part of the teacher's preference that transfers. It
is centred by its vocabulary mean, bounded, and added to the frozen base's own log-probs:

    target = softmax(log pi_0(v | question) + c * tanh((Delta - mean_v Delta) / c) / beta)

("tanh_clip"; "hard_clip" uses clamp(., -c, c)), and the loss per token is the generalised
JSD_beta(target, student) (`jsd_beta`; 0 = KL(target || student)). The anchor pi_0 is the
FROZEN initial model, not the live student: a target that moves with the student has no
fixed point (on a free logit table it drove the student to a token the teacher gives 0.017).
So the objective needs `teacher.weights: frozen` (the config refuses anything else): the
teacher actor's `none` context then is pi_0. With frozen teachers the target is a constant
per token, the loss is minimised exactly at student = target, and when both teachers agree
up to a constant the target is pi_0 itself.

From the paper (as a digest of its equations 13-18 gives it): the three passes, centring,
c * tanh bound with c = 10, beta = 1, the frozen-base anchor, a generalised JSD loss. Ours:
the JSD's own beta (not recovered; default 0.5, the OPSD first-version mixture), the
hard_clip alternative, and the top-k support (the full-context teacher's top-k, which the
other two passes must score too, student renormalised on it).

Where the reference holds all of the question's information (the CPU arithmetic task: the
reference is the worked solution), the probe predicts rollouts as well as the teacher and the
target is pi_0 plus correctness-blind noise: `benchmarks/pmi_signal.py` measures the margin a
target gives correct over incorrect rollouts before any training is spent (docs/methods.md).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from selfdistill.learner.objectives.base import (
    LOGPROB_FLOOR,
    LossAggField,
    MaxResponseLen,
    Objective,
    ObjectiveConfigBase,
    ObjectiveInputs,
    TeacherContext,
    TeacherTensors,
    aggregate_loss,
    common_metrics,
    kl_terms,
    masked_mean,
    register_objective,
    teacher_context,
)
from selfdistill.learner.objectives.opsd import JsdBeta, TopK, generalized_jsd

TargetForm = Literal["tanh_clip", "hard_clip"]


class PmiConfig(ObjectiveConfigBase):
    name: Literal["pmi"] = "pmi"
    context: TeacherContext = "full"
    reference_context: TeacherContext = "reference_only"
    anchor_context: TeacherContext = Field(
        "none", description="Context of the anchor pass pi_0: the frozen base under the student's plain prompt."
    )
    support: Literal["full", "teacher_topk"] = Field(
        "full",
        description="'full': whole-vocabulary rows from all three passes; 'teacher_topk': the full-context "
        "teacher's top_k ids, scored by all three passes, student renormalised on them.",
    )
    top_k: TopK = 20
    target_form: TargetForm = Field(
        "tanh_clip", description="How the centred PMI is bounded: c * tanh(x / c) (paper) or clamp(x, -c, c)."
    )
    beta: float = Field(1.0, gt=0.0, description="Divides the bounded PMI: smaller beta moves the target further "
                        "from the anchor (paper: 1; ablations 0.5, 2).")
    clip: float = Field(10.0, gt=0.0, description="Bound c on the centred PMI of any vocabulary entry (paper: 10; "
                        "ablations 5, 20).")
    jsd_beta: JsdBeta = 0.5
    loss_agg: LossAggField = "token_mean"
    max_response_len: MaxResponseLen = None

    @property
    def needs_frozen_teacher(self) -> bool:
        """The anchor pass must come from the initial weights (see the module docstring)."""
        return True


def pmi_target_logprobs(anchor_logprobs: Tensor, pmi: Tensor, beta: float, clip: float, form: TargetForm) -> Tensor:
    """log softmax(anchor + bound(pmi - mean_v pmi) / beta), bound = c*tanh(./c) or clamp to [-c, c]; no grad."""
    centred = pmi - pmi.mean(-1, keepdim=True)
    if form == "tanh_clip":
        bounded = clip * torch.tanh(centred / clip)
    elif form == "hard_clip":
        bounded = centred.clamp(-clip, clip)
    else:
        raise ValueError(f"target_form must be one of {TargetForm.__args__}, got {form!r}")
    return (anchor_logprobs.detach().clamp_min(LOGPROB_FLOOR) + bounded / beta).log_softmax(-1)


def _same_ids_logprobs(teacher: TeacherTensors, ids: Tensor, picked: Tensor, full: TeacherTensors, mask: Tensor,
                       context: str, full_context: str) -> Tensor:
    """`teacher`'s log-probs on the ids the full-context teacher's support picked."""
    if teacher.full_logprobs is not None:
        return teacher.full_logprobs.gather(-1, ids)
    same_ids = teacher.has_support and teacher.support_ids.shape == full.support_ids.shape
    if not same_ids or ((teacher.support_ids != full.support_ids).any(-1) & (mask > 0)).any():
        raise ValueError(
            f"support='teacher_topk' needs teacher[{context!r}] to score the same ids as "
            f"teacher[{full_context!r}].support_ids, or to send full_logprobs"
        )
    return teacher.support_logprobs.gather(-1, picked)


def pmi_on_support(
    student_logprobs: Tensor,
    full: TeacherTensors,
    reference: TeacherTensors,
    anchor: TeacherTensors,
    cfg: PmiConfig,
    mask: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """Delta = q_full - q_reference, the anchor's log-probs (both no grad, finite) and the student's, on one support.

    Teacher log-probs are floored at LOGPROB_FLOOR first, so a -inf (a token a sampler
    filtered out) gives a large finite Delta instead of NaN (-inf - -inf) or inf.
    """
    contexts = ((cfg.context, full), (cfg.reference_context, reference), (cfg.anchor_context, anchor))
    if cfg.support == "full":
        for context, teacher in contexts:
            if teacher.full_logprobs is None:
                raise ValueError(f"support='full' needs teacher[{context!r}].full_logprobs; it is None")
        full_lp, reference_lp, anchor_lp = (t.full_logprobs for _, t in contexts)
        student_lp = student_logprobs
    else:
        if not full.has_support or full.support_ids.shape[-1] < cfg.top_k:
            raise ValueError(
                f"support='teacher_topk' needs teacher[{cfg.context!r}].support_ids with >= {cfg.top_k} ids")
        picked = full.support_logprobs.topk(cfg.top_k, dim=-1).indices
        ids = full.support_ids.gather(-1, picked)
        full_lp = full.support_logprobs.gather(-1, picked)
        reference_lp = _same_ids_logprobs(reference, ids, picked, full, mask, cfg.reference_context, cfg.context)
        anchor_lp = _same_ids_logprobs(anchor, ids, picked, full, mask, cfg.anchor_context, cfg.context)
        student_lp = student_logprobs.gather(-1, ids).log_softmax(-1)
    full_lp, reference_lp, anchor_lp = (t.detach().clamp_min(LOGPROB_FLOOR) for t in (full_lp, reference_lp, anchor_lp))
    return full_lp - reference_lp, anchor_lp, student_lp


@register_objective("pmi")
class PmiTargetDistillation(Objective):
    """PMI-purified OPSD: JSD_beta(softmax(log pi_0 + bounded PMI / beta), student) per token."""

    def __init__(self, cfg: PmiConfig) -> None:
        super().__init__(cfg)
        self.contexts = tuple(dict.fromkeys((cfg.context, cfg.reference_context, cfg.anchor_context)))
        self.needs_full_vocab = cfg.support == "full"

    def __call__(self, x: ObjectiveInputs) -> tuple[Tensor, dict[str, float]]:
        cfg = self.cfg
        full = teacher_context(x, cfg.context, self.name)
        reference = teacher_context(x, cfg.reference_context, self.name)
        anchor = teacher_context(x, cfg.anchor_context, self.name)
        pmi, anchor_lp, student_lp = pmi_on_support(x.student_logprobs, full, reference, anchor, cfg, x.mask)
        target = pmi_target_logprobs(anchor_lp, pmi, cfg.beta, cfg.clip, cfg.target_form)
        per_token = generalized_jsd(target, student_lp, cfg.jsd_beta)
        loss = aggregate_loss(per_token, x.mask, cfg.loss_agg, cfg.max_response_len, x.is_weights)
        with torch.no_grad():
            spread = masked_mean((pmi - pmi.mean(-1, keepdim=True)).abs().mean(-1), x.mask).item()
            target_kl = masked_mean(kl_terms(target, student_lp.detach()).sum(-1), x.mask).item()
        return loss, {**common_metrics(x, self.contexts), "pmi_spread": spread, "target_student_kl": target_kl}
