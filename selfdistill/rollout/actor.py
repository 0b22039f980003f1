"""The rollout Ray actor: one inference engine in its own process, fed token ids and weights.

The trainer creates it from this importable module (Ray cannot pickle actor classes that
live in `__main__`):

    actor = ray.remote(RolloutActor).options(num_cpus=1).remote(model_path, engine_cfg, sync_cfg)

`num_cpus` also sets the actor's OpenMP threads. Calls run one at a time, so weights never
change under a running `generate`, and the version returned by `weight_version()` between
calls is the one that produced the samples of the next `generate`.
"""

from __future__ import annotations

import os

from selfdistill.config import SyncConfig
from selfdistill.learner.sync import build_transport
from selfdistill.rollout import vllm_internals
from selfdistill.rollout.base import EngineConfig, Sample, SamplingConfig, build_engine


class RolloutActor:
    """Ray actor around a `RolloutEngine`; see the module docstring."""

    def __init__(self, model_path: str, engine: EngineConfig, sync: SyncConfig | None = None, version: int = 0):
        vllm_internals.configure_env()  # in this actor's process, before anything imports vllm
        self.engine = build_engine(engine, model_path)
        self.transport = build_transport(sync or SyncConfig())
        self.version = version  # of the weights in model_path (a resumed run's checkpoint step)

    def ready(self) -> int:
        """The actor's process id, once the engine is built."""
        return os.getpid()

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig) -> list[list[Sample]]:
        """`sampling.n` samples for each prompt (token ids), in prompt order."""
        return self.engine.generate(prompts, sampling)

    def generate_stream(self, prompts: list[list[int]], sampling: SamplingConfig):
        """Ray streaming generator (call with `.options(num_returns="streaming")`): yields
        (prompt index, samples, weight version) as each prompt's `sampling.n` samples finish."""
        for i, samples in self.engine.generate_stream(prompts, sampling):
            yield i, samples, self.version

    def sequence_logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        """log p(x_t | x_<t) for t >= 1 at temperature 1 under the current weights."""
        return self.engine.sequence_logprobs(sequences)

    def load_weights(self, handle, version: int) -> int:
        """Stream a published version into the engine in one reload, then hold `version`; returns it.

        `handle` comes from the weight transport (`learner/sync`); it yields tensors bucket by
        bucket as the engine consumes them, so the whole model is never held twice.
        """
        self.engine.load_weights(self.transport.receive(handle))
        self.version = version
        return version

    def weight_version(self) -> int:
        """Version of the weights the engine holds (0: the initial checkpoint)."""
        return self.version

