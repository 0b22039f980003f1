"""The learner ranks as one handle: fan calls out, shard whole prompt groups across ranks."""

from __future__ import annotations

import socket

import ray

from selfdistill.config import TrainConfig
from selfdistill.learner.actor import LearnerActor
from selfdistill.records import TeacherScores, Trajectory


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LearnerGroup:
    def __init__(self, cfg: TrainConfig, model_path: str, resume_from: str | None = None):
        n = cfg.learner.num_ranks
        port = _free_port()
        actor_cls = ray.remote(LearnerActor).options(num_cpus=cfg.learner.num_cpus_per_rank)
        self.actors = [actor_cls.remote(cfg, model_path, rank, n, port, resume_from) for rank in range(n)]
        self.pids = ray.get([a.ready.remote() for a in self.actors])

    def train_step(self, trajs: list[Trajectory], scores: list[TeacherScores] | None) -> dict[str, float]:
        groups = sorted({t.group for t in trajs})
        per_rank = len(groups) // len(self.actors)
        refs = []
        for rank, actor in enumerate(self.actors):
            mine = set(groups[rank * per_rank : (rank + 1) * per_rank]) if rank < len(self.actors) - 1 \
                else set(groups[rank * per_rank :])
            idx = [i for i, t in enumerate(trajs) if t.group in mine]
            refs.append(actor.train_step.remote([trajs[i] for i in idx], [scores[i] for i in idx] if scores else None))
        results = ray.get(refs)
        return {k: sum(r[k] for r in results) / len(results) for k in results[0]}

    def publish(self, version: int):
        """Gather and publish weights; returns rank 0's (transport handle, byte and bucket counts)."""
        return ray.get([a.publish.remote(version) for a in self.actors])[0]

    def sequence_logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        return ray.get([a.sequence_logprobs.remote(sequences) for a in self.actors])[0]

    def save_checkpoint(self, path: str, client_state: dict) -> None:
        ray.get([a.save_checkpoint.remote(path, client_state) for a in self.actors])
