"""Teacher scoring with a transformers forward: exact entropy and any support.

For each (context prompt, response) pair the teacher returns, per response token, the
log-prob of the sampled token, the entropy of its distribution, log-probs of its top-k
tokens, and whole vocabulary rows when the vocabulary is small enough to ship.

Pairs usually share their context prompt (the G responses of one problem under one
context), and the prompt is long while responses are short, so scoring runs in two passes:

1. prefix pass: each distinct prompt runs once (batches of prompts, left-padded) and keeps
   its KV cache; the logits at its last token give the distribution of response token 0.
2. response pass: the cache is copied to one row per response and the responses run
   (right-padded) on top of it; the logits at response position t-1 give token t.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from transformers.cache_utils import DynamicCache

from selfdistill.records import ContextScores


@dataclass
class _Prefixes:
    """The prefix pass over a batch of distinct prompts (row r = prompt r)."""

    cache: DynamicCache  # keys/values [rows, heads, width, head_dim], left-padded
    attention_mask: torch.Tensor  # [rows, width], zeros on the left padding
    lengths: torch.Tensor  # [rows] real prompt lengths
    last_logits: torch.Tensor  # [rows, V] float32, predicts response token 0


@torch.no_grad()
def score_responses(
    model,
    pairs: list[tuple[list[int], list[int]]],
    *,
    temperature: float,
    top_k: int,
    full_rows: bool,
    pad_id: int,
    batch_size: int,
) -> list[ContextScores]:
    """Score each response (second item) following its context prompt (first item).

    `batch_size` bounds the rows of every forward: prompts in a prefix pass, responses in a response pass.
    """
    scores: list[ContextScores | None] = [None] * len(pairs)
    pairs_by_prompt: dict[tuple[int, ...], list[int]] = {}
    for index, (prompt, response) in enumerate(pairs):
        if not response:
            scores[index] = _empty(top_k)
        elif not prompt:
            raise ValueError("a response needs a non-empty context prompt to be scored")
        else:
            pairs_by_prompt.setdefault(tuple(prompt), []).append(index)

    # Sorting by length keeps prompts of similar length (the same context) in one batch: less padding.
    prompts = sorted(pairs_by_prompt, key=len)
    for start in range(0, len(prompts), batch_size):
        prompt_batch = prompts[start : start + batch_size]
        prefixes = _run_prefixes(model, prompt_batch, pad_id)
        rows_and_pairs = [(row, index) for row, prompt in enumerate(prompt_batch) for index in pairs_by_prompt[prompt]]
        for chunk_start in range(0, len(rows_and_pairs), batch_size):
            rows, indices = zip(*rows_and_pairs[chunk_start : chunk_start + batch_size])
            responses = [pairs[index][1] for index in indices]
            logits = _run_responses(model, prefixes, list(rows), responses, pad_id)
            for index, response, response_logits in zip(indices, responses, logits):
                scores[index] = _context_scores(response_logits / temperature, response, top_k, full_rows)
    return scores


def _run_prefixes(model, prompts: list[tuple[int, ...]], pad_id: int) -> _Prefixes:
    """Run the prompts once, left-padded so that every prompt ends at the last column."""
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt)
        attention_mask[row, width - len(prompt) :] = 1
    ids, attention_mask = ids.to(model.device), attention_mask.to(model.device)  # the teacher's bundle: GPU or CPU
    position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)
    output = model(input_ids=ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
                   logits_to_keep=1)
    return _Prefixes(output.past_key_values, attention_mask, attention_mask.sum(-1), output.logits[:, -1].float().cpu())


def _run_responses(
    model, prefixes: _Prefixes, rows: list[int], responses: list[list[int]], pad_id: int
) -> list[torch.Tensor]:
    """Logits [len(response), V] for each response, the response following prefix row `rows[i]`."""
    first_logits = [prefixes.last_logits[row : row + 1] for row in rows]
    # The last response token predicts nothing that is scored, so it is not fed.
    inputs = [response[:-1] for response in responses]
    width = max(map(len, inputs))
    if width == 0:
        return first_logits
    ids = torch.full((len(inputs), width), pad_id, dtype=torch.long)
    response_mask = torch.zeros((len(inputs), width), dtype=torch.long)
    for i, tokens in enumerate(inputs):
        ids[i, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        response_mask[i, : len(tokens)] = 1
    device = model.device
    ids, response_mask, row_index = ids.to(device), response_mask.to(device), torch.tensor(rows, device=device)
    attention_mask = torch.cat([prefixes.attention_mask[row_index], response_mask], dim=1)
    position_ids = prefixes.lengths[row_index, None] + torch.arange(width, device=device)
    output = model(input_ids=ids, attention_mask=attention_mask, position_ids=position_ids,
                   past_key_values=_expand_cache(prefixes.cache, row_index), use_cache=True)
    logits = output.logits.float().cpu()
    return [torch.cat([first, logits[i, : len(tokens)]]) for i, (first, tokens) in enumerate(zip(first_logits, inputs))]


def _expand_cache(cache: DynamicCache, rows: torch.Tensor) -> DynamicCache:
    """A new cache holding prefix row `rows[i]` in row i; `cache` itself is left untouched for later chunks."""
    expanded = DynamicCache(ddp_cache_data=[(layer.keys, layer.values) for layer in cache.layers])
    expanded.batch_select_indices(rows)
    return expanded


def _context_scores(logits: torch.Tensor, response: list[int], top_k: int, full_rows: bool) -> ContextScores:
    """Scores of one response from its (temperature-scaled) logits [len(response), V]."""
    logp = torch.log_softmax(logits, dim=-1)
    token_lp = logp.gather(-1, torch.tensor(response)[:, None]).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    k = min(top_k, logp.shape[-1])
    top_lp, top_ids = logp.topk(k, dim=-1) if k else (logp[:, :0], torch.zeros(len(response), 0, dtype=torch.long))
    return ContextScores(
        token_logprobs=token_lp.numpy().astype(np.float32),
        entropy=entropy.numpy().astype(np.float32),
        support_ids=top_ids.numpy().astype(np.int64),
        support_logprobs=top_lp.numpy().astype(np.float32),
        full_logprobs=logp.numpy().astype(np.float32) if full_rows else None,
    )


def _empty(top_k: int) -> ContextScores:
    return ContextScores(
        token_logprobs=np.zeros(0, np.float32),
        entropy=np.zeros(0, np.float32),
        support_ids=np.zeros((0, top_k), np.int64),
        support_logprobs=np.zeros((0, top_k), np.float32),
    )
