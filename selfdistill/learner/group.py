"""The learner ranks as one handle: fan calls out, shard whole prompt groups across ranks."""

from __future__ import annotations

import socket
import time

import ray

from selfdistill.config import TrainConfig
from selfdistill.learner.actor import LearnerActor
from selfdistill.learner.batching import micro_batch_plan, shard_groups
from selfdistill.records import TeacherScores, Trajectory
from selfdistill.weights import WeightSyncError


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LearnerGroup:
    def __init__(self, cfg: TrainConfig, model_path: str, resume_from: str | None = None, placements=None):
        """`placements` (launch/placement.py) puts each rank into its bundle; None: anywhere with the CPUs."""
        self.cfg = cfg
        n = cfg.learner.num_ranks
        port = _free_port()
        master = placements.node_address("learner", 0) if placements else cfg.cluster.node_ip_address
        options = [placements.options("learner", r) if placements else {"num_cpus": cfg.learner.num_cpus_per_rank}
                   for r in range(n)]
        self.actors = [ray.remote(LearnerActor).options(**options[rank]).remote(
            cfg, model_path, rank, n, port, resume_from, master) for rank in range(n)]
        self.pids = ray.get([a.ready.remote() for a in self.actors])

    def train_step(self, trajs: list[Trajectory], scores: list[TeacherScores] | None) -> dict[str, float]:
        """Whole prompt groups to each rank; every rank makes as many micro-batch passes as the busiest one."""
        shards = shard_groups(trajs, len(self.actors))
        lc = self.cfg.learner
        num_micro_batches = max(len(micro_batch_plan([trajs[i] for i in shard], lc.micro_batch_groups,
                                                     lc.micro_batch_tokens)) for shard in shards)
        refs = [actor.train_step.remote([trajs[i] for i in shard], [scores[i] for i in shard] if scores else None,
                                        num_micro_batches)
                for actor, shard in zip(self.actors, shards)]
        results = ray.get(refs)
        return {k: sum(r[k] for r in results) / len(results) for k in results[0]}

    def connect_weights(self, receivers: dict, workers: dict[str, int] | None = None) -> None:
        """Join the weight transport with the named receiver actors (bounded by `sync.timeout_s`)."""
        self._bounded([a.connect_weights.remote(receivers, workers) for a in self.actors], "connecting to receivers")

    def publish(self, version: int):
        """Gather and send weights to every receiver; returns rank 0's (transport handle, byte and bucket counts).

        Raises `WeightSyncError` naming the receiver that failed or the learner rank that did not finish in time.
        """
        return self._bounded([a.publish.remote(version) for a in self.actors], f"publishing version {version}")[0]

    def _bounded(self, refs: list, what: str) -> list:
        # The ranks bound their own receivers' calls by sync.timeout_s; the margin lets their errors (which name
        # the receiver) arrive first.
        deadline = time.monotonic() + self.cfg.sync.timeout_s + 30
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                ranks = [refs.index(r) for r in pending]
                raise WeightSyncError(f"learner ranks {ranks} did not finish {what} within sync.timeout_s="
                                      f"{self.cfg.sync.timeout_s:g} s (+30 s)")
            ray.get(ready[0])  # an error, naming the receiver, surfaces at once
        return ray.get(refs)

    def sequence_logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        return ray.get([a.sequence_logprobs.remote(sequences) for a in self.actors])[0]

    def save_checkpoint(self, path: str, client_state: dict) -> None:
        ray.get([a.save_checkpoint.remote(path, client_state) for a in self.actors])
