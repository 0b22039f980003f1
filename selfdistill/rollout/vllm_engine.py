"""The vLLM rollout engine: `vllm.LLM` in this process, token ids in and out.

All vLLM calls go through `rollout.vllm_internals`. Given a PEFT adapter folder instead of a
model folder, the engine serves base + adapter with vLLM's LoRA support, and `load_weights`
takes adapter tensors (`rollout.lora_adapter`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from selfdistill.models import lora
from selfdistill.rollout import vllm_internals as vi
from selfdistill.rollout.base import EngineConfig, EngineExecutor, Sample, SamplingConfig


class VLLMEngine:
    """`RolloutEngine` on vLLM (see `rollout.base`)."""

    def __init__(self, model_path: str, cfg: EngineConfig, weight_transfer_backend: str | None = None,
                 executor: EngineExecutor | None = None, sleep_mode: bool = False):
        self.adapter = None
        if lora.is_adapter(model_path):
            from selfdistill.rollout.lora_adapter import AdapterVersions

            rank = lora.adapter_settings(model_path)["r"]
            self.llm = vi.make_llm(lora.base_model_path(model_path), cfg, max_lora_rank=rank, executor=executor,
                                   sleep_mode=sleep_mode)
            self.adapter = AdapterVersions(self.llm, model_path)
        else:
            self.llm = vi.make_llm(model_path, cfg, weight_transfer_backend=weight_transfer_backend, executor=executor,
                                   sleep_mode=sleep_mode)
        self.checkpoint_names = _checkpoint_names(model_path)  # with an adapter: the adapter's tensors

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig) -> list[list[Sample]]:
        done = dict(self.generate_stream(prompts, sampling))
        return [done[i] for i in range(len(prompts))]

    def generate_stream(self, prompts: list[list[int]], sampling: SamplingConfig) -> Iterator[tuple[int, list[Sample]]]:
        if sampling.seed is None:
            params = vi.sampling_params(sampling, seed=None)
        else:  # sample j of prompt i gets seed + i*n + j: no two samples share a stream
            params = [vi.sampling_params(sampling, seed=sampling.seed + i * sampling.n) for i in range(len(prompts))]
        for i, out in vi.generate_stream(self.llm, prompts, params, self._adapter_request()):
            yield i, [
                Sample(
                    token_ids=list(c.token_ids),
                    logprobs=vi.sampled_logprobs(c),
                    finish_reason=vi.finish_reason(c),
                    text=c.text,
                )
                for c in sorted(out.outputs, key=lambda c: c.index)
            ]

    def sequence_logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        outputs = vi.generate(self.llm, sequences, vi.scoring_params(), self._adapter_request())
        return [vi.prompt_logprobs(out) for out in outputs]

    def _adapter_request(self):
        return self.adapter.request if self.adapter else None

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Reload every weight in place (with an adapter: replace the adapter); raise if the checkpoint's (adapter's)
        tensors were not all sent.

        vLLM itself only warns about missing tensors and keeps their old values: the
        stale-weights bug this check turns into an error.
        """
        received = self.adapter.load(named_tensors) if self.adapter else vi.reload_weights(self.llm, named_tensors)
        missing = self.checkpoint_names - received
        if missing:
            raise ValueError(
                f"weight sync incomplete: {len(missing)} of {len(self.checkpoint_names)} checkpoint tensors were not "
                f"sent and keep their old values, e.g. {sorted(missing)[:3]}"
            )


def _checkpoint_names(model_path: str) -> set[str]:
    """Tensor names in the model folder's safetensors files (empty for a hub id: no completeness check)."""
    names: set[str] = set()
    for file in Path(model_path).glob("*.safetensors"):
        with safe_open(file, framework="pt") as f:
            names.update(f.keys())
    return names
