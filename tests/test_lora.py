"""LoRA through PEFT: config errors, adapter folders, merging, and the DeepSpeed learner's adapter update."""

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from selfdistill.config import ConfigError, load_config
from selfdistill.models import lora
from selfdistill.models.tiny import build_tiny_model
from selfdistill.records import Problem, Trajectory
from tests.test_learner import _Reference


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return str(build_tiny_model(tmp_path_factory.mktemp("m"), seed=0, hidden_size=64, num_layers=1, num_heads=2))


def _adapter(base, tmp_path, **fields):
    cfg = lora.LoraConfig(rank=4, alpha=8, **fields)
    return str(lora.write_initial_adapter(cfg, base, tmp_path / "adapter", seed=0)), cfg


def test_rank_zero_is_a_config_error_naming_the_field():
    with pytest.raises(ConfigError, match=r"learner\.lora\.rank: Input should be greater than or equal to 1 \(got 0\)"):
        load_config(None, ["learner.lora={rank: 0}"])


def test_missing_target_module_is_a_config_error_naming_the_field(base):
    cfg = lora.LoraConfig(target_modules=["q_proj", "qkv_proj"])
    with pytest.raises(ConfigError, match=r"learner\.lora\.target_modules: .* no linear module named \['qkv_proj'\]"):
        lora.check_targets(cfg, base)
    lora.check_targets(lora.LoraConfig(target_modules=["q_proj", "down_proj"]), base)  # both exist


@pytest.mark.parametrize("targets", ["[]", "q_proj", "[q_proj, '']"])
def test_target_modules_not_a_name_list_is_a_config_error_naming_the_field(targets):
    with pytest.raises(ConfigError, match=r"learner\.lora\.target_modules: .*non-empty list of module names"):
        load_config(None, [f"learner.lora={{target_modules: {targets}}}"])


def test_adapter_on_the_output_head_is_a_config_error_naming_the_field(base):
    with pytest.raises(ConfigError, match=r"learner\.lora\.target_modules: \['lm_head'\] is the output head"):
        lora.check_targets(lora.LoraConfig(target_modules=["q_proj", "lm_head"]), base)


def test_resume_with_another_lora_setting_is_a_config_error_naming_the_field(base, tmp_path):
    path, cfg = _adapter(base, tmp_path)  # all-linear, saved by PEFT as the full module names
    lora.check_resume(cfg, path)
    lora.check_resume(cfg.model_copy(update={"sync": "adapter", "dropout": 0.1}), path)  # serving and dropout may change
    lora.check_resume(None, base)  # full weights, full fine-tuning
    with pytest.raises(ConfigError, match=r"learner\.lora: .* holds a LoRA adapter \(r 4, alpha 8"):
        lora.check_resume(None, path)
    with pytest.raises(ConfigError, match=r"learner\.lora: .* holds full weights"):
        lora.check_resume(cfg, base)
    with pytest.raises(ConfigError, match=r"learner\.lora\.rank: .* was trained with rank 4 \(got 8\)"):
        lora.check_resume(cfg.model_copy(update={"rank": 8}), path)
    with pytest.raises(ConfigError, match=r"learner\.lora\.alpha: .* was trained with alpha 8"):
        lora.check_resume(cfg.model_copy(update={"alpha": 16.0}), path)
    with pytest.raises(ConfigError, match=r"learner\.lora\.target_modules: .* has adapters on \['down_proj', "):
        lora.check_resume(cfg.model_copy(update={"target_modules": ["q_proj", "v_proj"]}), path)


def test_initial_adapter_is_peft_format_and_equals_the_base(base, tmp_path):
    path, _ = _adapter(base, tmp_path)
    tensors = load_file(f"{path}/{lora.ADAPTER_WEIGHTS}")
    assert tensors and all(".lora_A.weight" in n or ".lora_B.weight" in n for n in tensors)
    assert all(t.abs().sum() > 0 for n, t in tensors.items() if "lora_A" in n)
    assert all(torch.all(t == 0) for n, t in tensors.items() if "lora_B" in n)
    # 7 linear layers per block (q, k, v, o, gate, up, down), one block: lm_head is tied and left alone
    assert len(tensors) == 2 * 7
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), path)
    ids = torch.tensor([[3, 4, 5, 6]])
    torch.testing.assert_close(model(input_ids=ids).logits, AutoModelForCausalLM.from_pretrained(base)(input_ids=ids).logits)


def test_merged_units_equal_peft_merge_and_unload(base, tmp_path):
    path, _ = _adapter(base, tmp_path)
    model = lora.load_policy(path, torch.float32)
    torch.manual_seed(1)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.5)
    ours = {name: compute().detach().clone() for name, _, compute in lora.merged_units(model)}
    want = model.merge_and_unload().state_dict()
    assert set(ours) == {n for n in want if n != "lm_head.weight"}  # tied head: the embedding stands for it
    for name, tensor in ours.items():
        torch.testing.assert_close(tensor, want[name])
    assert not torch.equal(ours["model.layers.0.self_attn.q_proj.weight"],
                           AutoModelForCausalLM.from_pretrained(base).state_dict()["model.layers.0.self_attn.q_proj.weight"])


@pytest.mark.e2e
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_lora_two_ranks_equal_plain_peft_adamw(base, tmp_path, monkeypatch, zero_stage):
    """Two ranks train only the adapter; after each step it equals a plain PyTorch + PEFT AdamW step."""
    import ray

    from selfdistill.learner.group import LearnerGroup

    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    path, _ = _adapter(base, tmp_path)
    cfg = load_config(None, [f"model={{kind: pretrained, path: {base}}}", "objective.name=grpo", "learner.lr=1e-2",
                             "learner.grad_clip=0", f"learner.zero_stage={zero_stage}", "learner.num_ranks=2",
                             "learner.micro_batch_groups=1", "learner.lora={rank: 4, alpha: 8, sync: adapter}"])
    problem = Problem("p", "q", "r", "1")
    trajs = [Trajectory(problem, g, [5, 6, 7], [8 + g, 9, 10 + i][: 2 + i], [-1.0] * 3, "stop", 0, reward=float(i))
             for g in range(2) for i in range(2)]
    reference = _Reference(base, cfg)
    reference.model = lora.load_policy(path, torch.float32, trainable=True)
    reference.optimizer = torch.optim.AdamW([p for p in reference.model.parameters() if p.requires_grad], lr=1e-2)
    want_names = set(load_file(f"{path}/{lora.ADAPTER_WEIGHTS}"))

    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    try:
        learner = LearnerGroup(cfg, path)
        for version in range(3):
            learner.train_step(trajs, None)
            # one group per rank, ZeRO averages the ranks' gradients
            reference.step([(0.5, [t for t in trajs if t.group == g]) for g in range(2)])
            handle, stats = learner.publish(version)
            ours = {name: t for ref in handle for name, t in ray.get(ref).items()}
            assert set(ours) == want_names  # only the adapter travels
            assert stats["sync/bytes"] == sum(t.numel() * 4 for t in ours.values())
            want = lora.published_parameters(reference.model)
            # Adam's m / sqrt(v) magnifies rounding in near-zero gradients (gloo averaging) to ~1e-5 = lr / 1000;
            # a wrong gradient weight or a base weight in the optimizer would be off by about lr.
            for name, tensor in ours.items():
                torch.testing.assert_close(tensor, want[name].detach(), atol=1e-4, rtol=1e-4,
                                           msg=lambda m, name=name: f"step {version}, {name}: {m}")
        assert any(not torch.all(t == 0) for n, t in ours.items() if "lora_B" in n)
    finally:
        ray.shutdown()


def _perturbed_adapter(path, seed):
    """The adapter's tensors with every B drawn at random (so the adapter changes the model)."""
    tensors = load_file(f"{path}/{lora.ADAPTER_WEIGHTS}")
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(t.shape, generator=g) * 0.3 if "lora_B" in n else t for n, t in tensors.items()}


@torch.no_grad()
def _peft_logprobs(path, tensors, sequence):
    model = lora.load_policy(path, torch.float32)
    params = lora.published_parameters(model)
    for name, t in tensors.items():
        params[name].copy_(t)
    ids = torch.tensor([sequence])
    return model(input_ids=ids).logits[0, :-1].log_softmax(-1).gather(-1, ids[0, 1:, None]).squeeze(-1)


def test_frozen_teacher_takes_no_bytes_and_ema_teacher_averages_the_adapter(base, tmp_path):
    from selfdistill.config import TeacherConfig
    from selfdistill.weights import ObjectStoreConfig
    from selfdistill.data.templates import PromptTemplates
    from selfdistill.teacher.actor import TeacherActor

    class Untouchable:
        def __iter__(self):
            raise AssertionError("the frozen teacher read published weights")

    path, _ = _adapter(base, tmp_path)
    frozen = TeacherActor(base, TeacherConfig(weights="frozen"), PromptTemplates(), 1.0, ObjectStoreConfig())
    assert frozen.load_weights(Untouchable(), 1) == 0

    ema = TeacherActor(path, TeacherConfig(weights="ema", ema_rate=0.75), PromptTemplates(), 1.0, ObjectStoreConfig())
    before = {n: p.detach().clone() for n, p in lora.published_parameters(ema.model).items()}
    new = _perturbed_adapter(path, seed=3)
    assert ema.load_weights([new], 1) == 1
    after = lora.published_parameters(ema.model)
    assert set(after) == set(new)
    for name, tensor in new.items():
        torch.testing.assert_close(after[name].detach(), 0.75 * before[name] + 0.25 * tensor)
    base_weight = "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"
    torch.testing.assert_close(dict(ema.model.named_parameters())[base_weight].detach(),
                               AutoModelForCausalLM.from_pretrained(base).state_dict()[base_weight.removeprefix(
                                   lora.BASE_PREFIX).replace(".base_layer", "")])


def test_learner_changes_only_the_adapter(base, tmp_path, monkeypatch):
    import socket

    from selfdistill.learner.actor import LearnerActor

    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    path, _ = _adapter(base, tmp_path)
    cfg = load_config(None, [f"model={{kind: pretrained, path: {base}}}", "objective.name=grpo", "learner.lr=1e-2",
                             "learner.lora={rank: 4, alpha: 8}"])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    learner = LearnerActor(cfg, path, rank=0, world_size=1, master_port=port)
    initial = {n: p.detach().clone() for n, p in learner.engine.module.named_parameters()}
    problem = Problem("p", "q", "r", "1")
    trajs = [Trajectory(problem, 0, [5, 6, 7], [8, 9, 10 + i], [-1.0] * 3, "stop", 0, reward=float(i)) for i in range(2)]
    for _ in range(2):
        learner.train_step(trajs, None)
    changed = {n for n, p in learner.engine.module.named_parameters() if not torch.equal(p.detach(), initial[n])}
    assert changed and all(".lora_" in n for n in changed)
    assert {n for n, p in learner.engine.module.named_parameters() if p.requires_grad} == {
        n for n in initial if ".lora_" in n}


@pytest.mark.e2e
def test_vllm_serves_the_adapter_and_each_synced_version(base, tmp_path):
    from selfdistill.rollout.base import EngineConfig, SamplingConfig, build_engine

    path, _ = _adapter(base, tmp_path)
    torch.set_num_threads(1)
    engine = build_engine(EngineConfig(enforce_eager=True, kv_cache_gib=0.25, max_model_len=128), path)
    sequence = [1, *range(3, 30)]
    initial = load_file(f"{path}/{lora.ADAPTER_WEIGHTS}")
    gap = (torch.tensor(engine.sequence_logprobs([sequence])[0]) - _peft_logprobs(path, initial, sequence)).abs()
    assert gap.max() <= 1e-4
    for version in (1, 2):
        tensors = _perturbed_adapter(path, seed=version)
        engine.load_weights(iter(tensors.items()))
        want = _peft_logprobs(path, tensors, sequence)
        assert (want - _peft_logprobs(path, initial, sequence)).abs().max() > 1e-2  # the adapter matters
        assert (torch.tensor(engine.sequence_logprobs([sequence])[0]) - want).abs().max() <= 1e-4
        samples = engine.generate([sequence[:4]], SamplingConfig(n=2, max_new_tokens=5, seed=0))
        assert [len(s.token_ids) for s in samples[0]] and all(s.finish_reason in ("stop", "length") for s in samples[0])
    with pytest.raises(ValueError, match="weight sync incomplete"):
        engine.load_weights(iter(list(tensors.items())[:-1]))


@pytest.mark.parametrize("size", ["1.7b", "4b", "8b"])
def test_papers_that_train_lora_use_it_in_their_gpu_configs(size):
    """PW-OPSD's code and the PMI paper train LoRA r 64 (alpha 128 in PW-OPSD's code), lr 5e-6 (METHODS.md)."""
    from pathlib import Path

    for method in ("position_weighted", "pmi"):
        cfg = load_config(Path(__file__).parent.parent / "configs" / "gpu" / f"qwen3-{size}" / f"{method}.yaml")
        lc = cfg.learner.lora
        assert (lc.rank, lc.alpha, cfg.learner.lr, cfg.teacher.weights) == (64, 128, 5e-6, "frozen")
    for method in ("grpo", "dasd"):  # papers that train full weights
        assert load_config(Path(__file__).parent.parent / "configs" / "gpu" / f"qwen3-{size}" / f"{method}.yaml"
                           ).learner.lora is None


def test_lora_on_a_model_vllm_cannot_serve_with_lora_fails_before_any_actor(tmp_path):
    """GPT-2 has no LoRA path in vLLM 0.32: adapter serving is refused naming learner.lora.sync; merged is fine."""
    from transformers import GPT2Config

    from selfdistill.launch.policy import check_lora
    from selfdistill.launch.train import train

    gpt2 = tmp_path / "gpt2"
    GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, architectures=["GPT2LMHeadModel"]).save_pretrained(gpt2)
    cfg = load_config(None, [f"model={{kind: pretrained, path: {gpt2}}}", "learner.lora={rank: 8, sync: adapter}",
                             f"run.output_dir={tmp_path}", "run.progress=false"])
    with pytest.raises(ConfigError, match=r"learner\.lora\.sync: adapter serving needs vLLM's LoRA support: .*"
                                          r"GPT2LMHeadModel.*learner\.lora\.sync=merged"):
        train(cfg)
    import ray

    assert not ray.is_initialized()  # refused before the cluster and any actor started
    check_lora(cfg.model_copy(update={"learner": cfg.learner.model_copy(update={
        "lora": lora.LoraConfig(rank=8, sync="merged")})}), str(gpt2))


@pytest.mark.e2e
def test_fresh_adapter_under_zero3_publishes_merged_full_weights(base, monkeypatch):
    """sync: merged from the base (the learner makes its own adapter on ZeRO-3-partitioned weights): the first
    publish is exactly the base; after a step only adapter-targeted weights moved."""
    import ray

    from selfdistill.learner.group import LearnerGroup

    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    cfg = load_config(None, [f"model={{kind: pretrained, path: {base}}}", "objective.name=grpo", "learner.lr=1e-2",
                             "learner.zero_stage=3", "learner.num_ranks=2", "learner.micro_batch_groups=1",
                             "learner.lora={rank: 4, alpha: 8, sync: merged, target_modules: [q_proj, down_proj]}"])
    want = load_file(f"{base}/model.safetensors")
    problem = Problem("p", "q", "r", "1")
    trajs = [Trajectory(problem, g, [5, 6, 7], [8 + g, 9, 10 + i], [-1.0] * 3, "stop", 0, reward=float(i))
             for g in range(2) for i in range(2)]
    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    try:
        learner = LearnerGroup(cfg, base)
        handle, _ = learner.publish(0)
        ours = {name: t for ref in handle for name, t in ray.get(ref).items()}
        assert set(ours) == set(want) and all(torch.equal(ours[n], want[n]) for n in want)
        for version in (1, 2):
            learner.train_step(trajs, None)
        handle, _ = learner.publish(2)
        ours = {name: t for ref in handle for name, t in ray.get(ref).items()}
        moved = {n for n in want if not torch.equal(ours[n], want[n])}
        assert moved == {"model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight"}
    finally:
        ray.shutdown()
