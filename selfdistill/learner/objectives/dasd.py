"""DASD, direction-adaptive self-distillation (arXiv 2605.22263): the student's entropy decides
whether a token is pulled toward the teacher or pushed away from it.

Following the teacher everywhere hurts twice: at high-entropy tokens (forks in the
reasoning) conformity suppresses exploration, and at low-entropy tokens (routine steps)
deviating costs step accuracy. So each token gets a bounded, signed weight from where its
student entropy H_t sits in its own trajectory:

    A_t = A_grpo + beta * w_t * d_t
    w_t = tanh((tau_rho(H) - H_t) / sigma_H) * sigmoid(|d_t| - 1) * [push scale if w_t < 0]

tau_rho an entropy quantile and sigma_H the mean absolute deviation of the student's
entropies over the trajectory's response tokens, d_t the normalised gap
log p_T(y_t) - log p_S(y_t). With side="low_entropy_pulls" (default) tokens below the
quantile get w > 0: when the teacher likes the token more (d > 0) its advantage rises and
the student moves toward the teacher; tokens above it get w < 0 and move away. The loss is
the clipped policy gradient with this per-token advantage.

The paper's (as digests give it): the form of A_t and w_t, the per-trajectory quantile
with rho = 0.2, sigma_H = mean absolute deviation, the sigmoid damping of small gaps.
Not recovered, so ours: which share rho counts (`rho_share`), the gap normaliser
(`gap_norm`: none by default, or the gap's root mean square over the trajectory or the
micro-batch, its std about zero), beta, and what bounds the push. Read literally (beta = 1, no bound)
the push has no fixed point: it collapsed the CPU model (rollout reward 0.30 -> 0.03 in 9
steps). Our bound (`push_margin`, default 0.1 nat) is a trust region on the raw gap: a pushed
token's weight fades from 1 to 0 as |log p_T(y) - log p_S(y)| grows from m to 2m, so the
student can move only about 2m nats from the teacher on any token it samples;
`push_groups="mixed_rewards"` limits pushes to groups whose rewards differ. Defaults measured on
the CPU task (docs/methods.md): a 40-step sweep chose the raw gap and mixed-reward pushes (held-out
0.685 -> 0.035 with the trajectory-RMS gap and the trust region, 0.585 with the raw gap, 0.645 with
pushes only in mixed-reward groups); the methods benchmark (150 steps, 500 problems, paired gains)
chose the margin: push_margin 1 -1.9 points (two seeds), 0.1 +3.4 (two seeds; +5.3 +- 1.1 over
margin 1, paired; +2.4 +- 1.8 on three seeds, -1.9 +- 1.0 against GRPO), pulls only +2.9 (three seeds),
beta 3 -10.4; GRPO alone +4.3.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from selfdistill.learner.objectives.base import (
    LOGPROB_FLOOR,
    Objective,
    ObjectiveInputs,
    TeacherContext,
    common_metrics,
    masked,
    masked_mean,
    register_objective,
    sampled_token_logprobs,
    teacher_context,
    token_entropy,
)
from selfdistill.learner.objectives.rlvr import (
    ClippedPGConfig,
    Eps,
    group_advantages,
    groups_with_reward_variance,
    policy_gradient_loss,
)

GapNorm = Literal["none", "traj_std", "batch_std"]
Side = Literal["low_entropy_pulls", "high_entropy_pulls"]


class DasdConfig(ClippedPGConfig):
    name: Literal["dasd"] = "dasd"
    context: TeacherContext = "full"
    rho: float = Field(0.2, gt=0.0, lt=1.0, description="Entropy quantile level that splits pulled from pushed tokens.")
    rho_share: Literal["pushed", "pulled"] = Field(
        "pushed",
        description="What rho counts (the source leaves it open). 'pushed' (default): the split is the (1 - rho)-"
        "quantile, so the rho share of highest-entropy tokens (the forks) is pushed away and the rest pulled; "
        "'pulled': the split is Q_rho as the formula is written, so only the rho share of lowest-entropy tokens is "
        "pulled and 1 - rho pushed (on the CPU default this pushed 79% of tokens and collapsed accuracy).",
    )
    beta: float = Field(
        1.0, ge=0.0, description="Scale of the routed distillation term next to the GRPO advantage (not public)."
    )
    push_margin: float | None = Field(
        0.1,
        gt=0.0,
        description="Trust region of the push (ours): a pushed token's weight fades linearly from 1 to 0 as the raw "
        "gap |log p_T(y) - log p_S(y)| grows from push_margin to 2 * push_margin nats, so the student can move only "
        "so far from the teacher. None: no bound (as the digest reads; collapses the CPU model).",
    )
    push_groups: Literal["all", "mixed_rewards"] = Field(
        "mixed_rewards",
        description="Where the push applies (ours): only in groups whose rewards differ ('mixed_rewards', "
        "default), where the verifier says the forks matter, or in 'all' responses; pulls apply everywhere.",
    )
    gap_norm: GapNorm = Field(
        "none",
        description="Normaliser of the gap log p_T(y) - log p_S(y): none (default: the push stays proportional to "
        "the real disagreement), or its root mean square over the trajectory ('traj_std') or the micro-batch "
        "('batch_std'), which turns a confident student's tiny gaps into unit-size pushes (measured: drift).",
    )
    side: Side = Field(
        "low_entropy_pulls",
        description="Which side of the quantile is pulled toward the teacher: 'low_entropy_pulls' "
        "(entropy below Q_rho -> w > 0) or the mirror 'high_entropy_pulls'.",
    )
    eps: Eps = 1e-6


def masked_quantile(values: Tensor, mask: Tensor, q: float) -> Tensor:
    """[B] q-quantile of each row's masked entries (linear interpolation, as torch.quantile); 0 for empty rows."""
    count = mask.sum(-1).long()
    ordered = values.masked_fill(mask == 0, float("inf")).sort(-1).values
    position = q * (count - 1).clamp_min(0).to(values.dtype)
    low, high = position.floor().long(), position.ceil().long()
    low_value = ordered.gather(-1, low[:, None]).squeeze(-1)
    high_value = ordered.gather(-1, high[:, None]).squeeze(-1)
    result = low_value + (position - low.to(values.dtype)) * (high_value - low_value)
    return torch.where(count > 0, result, torch.zeros_like(result))


def normalised_gap(gap: Tensor, mask: Tensor, mode: GapNorm, eps: float) -> Tensor:
    """[B, T] gap divided by its root mean square over each trajectory, the micro-batch, or not at all."""
    if mode == "none":
        return gap
    if mode == "traj_std":
        scale = masked_mean(gap**2, mask, dim=-1).sqrt()[:, None]
    elif mode == "batch_std":
        scale = masked_mean(gap**2, mask).sqrt()
    else:
        raise ValueError(f"gap_norm must be one of {GapNorm.__args__}, got {mode!r}")
    return gap / (scale + eps)


def mean_absolute_deviation(values: Tensor, mask: Tensor) -> Tensor:
    """[B, 1] mean over each row's masked entries of |value - the row's masked mean|."""
    mean = masked_mean(values, mask, dim=-1)[:, None]
    return masked_mean((values - mean).abs(), mask, dim=-1)[:, None]


def entropy_routing_weights(entropy: Tensor, gap: Tensor, mask: Tensor, rho: float, side: Side, eps: float) -> Tensor:
    """[B, T] w_t = tanh((Q_rho(H) - H_t) / sigma_H) * sigmoid(|d_t| - 1), statistics per trajectory.

    sigma_H is the mean absolute deviation of the trajectory's entropies; `gap` is the
    normalised d_t; side="high_entropy_pulls" flips the sign of the tanh argument.
    """
    quantile = masked_quantile(entropy, mask, rho)[:, None]
    mad = mean_absolute_deviation(entropy, mask)
    below_quantile = quantile - entropy
    if side == "high_entropy_pulls":
        below_quantile = -below_quantile
    elif side != "low_entropy_pulls":
        raise ValueError(f"side must be one of {Side.__args__}, got {side!r}")
    return torch.tanh(below_quantile / (mad + eps)) * torch.sigmoid(gap.abs() - 1.0) * mask


def push_scale(raw_gap: Tensor, x: ObjectiveInputs, cfg: DasdConfig) -> Tensor:
    """[B, T] factor in [0, 1] on the push: the trust region on the raw gap and the group gate."""
    scale = torch.ones_like(raw_gap)
    if cfg.push_margin is not None:
        scale = (2.0 - raw_gap.abs() / cfg.push_margin).clamp(0.0, 1.0)
    if cfg.push_groups == "mixed_rewards":
        scale = scale * groups_with_reward_variance(x.rewards, x.group_ids).to(scale.dtype)[:, None]
    return scale


@register_objective("dasd")
class DirectionAdaptiveSelfDistillation(Objective):
    """DASD: GRPO advantage plus an entropy-routed, signed teacher gap per token."""

    def __init__(self, cfg: DasdConfig) -> None:
        super().__init__(cfg)
        self.contexts = (cfg.context,)

    def __call__(self, x: ObjectiveInputs) -> tuple[Tensor, dict[str, float]]:
        cfg = self.cfg
        teacher = teacher_context(x, cfg.context, self.name)
        with torch.no_grad():
            student_lp = x.student_logprobs.detach()
            # floored: a -inf teacher log-prob (a token a sampler filtered out) would make the gap and its scale inf
            raw_gap = teacher.token_logprobs.clamp_min(LOGPROB_FLOOR) - sampled_token_logprobs(student_lp, x.tokens)
            raw_gap = masked(raw_gap, x.mask)
            gap = normalised_gap(raw_gap, x.mask, cfg.gap_norm, cfg.eps)
            level = 1.0 - cfg.rho if cfg.rho_share == "pushed" else cfg.rho
            weights = entropy_routing_weights(token_entropy(student_lp), gap, x.mask, level, cfg.side, cfg.eps)
            weights = torch.where(weights < 0, weights * push_scale(raw_gap, x, cfg), weights)
            verifier = group_advantages(x.rewards, x.group_ids, scale_by_std=True, eps=cfg.eps)
            advantages = verifier[:, None] + cfg.beta * weights * gap
        loss, metrics = policy_gradient_loss(x, advantages, x.mask, cfg)
        routing = {
            "frac_pushed_away": masked_mean((weights < 0).to(x.mask.dtype), x.mask).item(),
            "mean_weight": masked_mean(weights.abs(), x.mask).item(),
        }
        return loss, {**metrics, **common_metrics(x, self.contexts), **routing}
