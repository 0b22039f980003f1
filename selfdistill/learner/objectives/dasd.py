"""DASD, direction-adaptive self-distillation: the student's entropy decides whether a token
is pulled toward the teacher or pushed away from it.

Following the teacher everywhere hurts twice: at high-entropy tokens (forks in the
reasoning) conformity suppresses exploration, and at low-entropy tokens (routine steps)
deviating costs step accuracy. So each token gets a bounded, signed weight from where its
student entropy H_t sits in its own trajectory:

    A_t = A_grpo + beta * w_t * d_t
    w_t = tanh((Q_rho(H) - H_t) / MAD(H)) * sigmoid(|d_t| - 1)

with Q_rho the rho-quantile and MAD the median absolute deviation of the student's
entropies over the trajectory's response tokens, and d_t the normalised gap
log p_T(y_t) - log p_S(y_t). With side="low_entropy_pulls" (default) tokens below the
quantile get w > 0: when the teacher likes the token more (d > 0) its advantage rises and
the student moves toward the teacher; tokens above the quantile get w < 0 and move away.
The sigmoid lets large gaps count fully and damps tiny ones. The loss is the clipped
policy gradient with this per-token advantage.

The paper's gap normalisation and beta are not public: `gap_norm` divides the gap by its
root mean square (its std about zero, which keeps the sign and stays finite for a
constant gap) over the trajectory ("traj_std", default) or the micro-batch
("batch_std"), or leaves it raw ("none").
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from selfdistill.learner.objectives.base import (
    Objective,
    ObjectiveInputs,
    TeacherContext,
    common_metrics,
    masked_mean,
    register_objective,
    sampled_token_logprobs,
    teacher_context,
    token_entropy,
)
from selfdistill.learner.objectives.rlvr import ClippedPGConfig, Eps, group_advantages, policy_gradient_loss

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
    gap_norm: GapNorm = Field(
        "traj_std",
        description="Normaliser of the gap log p_T(y) - log p_S(y): its root mean square over the trajectory "
        "('traj_std') or the micro-batch ('batch_std'), or none.",
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


def entropy_routing_weights(entropy: Tensor, gap: Tensor, mask: Tensor, rho: float, side: Side, eps: float) -> Tensor:
    """[B, T] w_t = tanh((Q_rho(H) - H_t) / MAD(H)) * sigmoid(|d_t| - 1), statistics per trajectory.

    `gap` is the normalised d_t; side="high_entropy_pulls" flips the sign of the tanh argument.
    """
    quantile = masked_quantile(entropy, mask, rho)[:, None]
    median = masked_quantile(entropy, mask, 0.5)[:, None]
    mad = masked_quantile((entropy - median).abs(), mask, 0.5)[:, None]
    below_quantile = quantile - entropy
    if side == "high_entropy_pulls":
        below_quantile = -below_quantile
    elif side != "low_entropy_pulls":
        raise ValueError(f"side must be one of {Side.__args__}, got {side!r}")
    return torch.tanh(below_quantile / (mad + eps)) * torch.sigmoid(gap.abs() - 1.0) * mask


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
            gap = normalised_gap(
                teacher.token_logprobs - sampled_token_logprobs(student_lp, x.tokens), x.mask, cfg.gap_norm, cfg.eps
            )
            level = 1.0 - cfg.rho if cfg.rho_share == "pushed" else cfg.rho
            weights = entropy_routing_weights(token_entropy(student_lp), gap, x.mask, level, cfg.side, cfg.eps)
            verifier = group_advantages(x.rewards, x.group_ids, scale_by_std=True, eps=cfg.eps)
            advantages = verifier[:, None] + cfg.beta * weights * gap
        loss, metrics = policy_gradient_loss(x, advantages, x.mask, cfg)
        routing = {
            "frac_pushed_away": masked_mean((weights < 0).to(x.mask.dtype), x.mask).item(),
            "mean_weight": masked_mean(weights.abs(), x.mask).item(),
        }
        return loss, {**metrics, **common_metrics(x, self.contexts), **routing}
