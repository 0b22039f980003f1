"""The rollout engine interface: sampling and engine configs, samples, and the factory.

An engine takes token ids and gives token ids back (no re-tokenisation), with the
log-prob of every sampled token under the distribution it was sampled from. It can also
score whole sequences under its current weights, which is how a weight sync is checked:
after `load_weights`, `sequence_logprobs` must equal the learner's own log-probs.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch
from pydantic import BaseModel, ConfigDict, Field


class SamplingConfig(BaseModel):
    """How responses are sampled: one config for every prompt of a `generate` call."""

    model_config = ConfigDict(extra="forbid")

    temperature: float = Field(1.0, ge=0.0, description="Logits are divided by this before sampling; 0 is greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass; 1.0 keeps the whole vocabulary.")
    top_k: int = Field(0, ge=0, description="Sample among the k most likely tokens; 0 means off (whole vocabulary).")
    max_new_tokens: int = Field(256, ge=1, description="Longest response in tokens; a response cut here ends 'length'.")
    n: int = Field(1, ge=1, description="Responses per prompt (G, the group size of GRPO-style objectives).")
    seed: int | None = Field(
        None,
        description="Seed of the call: the same seed, prompts and weights give the same samples, and no two samples "
        "of a call share a random stream. None draws fresh randomness on every call.",
    )
    stop: list[str] = Field(
        default_factory=list,
        description="Strings that end a response (finish reason 'stop'); the stop string stays in the tokens and text.",
    )


class EngineConfig(BaseModel):
    """Which inference engine runs the policy, and how it is built."""

    model_config = ConfigDict(extra="forbid")

    name: Literal["vllm", "hf"] = Field(
        "vllm", description="'vllm': vllm.LLM in-process; 'hf': transformers generate (baseline, no vLLM needed)."
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Weights and activations. CPU needs float32 (bfloat16 attention dies on some prompts)."
    )
    gpu_memory_utilization: float = Field(
        0.9, gt=0.0, le=1.0, description="GPU only: share of GPU memory vLLM may take (weights, activations, KV cache)."
    )
    kv_cache_gib: float | None = Field(
        1.0,
        gt=0.0,
        description="KV cache size in GiB. Needed on CPU, where vLLM would otherwise size it from free RAM. On GPU set "
        "None to size it from gpu_memory_utilization.",
    )
    enforce_eager: bool = Field(
        False,
        description="Skip torch.compile and CUDA graphs. On CPU with the tiny model: engine start plus first generate "
        "about 10 s instead of 16 s, decoding about 15% slower. On GPU keep False (CUDA graphs set decode speed).",
    )
    max_model_len: int | None = Field(
        None, ge=1, description="Longest prompt + response in tokens; None takes the model's max_position_embeddings."
    )
    seed: int = Field(0, description="Seed of the engine's own random state (used when SamplingConfig.seed is None).")
    enable_prefix_caching: bool = Field(
        True, description="Reuse KV blocks across requests sharing a prefix (the G samples of one prompt)."
    )
    logprobs_mode: Literal["processed_logprobs", "raw_logprobs"] = Field(
        "processed_logprobs",
        description="What Sample.logprobs holds. 'processed_logprobs': log-probs of the distribution actually sampled "
        "from, after temperature and after top-k/top-p truncation (renormalised). 'raw_logprobs': log_softmax of the "
        "model's logits before temperature. The learner's importance ratio recomputes log_softmax(logits / T) over "
        "the full vocabulary, so it needs 'processed_logprobs' with top_p=1 and top_k=0; with truncation on, the "
        "engine's numbers are the true sampling probabilities and the learner must truncate the same way. "
        "At temperature 0 both modes give log_softmax(logits).",
    )


@dataclass
class EngineExecutor:
    """How a vLLM engine runs its model: in the engine's own process (tensor_parallel_size 1), or over
    `tensor_parallel_size` workers that vLLM's Ray executor starts in the bundles `bundle_indices` of the engine's
    placement group, each asking for `worker_gpus` (a fraction when they share GPUs with learner ranks)."""

    tensor_parallel_size: int = 1
    bundle_indices: list[int] = field(default_factory=list)
    worker_gpus: float = 1.0


@dataclass
class Sample:
    """One sampled response."""

    token_ids: list[int]  # response tokens only; EOS and stop-string tokens included when they ended it
    logprobs: list[float]  # log-prob of each token under the sampling distribution (see EngineConfig.logprobs_mode)
    finish_reason: str  # "stop" (EOS or a stop string) or "length" (max_new_tokens or max_model_len)
    text: str  # the response decoded, special tokens skipped


class RolloutEngine(Protocol):
    """What the rollout actor needs from an inference engine."""

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig) -> list[list[Sample]]:
        """For each prompt (token ids), `sampling.n` samples, in prompt order."""
        ...

    def generate_stream(self, prompts: list[list[int]], sampling: SamplingConfig) -> Iterator[tuple[int, list[Sample]]]:
        """The same samples as `generate`, yielded as (prompt index, samples) as each prompt's n samples finish."""
        ...

    def sequence_logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        """log p(x_t | x_<t) for t = 1..len-1 at temperature 1 under the current weights."""
        ...

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Replace every weight in one pass (Hugging Face names; a tied lm_head.weight may be absent)."""
        ...


def build_engine(cfg: EngineConfig, model_path: str, weight_transfer_backend: str | None = None,
                 executor: EngineExecutor | None = None, sleep_mode: bool = False) -> RolloutEngine:
    """The engine named by `cfg.name`, loaded from a Hugging Face model folder. A vLLM engine built with a
    `weight_transfer_backend` receives weights through vLLM's weight-transfer API (see selfdistill/weights/);
    `executor` says how it runs (tensor parallel or not), `sleep_mode` lets it sleep while a colocated learner trains."""
    if cfg.name == "vllm":
        from selfdistill.rollout.vllm_engine import VLLMEngine

        return VLLMEngine(model_path, cfg, weight_transfer_backend, executor, sleep_mode)
    from selfdistill.rollout.hf_engine import HFEngine

    return HFEngine(model_path, cfg)
