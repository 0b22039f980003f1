"""Trajectories -> ranks -> micro-batches -> tensors.

Whole prompt groups go to one rank and one micro-batch (objectives compute group-relative
advantages inside a micro-batch). A micro-batch's input rows are either one sequence each,
[prompt | response | pad], or several sequences packed back to back with position ids
restarting at 0 for each, which Hugging Face models turn into block-diagonal causal attention
when no attention mask is given. Per-token tensors are [B, T] over response positions
(token t of sequence b at [b, t]), right-padded, with `mask` marking real tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from selfdistill.learner.objectives.base import TeacherTensors
from selfdistill.records import TeacherScores, Trajectory


@dataclass
class MicroBatch:
    input_ids: torch.Tensor  # [R, L] one row per sequence, or packed rows
    attention_mask: torch.Tensor | None  # [R, L]; None when packed (position_ids delimit the sequences)
    position_ids: torch.Tensor | None  # [R, L] when packed, else None (0, 1, 2, ... per row)
    response_row: torch.Tensor  # [B, T] row of input_ids holding response token t of sequence b
    response_index: torch.Tensor  # [B, T] column in that row whose logits predict response token t
    tokens: torch.Tensor  # [B, T]
    mask: torch.Tensor  # [B, T] float
    sampling_logprobs: torch.Tensor  # [B, T]
    rewards: torch.Tensor  # [B]
    group_ids: torch.Tensor  # [B]
    teacher: dict[str, TeacherTensors]


def sequence_tokens(traj: Trajectory) -> int:
    return len(traj.prompt_ids) + len(traj.response_ids)


def prompt_groups(trajs: Sequence[Trajectory]) -> list[list[int]]:
    """Trajectory indices of each prompt group, groups in order of first appearance."""
    groups: dict[int, list[int]] = {}
    for i, t in enumerate(trajs):
        groups.setdefault(t.group, []).append(i)
    return list(groups.values())


def group_tokens(trajs: Sequence[Trajectory], groups: list[list[int]]) -> list[int]:
    """Prompt + response tokens of each group."""
    return [sum(sequence_tokens(trajs[i]) for i in g) for g in groups]


def shard_groups(trajs: Sequence[Trajectory], num_ranks: int) -> list[list[int]]:
    """Trajectory indices per rank: consecutive whole prompt groups, group counts differing by at most one."""
    groups = prompt_groups(trajs)
    if len(groups) < num_ranks:
        raise ValueError(f"{len(groups)} prompt groups cannot feed {num_ranks} learner ranks")
    per_rank, extra = divmod(len(groups), num_ranks)
    shards, start = [], 0
    for rank in range(num_ranks):
        end = start + per_rank + (rank < extra)
        shards.append([i for g in groups[start:end] for i in g])
        start = end
    return shards


def plan_micro_batches(group_tokens: Sequence[int], groups_per_batch: int, token_budget: int | None) -> list[list[int]]:
    """Group positions per micro-batch, in order.

    Without a budget, `groups_per_batch` groups each; with one, consecutive groups while their
    tokens fit the budget (a group over the budget forms its own micro-batch).
    """
    if token_budget is None:
        return [list(range(s, min(s + groups_per_batch, len(group_tokens))))
                for s in range(0, len(group_tokens), groups_per_batch)]
    plan: list[list[int]] = []
    used = 0
    for g, tokens in enumerate(group_tokens):
        if plan and used + tokens <= token_budget:
            plan[-1].append(g)
            used += tokens
        else:
            plan.append([g])
            used = tokens
    return plan


def split_micro_batches(plan: list[list[int]], count: int) -> list[list[int]]:
    """Halve the micro-batch with the most groups until there are `count` (or every one holds a single group)."""
    plan = [list(mb) for mb in plan]
    while len(plan) < count:
        largest = max(range(len(plan)), key=lambda i: len(plan[i]))
        groups = plan[largest]
        if len(groups) < 2:
            break
        half = (len(groups) + 1) // 2
        plan[largest : largest + 1] = [groups[:half], groups[half:]]
    return plan


def micro_batch_plan(trajs: Sequence[Trajectory], groups_per_batch: int, token_budget: int | None,
                     count: int | None = None) -> list[list[int]]:
    """Trajectory indices of each micro-batch: whole prompt groups, `groups_per_batch` at a time or
    within `token_budget`, then split towards `count` passes (every rank must make the same number)."""
    groups = prompt_groups(trajs)
    plan = plan_micro_batches(group_tokens(trajs, groups), groups_per_batch, token_budget)
    if count is not None:
        if len(plan) > count:
            raise ValueError(f"{len(plan)} micro-batches planned, more than the {count} asked for")
        plan = split_micro_batches(plan, count)
    return [[i for g in micro for i in groups[g]] for micro in plan]


def pack_rows(lengths: Sequence[int], row_tokens: int) -> list[list[int]]:
    """Sequence indices per row, first-fit decreasing into rows of max(longest sequence, row_tokens) tokens."""
    capacity = max(max(lengths), row_tokens)
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = next((r for r, space in enumerate(free) if space >= lengths[i]), None)
        if row is None:
            rows.append([])
            free.append(capacity)
            row = len(rows) - 1
        rows[row].append(i)
        free[row] -= lengths[i]
    return rows


def collate(trajs: list[Trajectory], scores: list[TeacherScores] | None, pad_id: int,
            packed_row_tokens: int | None = None) -> MicroBatch:
    """Tensors for one micro-batch; packed into rows of `packed_row_tokens` when it is given."""
    B = len(trajs)
    lengths = [sequence_tokens(t) for t in trajs]
    packed = packed_row_tokens is not None
    rows = pack_rows(lengths, packed_row_tokens) if packed else [[b] for b in range(B)]
    L = max(sum(lengths[b] for b in row) for row in rows)
    T = max(1, max(len(t.response_ids) for t in trajs))
    input_ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), L), dtype=torch.long)
    response_row = torch.zeros((B, T), dtype=torch.long)
    response_index = torch.zeros((B, T), dtype=torch.long)
    tokens = torch.zeros((B, T), dtype=torch.long)
    mask = torch.zeros((B, T))
    sampling = torch.zeros((B, T))
    for r, row in enumerate(rows):
        offset = 0
        for b in row:
            t = trajs[b]
            p, n = len(t.prompt_ids), len(t.response_ids)
            input_ids[r, offset : offset + p + n] = torch.tensor(t.prompt_ids + t.response_ids)
            position_ids[r, offset : offset + p + n] = torch.arange(p + n)
            response_row[b] = r
            response_index[b] = offset
            response_index[b, :n] = torch.arange(offset + p - 1, offset + p - 1 + n)
            tokens[b, :n] = torch.tensor(t.response_ids)
            mask[b, :n] = 1.0
            sampling[b, :n] = torch.tensor(t.sampling_logprobs[:n])
            offset += p + n
        # The padding tail is a sequence of its own, so no real token attends to it.
        position_ids[r, offset:] = torch.arange(L - offset)
    attention_mask = None if packed else (torch.arange(L)[None] < torch.tensor(lengths)[:, None]).long()
    teacher = _teacher_tensors(scores, B, T) if scores else {}
    return MicroBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids if packed else None,
        response_row=response_row,
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
