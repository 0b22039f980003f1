"""PMI targets: distil only what the question adds to the reference.

On long chain-of-thought models plain OPSD is dominated by a reference-induced signal:
the teacher that sees the reference solution favours copying its shortcuts. A second,
reference-only teacher (the same model given the reference but not the question) scores
the same response; per vocabulary entry v the difference

    Delta_v = log p_T(v | question, reference) - log p_T(v | reference)

is PMI(v; question | reference), the part of the teacher's preference that transfers. It
becomes a target distribution next to the student's own:

    z = sg(log p_S) + c * tanh((Delta - mean_v Delta) / c) / beta,   target = softmax(z)

("tanh_clip"; "hard_clip" uses clamp(Delta - mean_v Delta, -c, c) instead), and the loss
per token is KL(target || student). When both teachers agree up to a constant, Delta -
mean Delta = 0, the target is the student itself and the loss is 0. The exact target of
the paper is not public: this is one reading, with beta = 1 and c = 10 as defaults.
Support: full vocabulary rows, or the full-context teacher's top-k (the reference-only
teacher must then score the same ids), with the student renormalised on it.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from selfdistill.learner.objectives.base import (
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
from selfdistill.learner.objectives.opsd import TopK

TargetForm = Literal["tanh_clip", "hard_clip"]


class PmiConfig(ObjectiveConfigBase):
    name: Literal["pmi"] = "pmi"
    context: TeacherContext = "full"
    reference_context: TeacherContext = "reference_only"
    support: Literal["full", "teacher_topk"] = Field(
        "full",
        description="'full': whole-vocabulary rows from both teachers; 'teacher_topk': the full-context "
        "teacher's top_k ids, scored by both teachers, student renormalised on them.",
    )
    top_k: TopK = 20
    target_form: TargetForm = Field(
        "tanh_clip", description="How the centred PMI is bounded: c * tanh(x / c) or clamp(x, -c, c)."
    )
    beta: float = Field(1.0, gt=0.0, description="Divides the bounded PMI: smaller beta moves the target further.")
    clip: float = Field(10.0, gt=0.0, description="Bound c on the centred PMI of any vocabulary entry.")
    loss_agg: LossAggField = "token_mean"
    max_response_len: MaxResponseLen = None


def pmi_target_logprobs(student_logprobs: Tensor, pmi: Tensor, beta: float, clip: float, form: TargetForm) -> Tensor:
    """log softmax(sg(student) + bound(pmi - mean_v pmi) / beta), bound = c*tanh(./c) or clamp to [-c, c]."""
    centred = pmi - pmi.mean(-1, keepdim=True)
    if form == "tanh_clip":
        bounded = clip * torch.tanh(centred / clip)
    elif form == "hard_clip":
        bounded = centred.clamp(-clip, clip)
    else:
        raise ValueError(f"target_form must be one of {TargetForm.__args__}, got {form!r}")
    return (student_logprobs.detach() + bounded / beta).log_softmax(-1)


def pmi_on_support(
    student_logprobs: Tensor,
    full: TeacherTensors,
    reference: TeacherTensors,
    cfg: PmiConfig,
    mask: Tensor,
) -> tuple[Tensor, Tensor]:
    """Delta = q_full - q_reference (no grad) and the student's log-probs, on the same support."""
    if cfg.support == "full":
        for context, teacher in ((cfg.context, full), (cfg.reference_context, reference)):
            if teacher.full_logprobs is None:
                raise ValueError(f"support='full' needs teacher[{context!r}].full_logprobs; it is None")
        return (full.full_logprobs - reference.full_logprobs).detach(), student_logprobs
    if not full.has_support or full.support_ids.shape[-1] < cfg.top_k:
        raise ValueError(f"support='teacher_topk' needs teacher[{cfg.context!r}].support_ids with >= {cfg.top_k} ids")
    picked = full.support_logprobs.topk(cfg.top_k, dim=-1).indices
    ids = full.support_ids.gather(-1, picked)
    if reference.full_logprobs is not None:
        reference_lp = reference.full_logprobs.gather(-1, ids)
    else:
        same_ids = reference.has_support and reference.support_ids.shape == full.support_ids.shape
        if not same_ids or ((reference.support_ids != full.support_ids).any(-1) & (mask > 0)).any():
            raise ValueError(
                f"support='teacher_topk' needs teacher[{cfg.reference_context!r}] to score the same ids as "
                f"teacher[{cfg.context!r}].support_ids, or to send full_logprobs"
            )
        reference_lp = reference.support_logprobs.gather(-1, picked)
    pmi = full.support_logprobs.gather(-1, picked) - reference_lp
    return pmi.detach(), student_logprobs.gather(-1, ids).log_softmax(-1)


@register_objective("pmi")
class PmiTargetDistillation(Objective):
    """PMI-purified OPSD: KL(softmax(sg(s) + bounded PMI / beta) || student) per token."""

    def __init__(self, cfg: PmiConfig) -> None:
        super().__init__(cfg)
        self.contexts = (cfg.context, cfg.reference_context)
        self.needs_full_vocab = cfg.support == "full"

    def __call__(self, x: ObjectiveInputs) -> tuple[Tensor, dict[str, float]]:
        cfg = self.cfg
        full = teacher_context(x, cfg.context, self.name)
        reference = teacher_context(x, cfg.reference_context, self.name)
        pmi, student_lp = pmi_on_support(x.student_logprobs, full, reference, cfg, x.mask)
        target = pmi_target_logprobs(student_lp, pmi, cfg.beta, cfg.clip, cfg.target_form)
        per_token = kl_terms(target, student_lp).sum(-1)
        loss = aggregate_loss(per_token, x.mask, cfg.loss_agg, cfg.max_response_len, x.is_weights)
        with torch.no_grad():
            spread = masked_mean((pmi - pmi.mean(-1, keepdim=True)).abs().mean(-1), x.mask).item()
        return loss, {**common_metrics(x, self.contexts), "pmi_spread": spread}
