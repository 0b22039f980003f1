"""The learner ranks as one handle: fan calls out, shard whole prompt groups across ranks.

Every call on the ranks is bounded: a rank that dies or does not answer within its timeout
(`faults.learner_timeout_s`; publishing and connecting: `sync.timeout_s` + 30 s; starting:
`faults.start_timeout_s`) raises `LearnerFailed` naming the rank, and the run stops cleanly.
"""

from __future__ import annotations

import time

import ray
from ray.exceptions import RayActorError, RayTaskError

from selfdistill.config import TrainConfig
from selfdistill.launch.faults import RoleFailed
from selfdistill.launch.processes import stop_actors
from selfdistill.learner.actor import LearnerActor
from selfdistill.learner.batching import micro_batch_plan, shard_groups
from selfdistill.records import TeacherScores, Trajectory


class LearnerFailed(RoleFailed):
    """A learner rank died or did not answer in time; the run stops (the last complete checkpoint is intact)."""


class LearnerGroup:
    def __init__(self, cfg: TrainConfig, model_path: str, resume_from: str | None = None, placements=None):
        """`placements` (launch/placement.py) puts each rank into its bundle; None: anywhere with the CPUs.

        The ranks start together; rank 0 opens the rendezvous on its own node and reports its port (a port the
        driver finds free on its machine may be taken on rank 0's node), then every rank meets there. A rank
        that fails to start stops the group's actors before the error surfaces."""
        self.cfg = cfg
        n = cfg.learner.num_ranks
        master = placements.node_address("learner", 0) if placements else cfg.cluster.node_ip_address
        options = [placements.options("learner", r) if placements else {"num_cpus": cfg.learner.num_cpus_per_rank}
                   for r in range(n)]
        self.actors = [ray.remote(LearnerActor).options(**options[rank]).remote(
            cfg, model_path, rank, n, None, resume_from, master) for rank in range(n)]
        self.pids: list = [None] * n
        try:
            self.pids = self._started([a.ready.remote() for a in self.actors])
            port = self._started([self.actors[0].master_port.remote()])[0]
            self._started([a.start.remote(port) for a in self.actors])
        except BaseException:
            stop_actors(self.actors, self.pids)  # the ranks that started would wait for the others until killed
            raise

    def train_step(self, trajs: list[Trajectory], scores: list[TeacherScores] | None) -> dict[str, float]:
        """Whole prompt groups to each rank; every rank makes as many micro-batch passes as the busiest one."""
        shards = shard_groups(trajs, len(self.actors))
        lc = self.cfg.learner
        num_micro_batches = max(len(micro_batch_plan([trajs[i] for i in shard], lc.micro_batch_groups,
                                                     lc.micro_batch_tokens)) for shard in shards)
        refs = [actor.train_step.remote([trajs[i] for i in shard], [scores[i] for i in shard] if scores else None,
                                        num_micro_batches)
                for actor, shard in zip(self.actors, shards)]
        results = self._learner_call(refs, "the train step")
        return {k: sum(r[k] for r in results) / len(results) for k in results[0]}

    def connect_weights(self, receivers: dict, workers: dict[str, int] | None = None) -> None:
        """Join the weight transport with the named receiver actors (bounded by `sync.timeout_s`)."""
        self._sync_call([a.connect_weights.remote(receivers, workers) for a in self.actors], "connecting to receivers")

    def publish(self, version: int):
        """Gather and send weights to every receiver; returns rank 0's (transport handle, byte and bucket counts).

        Raises `WeightSyncError` naming a receiver that failed, `LearnerFailed` naming a rank that died or did not
        finish in time.
        """
        return self._sync_call([a.publish.remote(version) for a in self.actors], f"publishing version {version}")[0]

    def sequence_logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        return self._learner_call([a.sequence_logprobs.remote(sequences) for a in self.actors], "a log-prob pass")[0]

    def save_checkpoint(self, path: str, client_state: dict) -> None:
        self._learner_call([a.save_checkpoint.remote(path, client_state) for a in self.actors],
                           f"saving the checkpoint {path}")

    def _started(self, refs: list) -> list:
        return self._bounded(refs, "starting", self.cfg.faults.start_timeout_s, "faults.start_timeout_s")

    def _learner_call(self, refs: list, what: str) -> list:
        return self._bounded(refs, what, self.cfg.faults.learner_timeout_s, "faults.learner_timeout_s")

    def _sync_call(self, refs: list, what: str) -> list:
        # The ranks bound their own receivers' calls by sync.timeout_s; the margin lets their errors (which name
        # the receiver) arrive first.
        return self._bounded(refs, what, self.cfg.sync.timeout_s + 30, "sync.timeout_s (+30 s)")

    def _bounded(self, refs: list, what: str, timeout_s: float, field: str) -> list:
        """Every rank's result of `refs` (one per rank); the first error surfaces at once. A rank whose process
        died, or that has not answered `timeout_s` after the call, raises `LearnerFailed` naming it."""
        deadline = time.monotonic() + timeout_s
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                late = ", ".join(self._rank(refs.index(r)) for r in pending)
                raise LearnerFailed(f"{late} did not finish {what} within {field}={timeout_s:g} s; the run stops "
                                    f"here and the last complete checkpoint is intact: continue with --resume auto")
            try:
                ray.get(ready[0])
            except RayActorError as error:
                if isinstance(error, RayTaskError):  # raised inside a live rank (e.g. by a receiver it called)
                    raise
                raise LearnerFailed(f"{self._rank(refs.index(ready[0]))} died during {what} "
                                    f"({type(error).__name__}); the run stops here and the last complete "
                                    f"checkpoint is intact: continue with --resume auto") from error
        return ray.get(refs)

    def _rank(self, rank: int) -> str:
        pid = self.pids[rank]
        return f"learner rank {rank}" + (f" (pid {pid})" if pid is not None else "")
