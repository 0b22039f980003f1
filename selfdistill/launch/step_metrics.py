"""The numbers logged for every step (metrics.jsonl and TensorBoard)."""

from __future__ import annotations

from collections import Counter

from selfdistill.records import Trajectory


def step_metrics(trajs: list[Trajectory], train: dict[str, float], seconds: dict[str, float], step: int
                 ) -> dict[str, float]:
    """Rewards, lengths, verifier outcomes, staleness, stage times and tokens/s of one step.

    `seconds` holds the stage times: generate, verify, teacher, collect (made in the rollout
    pipeline, possibly while an earlier step trained) and idle, train, sync, step (the learner's).
    """
    n = len(trajs)
    staleness = [step - 1 - t.weight_version for t in trajs]
    lengths = [len(t.response_ids) for t in trajs]
    status = Counter(t.verify_status for t in trajs)
    out = {
        "reward/mean": sum(t.reward for t in trajs) / n,
        "reward/accuracy": status["correct"] / n,
        "response/length": sum(lengths) / n,
        "response/truncated": sum(t.finish_reason == "length" for t in trajs) / n,
        **{f"verify/{s}": status[s] / n for s in ("unparsable", "refused", "timeout", "error")},
        **{f"train/{k}": v for k, v in train.items()},
        "rollout/staleness_mean": sum(staleness) / n,
        "rollout/staleness_max": max(staleness),
        **{f"time/{k}": v for k, v in seconds.items()},
    }
    tokens = {"generate": sum(lengths), "teacher": sum(lengths), "train": sum(lengths) + sum(len(t.prompt_ids) for t in trajs)}
    for stage, count in tokens.items():
        if seconds.get(stage):
            out[f"throughput/{stage}_tokens_per_s"] = count / seconds[stage]
    return out
