"""The transformers rollout engine: `generate` on the policy model, same interface as vLLM.

A baseline for benchmarks and for machines without vLLM; it batches every prompt of a call
into one padded `generate` and does no KV-cache sharing between samples.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from transformers import AutoTokenizer, GenerationConfig

from selfdistill.models import lora
from selfdistill.rollout.base import EngineConfig, Sample, SamplingConfig


class HFEngine:
    """`RolloutEngine` on transformers (see `rollout.base`)."""

    def __init__(self, model_path: str, cfg: EngineConfig):
        self.model = lora.load_policy(model_path, getattr(torch, cfg.dtype)).eval()  # an adapter folder: base + adapter
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = {self.tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos])} - {None}
        self.processed = cfg.logprobs_mode == "processed_logprobs"
        self.seed = cfg.seed

    def generate_stream(self, prompts: list[list[int]], sampling: SamplingConfig) -> Iterator[tuple[int, list[Sample]]]:
        """transformers generates a batch at once: every prompt's samples come when the batch is done."""
        yield from enumerate(self.generate(prompts, sampling))

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], sampling: SamplingConfig) -> list[list[Sample]]:
        if not prompts:
            return []
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):  # left padding: every prompt ends where generation starts
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        greedy = sampling.temperature == 0
        config = GenerationConfig(
            do_sample=not greedy,
            temperature=None if greedy else sampling.temperature,
            top_p=None if greedy else sampling.top_p,
            top_k=None if greedy else sampling.top_k,
            max_new_tokens=sampling.max_new_tokens,
            num_return_sequences=sampling.n,
            pad_token_id=self.pad_id,
            eos_token_id=sorted(self.eos_ids),
            stop_strings=sampling.stop or None,
            return_dict_in_generate=True,
            output_scores=self.processed,
            output_logits=not self.processed,
        )
        seed = sampling.seed
        if seed is None:  # fresh randomness each call, reproducible from the engine seed
            seed, self.seed = self.seed, self.seed + 1
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            out = self.model.generate(
                input_ids=ids, attention_mask=mask, generation_config=config, tokenizer=self.tokenizer
            )
        # scores: after temperature and top-k/top-p (what was sampled from); logits: raw
        steps = torch.stack(out.scores if self.processed else out.logits, dim=1).float().log_softmax(-1)
        new_tokens = out.sequences[:, width:]
        token_lp = steps.gather(-1, new_tokens[:, :, None]).squeeze(-1)
        samples = [
            self._sample(row.tolist(), lp.tolist(), sampling.stop) for row, lp in zip(new_tokens, token_lp, strict=True)
        ]
        return [samples[i * sampling.n : (i + 1) * sampling.n] for i in range(len(prompts))]

    def _sample(self, tokens: list[int], logprobs: list[float], stop: list[str]) -> Sample:
        """Cut one generated row where it ended (EOS or stop string, kept) and name why."""
        end, reason = len(tokens), "length"
        for t, token in enumerate(tokens):
            if token in self.eos_ids or (stop and any(s in self.tokenizer.decode(tokens[: t + 1]) for s in stop)):
                end, reason = t + 1, "stop"
                break
        tokens = tokens[:end]
        return Sample(tokens, logprobs[:end], reason, self.tokenizer.decode(tokens, skip_special_tokens=True))

    @torch.no_grad()
    def sequence_logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        if not sequences:
            return []
        width = max(len(s) for s in sequences)
        ids = torch.full((len(sequences), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(sequences):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        logp = self.model(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)
        token_lp = logp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
        return [token_lp[i, : len(s) - 1].tolist() for i, s in enumerate(sequences)]

    @torch.no_grad()
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy tensors in by name; raise on an unknown name or a parameter left unsent."""
        expected = lora.published_parameters(self.model)  # every parameter, or the adapter's
        targets = {**self.model.state_dict(keep_vars=True), **expected}  # tied lm_head.weight: an alias of the embedding
        sent = set()
        for name, tensor in named_tensors:
            if name not in targets:
                raise KeyError(f"unknown parameter {name!r} for {type(self.model).__name__}")
            targets[name].copy_(tensor)
            sent.add(name)
        missing = set(expected) - sent
        if missing:
            raise ValueError(f"weight sync incomplete: {len(missing)} parameters not sent, e.g. {sorted(missing)[:3]}")
