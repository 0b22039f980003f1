"""Collect one step's rollouts: generate, verify, and (DAPO's dynamic sampling) refill.

With `rollout.filter_groups`, prompt groups whose rewards are all equal (no learning
signal for group-relative advantages) are dropped and more prompts are sampled, for at
most `rollout.max_filter_rounds` extra rounds; if still short, dropped groups fill the
batch back to `prompts_per_step` so that every rank gets the same number of groups.
"""

from __future__ import annotations

import time

from selfdistill.records import Trajectory


def collect_rollouts(roles, sampler, cfg, sampling, seconds: dict[str, float]) -> tuple[list[Trajectory], dict]:
    need = cfg.rollout.prompts_per_step
    kept: list[list[Trajectory]] = []
    dropped: list[list[Trajectory]] = []
    rounds = 0
    while len(kept) < need:
        problems = sampler.next_batch(need - len(kept) if cfg.rollout.filter_groups else need)
        start = time.perf_counter()
        trajs = roles.generate(problems, sampling.model_copy(update={"seed": (sampling.seed or 0) + 7919 * rounds}))
        seconds["generate"] = seconds.get("generate", 0.0) + time.perf_counter() - start
        start = time.perf_counter()
        roles.verify(trajs)
        seconds["verify"] = seconds.get("verify", 0.0) + time.perf_counter() - start
        groups = _by_group(trajs)
        if not cfg.rollout.filter_groups:
            kept = groups
            break
        for g in groups:
            (kept if len({t.reward for t in g}) > 1 else dropped).append(g)
        rounds += 1
        if rounds > cfg.rollout.max_filter_rounds:
            break
    if len(kept) < need:
        kept += dropped[: need - len(kept)]
    out = []
    for new_id, group in enumerate(kept[:need]):
        for t in group:
            t.group = new_id
            out.append(t)
    info = {"rollout/filter_rounds": rounds, "rollout/groups_dropped": len(dropped)} if cfg.rollout.filter_groups else {}
    return out, info


def _by_group(trajs: list[Trajectory]) -> list[list[Trajectory]]:
    groups: dict[int, list[Trajectory]] = {}
    for t in trajs:
        groups.setdefault(t.group, []).append(t)
    return list(groups.values())
