"""RLVR baselines: one clipped policy-gradient loss, four ways to turn rewards into advantages.

Each prompt is answered G times (a group). Every response gets one advantage from its
verifier reward relative to its group, and each of its tokens is pushed by the PPO-style
clipped ratio pi(y_t) / pi_old(y_t), which also corrects for stale samples.

- grpo: A = (r - mean_group) / (std_group + eps); mean over each response's tokens, then
  over responses.
- dr_grpo: A = r - mean_group (no std) and each response's token sum divided by a constant
  (no length normalisation): both biases of GRPO removed.
- dapo: clip-higher (0.2 / 0.28), mean over all tokens of the micro-batch, a soft overlong
  penalty added to the reward, and dynamic sampling: groups whose rewards are all equal
  carry no signal, the loop refills them and the loss gives them zero weight.
- rloo: A = r - mean of the other responses' rewards in the group (leave-one-out).
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor

from selfdistill.learner.objectives.base import (
    LossAggField,
    MaxResponseLen,
    Objective,
    ObjectiveConfigBase,
    ObjectiveInputs,
    aggregate_loss,
    common_metrics,
    masked_mean,
    register_objective,
    sampled_token_logprobs,
)

ClipLow = Annotated[
    float, Field(ge=0.0, lt=1.0, description="Lower ratio clip: the ratio is clipped below at 1 - clip_low.")
]
ClipHigh = Annotated[float, Field(ge=0.0, description="Upper ratio clip: the ratio is clipped above at 1 + clip_high.")]
ScaleRewards = Annotated[
    bool, Field(description="Divide group-centred rewards by the group's std (GRPO); off for Dr.GRPO.")
]
Eps = Annotated[float, Field(gt=0.0, description="Added to every normaliser (std, MAD) to avoid division by 0.")]


class ClippedPGConfig(ObjectiveConfigBase):
    """Fields shared by every objective that ends in the clipped policy-gradient loss."""

    clip_low: ClipLow = 0.2
    clip_high: ClipHigh = 0.2
    loss_agg: LossAggField = "token_mean"
    max_response_len: MaxResponseLen = None


class GrpoConfig(ClippedPGConfig):
    name: Literal["grpo"] = "grpo"
    loss_agg: LossAggField = "seq_mean_token_mean"
    scale_rewards: ScaleRewards = True
    eps: Eps = 1e-6


class DrGrpoConfig(ClippedPGConfig):
    name: Literal["dr_grpo"] = "dr_grpo"
    loss_agg: LossAggField = "seq_mean_token_sum"
    scale_rewards: ScaleRewards = False
    eps: Eps = 1e-6


class DapoConfig(ClippedPGConfig):
    name: Literal["dapo"] = "dapo"
    clip_high: ClipHigh = 0.28
    scale_rewards: ScaleRewards = True
    eps: Eps = 1e-6
    overlong_buffer_len: int = Field(
        0,
        ge=0,
        description="Length of the soft overlong window before max_response_len: responses longer than "
        "max_response_len - overlong_buffer_len lose reward linearly. 0 turns the penalty off.",
    )
    overlong_penalty_factor: float = Field(
        1.0, ge=0.0, description="Reward lost by a response that reaches max_response_len."
    )

    @model_validator(mode="after")
    def _overlong_window_fits(self) -> DapoConfig:
        if self.overlong_buffer_len > 0:
            if self.max_response_len is None:
                raise ValueError("overlong_buffer_len > 0 needs max_response_len (the generation budget)")
            if self.overlong_buffer_len > self.max_response_len:
                raise ValueError(
                    f"overlong_buffer_len ({self.overlong_buffer_len}) must not exceed "
                    f"max_response_len ({self.max_response_len})"
                )
        return self


class RlooConfig(ClippedPGConfig):
    name: Literal["rloo"] = "rloo"
    loss_agg: LossAggField = "seq_mean_token_mean"


def _group_index(group_ids: Tensor) -> tuple[Tensor, Tensor]:
    """Each response's group index in 0..G-1 and each group's size."""
    _, index, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    return index, counts


def _group_sum(values: Tensor, index: Tensor, groups: int) -> Tensor:
    return torch.zeros(groups, dtype=values.dtype, device=values.device).index_add_(0, index, values)


def group_advantages(rewards: Tensor, group_ids: Tensor, scale_by_std: bool, eps: float) -> Tensor:
    """[B] r - mean of its group, divided by (group std + eps) when `scale_by_std`.

    The std is the unbiased one (as torch.std); a group of one gets advantage 0.
    """
    index, counts = _group_index(group_ids)
    size = counts.to(rewards.dtype)
    centred = rewards - (_group_sum(rewards, index, len(counts)) / size)[index]
    if not scale_by_std:
        return centred
    variance = _group_sum(centred**2, index, len(counts)) / (size - 1).clamp_min(1)
    return centred / (variance.sqrt()[index] + eps)


def rloo_advantages(rewards: Tensor, group_ids: Tensor) -> Tensor:
    """[B] r_i - mean_{j != i} r_j over i's group; 0 for a group of one."""
    index, counts = _group_index(group_ids)
    size = counts.to(rewards.dtype)[index]
    others_mean = (_group_sum(rewards, index, len(counts))[index] - rewards) / (size - 1).clamp_min(1)
    return torch.where(size > 1, rewards - others_mean, torch.zeros_like(rewards))


def verifier_advantages(
    rewards: Tensor, group_ids: Tensor, kind: Literal["grpo", "dr_grpo", "rloo"], eps: float
) -> Tensor:
    """[B] advantage of each response by the named RLVR rule (grpo scales by std, dr_grpo does not)."""
    if kind == "rloo":
        return rloo_advantages(rewards, group_ids)
    return group_advantages(rewards, group_ids, scale_by_std=kind == "grpo", eps=eps)


def groups_with_reward_variance(rewards: Tensor, group_ids: Tensor) -> Tensor:
    """[B] bool: True for responses whose group's rewards are not all equal (DAPO dynamic sampling)."""
    index, counts = _group_index(group_ids)
    fill = torch.full((len(counts),), float("inf"), dtype=rewards.dtype, device=rewards.device)
    lowest = fill.scatter_reduce(0, index, rewards, "amin")
    highest = (-fill).scatter_reduce(0, index, rewards, "amax")
    return (highest > lowest)[index]


def overlong_penalty(lengths: Tensor, max_len: int, buffer_len: int, factor: float) -> Tensor:
    """DAPO soft overlong punishment per response: 0 up to max_len - buffer_len tokens, then
    linear down to -factor at max_len (and -factor beyond)."""
    if not 0 < buffer_len <= max_len:
        raise ValueError(f"buffer_len must be in (0, max_len={max_len}], got {buffer_len}")
    over = (lengths.to(torch.float32) - (max_len - buffer_len)).clamp(0, buffer_len)
    return -factor * over / buffer_len


def clipped_pg_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, clip_low: float, clip_high: float
) -> tuple[Tensor, Tensor]:
    """Per-token PPO loss max(-A * ratio, -A * clip(ratio, 1 - clip_low, 1 + clip_high)) and a
    bool mask of the tokens where the clipped branch is taken (their gradient is zero)."""
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    return torch.maximum(unclipped, clipped), clipped > unclipped


def policy_gradient_loss(
    x: ObjectiveInputs, advantages: Tensor, mask: Tensor, cfg: ClippedPGConfig
) -> tuple[Tensor, dict[str, float]]:
    """The clipped PG loss with per-token `advantages` [B, T] (no grad), aggregated over `mask`."""
    logprobs = sampled_token_logprobs(x.student_logprobs, x.tokens)
    per_token, is_clipped = clipped_pg_loss(logprobs, x.old_logprobs, advantages, cfg.clip_low, cfg.clip_high)
    loss = aggregate_loss(per_token, mask, cfg.loss_agg, cfg.max_response_len, x.is_weights)
    with torch.no_grad():
        adv_mean = masked_mean(advantages, mask)
        metrics = {
            "pg_clipfrac": masked_mean(is_clipped.to(mask.dtype), mask).item(),
            "ratio_mean": masked_mean(torch.exp(logprobs - x.old_logprobs), mask).item(),
            "adv_mean": adv_mean.item(),
            "adv_std": masked_mean((advantages - adv_mean) ** 2, mask).sqrt().item(),
        }
    return loss, metrics


@register_objective("grpo", "dr_grpo")
class GroupRelativePolicyGradient(Objective):
    """GRPO and Dr.GRPO: group-centred (optionally std-scaled) verifier advantage."""

    def advantages(self, x: ObjectiveInputs) -> Tensor:
        return group_advantages(x.rewards, x.group_ids, self.cfg.scale_rewards, self.cfg.eps)

    def loss_mask(self, x: ObjectiveInputs) -> Tensor:
        return x.mask

    def __call__(self, x: ObjectiveInputs) -> tuple[Tensor, dict[str, float]]:
        advantages = self.advantages(x).detach()[:, None].expand_as(x.mask)
        mask = self.loss_mask(x)
        loss, metrics = policy_gradient_loss(x, advantages, mask, self.cfg)
        return loss, {**metrics, **common_metrics(x, ())}


@register_objective("dapo")
class Dapo(GroupRelativePolicyGradient):
    """DAPO: GRPO advantage on overlong-shaped rewards; equal-reward groups weigh zero."""

    def advantages(self, x: ObjectiveInputs) -> Tensor:
        rewards = x.rewards
        if self.cfg.overlong_buffer_len > 0:
            rewards = rewards + overlong_penalty(
                x.mask.sum(-1),
                self.cfg.max_response_len,
                self.cfg.overlong_buffer_len,
                self.cfg.overlong_penalty_factor,
            ).to(rewards.dtype)
        return group_advantages(rewards, x.group_ids, self.cfg.scale_rewards, self.cfg.eps)

    def loss_mask(self, x: ObjectiveInputs) -> Tensor:
        # Filtered on the verifier reward (as DAPO filters on accuracy), before overlong shaping.
        return x.mask * groups_with_reward_variance(x.rewards, x.group_ids).to(x.mask.dtype)[:, None]


@register_objective("rloo")
class Rloo(GroupRelativePolicyGradient):
    """RLOO: leave-one-out baseline advantage."""

    def advantages(self, x: ObjectiveInputs) -> Tensor:
        return rloo_advantages(x.rewards, x.group_ids)
