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
  since the last one, so calls grow when generation outpaces the teacher;
- an engine or teacher that dies, or gives nothing for `faults.call_timeout_s`, is replaced
  (launch/faults.py) and its unfinished prompts or teacher call are sent again; each prompt
  keeps its own seed, so the redone group is the one that was lost.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import ray

from selfdistill.launch.faults import ACTOR_ERRORS
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


def collect_batch(roles, sampler, cfg, sampling, alpha: float | None, faults) -> Batch:
    """Generate, verify and score `rollout.prompts_per_step` groups (see module docstring)."""
    need, filtering = cfg.rollout.prompts_per_step, cfg.rollout.filter_groups
    collector = _Collector(roles, alpha, faults)
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
    info.update({"rollout/responses": len(trajs), "rollout/prompts": len({t.problem.uid for t in trajs})})
    return Batch(trajs, ordered_scores, collector.seconds, info, sampler.state())


class _Collector:
    """The event loop over engine streams and teacher calls (one step)."""

    def __init__(self, roles, alpha: float | None, faults):
        self.roles, self.alpha, self.faults = roles, alpha, faults
        self.timeout_s = faults.cfg.call_timeout_s
        self.start = time.perf_counter()
        self.seconds = {"generate": 0.0, "verify": 0.0, "teacher": 0.0}
        self.waiting: list[Trajectory] = []  # finished, verified, not yet sent to the teacher
        self.in_flight = None  # (ref, trajectories, sent at, teacher handle)
        self.scores: dict[int, TeacherScores] = {}

    def generate(self, problems: list[Problem], sampling):
        """Yield each problem's verified group of trajectories as soon as its samples are done."""
        prompts = [self.roles.prompt(p) for p in problems]
        # Two chunks per engine when there are several: one that finishes early takes over work from a slower one.
        engines = len(self.roles.engines)
        chunks = chunk_bounds(len(prompts), 1 if engines == 1 else 2 * engines)
        streams: dict = {}  # ObjectRefGenerator -> (engine, chunk bounds, indices received)
        free = list(self.roles.engines)
        started = time.perf_counter()
        while chunks or streams:
            while chunks and free:
                engine, (lo, hi) = free.pop(0), chunks.pop(0)
                streams[self.roles.start_stream(engine, prompts[lo:hi], sampling, lo)] = (engine, lo, hi, set())
            waitables = list(streams) + ([self.in_flight[0]] if self.in_flight else [])
            ready, _ = ray.wait(waitables, num_returns=1, timeout=self.timeout_s)
            if not ready:  # nothing came back in time: every actor waited on counts as failed
                error = ray.exceptions.GetTimeoutError(f"no rollout or teacher result in {self.timeout_s:.0f} s")
                for stream in list(streams):
                    free.append(self._engine_failed(streams, stream, chunks, error))
                if self.in_flight:
                    self._teacher_failed(error)
                continue
            if self.in_flight and ready[0] is self.in_flight[0]:
                self._take_scores()
                continue
            stream = ready[0]
            engine, offset, _, received = streams[stream]
            try:
                index, samples, version = ray.get(next(stream), timeout=self.timeout_s)
            except StopIteration:
                del streams[stream]
                free.append(engine)
                continue
            except ACTOR_ERRORS as error:
                free.append(self._engine_failed(streams, stream, chunks, error))
                continue
            received.add(index)
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

    def _engine_failed(self, streams: dict, stream, chunks: list, error: BaseException):
        """Replace a failed engine; its unfinished prompts go back to the front of the queue, one chunk each."""
        engine, lo, hi, received = streams.pop(stream)
        chunks[:0] = [(i, i + 1) for i in range(lo, hi) if i - lo not in received]
        return self.faults.replace_engine(self.roles, engine, error)

    def _teacher_failed(self, error: BaseException) -> None:
        """Replace the teacher and send the call it had in flight again (first, before newer groups)."""
        _, trajs, _, teacher = self.in_flight
        self.faults.replace_teacher(self.roles, teacher, error)
        self.waiting, self.in_flight = trajs + self.waiting, None
        self._send()

    def finish_scoring(self) -> dict[int, TeacherScores] | None:
        """Wait for the teacher to score every queued group; scores keyed by id(trajectory)."""
        if self.roles.teacher is None:
            self.seconds["collect"] = time.perf_counter() - self.start
            return None
        while self.in_flight is not None:
            ready, _ = ray.wait([self.in_flight[0]], timeout=self.timeout_s)
            if not ready:
                self._teacher_failed(ray.exceptions.GetTimeoutError(f"no teacher result in {self.timeout_s:.0f} s"))
                continue
            self._take_scores()
        self.seconds["collect"] = time.perf_counter() - self.start
        return self.scores

    def _send(self) -> None:
        teacher = self.roles.teacher
        self.in_flight = (self.roles.score_async(self.waiting, self.alpha), self.waiting, time.perf_counter(), teacher)
        self.waiting = []

    def _take_scores(self) -> None:
        ref, trajs, sent, _ = self.in_flight
        try:
            scores = ray.get(ref, timeout=self.timeout_s)
        except ACTOR_ERRORS as error:
            self._teacher_failed(error)
            return
        for t, s in zip(trajs, scores, strict=True):
            self.scores[id(t)] = s
        self.seconds["teacher"] += time.perf_counter() - sent
        self.in_flight = None
        if self.waiting:
            self._send()

