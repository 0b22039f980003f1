"""Rewards: verifiers that turn a response and a gold answer into a reward, picked by name."""

from __future__ import annotations

from collections import Counter
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from selfdistill.rewards.guard import AnswerLimits
from selfdistill.rewards.math_verifier import STATUSES, MathVerifier, VerifyResult, extract_boxed

__all__ = [
    "STATUSES",
    "AnswerLimits",
    "MathVerifier",
    "RewardConfig",
    "VerifyResult",
    "build_reward",
    "extract_boxed",
    "status_counts",
]


class RewardConfig(BaseModel):
    """Which verifier scores responses, and its limits."""

    model_config = ConfigDict(extra="forbid")

    name: Literal["math_verify"] = Field(
        "math_verify",
        description="Verifier: `math_verify` compares the response's last \\boxed{} with the gold "
        "answer (math-verify, then an exact sympy arithmetic fallback).",
    )
    timeout_s: float = Field(
        5.0,
        gt=0,
        description="Seconds one answer may take; past it the answer scores 0 (status "
        "`timeout`) and its worker process is replaced.",
    )
    num_workers: int = Field(
        2,
        ge=1,
        description="Worker processes for answers that need math-verify. Plain-integer and "
        "identical answers are decided in the caller and cost no worker time.",
    )
    limits: AnswerLimits = Field(
        default_factory=AnswerLimits,
        description="Answers that break these bounds are refused in the caller (status `refused`, reward 0) "
        "before any worker sees them.",
    )


def build_reward(cfg: RewardConfig) -> MathVerifier:
    """The verifier `cfg` names. Close it when done (it owns worker processes)."""
    return MathVerifier(timeout_s=cfg.timeout_s, num_workers=cfg.num_workers, limits=cfg.limits)


def status_counts(results: list[VerifyResult]) -> dict[str, int]:
    """How many results have each status; every status is present, so logged keys are stable."""
    counts = Counter(result.status for result in results)
    return {status: counts[status] for status in STATUSES}
