"""The numbers logged for every step (metrics.jsonl and TensorBoard)."""

from __future__ import annotations

from collections import Counter

from selfdistill.records import Trajectory


def step_metrics(trajs: list[Trajectory], train: dict[str, float], seconds: dict[str, float]) -> dict[str, float]:
    n = len(trajs)
    lengths = [len(t.response_ids) for t in trajs]
    status = Counter(t.verify_status for t in trajs)
    out = {
        "reward/mean": sum(t.reward for t in trajs) / n,
        "reward/accuracy": status["correct"] / n,
        "response/length": sum(lengths) / n,
        "response/truncated": sum(t.finish_reason == "length" for t in trajs) / n,
        **{f"verify/{s}": status[s] / n for s in ("unparsable", "timeout", "error")},
        **{f"train/{k}": v for k, v in train.items()},
        **{f"time/{k}": v for k, v in seconds.items()},
        "time/step": sum(seconds.values()),
    }
    tokens = {"generate": sum(lengths), "teacher": sum(lengths), "train": sum(lengths) + sum(len(t.prompt_ids) for t in trajs)}
    for stage, count in tokens.items():
        if seconds.get(stage):
            out[f"throughput/{stage}_tokens_per_s"] = count / seconds[stage]
    return out
