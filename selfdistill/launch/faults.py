"""Surviving actor failures: a dead or hung rollout engine or teacher is replaced and its work redone.

A replacement is built from the run's policy (or teacher) folder and, before it serves, gets the
weights every other receiver holds. The object store transport keeps the last published version's
buckets: the replacement loads them, then the learner reconnects to the receivers. The collective
transports keep no copy: the learner opens a fresh group with every receiver (a new rendezvous, the
replacement included) and publishes the weights it holds, under the version they are
(`Roles.learner_version`: with `rollout.max_staleness` >= 1 the learner may have trained past the
last published version). A replacement and a learner call (a train step, a publish) never overlap:
the learner is idle while it reconnects, so the version is exact and the reconnect never waits
behind a train step (the pipeline thread replaces while the training thread trains). The work the
dead actor had in flight is sent again (launch/collect.py): prompts keep their per-prompt seeds and
teacher scoring is deterministic, so redone work equals what was lost. A verifier worker that dies
mid-check has its answer checked again by a fresh worker (rewards/deadline_pool.py). Every failure
is counted (`fault/<role>` in metrics.jsonl) and printed; more than `faults.max_failures` failures
of one role within `faults.window_s` stop the run with `RoleFailed` instead of looping. A learner
rank that dies or does not answer in time stops the run (`LearnerFailed`, a `RoleFailed` naming the
rank, learner/group.py) with the last checkpoint intact, to be continued with `--resume auto`.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict, deque

import ray
from ray.exceptions import GetTimeoutError, RayActorError

from selfdistill.config import FaultConfig
from selfdistill.launch.processes import stop_actors
from selfdistill.weights import WeightSyncError

ACTOR_ERRORS = (RayActorError, GetTimeoutError)  # a dead actor, or one that did not answer in time
ROLES = ("rollout", "teacher", "verifier", "learner")


class RoleFailed(RuntimeError):
    """A role failed more often than the fault policy allows, or the learner failed."""


class Faults:
    """The run's failure policy and counters; `replace_*` swap a dead actor for a fresh one (thread-safe)."""

    def __init__(self, cfg: FaultConfig, console):
        self.cfg, self.console = cfg, console
        self.counts = {role: 0 for role in ROLES}
        self._recent: dict[str, deque] = defaultdict(deque)
        self._verifier_seen = 0
        self._replaced: dict = {}  # dead engine handle -> its replacement
        # the pipeline thread and the training thread may both replace; a replacement and the training thread's
        # learner calls (train steps, publishes) never overlap
        self._lock = threading.RLock()

    def failed(self, role: str, error: BaseException) -> None:
        """Count a failure of `role`; raise RoleFailed past the policy's limit."""
        now = time.monotonic()
        recent = self._recent[role]
        recent.append(now)
        while now - recent[0] > self.cfg.window_s:
            recent.popleft()
        self.counts[role] += 1
        message = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:300]
        if len(recent) > self.cfg.max_failures:
            raise RoleFailed(f"the {role} role failed {len(recent)} times within {self.cfg.window_s:.0f} s "
                             f"(faults.max_failures={self.cfg.max_failures}); last failure: {message}") from error
        self.console.note(f"fault: {role} failed ({message}); replacing it and redoing its work")

    def metrics(self, roles) -> dict[str, int]:
        """Failures so far per role (verifier: worker processes that died mid-check)."""
        deaths = roles.verifier.worker_deaths if roles.verifier is not None else 0
        while self._verifier_seen < deaths:
            self._verifier_seen += 1
            self.failed("verifier", RuntimeError("a verifier worker process died while checking an answer"))
        return {f"fault/{role}": count for role, count in self.counts.items()}

    def call(self, role: str, fn, *args):
        """Run a stage that cannot be redone here (the learner): an actor failure stops the run cleanly. No
        replacement runs meanwhile (it waits for the stage to end)."""
        try:
            with self._lock:
                return fn(*args)
        except RoleFailed:  # the learner group names the rank that died or hung (learner/group.py)
            self.counts[role] += 1
            raise
        except ACTOR_ERRORS as error:
            self.counts[role] += 1
            raise RoleFailed(f"the {role} role failed ({type(error).__name__}); the run stops here and the last "
                             f"complete checkpoint is intact: continue with --resume") from error

    def replace_engine(self, roles, engine, error: BaseException):
        """Count `engine`'s failure and put a fresh rollout actor, holding the learner's weights, in its place.

        Returns the replacement; when both threads saw the same death, the second gets the first's replacement.
        """
        with self._lock:
            if engine in self._replaced:
                return self._replaced[engine]
            self.failed("rollout", error)
            index = roles.engines.index(engine)
            stop_actors([engine], [roles.pids["rollout"][index]], timeout_s=30)
            new = roles.new_engine(index)
            pid = self._start(new, roles)
            roles.engines[index], roles.pids["rollout"][index] = new, pid
            self._replaced[engine] = new
            self._reconnect(roles)
            return new

    def replace_teacher(self, roles, teacher, error: BaseException) -> None:
        """Count `teacher`'s failure and start a fresh teacher holding the learner's weights (unless frozen).

        An EMA teacher restarts from the average saved in the run's last checkpoint (before the first: the one
        it started from) and blends the weights published since with the weight of every version it missed
        (teacher/actor.py).
        """
        with self._lock:
            if roles.teacher is not teacher:  # the other thread replaced it already
                return
            self.failed("teacher", error)
            stop_actors([roles.teacher], [roles.pids["teacher"]], timeout_s=30)
            new = roles.new_teacher()
            roles.teacher, roles.pids["teacher"] = new, self._start(new, roles)
            self._reconnect(roles)

    def retrying(self, roles, fn, *args):
        """`fn(*args)` (a call on every engine and the teacher, from the training thread); when it fails, replace
        the receivers that no longer answer and call again. Nobody dead: the learner failed (RoleFailed)."""
        while True:
            try:
                with self._lock:
                    return fn(*args)
            except (*ACTOR_ERRORS, WeightSyncError) as error:
                dead = [e for e in roles.engines if not self._answers(e)]
                teacher = roles.teacher
                teacher_dead = teacher is not None and not self._answers(teacher)
                if not dead and not teacher_dead:
                    return self.call("learner", _raise, error)
                for engine in dead:
                    self.replace_engine(roles, engine, error)
                if teacher_dead:
                    self.replace_teacher(roles, teacher, error)

    def _start(self, actor, roles) -> int:
        pid = ray.get(actor.ready.remote(), timeout=self.cfg.start_timeout_s)
        handle, version = getattr(roles, "published", None) or (None, None)
        if handle is not None:  # the object store's buckets of the last published version
            ray.get(actor.load_weights.remote(handle, version), timeout=self.cfg.call_timeout_s)
        return pid

    def _reconnect(self, roles) -> None:
        """The learner sends the next versions to the receivers as they are now (the replacement included): a
        fresh rendezvous. A transport that kept no copy of the last published version sends the learner's weights
        again, once it has trained past the starting weights the replacement was built with."""
        if roles.learner is None:
            return
        roles.learner.connect_weights(roles.receivers(), roles.receiver_ranks())
        handle, _ = getattr(roles, "published", None) or (None, None)
        if handle is None and roles.learner_version != roles.start_version:
            roles.publish(roles.learner_version)

    def _answers(self, actor) -> bool:
        try:
            ray.get(actor.ready.remote(), timeout=self.cfg.probe_timeout_s)
            return True
        except ACTOR_ERRORS:
            return False


def _raise(error: BaseException):
    raise error
