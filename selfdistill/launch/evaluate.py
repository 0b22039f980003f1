"""Held-out greedy accuracy through the rollout engines and the verifier."""

from __future__ import annotations

from selfdistill.config import TrainConfig
from selfdistill.records import Problem


def greedy_eval(roles, problems: list[Problem], cfg: TrainConfig) -> dict:
    """Greedy (temperature 0) decoding of the plain prompt, scored by the verifier."""
    if not problems:
        return {"accuracy": float("nan"), "n": 0}
    sampling = cfg.rollout.sampling.model_copy(update={"temperature": 0.0, "n": 1, "seed": cfg.run.seed})
    trajs = roles.generate(problems, sampling)
    roles.verify(trajs)
    return {"accuracy": sum(t.verify_status == "correct" for t in trajs) / len(trajs), "n": len(trajs)}
