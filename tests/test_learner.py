"""The DeepSpeed learner's update equals a plain PyTorch reference (one rank, in process)."""

import socket

import pytest
import torch
from transformers import AutoModelForCausalLM

from selfdistill.config import load_config
from selfdistill.learner.actor import LearnerActor
from selfdistill.learner.batching import collate
from selfdistill.learner.objectives import build_objective
from selfdistill.learner.objectives.base import ObjectiveInputs
from selfdistill.models.tiny import build_tiny_model
from selfdistill.records import Problem, Trajectory


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Reference:
    """A plain transformers model with PyTorch AdamW: what a learner step must equal."""

    def __init__(self, model, cfg):
        self.model = AutoModelForCausalLM.from_pretrained(model)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.learner.lr, betas=(0.9, 0.999),
                                           weight_decay=0.0)
        self.objective = build_objective(cfg.objective)

    def step(self, micro_batches):
        """One update accumulating `share * loss` over (share, trajectories) micro-batches, each padded."""
        self.optimizer.zero_grad()
        for share, trajs in micro_batches:
            b = collate(trajs, None, pad_id=0)
            logits = self.model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
            logp = torch.log_softmax(logits[b.response_row, b.response_index], -1)
            token = logp.gather(-1, b.tokens[..., None]).squeeze(-1)
            loss, _ = self.objective(ObjectiveInputs(logp, b.tokens, b.mask, token.detach(), b.rewards, b.group_ids))
            (loss * share).backward()
        self.optimizer.step()


@pytest.mark.parametrize("zero_stage", [1, 2])
def test_micro_batched_deepspeed_step_equals_plain_adamw(tmp_path, monkeypatch, zero_stage):
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    model = build_tiny_model(tmp_path / "m", seed=0, hidden_size=32, num_layers=1, num_heads=2)
    cfg = load_config(None, [f"model={{kind: pretrained, path: {model}}}", "objective.name=grpo", "learner.lr=1e-2",
                             "learner.micro_batch_groups=1", "learner.grad_clip=0", f"learner.zero_stage={zero_stage}"])
    learner = LearnerActor(cfg, str(model), rank=0, world_size=1, master_port=_free_port())
    problem = Problem("p", "q", "r", "1")
    trajs = [Trajectory(problem, g, [5, 6, 7], [8 + g, 9, 10 + i][: 2 + i], [-1.0] * 3, "stop", 0, reward=float(i))
             for g in range(2) for i in range(2)]

    reference = _Reference(model, cfg)
    for _ in range(3):
        learner.train_step(trajs, None)
        # the same two micro-batches, each weighted by its share of the batch
        reference.step([(0.5, [t for t in trajs if t.group == group]) for group in range(2)])
        ours = dict(learner.engine.module.named_parameters())
        for name, param in reference.model.named_parameters():
            torch.testing.assert_close(ours[name].detach(), param.detach(), atol=1e-6, rtol=1e-5)
    initial = dict(AutoModelForCausalLM.from_pretrained(model).named_parameters())
    assert any(not torch.equal(initial[n], p.detach()) for n, p in reference.model.named_parameters())


def test_token_budget_packed_two_ranks_equal_plain_adamw(tmp_path, monkeypatch):
    """Two ZeRO-2 ranks with token-budget micro-batches and packing: rank 0 gets two micro-batches, rank 1 one
    group plus a zero-weighted pass; the update still equals the padded single-process reference."""
    import ray

    from selfdistill.learner.group import LearnerGroup

    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    model = build_tiny_model(tmp_path / "m", seed=0, hidden_size=32, num_layers=1, num_heads=2)
    cfg = load_config(None, [f"model={{kind: pretrained, path: {model}}}", "objective.name=grpo", "learner.lr=1e-2",
                             "learner.grad_clip=0", "learner.zero_stage=2", "learner.num_ranks=2",
                             "learner.micro_batch_tokens=16", "learner.packing=true", "learner.packed_row_tokens=8"])
    problem = Problem("p", "q", "r", "1")
    prompts = [[5, 6, 7], [5, 6, 7, 8, 9], [11, 12]]
    trajs = [Trajectory(problem, g, prompts[g], [8 + g, 9, 10 + i][: 2 + i], [-1.0] * 3, "stop", 0, reward=float(i))
             for g in range(3) for i in range(2)]
    # each group holds 11-14 tokens, so no two share a 16-token micro-batch
    passes = {0: [0.5, 0.5], 1: [1.0]}  # rank -> share of each micro-batch; ranks 0 and 1 get groups {0, 1} and {2}
    groups_of = {0: [[0], [1]], 1: [[2]]}

    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    try:
        learner = LearnerGroup(cfg, str(model))
        reference = _Reference(model, cfg)
        for version in range(2):
            learner.train_step(trajs, None)
            reference.step([(share / 2, [t for t in trajs if t.group in groups])  # ZeRO averages the ranks' gradients
                            for rank, shares in passes.items() for share, groups in zip(shares, groups_of[rank])])
            handle, _ = learner.publish(version)
            ours = {name: t for ref in handle for name, t in ray.get(ref).items()}
            # Adam's g / sqrt(v) magnifies rounding in near-zero gradients (packed rows, gloo averaging) to
            # ~1e-6; a wrong micro-batch weight would be off by about lr = 1e-2.
            for name, param in reference.model.named_parameters():
                torch.testing.assert_close(ours[name], param.detach(), atol=1e-5, rtol=1e-5)
    finally:
        ray.shutdown()
