"""Trajectories and teacher scores -> padded tensors for one micro-batch.

Rows are [prompt | response | pad]; per-token tensors are [B, T] over response positions
(token t of row b at [b, t]), right-padded, with `mask` marking real tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from selfdistill.learner.objectives.base import TeacherTensors
from selfdistill.records import TeacherScores, Trajectory


@dataclass
class MicroBatch:
    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, L]
    response_index: torch.Tensor  # [B, T] position in input_ids whose logits predict response token t
    tokens: torch.Tensor  # [B, T]
    mask: torch.Tensor  # [B, T] float
    sampling_logprobs: torch.Tensor  # [B, T]
    rewards: torch.Tensor  # [B]
    group_ids: torch.Tensor  # [B]
    teacher: dict[str, TeacherTensors]


def collate(trajs: list[Trajectory], scores: list[TeacherScores] | None, pad_id: int) -> MicroBatch:
    B = len(trajs)
    L = max(len(t.prompt_ids) + len(t.response_ids) for t in trajs)
    T = max(1, max(len(t.response_ids) for t in trajs))
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, L), dtype=torch.long)
    response_index = torch.zeros((B, T), dtype=torch.long)
    tokens = torch.zeros((B, T), dtype=torch.long)
    mask = torch.zeros((B, T))
    sampling = torch.zeros((B, T))
    for b, t in enumerate(trajs):
        p, r = len(t.prompt_ids), len(t.response_ids)
        input_ids[b, : p + r] = torch.tensor(t.prompt_ids + t.response_ids)
        attention_mask[b, : p + r] = 1
        response_index[b, :r] = torch.arange(p - 1, p - 1 + r)
        tokens[b, :r] = torch.tensor(t.response_ids)
        mask[b, :r] = 1.0
        sampling[b, :r] = torch.tensor(t.sampling_logprobs[:r])
    teacher = _teacher_tensors(scores, B, T) if scores else {}
    return MicroBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        response_index=response_index,
        tokens=tokens,
        mask=mask,
        sampling_logprobs=sampling,
        rewards=torch.tensor([t.reward for t in trajs], dtype=torch.float32),
        group_ids=torch.tensor([t.group for t in trajs], dtype=torch.long),
        teacher=teacher,
    )


def _teacher_tensors(scores: list[TeacherScores], B: int, T: int) -> dict[str, TeacherTensors]:
    out = {}
    for name in scores[0].contexts:
        rows = [s.contexts[name] for s in scores]
        k = rows[0].support_ids.shape[1] if rows[0].support_ids.ndim == 2 else 0
        full = rows[0].full_logprobs is not None
        V = rows[0].full_logprobs.shape[1] if full else 0
        token_lp, entropy = np.zeros((B, T), np.float32), np.zeros((B, T), np.float32)
        sup_ids, sup_lp = np.zeros((B, T, k), np.int64), np.full((B, T, k), -1e9, np.float32)
        full_lp = np.zeros((B, T, V), np.float32) if full else None
        for b, row in enumerate(rows):
            n = len(row.token_logprobs)
            token_lp[b, :n], entropy[b, :n] = row.token_logprobs, row.entropy
            if k:
                sup_ids[b, :n], sup_lp[b, :n] = row.support_ids, row.support_logprobs
            if full:
                full_lp[b, :n] = row.full_logprobs
        out[name] = TeacherTensors(
            token_logprobs=torch.from_numpy(token_lp),
            entropy=torch.from_numpy(entropy),
            support_ids=torch.from_numpy(sup_ids) if k else None,
            support_logprobs=torch.from_numpy(sup_lp) if k else None,
            full_logprobs=torch.from_numpy(full_lp) if full else None,
        )
    return out
