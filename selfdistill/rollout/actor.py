"""The rollout Ray actor: one inference engine in its own process, fed token ids and weights.

The trainer creates it from this importable module (Ray cannot pickle actor classes that
live in `__main__`):

    actor = ray.remote(RolloutActor).options(num_cpus=1).remote(model_path, engine_cfg)

`num_cpus` also sets the actor's OpenMP threads. Calls run one at a time, so weights never
change under a running `generate`, and the version returned by `weight_version()` between
calls is the one that produced the samples of the next `generate`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import ray
import torch

from selfdistill.rollout import vllm_internals
from selfdistill.rollout.base import EngineConfig, Sample, SamplingConfig, build_engine


class RolloutActor:
    """Ray actor around a `RolloutEngine`; see the module docstring."""

    def __init__(self, model_path: str, engine: EngineConfig):
        vllm_internals.configure_env()  # in this actor's process, before anything imports vllm
        self.engine = build_engine(engine, model_path)
        self.version = 0

    def ready(self) -> int:
        """The actor's process id, once the engine is built."""
        return os.getpid()

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig) -> list[list[Sample]]:
        """`sampling.n` samples for each prompt (token ids), in prompt order."""
        return self.engine.generate(prompts, sampling)

    def sequence_logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        """log p(x_t | x_<t) for t >= 1 at temperature 1 under the current weights."""
        return self.engine.sequence_logprobs(sequences)

    def load_weights(self, buckets: list, version: int) -> int:
        """Stream every bucket into the engine in one reload, then hold `version`; returns it.

        A bucket is a dict name -> tensor or a `ray.ObjectRef` to one. Refs are fetched one
        at a time as the engine consumes them, so the whole model is never held twice.
        """
        self.engine.load_weights(_named_tensors(buckets))
        self.version = version
        return version

    def weight_version(self) -> int:
        """Version of the weights the engine holds (0: the initial checkpoint)."""
        return self.version


def _named_tensors(buckets: list) -> Iterator[tuple[str, torch.Tensor]]:
    for bucket in buckets:
        tensors = ray.get(bucket) if isinstance(bucket, ray.ObjectRef) else bucket
        yield from tensors.items()
