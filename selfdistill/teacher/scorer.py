"""Teacher scoring with a transformers forward: exact entropy and any support.

For each (context prompt, response) pair the teacher returns, per response token, the
log-prob of the sampled token, the entropy of its distribution, log-probs of its top-k
tokens, and whole vocabulary rows when the vocabulary is small enough to ship.
"""

from __future__ import annotations

import numpy as np
import torch

from selfdistill.records import ContextScores


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
    """Score each response (second item) following its context prompt (first item)."""
    out: list[ContextScores] = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        lengths = [len(p) + len(r) for p, r in chunk]
        width = max(lengths)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        attn = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, (p, r) in enumerate(chunk):
            ids[i, : lengths[i]] = torch.tensor(p + r)
            attn[i, : lengths[i]] = 1
        logits = model(input_ids=ids, attention_mask=attn).logits.float()
        for i, (p, r) in enumerate(chunk):
            if not r:
                out.append(_empty(top_k))
                continue
            rows = logits[i, len(p) - 1 : len(p) - 1 + len(r)] / temperature
            logp = torch.log_softmax(rows, dim=-1)
            tokens = torch.tensor(r)
            token_lp = logp.gather(-1, tokens[:, None]).squeeze(-1)
            entropy = -(logp.exp() * logp).sum(-1)
            k = min(top_k, logp.shape[-1])
            top_lp, top_ids = logp.topk(k, dim=-1) if k else (logp[:, :0], torch.zeros(len(r), 0, dtype=torch.long))
            out.append(
                ContextScores(
                    token_logprobs=token_lp.numpy().astype(np.float32),
                    entropy=entropy.numpy().astype(np.float32),
                    support_ids=top_ids.numpy().astype(np.int64),
                    support_logprobs=top_lp.numpy().astype(np.float32),
                    full_logprobs=logp.numpy().astype(np.float32) if full_rows else None,
                )
            )
    return out


def _empty(top_k: int) -> ContextScores:
    return ContextScores(
        token_logprobs=np.zeros(0, np.float32),
        entropy=np.zeros(0, np.float32),
        support_ids=np.zeros((0, top_k), np.int64),
        support_logprobs=np.zeros((0, top_k), np.float32),
    )
