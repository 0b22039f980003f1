"""What every objective shares: the tensors the learner hands over, the `Objective`
interface, masked reductions, loss aggregation, shared config fields and the registry.

Conventions: per-token tensors are [B, T] over right-padded responses (token t of response
b at [b, t]); `mask` is 1.0 on real response tokens. `student_logprobs` is
log_softmax(logits / temperature) over the vocabulary, [B, T, V], with gradient; all
teacher tensors are no-grad. An objective returns a scalar loss to minimise and python
float diagnostics.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

LossAgg = Literal["token_mean", "seq_mean_token_sum", "seq_mean_token_mean"]

# Teacher rows may hold -inf for tokens a sampler filtered out; 0 * -inf would be NaN.
LOGPROB_FLOOR = -1e4


@dataclass
class TeacherTensors:
    """One privileged context's scores of every response token (no grad)."""

    token_logprobs: Tensor  # [B, T] log p_T(y_t)
    entropy: Tensor  # [B, T]
    support_ids: Tensor | None = None  # [B, T, k] long: the teacher's top-k, or ids the caller passed
    support_logprobs: Tensor | None = None  # [B, T, k]
    full_logprobs: Tensor | None = None  # [B, T, V] log-softmax rows (small vocabularies only)

    def check_shapes(self, context: str, batch: int, length: int, vocab: int) -> None:
        """Raise ValueError naming the field whose shape does not fit a [B, T] batch."""
        where = f"teacher[{context!r}]"
        for name in ("token_logprobs", "entropy"):
            _check_shape(f"{where}.{name}", getattr(self, name), (batch, length))
        if (self.support_ids is None) != (self.support_logprobs is None):
            raise ValueError(f"{where}: support_ids and support_logprobs must be given together")
        if self.support_ids is not None:
            k = self.support_ids.shape[-1] if self.support_ids.dim() == 3 else -1
            _check_shape(f"{where}.support_ids", self.support_ids, (batch, length, k))
            _check_shape(f"{where}.support_logprobs", self.support_logprobs, (batch, length, k))
            if self.support_ids.dtype != torch.long:
                raise ValueError(f"{where}.support_ids must be int64, got {self.support_ids.dtype}")
        if self.full_logprobs is not None:
            _check_shape(f"{where}.full_logprobs", self.full_logprobs, (batch, length, vocab))

    @property
    def has_support(self) -> bool:
        return self.support_ids is not None and self.support_ids.shape[-1] > 0


@dataclass
class ObjectiveInputs:
    """One micro-batch as every objective sees it; shapes are checked on construction."""

    student_logprobs: Tensor  # [B, T, V] log_softmax(logits / temperature), with grad
    tokens: Tensor  # [B, T] long, sampled response tokens (pad = 0)
    mask: Tensor  # [B, T] float, 1 on real response tokens
    old_logprobs: Tensor  # [B, T] log-probs of tokens under the policy that sampled them, no grad
    rewards: Tensor  # [B] verifier rewards
    group_ids: Tensor  # [B] long: equal ids answer the same prompt
    teacher: dict[str, TeacherTensors] = field(default_factory=dict)  # keyed by context name
    step: int = 0
    # [B, T] truncated importance weights min(pi_learner / pi_sampler, cap), no grad: set when rollouts
    # may be stale (asynchronous mode); every objective scales its per-token loss by them. None: on-policy.
    is_weights: Tensor | None = None

    def __post_init__(self) -> None:
        if self.student_logprobs.dim() != 3:
            raise ValueError(f"student_logprobs must be [B, T, V], got shape {tuple(self.student_logprobs.shape)}")
        batch, length, vocab = self.student_logprobs.shape
        for name in ("tokens", "mask", "old_logprobs"):
            _check_shape(name, getattr(self, name), (batch, length))
        for name in ("rewards", "group_ids"):
            _check_shape(name, getattr(self, name), (batch,))
        if self.tokens.dtype != torch.long:
            raise ValueError(f"tokens must be int64, got {self.tokens.dtype}")
        if not self.mask.is_floating_point():
            raise ValueError(f"mask must be a float tensor, got {self.mask.dtype}")
        for context, scores in self.teacher.items():
            scores.check_shapes(context, batch, length, vocab)
        if self.is_weights is not None:
            _check_shape("is_weights", self.is_weights, (batch, length))


def _check_shape(name: str, tensor: Tensor, expected: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != expected:
        raise ValueError(f"{name} must have shape {expected}, got {tuple(tensor.shape)}")


class Objective(abc.ABC):
    """A training loss over one micro-batch, built from its config by `build_objective`."""

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        self.name: str = cfg.name
        self.contexts: tuple[str, ...] = ()  # teacher contexts this objective reads
        self.needs_full_vocab: bool = False  # True when it needs teacher full_logprobs rows

    @abc.abstractmethod
    def __call__(self, x: ObjectiveInputs) -> tuple[Tensor, dict[str, float]]:
        """Scalar loss (to minimise) and diagnostics (python floats)."""


_OBJECTIVES: dict[str, type[Objective]] = {}


def register_objective(*names: str) -> Callable[[type[Objective]], type[Objective]]:
    """Class decorator: make `build_objective` build this class for configs with these names."""

    def add(cls: type[Objective]) -> type[Objective]:
        for name in names:
            if name in _OBJECTIVES:
                raise ValueError(f"objective name {name!r} is registered twice")
            _OBJECTIVES[name] = cls
        return cls

    return add


def registered_objective_names() -> tuple[str, ...]:
    return tuple(sorted(_OBJECTIVES))


def build_objective(cfg: Any) -> Objective:
    """The objective for a config, picked by `cfg.name`."""
    if cfg.name not in _OBJECTIVES:
        raise ValueError(f"unknown objective name {cfg.name!r}; known: {registered_objective_names()}")
    return _OBJECTIVES[cfg.name](cfg)


class ObjectiveConfigBase(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


LossAggField = Annotated[
    LossAgg,
    Field(
        description="How per-token losses become one scalar: 'token_mean' averages over every "
        "response token of the micro-batch; 'seq_mean_token_mean' averages within each response, "
        "then over responses; 'seq_mean_token_sum' sums within each response, divides by the "
        "constant max_response_len (Dr.GRPO), then averages over responses."
    ),
]
MaxResponseLen = Annotated[
    int | None,
    Field(
        gt=0,
        description="Constant that divides each response's token sum under "
        "loss_agg='seq_mean_token_sum'; set it to the generation budget so the loss does not depend "
        "on each response's own length (Dr.GRPO). None divides by 1.",
    ),
]
TeacherContext = Annotated[
    str,
    Field(
        min_length=1,
        description="Name of the teacher context to read: 'full', 'partial', 'reference_only' or 'none'.",
    ),
]


def masked(values: Tensor, mask: Tensor) -> Tensor:
    """`values * mask` where the mask is non-zero and exactly 0 elsewhere: NaN or inf in padded
    slots cannot spread (0 * NaN is NaN), and no gradient flows to them."""
    return torch.where(mask != 0, values, torch.zeros_like(values)) * mask


def masked_mean(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of `values` where `mask` is 1 (over all entries, or along `dim`); 0 where mask is empty.

    Whatever sits outside the mask (NaN and inf included) does not reach the result."""
    total = masked(values, mask).sum() if dim is None else masked(values, mask).sum(dim)
    count = mask.sum() if dim is None else mask.sum(dim)
    return total / torch.where(count > 0, count, torch.ones_like(count))


def aggregate_loss(per_token: Tensor, mask: Tensor, mode: LossAgg, max_response_len: int | None = None,
                   weights: Tensor | None = None) -> Tensor:
    """Reduce a [B, T] per-token loss to a scalar (see `LossAggField`); empty responses do not count.

    `weights` (importance weights, [B, T]) scale each token's loss; the normaliser stays the mask.
    """
    if weights is not None:
        per_token = per_token * weights
    if mode == "token_mean":
        return masked_mean(per_token, mask)
    lengths = mask.sum(-1)
    sums = masked(per_token, mask).sum(-1)
    if mode == "seq_mean_token_mean":
        per_response = sums / lengths.clamp_min(1.0)
    elif mode == "seq_mean_token_sum":
        per_response = sums / (max_response_len or 1)
    else:
        raise ValueError(f"loss_agg must be one of {LossAgg.__args__}, got {mode!r}")
    return masked_mean(per_response, (lengths > 0).to(per_response.dtype))


def sampled_token_logprobs(student_logprobs: Tensor, tokens: Tensor) -> Tensor:
    """[B, T] log-prob of each sampled token, gathered from [B, T, V] rows."""
    return student_logprobs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def token_entropy(logprobs: Tensor) -> Tensor:
    """Entropy of each distribution along the last dim, from its log-probs."""
    return torch.special.entr(logprobs.exp()).sum(-1)


def kl_terms(p_logprobs: Tensor, q_logprobs: Tensor) -> Tensor:
    """Per-entry terms p_v * (log p_v - log q_v) of KL(p || q); summing the last dim gives the KL."""
    p_logprobs = p_logprobs.clamp_min(LOGPROB_FLOOR)
    return p_logprobs.exp() * (p_logprobs - q_logprobs.clamp_min(LOGPROB_FLOOR))


def teacher_context(x: ObjectiveInputs, context: str, objective: str) -> TeacherTensors:
    """The teacher's scores under `context`, or a KeyError naming what is missing."""
    if context not in x.teacher:
        raise KeyError(f"objective {objective!r} needs teacher context {context!r}; the batch has {sorted(x.teacher)}")
    return x.teacher[context]


@torch.no_grad()
def teacher_student_kl(teacher: TeacherTensors, student_logprobs: Tensor, mask: Tensor) -> float | None:
    """Mean per token of KL(teacher || student): over full rows if present, else both renormalised
    on the teacher's support; None when the teacher sent neither."""
    if teacher.full_logprobs is not None:
        teacher_lp, student_lp = teacher.full_logprobs, student_logprobs
    elif teacher.has_support:
        teacher_lp = teacher.support_logprobs.log_softmax(-1)
        student_lp = student_logprobs.gather(-1, teacher.support_ids).log_softmax(-1)
    else:
        return None
    return masked_mean(kl_terms(teacher_lp, student_lp).sum(-1), mask).item()


@torch.no_grad()
def common_metrics(x: ObjectiveInputs, contexts: Iterable[str]) -> dict[str, float]:
    """Student mean token entropy, and `teacher_entropy/<context>` and `teacher_student_kl/<context>` for each
    context given."""
    metrics = {"entropy": masked_mean(token_entropy(x.student_logprobs), x.mask).item()}
    for context in contexts:
        metrics[f"teacher_entropy/{context}"] = masked_mean(x.teacher[context].entropy, x.mask).item()
        kl = teacher_student_kl(x.teacher[context], x.student_logprobs, x.mask)
        if kl is not None:
            metrics[f"teacher_student_kl/{context}"] = kl
    return metrics
