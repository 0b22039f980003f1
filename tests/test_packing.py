"""Token-budget micro-batches, equal pass counts across ranks, and packed (padding-free) forwards (no Ray)."""

import random
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from selfdistill.config import LearnerConfig
from selfdistill.learner.actor import LearnerActor
from selfdistill.learner.batching import (
    collate,
    micro_batch_plan,
    pack_rows,
    plan_micro_batches,
    shard_groups,
    split_micro_batches,
)
from selfdistill.records import Problem, Trajectory

PROBLEM = Problem("p", "q", "r", "1")


def _traj(group, prompt_len, response_len, seed=0):
    rng = random.Random(seed)
    return Trajectory(PROBLEM, group, [rng.randrange(1, 50) for _ in range(prompt_len)],
                      [rng.randrange(1, 50) for _ in range(response_len)], [-0.5] * response_len, "stop", 0,
                      reward=float(seed % 2))


def test_token_budget_keeps_groups_whole_and_within_budget():
    group_tokens = [30, 40, 100, 20, 20, 20, 5]
    plan = plan_micro_batches(group_tokens, groups_per_batch=8, token_budget=60)
    assert plan == [[0], [1], [2], [3, 4, 5], [6]]
    assert sorted(g for mb in plan for g in mb) == list(range(len(group_tokens)))
    for mb in plan:
        assert len(mb) == 1 or sum(group_tokens[g] for g in mb) <= 60  # an oversize group goes alone
    assert plan_micro_batches(group_tokens, groups_per_batch=3, token_budget=None) == [[0, 1, 2], [3, 4, 5], [6]]


def test_split_reaches_the_count_without_splitting_groups():
    assert split_micro_batches([[0, 1, 2, 3], [4]], 3) == [[0, 1], [2, 3], [4]]
    assert split_micro_batches([[0, 1, 2], [3]], 4) == [[0], [1], [2], [3]]
    assert split_micro_batches([[0], [1, 2]], 5) == [[0], [1], [2]]  # single groups cannot split further


def test_ranks_get_the_same_number_of_passes():
    lc = LearnerConfig(micro_batch_tokens=100)
    # groups of 2 sequences; group 2 alone exceeds the budget
    sizes = [(10, 10), (10, 10), (30, 40), (10, 5), (10, 5)]
    trajs = [_traj(g, p, r, seed=g * 2 + i) for g, (p, r) in enumerate(sizes) for i in range(2)]
    shards = shard_groups(trajs, 2)
    assert [sorted({trajs[i].group for i in s}) for s in shards] == [[0, 1, 2], [3, 4]]
    counts = [len(micro_batch_plan([trajs[i] for i in s], lc.micro_batch_groups, lc.micro_batch_tokens))
              for s in shards]
    assert counts == [2, 1]
    target = max(counts)
    for shard in shards:
        shard_trajs = [trajs[i] for i in shard]
        plan = micro_batch_plan(shard_trajs, lc.micro_batch_groups, lc.micro_batch_tokens, target)
        assert len(plan) == target
        assert sorted(i for idx in plan for i in idx) == list(range(len(shard_trajs)))
        for idx in plan:
            mb_trajs = [shard_trajs[i] for i in idx]
            groups = {t.group for t in mb_trajs}
            assert all(sum(t.group == g for t in mb_trajs) == 2 for g in groups)  # whole groups
    one_group = [t for t in trajs if t.group == 2]
    # the rank tops up with zero-weighted passes
    assert len(micro_batch_plan(one_group, lc.micro_batch_groups, lc.micro_batch_tokens, 3)) == 1
    with pytest.raises(ValueError, match="more than the 1 asked for"):
        micro_batch_plan(trajs, lc.micro_batch_groups, lc.micro_batch_tokens, 1)
    with pytest.raises(ValueError, match="prompt groups"):
        shard_groups(one_group, 2)
    with pytest.raises(ValueError, match="prompt groups"):
        shard_groups(one_group, 2)


def test_pack_rows_respects_the_row_budget():
    lengths = [30, 70, 20, 50, 10, 40]
    rows = pack_rows(lengths, 100)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 100 for row in rows)
    assert len(rows) == 3  # first-fit decreasing: 70+30 | 50+40+10 | 20
    # a sequence longer than the budget widens every row to its length
    rows = pack_rows(lengths + [150], 100)
    assert [6] in rows and all(sum((lengths + [150])[i] for i in row) <= 150 for row in rows)
    assert len(rows) == 3  # 150 | 70+50+30 | 40+20+10


def test_packed_collate_maps_response_positions():
    trajs = [_traj(0, 3, 2), _traj(0, 1, 3), _traj(1, 4, 1)]
    b = collate(trajs, None, pad_id=0, packed_row_tokens=9)
    assert b.attention_mask is None and b.input_ids.shape[0] == 2
    for i, t in enumerate(trajs):
        n = len(t.response_ids)
        row, cols = b.response_row[i, :n], b.response_index[i, :n]
        # column c predicts the token at c + 1 of the same row
        assert b.input_ids[row, cols + 1].tolist() == t.response_ids
        assert b.position_ids[row, cols + 1].tolist() == list(range(len(t.prompt_ids), len(t.prompt_ids) + n))
    assert b.tokens.tolist() == collate(trajs, None, pad_id=0).tokens.tolist()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_forward_equals_padded_forward(attn):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, attn_implementation=attn)
    model = LlamaForCausalLM(config).float().train()
    rng = random.Random(1)
    trajs = [_traj(g, rng.randint(2, 12), rng.randint(0, 9), seed=7 * g + i) for g in range(3) for i in range(3)]
    owner = SimpleNamespace(engine=model, temperature=0.7)

    def logprobs_and_grads(batch):
        model.zero_grad()
        lp = LearnerActor._student_logprobs(owner, batch.input_ids, batch.response_row, batch.response_index,
                                            batch.attention_mask, batch.position_ids)
        token = lp.gather(-1, batch.tokens[..., None]).squeeze(-1) * batch.mask
        token.sum().backward()
        return token.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    padded, padded_grads = logprobs_and_grads(collate(trajs, None, pad_id=0))
    packed_batch = collate(trajs, None, pad_id=0, packed_row_tokens=24)
    assert packed_batch.input_ids.shape[0] < len(trajs)
    packed, packed_grads = logprobs_and_grads(packed_batch)
    torch.testing.assert_close(packed, padded, atol=1e-5, rtol=0)
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, atol=1e-5, rtol=1e-4)
