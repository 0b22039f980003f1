"""The rollout Ray actor: one inference engine in its own process, fed token ids and weights.

The trainer creates it from this importable module (Ray cannot pickle actor classes that
live in `__main__`):

    actor = ray.remote(RolloutActor).options(num_cpus=1).remote(model_path, engine_cfg, sync_cfg)

`num_cpus` also sets the actor's OpenMP threads. Calls run one at a time, so weights never
change under a running `generate`, and the version returned by `weight_version()` between
calls is the one that produced the samples of the next `generate`.

Weights arrive through the weight transport (selfdistill/weights/) as vLLM's four
weight-sync calls, driven by the learner: a vLLM engine built with the transport's
`vllm_backend` hands them to vLLM's weight-transfer API; otherwise the engine reloads
from the named tensors the transport yields.

Colocated with a learner rank (placement.mode colocated), the engine sleeps while the learner
trains and wakes in two stages around the weight update (`sleep`, `wake_up`); it records those
calls, the weight calls and the generate calls in order (`memory_calls`), and refuses to
generate while any of its memory is asleep.
"""

from __future__ import annotations

import os

from selfdistill import weights
from selfdistill.models import lora
from selfdistill.rollout import vllm_internals
from selfdistill.rollout.base import EngineConfig, EngineExecutor, Sample, SamplingConfig, build_engine
from selfdistill.weights.object_store import bucket_tensors


class RolloutActor:
    """Ray actor around a `RolloutEngine`; see the module docstring."""

    def __init__(self, model_path: str, engine: EngineConfig, sync: weights.SyncConfig | None = None,
                 version: int = 0, executor: EngineExecutor | None = None, colocated: bool = False):
        vllm_internals.configure_env()  # in this actor's process, before anything imports vllm
        self.receiver = weights.build_receiver(sync or weights.ObjectStoreConfig())
        # vLLM's weight transfer replaces base weights; a LoRA adapter is reloaded from the tensors instead
        self.native = engine.name == "vllm" and self.receiver.vllm_backend is not None and not lora.is_adapter(model_path)
        self.engine = build_engine(engine, model_path, self.receiver.vllm_backend if self.native else None,
                                   executor, sleep_mode=colocated)
        self.version = version  # of the weights in model_path (a resumed run's checkpoint step)
        self.calls: list[str] | None = [] if colocated else None  # colocated: sleep, wake and weight calls, in order

    def ready(self) -> int:
        """The actor's process id, once the engine is built (and, called later, once earlier calls are done)."""
        return os.getpid()

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig) -> list[list[Sample]]:
        """`sampling.n` samples for each prompt (token ids), in prompt order."""
        self._record("generate", awake=True)
        return self.engine.generate(prompts, sampling)

    def generate_stream(self, prompts: list[list[int]], sampling: SamplingConfig):
        """Ray streaming generator (call with `.options(num_returns="streaming")`): yields
        (prompt index, samples, weight version) as each prompt's `sampling.n` samples finish."""
        self._record("generate", awake=True)
        for i, samples in self.engine.generate_stream(prompts, sampling):
            yield i, samples, self.version

    def sequence_logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        """log p(x_t | x_<t) for t >= 1 at temperature 1 under the current weights."""
        self._record("sequence_logprobs", awake=True)
        return self.engine.sequence_logprobs(sequences)

    # ------------------------------------------------------------------ colocated: sleep while the learner trains

    def sleep(self) -> None:
        """Offload the weights and drop the KV cache (vLLM's `sleep(level=1)`): the learner takes the GPU."""
        vllm_internals.sleep(self.engine.llm)
        self._record("sleep")

    def wake_up(self, tags: list[str]) -> None:
        """Bring back each tag's memory in order: "weights" before a weight update, "kv_cache" before generating."""
        for tag in tags:
            vllm_internals.wake_up(self.engine.llm, tag)
            self._record(f"wake_up({tag})")

    def memory_calls(self) -> list[str]:
        """The sleep, wake, weight and generate calls since the last time this was asked, in order; each marked
        "[asleep]" if vLLM still held memory asleep after it."""
        if self.calls is None:
            return []
        calls, self.calls = self.calls, []
        return calls

    def _record(self, call: str, awake: bool = False) -> None:
        """Note a call (colocated engines only); `awake`: the call needs the whole engine awake."""
        if self.calls is None:
            return
        asleep = vllm_internals.is_sleeping(self.engine.llm)
        if awake and asleep:  # vLLM would queue the requests forever: the scheduler stays paused
            raise RuntimeError(f"rollout engine asleep: {call} before wake_up(kv_cache)")
        self.calls.append(call + (" [asleep]" if asleep else ""))

    # ------------------------------------------------------------------ weights in

    def load_weights(self, buckets: list, version: int) -> int:
        """Reload every weight from a list of buckets (dicts of tensors, or Ray refs to them) in one call;
        returns `version`, now held."""
        self.engine.load_weights(bucket_tensors(buckets))
        self.version = version
        self._record("load_weights")
        return version

    # vLLM's weight-sync calls, driven by the learner through the weight transport

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        """Join the learner's transport (a collective group's rendezvous; nothing for the object store)."""
        if self.native:
            vllm_internals.init_weight_transfer(self.engine.llm, init_info)
        else:
            self.receiver.init(init_info)

    def start_weight_update(self) -> None:
        if self.native:
            vllm_internals.start_weight_update(self.engine.llm)
        self._record("start_weight_update")

    def update_weights(self, update_info: dict) -> None:
        """Receive one chunk of a version (the learner sends while this runs)."""
        update_info = weights.without_header(update_info)  # the engine knows what it serves and commits the version
        if self.native:
            vllm_internals.update_weights(self.engine.llm, update_info)
        else:
            self.engine.load_weights(self.receiver.tensors(update_info))
        self._record("update_weights")

    def finish_weight_update(self, weight_version: str) -> None:
        """Commit the update: the next `generate` samples from `weight_version`."""
        if self.native:
            vllm_internals.finish_weight_update(self.engine.llm, int(weight_version))
        self.version = int(weight_version)
        self._record("finish_weight_update")

    def weight_version(self) -> int:
        """Version of the weights the engine holds (0: the initial checkpoint)."""
        return self.version
