"""Collect one step's batch, streaming: each prompt group goes to the verifier and the teacher
as soon as its G responses are done, while the engines keep generating the rest.

One event loop waits on every engine's stream and on the teacher call in flight:
- prompts go to engines in chunks; an engine that finishes its chunk takes the next one
  (load balancing when engines run at different speeds);
- a finished group is verified at once; with DAPO's dynamic sampling
  (`rollout.filter_groups`) a group whose rewards are all equal is set aside before the
  teacher ever scores it, and more prompts are drawn for at most `rollout.max_filter_rounds`
  extra rounds; if still short, set-aside groups fill the batch back to `prompts_per_step`;
- groups wait for the teacher only while it is busy: each call takes every group finished
  since the last one, so calls grow when generation outpaces the teacher.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import ray

from selfdistill.launch.roles import chunk_bounds
from selfdistill.records import Problem, TeacherScores, Trajectory


@dataclass
class Batch:
    """A training step's rollouts, with how they were made."""

    trajs: list[Trajectory]
    scores: list[TeacherScores] | None
    seconds: dict[str, float]  # generate (first prompt sent -> last group back), verify, teacher (busy), collect (wall)
    info: dict[str, float] = field(default_factory=dict)
    data_state: dict = field(default_factory=dict)  # the sampler's position after this batch was drawn


def collect_batch(roles, sampler, cfg, sampling, alpha: float | None) -> Batch:
    """Generate, verify and score `rollout.prompts_per_step` groups (see module docstring)."""
    need, filtering = cfg.rollout.prompts_per_step, cfg.rollout.filter_groups
    collector = _Collector(roles, alpha)
    kept: list[list[Trajectory]] = []
    set_aside: list[list[Trajectory]] = []
    rounds = 0
    while len(kept) < need:
        problems = sampler.next_batch(need - len(kept) if filtering else need)
        round_sampling = sampling.model_copy(update={"seed": (sampling.seed or 0) + 7919 * rounds})
        for group in collector.generate(problems, round_sampling):
            if filtering and len({t.reward for t in group}) == 1:
                set_aside.append(group)
            else:
                kept.append(group)
                collector.score(group)
        rounds += 1
        if not filtering or rounds > cfg.rollout.max_filter_rounds:
            break
    for group in set_aside[: max(0, need - len(kept))]:
        kept.append(group)
        collector.score(group)
    kept = kept[:need]
    scores = collector.finish_scoring()
    trajs, ordered_scores = [], [] if scores is not None else None
    for new_id, group in enumerate(kept):
        for t in group:
            t.group = new_id
            trajs.append(t)
            if scores is not None:
                ordered_scores.append(scores[id(t)])
    info = {"rollout/filter_rounds": rounds, "rollout/groups_dropped": len(set_aside)} if filtering else {}
    return Batch(trajs, ordered_scores, collector.seconds, info, sampler.state())


class _Collector:
    """The event loop over engine streams and teacher calls (one step)."""

    def __init__(self, roles, alpha: float | None):
        self.roles, self.alpha = roles, alpha
        self.start = time.perf_counter()
        self.seconds = {"generate": 0.0, "verify": 0.0, "teacher": 0.0}
        self.waiting: list[Trajectory] = []  # finished, verified, not yet sent to the teacher
        self.in_flight = None  # (ref, trajectories, sent at)
        self.scores: dict[int, TeacherScores] = {}

    def generate(self, problems: list[Problem], sampling):
        """Yield each problem's verified group of trajectories as soon as its samples are done."""
        prompts = [self.roles.prompt(p) for p in problems]
        # Two chunks per engine when there are several: one that finishes early takes over work from a slower one.
        engines = len(self.roles.engines)
        chunks = chunk_bounds(len(prompts), 1 if engines == 1 else 2 * engines)
        streams: dict = {}  # ObjectRefGenerator -> (engine, offset of its chunk)
        free = list(self.roles.engines)
        started = time.perf_counter()
        while chunks or streams:
            while chunks and free:
                engine, (lo, hi) = free.pop(0), chunks.pop(0)
                streams[self.roles.start_stream(engine, prompts[lo:hi], sampling, lo)] = (engine, lo)
            waitables = list(streams) + ([self.in_flight[0]] if self.in_flight else [])
            ready, _ = ray.wait(waitables, num_returns=1)
            if self.in_flight and ready[0] is self.in_flight[0]:
                self._take_scores()
                continue
            stream = ready[0]
            engine, offset = streams[stream]
            try:
                index, samples, version = ray.get(next(stream))
            except StopIteration:
                del streams[stream]
                free.append(engine)
                continue
            i = offset + index
            group = self.roles.trajectories(problems[i], prompts[i], samples, version)
            self.seconds["generate"] = time.perf_counter() - started
            verify_start = time.perf_counter()
            self.roles.verify(group)
            self.seconds["verify"] += time.perf_counter() - verify_start
            yield group

    def score(self, group: list[Trajectory]) -> None:
        """Queue a group for the teacher; send the queue now if the teacher is idle."""
        if self.roles.teacher is None:
            return
        self.waiting.extend(group)
        if self.in_flight is None:
            self._send()

    def finish_scoring(self) -> dict[int, TeacherScores] | None:
        """Wait for the teacher to score every queued group; scores keyed by id(trajectory)."""
        if self.roles.teacher is None:
            self.seconds["collect"] = time.perf_counter() - self.start
            return None
        while self.in_flight is not None:
            ray.wait([self.in_flight[0]])
            self._take_scores()
        self.seconds["collect"] = time.perf_counter() - self.start
        return self.scores

    def _send(self) -> None:
        self.in_flight = (self.roles.score_async(self.waiting, self.alpha), self.waiting, time.perf_counter())
        self.waiting = []

    def _take_scores(self) -> None:
        ref, trajs, sent = self.in_flight
        for t, s in zip(trajs, ray.get(ref), strict=True):
            self.scores[id(t)] = s
        self.seconds["teacher"] += time.perf_counter() - sent
        self.in_flight = None
        if self.waiting:
            self._send()

