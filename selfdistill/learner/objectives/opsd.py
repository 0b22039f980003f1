"""On-policy self-distillation (OPSD): the model, shown privileged context, teaches itself.

The student samples a response to the plain prompt. The teacher is the same model (live,
initial or EMA weights) given a privileged context, e.g. the reference solution, and
scores every token of that response without gradient. At each response position the
student's next-token distribution is pulled toward the teacher's by a generalised
Jensen-Shannon divergence JSD_beta, taken over one of three supports:

- "full": the whole vocabulary (teacher `full_logprobs` rows; small vocabularies only);
- "teacher_topk": the teacher's top-k ids, both distributions renormalised on them;
- "student_topk_tail": the student's own top-k ids plus one tail bucket holding the rest
  of each distribution's mass, so nothing is renormalised away.

Convention (as TRL's `generalized_jsd_loss`): beta = 0 is forward KL(teacher || student),
beta = 1 is reverse KL(student || teacher), and 0 < beta < 1 is
beta * KL(teacher || M) + (1 - beta) * KL(student || M) with M = beta * teacher +
(1 - beta) * student. Defaults follow the later OPSD reruns: beta = 0 with a pointwise
clip kappa = 0.05 on every vocabulary term (the first version used beta = 0.5, no clip);
the clip bounds the contribution of any one vocabulary entry, so style tokens such as
"wait" (6-15x the KL of math tokens) cannot dominate. As in the OPSD reference code the
cap is applied to each signed term before the vocabulary sum and from above only (terms
p_v log(p_v / q_v) are negative where the student gives more mass than the teacher), so a
clipped per-token value can fall below zero; terms at the cap pass no gradient. The clipped
loss is then no divergence: it is bounded below by -H(teacher) but its minimum is not at
student = teacher (lowering the unclipped negative terms pays while capped ones cost nothing).
Near its ends JSD_beta vanishes (about beta * KL) while beta = 0 and 1 are the full KLs, so
configs refuse beta in (0, 0.01) and (0.99, 1).

`opd_sampled` is the sampled-token form (on-policy distillation): only the sampled token
is scored, A_t = sg(log p_T(y_t) - log p_S(y_t)) is an advantage (optionally added to a
verifier advantage) and the clipped policy-gradient loss follows it; in expectation this
descends the reverse KL.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

import torch
from pydantic import AfterValidator, Field
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
    sampled_token_logprobs,
    teacher_context,
)
from selfdistill.learner.objectives.rlvr import ClippedPGConfig, Eps, policy_gradient_loss, verifier_advantages

Support = Literal["full", "teacher_topk", "student_topk_tail"]

# Tail mass below this is treated as this (top-k mass can round above 1 in float32).
TAIL_FLOOR = 1e-12
# Slack when checking that given support ids are the student's top-k (ties, learner/engine rounding).
TOPK_MATCH_ATOL = 1e-4

# JSD_beta tends to 0 like beta * KL(teacher || student) as beta -> 0 (and like (1 - beta) * KL(student ||
# teacher) as beta -> 1), while beta = 0 and 1 are the full KLs: values this close to an end are refused.
BETA_END_MARGIN = 0.01


def check_jsd_beta(beta: float) -> float:
    """`beta` itself if it lies in {0, 1} or [BETA_END_MARGIN, 1 - BETA_END_MARGIN], else ValueError."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if 0.0 < beta < BETA_END_MARGIN or 1.0 - BETA_END_MARGIN < beta < 1.0:
        raise ValueError(
            f"beta={beta} is within {BETA_END_MARGIN} of an end of [0, 1]: there JSD_beta shrinks toward 0 (about "
            f"beta * KL), while beta=0 / beta=1 are the full forward / reverse KL; use 0 or 1 exactly, or a value "
            f"in [{BETA_END_MARGIN}, {1 - BETA_END_MARGIN}]")
    return beta


JsdBeta = Annotated[
    float,
    AfterValidator(check_jsd_beta),
    Field(description="JSD interpolation: 0 forward KL(teacher||student), 1 reverse KL(student||teacher), between: "
          "the generalised JSD; (0, 0.01) and (0.99, 1) are refused (the divergence vanishes there)."),
]

SupportField = Annotated[
    Support,
    Field(
        description="Vocabulary support of the divergence: 'full' (teacher full_logprobs rows), "
        "'teacher_topk' (teacher's top_k ids, both renormalised), 'student_topk_tail' (student's "
        "top_k ids plus one tail bucket)."
    ),
]
TopK = Annotated[int, Field(gt=0, description="Support size k for the top-k supports; unused for support='full'.")]
PointwiseClip = Annotated[
    float | None,
    Field(
        gt=0.0,
        description="Pointwise clip kappa: each vocabulary term of the per-token divergence is capped "
        "at kappa before summing (a capped term passes no gradient). None: no clip. The OPSD reruns use 0.05 on "
        "Qwen3 (configs/gpu); on a small model, where the teacher's corrections are large single terms, the cap "
        "removes exactly those (measured on the CPU default: held-out accuracy 0.44 -> 0.09 in 30 steps).",
    ),
]


class OpsdConfig(ObjectiveConfigBase):
    name: Literal["opsd"] = "opsd"
    beta: JsdBeta = 0.0
    support: SupportField = "full"
    top_k: TopK = 20
    clip: PointwiseClip = None
    context: TeacherContext = "full"
    loss_agg: LossAggField = "token_mean"
    max_response_len: MaxResponseLen = None


class OpdSampledConfig(ClippedPGConfig):
    name: Literal["opd_sampled"] = "opd_sampled"
    context: TeacherContext = "full"
    coef: float = Field(1.0, gt=0.0, description="Scale of the distillation advantage sg(log p_T(y) - log p_S(y)).")
    add_to_verifier_advantage: bool = Field(
        False, description="Add the verifier's group advantage (rule `verifier`) to the distillation advantage."
    )
    verifier: Literal["grpo", "dr_grpo", "rloo"] = Field(
        "grpo", description="Advantage rule for the verifier part when add_to_verifier_advantage is set."
    )
    eps: Eps = 1e-6


def generalized_jsd(
    teacher_logprobs: Tensor, student_logprobs: Tensor, beta: float, clip: float | None = None
) -> Tensor:
    """JSD_beta between teacher and student log-prob rows (last dim), per row.

    beta = 0: KL(teacher || student); beta = 1: KL(student || teacher); otherwise
    beta * KL(teacher || M) + (1 - beta) * KL(student || M), M = beta * teacher + (1 - beta) * student.
    With `clip`, each vocabulary term is capped at `clip` before the sum.
    """
    check_jsd_beta(beta)
    if beta == 0.0:
        terms = kl_terms(teacher_logprobs, student_logprobs)
    elif beta == 1.0:
        terms = kl_terms(student_logprobs, teacher_logprobs)
    else:
        mixture = torch.logaddexp(teacher_logprobs + math.log(beta), student_logprobs + math.log(1.0 - beta))
        terms = beta * kl_terms(teacher_logprobs, mixture) + (1.0 - beta) * kl_terms(student_logprobs, mixture)
    if clip is not None:
        terms = terms.clamp(max=clip)
    return terms.sum(-1)


def with_tail_bucket(logprobs: Tensor) -> Tensor:
    """Append to [..., k] log-probs one entry holding log(1 - their total mass)."""
    tail = (1.0 - logprobs.exp().sum(-1, keepdim=True)).clamp_min(TAIL_FLOOR).log()
    return torch.cat([logprobs, tail], dim=-1)


def teacher_topk(teacher: TeacherTensors, top_k: int, context: str) -> tuple[Tensor, Tensor]:
    """The teacher's top_k ids and their (unnormalised) log-probs, [B, T, top_k] each."""
    if teacher.has_support:
        width = teacher.support_ids.shape[-1]
        if width < top_k:
            raise ValueError(f"top_k={top_k} but teacher[{context!r}].support_ids holds only {width} ids per token")
        picked = teacher.support_logprobs.topk(top_k, dim=-1).indices
        return teacher.support_ids.gather(-1, picked), teacher.support_logprobs.gather(-1, picked)
    if teacher.full_logprobs is not None:
        values, ids = teacher.full_logprobs.topk(top_k, dim=-1)
        return ids, values
    raise ValueError(f"support='teacher_topk' needs teacher[{context!r}].support_ids or full_logprobs; both are None")


def student_topk_ids(
    student_logprobs: Tensor, teacher: TeacherTensors, top_k: int, mask: Tensor, context: str
) -> Tensor:
    """[B, T, top_k] ids of the student's top_k tokens (no grad on the selection).

    Taken from the student's own rows when the teacher sent full rows (any ids can then be
    looked up); otherwise the teacher must have scored exactly the student's top_k ids, and
    its `support_ids` are checked to be them (up to ties) on every response token.
    """
    student = student_logprobs.detach()
    if teacher.full_logprobs is not None:
        return student.topk(top_k, dim=-1).indices
    if not teacher.has_support or teacher.support_ids.shape[-1] != top_k:
        raise ValueError(
            f"support='student_topk_tail' needs teacher[{context!r}].full_logprobs, or support_ids holding "
            f"the student's top-{top_k} ids"
        )
    ids = teacher.support_ids
    kth_largest = student.topk(top_k, dim=-1).values[..., -1]
    lowest_on_support = student.gather(-1, ids).min(-1).values
    duplicated = (ids.sort(-1).values.diff(dim=-1) == 0).any(-1)
    wrong = ((lowest_on_support < kth_largest - TOPK_MATCH_ATOL) | duplicated) & (mask > 0)
    if wrong.any():
        raise ValueError(
            f"support='student_topk_tail': teacher[{context!r}].support_ids are not the student's top-{top_k} ids "
            f"at {int(wrong.sum())} of {int((mask > 0).sum())} response tokens; score the learner's own "
            "top-k ids or send full_logprobs"
        )
    return ids


def distributions_on_support(
    student_logprobs: Tensor, teacher: TeacherTensors, support: Support, top_k: int, mask: Tensor, context: str
) -> tuple[Tensor, Tensor]:
    """Teacher (no grad) and student log-probs over the same support, [B, T, K] each."""
    if support == "full":
        if teacher.full_logprobs is None:
            raise ValueError(f"support='full' needs teacher[{context!r}].full_logprobs; it is None")
        return teacher.full_logprobs.detach(), student_logprobs
    if support == "teacher_topk":
        ids, teacher_lp = teacher_topk(teacher, top_k, context)
        return teacher_lp.detach().log_softmax(-1), student_logprobs.gather(-1, ids).log_softmax(-1)
    if support == "student_topk_tail":
        ids = student_topk_ids(student_logprobs, teacher, top_k, mask, context)
        if teacher.full_logprobs is not None:
            teacher_lp = teacher.full_logprobs.gather(-1, ids)
        else:
            teacher_lp = teacher.support_logprobs
        return with_tail_bucket(teacher_lp.detach()), with_tail_bucket(student_logprobs.gather(-1, ids))
    raise ValueError(f"support must be one of {Support.__args__}, got {support!r}")


def distillation_divergence(
    x: ObjectiveInputs, context: str, objective: str, *, beta: float, clip: float | None, support: Support, top_k: int
) -> Tensor:
    """[B, T] JSD_beta(teacher under `context`, student) per response token, with gradient."""
    teacher = teacher_context(x, context, objective)
    teacher_lp, student_lp = distributions_on_support(x.student_logprobs, teacher, support, top_k, x.mask, context)
    return generalized_jsd(teacher_lp, student_lp, beta, clip)


@register_objective("opsd")
class OnPolicySelfDistillation(Objective):
    """OPSD: mean JSD_beta(teacher || student) over response tokens."""

    def __init__(self, cfg: OpsdConfig) -> None:
        super().__init__(cfg)
        self.contexts = (cfg.context,)
        self.needs_full_vocab = cfg.support == "full"

    def __call__(self, x: ObjectiveInputs) -> tuple[Tensor, dict[str, float]]:
        cfg = self.cfg
        per_token = distillation_divergence(
            x, cfg.context, self.name, beta=cfg.beta, clip=cfg.clip, support=cfg.support, top_k=cfg.top_k
        )
        loss = aggregate_loss(per_token, x.mask, cfg.loss_agg, cfg.max_response_len, x.is_weights)
        return loss, {**common_metrics(x, self.contexts), "frac_pushed_away": 0.0}


@register_objective("opd_sampled")
class SampledTokenDistillation(Objective):
    """On-policy distillation on the sampled token: advantage sg(log p_T(y) - log p_S(y))."""

    def __init__(self, cfg: OpdSampledConfig) -> None:
        super().__init__(cfg)
        self.contexts = (cfg.context,)

    def __call__(self, x: ObjectiveInputs) -> tuple[Tensor, dict[str, float]]:
        cfg = self.cfg
        teacher = teacher_context(x, cfg.context, self.name)
        with torch.no_grad():
            gap = teacher.token_logprobs - sampled_token_logprobs(x.student_logprobs, x.tokens)
            advantages = cfg.coef * gap
            if cfg.add_to_verifier_advantage:
                advantages = advantages + verifier_advantages(x.rewards, x.group_ids, cfg.verifier, cfg.eps)[:, None]
            # Away from the teacher: the advantage moves log p_S(y) against the sign of the gap.
            pushed_away = masked_mean((advantages * gap < 0).to(x.mask.dtype), x.mask).item()
        loss, metrics = policy_gradient_loss(x, advantages, x.mask, cfg)
        return loss, {**metrics, **common_metrics(x, self.contexts), "frac_pushed_away": pushed_away}
