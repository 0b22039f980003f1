"""The named roles of a run, placed as Ray actors: rollout engines, teacher, learner ranks.

Each method is one stage of a step and hides only the fan-out (splitting prompts across
engines, gathering results); the loop in `train.py` reads as the algorithm.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager

import ray

from selfdistill.config import TrainConfig
from selfdistill.launch.placement import ClusterSpec, RolePlacements, actor_nodes, plan_placement
from selfdistill.launch.processes import stop_actors
from selfdistill.learner.group import LearnerGroup
from selfdistill.records import Problem, TeacherScores, Trajectory
from selfdistill.rewards import build_reward
from selfdistill.rollout.actor import RolloutActor
from selfdistill.rollout.base import Sample, SamplingConfig
from selfdistill.teacher.actor import TeacherActor
from selfdistill.teacher.contexts import prompt_ids
from selfdistill.weights import WeightSyncError


class Roles:
    def __init__(self, cfg: TrainConfig, policy_path: str, teacher_path: str, tokenizer, contexts: tuple[str, ...],
                 resume_from: str | None = None, version: int = 0):
        self.cfg, self.tokenizer, self.contexts = cfg, tokenizer, contexts
        self.engines, self.teacher, self.learner, self.verifier = [], None, None, None
        self.paused, self.gate = False, threading.Condition()  # generation pauses while weights change
        self.pids: dict = {"rollout": [], "teacher": None, "learner": []}
        self.placements, self.placement = None, {}
        self.colocated = cfg.placement.mode == "colocated"  # engines sleep while the learner trains
        try:
            self.plan = plan_placement(cfg, ClusterSpec.live(), contexts)  # ConfigError before any actor starts
            self.placements = RolePlacements(cfg, self.plan)
            self.policy_path, self.teacher_path, self.start_version = policy_path, teacher_path, version
            self.learner_version = version  # the learner's weights: version v = after v steps (see `train`)
            self.teacher_version = version  # the version of the weights in teacher_path
            self.engines = [self.new_engine(i) for i in range(cfg.rollout.num_engines)]
            if contexts:
                self.teacher = self.new_teacher()
            self.learner = LearnerGroup(cfg, policy_path, resume_from, self.placements)  # starts while engines load
            self.pids["learner"] = self.learner.pids
            self.pids["rollout"] = ray.get([e.ready.remote() for e in self.engines])
            self.pids["teacher"] = ray.get(self.teacher.ready.remote()) if self.teacher else None
            self.placement = actor_nodes({**{f"rollout/{i}": e for i, e in enumerate(self.engines)},
                                          **({"teacher": self.teacher} if self.teacher else {}),
                                          **{f"learner/{r}": a for r, a in enumerate(self.learner.actors)}})
            self.verifier = build_reward(cfg.reward)
            self.learner.connect_weights(self.receivers(), self.receiver_ranks())  # every receiver joins the transport
        except BaseException:
            self.close()
            raise

    def new_engine(self, index: int):
        """A rollout actor in engine `index`'s bundle, holding the run's starting weights (at start, or to replace it)."""
        options = self.placements.options("rollout", index)
        return ray.remote(RolloutActor).options(**options).remote(
            self.policy_path, self.cfg.rollout.engine, self.cfg.sync, self.start_version,
            self.placements.executor(index), self.colocated)

    def new_teacher(self):
        """A teacher actor in the teacher's bundle (at start, or to replace it)."""
        cfg = self.cfg
        return ray.remote(TeacherActor).options(**self.placements.options("teacher", 0)).remote(
            self.teacher_path, cfg.teacher, cfg.templates, cfg.train_temperature, cfg.sync, cfg.chat,
            self.teacher_version)

    def __enter__(self) -> Roles:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # ------------------------------------------------------------------ stages

    def sample(self, prompts: list[list[int]], sampling: SamplingConfig) -> list[list[Sample]]:
        """`sampling.n` samples per prompt, one chunk of prompts per engine, in prompt order."""
        chunks = chunk_bounds(len(prompts), len(self.engines))
        refs = [engine.generate.remote(prompts[lo:hi], _seeded(sampling, lo))
                for engine, (lo, hi) in zip(self.engines, chunks)]
        return [samples for out in ray.get(refs) for samples in out]

    def prompt(self, problem: Problem) -> list[int]:
        """The student's prompt (no privileged context) as token ids."""
        return prompt_ids(self.tokenizer, self.cfg.templates, "plain", problem, chat=self.cfg.chat)

    def start_stream(self, engine, prompts: list[list[int]], sampling: SamplingConfig, offset: int):
        """Start sampling on `engine`; a Ray generator of (index in `prompts`, samples, weight version).

        `offset` is the chunk's place in the step's batch (see `_seeded`).
        """
        with self.gate:  # never starts while weights change (see `publish`)
            self.gate.wait_for(lambda: not self.paused)
            return engine.generate_stream.options(num_returns="streaming").remote(prompts, _seeded(sampling, offset))

    def trajectories(self, problem: Problem, prompt: list[int], samples: list[Sample],
                     version: int) -> list[Trajectory]:
        """One prompt group's trajectories (group id set later, when the batch is assembled)."""
        return [
            Trajectory(problem=problem, group=-1, prompt_ids=prompt, response_ids=list(s.token_ids),
                       sampling_logprobs=list(s.logprobs), finish_reason=s.finish_reason, weight_version=version,
                       text=s.text)
            for s in samples
        ]

    def verify(self, trajs: list[Trajectory]) -> None:
        results = self.verifier.score([t.text for t in trajs], [t.problem.answer for t in trajs])
        for t, r in zip(trajs, results):
            t.reward, t.verify_status = r.reward, r.status

    def score_async(self, trajs: list[Trajectory], alpha: float | None):
        """Start the teacher on every context the objective reads; a Ray ref to one TeacherScores per trajectory."""
        with self.gate:  # never starts while weights change (see `publish`)
            self.gate.wait_for(lambda: not self.paused)
            return self.teacher.score.remote([(t.problem, t.response_ids) for t in trajs], list(self.contexts), alpha)

    def train(self, trajs: list[Trajectory], scores: list[TeacherScores] | None) -> dict[str, float]:
        """One learner step. Colocated, the engines first sleep (`sleep(level=1)`: weights offloaded, KV cache
        dropped), giving the learner their GPUs; `publish` wakes them."""
        if not self.colocated:
            return self._train_step(trajs, scores)
        start = time.perf_counter()
        self._engines("sleep")
        slept = time.perf_counter() - start
        return {**self._train_step(trajs, scores), "colocate_sleep_s": slept}

    def _train_step(self, trajs: list[Trajectory], scores: list[TeacherScores] | None) -> dict[str, float]:
        metrics = self.learner.train_step(trajs, scores)
        self.learner_version += 1
        return metrics

    def publish(self, version: int) -> dict[str, float]:
        """Learner -> every engine and the (live or EMA) teacher; all hold `version` on return.

        Generation pauses first: no stream or teacher call starts, and the update begins once every
        receiver has finished the calls it was running (Ray runs an actor's calls one at a time), so
        an update never lands mid-generate and a collective never waits on a busy receiver. The
        learner's rank 0 then sends while every receiver receives (`selfdistill/weights/`). A sync
        that does not finish within `sync.timeout_s` raises `WeightSyncError` naming the receiver.
        """
        start = time.perf_counter()
        with self._generation_paused():
            if self.colocated:  # the weights back on the GPU, then the update, then the KV cache
                self._engines("wake_up", ["weights"])
                woke = time.perf_counter()
            handle, stats = self.learner.publish(version)
            if self.colocated:
                synced = time.perf_counter()
                self._engines("wake_up", ["kv_cache"])
                stats.update({"sync/wake_weights_s": woke - start, "sync/wake_kv_cache_s": time.perf_counter() - synced,
                              "colocate/engine_calls": self._engines("memory_calls")})
        stats["sync/learner_s"] = time.perf_counter() - start
        self.published = (handle, version)  # what a replacement actor loads before it serves (launch/faults.py)
        return stats

    def _engines(self, method: str, *args) -> dict:
        """Call `method` on every engine at once (bounded by sync.timeout_s); results by engine name."""
        names = [f"engine {i}" for i in range(len(self.engines))]
        refs = [getattr(e, method).remote(*args) for e in self.engines]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=self.cfg.sync.timeout_s)
        if len(ready) < len(refs):
            late = [name for name, ref in zip(names, refs) if ref not in ready]
            raise WeightSyncError(f"{', '.join(late)} did not finish {method} within sync.timeout_s="
                                  f"{self.cfg.sync.timeout_s:g} s")
        return dict(zip(names, ray.get(refs)))

    def receiver_ranks(self) -> dict[str, int]:
        """Ranks each receiver takes in a collective group: an engine's tensor-parallel workers, else 1."""
        tp = self.cfg.placement.rollout.tensor_parallel_size
        return {name: tp for name in self.receivers() if name.startswith("engine ")}

    def receivers(self) -> dict:
        """The weight-sync receivers by name: every engine, and the teacher unless it is frozen."""
        named = {f"engine {i} (pid {pid})": e for i, (e, pid) in
                 enumerate(zip(self.engines, self.pids["rollout"] or [None] * len(self.engines)))}
        if self.teacher is not None and self.cfg.teacher.weights != "frozen":
            named[f"teacher (pid {self.pids['teacher']})"] = self.teacher
        return named

    @contextmanager
    def _generation_paused(self):
        with self.gate:
            self.paused = True
        try:
            busy = {e.ready.remote(): name for name, e in self.receivers().items()}
            ready, _ = ray.wait(list(busy), num_returns=len(busy), timeout=self.cfg.sync.timeout_s)
            if len(ready) < len(busy):
                late = sorted(name for ref, name in busy.items() if ref not in ready)
                raise WeightSyncError(f"{', '.join(late)} did not finish their running calls within "
                                      f"sync.timeout_s={self.cfg.sync.timeout_s:g} s before a weight update")
            ray.get(ready)
            yield
        finally:
            with self.gate:
                self.paused = False
                self.gate.notify_all()

    def save_checkpoint(self, path, client_state: dict) -> None:
        self.learner.save_checkpoint(str(path), client_state)
        if self.teacher is not None and self.cfg.teacher.weights == "ema":
            ray.get(self.teacher.save.remote(str(path / "teacher")))

    def checkpointed(self, path) -> None:
        """Checkpoint `path` is complete: a replacement EMA teacher starts from the average saved in it."""
        if self.teacher is not None and self.cfg.teacher.weights == "ema":
            # saved after this step's publish: the average holds the learner's version
            self.teacher_path, self.teacher_version = str(path / "teacher"), self.learner_version

    # ------------------------------------------------------------------ checks

    def sync_gap(self, sequence: list[int]) -> float:
        """Largest |receiver - learner| log-prob over a fixed sequence, over every engine and a live teacher
        (0 when the sync landed; an EMA or frozen teacher is not meant to equal the learner)."""
        learner = self.learner.sequence_logprobs([sequence])[0]
        receivers = list(self.engines) + ([self.teacher] if self.teacher and self.cfg.teacher.weights == "live" else [])
        outs = ray.get([r.sequence_logprobs.remote([sequence]) for r in receivers])
        return max(abs(a - b) for out in outs for a, b in zip(out[0], learner))

    def close(self, timeout_s: float = 60.0) -> None:
        """Stop the verifier and every actor, and wait (bounded) until their processes have exited."""
        if self.verifier is not None:
            self.verifier.close()
        actors = [*self.engines, *([self.teacher] if self.teacher is not None else []),
                  *(self.learner.actors if self.learner is not None else [])]
        pids = [*self.pids["rollout"], self.pids["teacher"], *self.pids["learner"]]
        left = stop_actors(actors, pids, timeout_s)
        if self.placements is not None:
            self.placements.remove()
        if left:
            print(f"selfdistill: actor processes {left} still running {timeout_s:.0f} s after they were stopped")


def chunk_bounds(n: int, parts: int) -> list[tuple[int, int]]:
    """[lo, hi) ranges cutting n items into at most `parts` contiguous, non-empty chunks of near-equal size."""
    size, extra = divmod(n, parts)
    bounds, lo = [], 0
    for k in range(parts):
        hi = lo + size + (k < extra)
        if hi > lo:
            bounds.append((lo, hi))
        lo = hi
    return bounds


def _seeded(sampling: SamplingConfig, offset: int) -> SamplingConfig:
    """Sampling for a chunk that starts at prompt `offset` of the batch: prompt i of the batch gets seeds
    seed + i*n + j wherever it runs, so results do not depend on how prompts were split across engines."""
    if sampling.seed is None:
        return sampling
    return sampling.model_copy(update={"seed": sampling.seed + offset * sampling.n})
