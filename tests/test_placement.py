"""Placement plans, dry-runs and memory estimates (no Ray started)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from selfdistill.config import ConfigError, TrainConfig, load_config
from selfdistill.launch import sizing
from selfdistill.launch.placement import COLOCATED_SHARE, ClusterSpec, NodeSpec, bundle_layout, engine_executor, \
    plan_placement

TP2_GPU = ["placement.rollout.tensor_parallel_size=2", "placement.rollout.gpus=2"]
GPU_CONFIGS = sorted(Path(__file__).resolve().parents[1].glob("configs/gpu/*/*.yaml"))


def _spec_of(path: Path) -> str:
    """The cluster spec a GPU config says it is planned for (its `--cluster-spec` comment)."""
    found = re.search(r"--cluster-spec (\S+)", path.read_text())
    assert found, f"{path} names no --cluster-spec"
    return found.group(1)


@pytest.mark.parametrize("path", GPU_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_gpu_config_plans_on_its_cluster(path):
    cfg = load_config(path)
    spec = ClusterSpec.parse(_spec_of(path))
    plan = plan_placement(cfg, spec)
    gpus = sum(a.gpus for a in plan.actors)
    assert gpus == sum(n.gpus for n in spec.nodes)  # the configs use every GPU they ask for
    learner_nodes = {a.node for a in plan.role("learner")}
    assert len(learner_nodes) == 1  # ranks kept together on one node
    assert all(a.memory is not None and a.memory.total_gib < spec.nodes[a.node].gpu_memory_gib for a in plan.actors)
    if len(spec.nodes) > 1:  # the 16-GPU runs: engines on one node, learner ranks on the other
        assert {a.node for a in plan.role("rollout")} != learner_nodes


def test_cpu_default_plans_on_this_machine_without_gpus():
    cfg = TrainConfig()
    plan = plan_placement(cfg, ClusterSpec.parse("nodes=1,gpus_per_node=0,cpus_per_node=3"))
    assert [a.actor for a in plan.actors] == ["rollout/0", "teacher", "learner/0"]
    assert all(a.gpus == 0 and a.cpus == 1.0 and a.node == 0 for a in plan.actors)
    assert "rollout/0" in plan.table()


@pytest.mark.parametrize("overrides, spec, field", [
    (["placement.learner.gpus=1", "learner.num_ranks=16", "rollout.prompts_per_step=16"], "nodes=1,gpus_per_node=8",
     "placement.learner.gpus"),
    (["placement.rollout.tensor_parallel_size=16", "placement.rollout.gpus=16", "sync.transport=collective",
      "sync.backend=nccl"], "nodes=2,gpus_per_node=8", "placement.rollout.tensor_parallel_size"),
    (["placement.mode=colocated", "placement.rollout.gpus=1", "placement.learner.gpus=1", "rollout.num_engines=3",
      "learner.num_ranks=4"], "nodes=1,gpus_per_node=8", "rollout.num_engines"),
    (["placement.rollout.resources={node_x: 1}"], "nodes=1,gpus_per_node=0", "placement.rollout.resources.node_x"),
    (["placement.learner.gpus=1"], "nodes=1,gpus_per_node=0", "placement.learner.gpus"),
    (["learner.num_cpus_per_rank=8"], "nodes=1,gpus_per_node=0,cpus_per_node=4", "learner.num_cpus_per_rank"),
])
def test_impossible_placements_name_the_field(overrides, spec, field):
    with pytest.raises(ConfigError, match=re.escape(field) + ":"):
        plan_placement(load_config(None, overrides), ClusterSpec.parse(spec))


def test_a_model_too_large_for_its_gpus_is_refused():
    path = next(p for p in GPU_CONFIGS if p.parent.name == "qwen3-8b" and p.stem == "opsd")
    with pytest.raises(ConfigError, match=r"placement\.learner\.gpus: learner/0 needs about .* GiB per GPU"):
        plan_placement(load_config(path), ClusterSpec.parse("nodes=2,gpus_per_node=8,gpu_memory_gib=24"))


def test_colocated_engines_share_the_learner_nodes():
    cfg = load_config(None, ["placement.mode=colocated", *TP2_GPU, "placement.learner.gpus=1",
                             "rollout.num_engines=4", "learner.num_ranks=8", "rollout.prompts_per_step=16",
                             "sync.transport=ipc"])
    plan = plan_placement(cfg, ClusterSpec.parse("nodes=1,gpus_per_node=8"))
    learners = plan.role("learner")
    assert [e.node for e in plan.role("rollout")] == [learners[2 * i].node for i in range(4)]
    assert "8/8 GPUs" in plan.table()


def test_cluster_spec_errors_name_the_key():
    with pytest.raises(ValueError, match="gpus=8"):
        ClusterSpec.parse("nodes=2,gpus=8")
    with pytest.raises(ValueError, match="nodes must be a number"):
        ClusterSpec.parse("nodes=two")


def test_parameter_count_matches_the_built_tiny_model():
    from transformers import LlamaForCausalLM

    from selfdistill.models.tiny import tiny_llama_config

    config = tiny_llama_config(vocab_size=50, hidden_size=64, num_layers=2, num_heads=4)
    shape = sizing.ModelShape.from_config(config.to_dict())
    model = LlamaForCausalLM(config)
    # Llama has no q/k norms (Qwen3 does: 2 * head_dim per layer), the only difference to the formula.
    assert shape.parameters - 2 * 2 * shape.head_dim == sum(p.numel() for p in model.parameters())


def test_qwen3_8b_memory_by_hand():
    shape = sizing.ModelShape.from_config(sizing.KNOWN_SHAPES["Qwen/Qwen3-8B"])
    assert 8.1e9 < shape.parameters < 8.3e9  # published: 8.2B
    cfg = load_config(None, ["model={kind: pretrained, path: Qwen/Qwen3-8B}", "learner.num_ranks=8",
                             "learner.zero_stage=3", "learner.dtype=bfloat16", "rollout.prompts_per_step=8"])
    mem = sizing.learner_memory(cfg, shape)
    p = shape.parameters
    assert mem.weights_gib == pytest.approx(p * 2 / 8 / 2**30)
    assert mem.other_gib == pytest.approx((p * 2 / 8 + p * 12 / 8) / 2**30)  # grads + (2 moments + fp32 master)


def test_dry_run_cli_prints_the_plan_and_refuses_by_field(capsys):
    from selfdistill.launch.cli import main

    path = next(p for p in GPU_CONFIGS if p.parent.name == "qwen3-8b" and p.stem == "grpo")
    assert main(["train", str(path), "--dry-run", "--cluster-spec", "nodes=2,gpus_per_node=8"]) == 0
    out = capsys.readouterr().out
    assert "# resolved config" in out and "learner/7" in out and "node node1: 8/8 GPUs" in out
    assert main(["train", str(path), "--dry-run", "--cluster-spec", "nodes=1,gpus_per_node=8"]) == 2
    assert "placement.learner.gpus:" in capsys.readouterr().err


@pytest.mark.parametrize("overrides, field", [
    (["rollout.max_staleness=1"], "rollout.max_staleness"),
    (["rollout.engine.name=hf"], "rollout.engine.name"),
    (["placement.learner.gpus=1"], "placement.rollout.gpus"),
    (["placement.rollout.gpus=1", "placement.learner.gpus=1", "sync.transport=collective", "sync.backend=nccl"],
     "sync.transport"),
    (["learner.num_ranks=2"], "rollout.num_engines"),
])
def test_colocated_setups_that_cannot_run_are_refused_by_field(overrides, field):
    """The same checks refuse them in a dry-run and before a run starts (both plan first)."""
    spec = ClusterSpec.parse("nodes=1,gpus_per_node=8")
    plan_placement(load_config(None, ["placement.mode=colocated", "objective={name: grpo}"]), spec)  # runs on CPU
    with pytest.raises(ConfigError, match=re.escape(field) + ":"):
        plan_placement(load_config(None, ["placement.mode=colocated", "objective={name: grpo}", *overrides]), spec)


def test_tensor_parallel_engines_need_a_transport_their_workers_receive():
    spec = ClusterSpec.parse("nodes=1,gpus_per_node=8")
    with pytest.raises(ConfigError, match=r"sync\.transport:.*Ray executor on GPUs.*or ipc"):
        plan_placement(load_config(None, TP2_GPU), spec)
    with pytest.raises(ConfigError, match=r"sync\.transport:.*multiprocess executor on CPU.*gloo on CPU\)$"):
        plan_placement(load_config(None, ["placement.rollout.tensor_parallel_size=2", "rollout.num_cpus_per_engine=2"]),
                       spec)
    plan_placement(load_config(None, [*TP2_GPU, "sync.transport=collective", "sync.backend=nccl"]), spec)


CPU_TP2 = ["placement.rollout.tensor_parallel_size=2", "rollout.num_cpus_per_engine=2", "sync.transport=collective"]


@pytest.mark.parametrize("overrides, spec, field", [
    (["placement.rollout.gpus=2"], "nodes=1,gpus_per_node=8", "placement.rollout.gpus"),  # TP 1: 0 or 1 GPU
    ([*TP2_GPU[:1], "placement.rollout.gpus=1", "sync.transport=collective", "sync.backend=nccl"],
     "nodes=1,gpus_per_node=8", "placement.rollout.gpus"),
    ([*TP2_GPU, "sync.transport=collective", "sync.backend=nccl"], "nodes=2,gpus_per_node=1",
     "placement.rollout.tensor_parallel_size"),  # 2 GPUs of one engine on one node
    (["placement.rollout.tensor_parallel_size=2", "sync.transport=collective"], "nodes=1,gpus_per_node=0",
     "rollout.num_cpus_per_engine"),  # a CPU worker needs a core
    ([*CPU_TP2, "rollout.engine.name=hf"], "nodes=1,gpus_per_node=0", "placement.rollout.tensor_parallel_size"),
    (["sync.transport=ipc"], "nodes=1,gpus_per_node=8", "sync.transport"),  # ipc: colocated GPU engines only
    (["sync.transport=ipc", "placement.rollout.gpus=1", "placement.learner.gpus=1"], "nodes=1,gpus_per_node=8",
     "sync.transport"),
    (["placement.mode=colocated", "objective={name: grpo}", *CPU_TP2], "nodes=1,gpus_per_node=0,cpus_per_node=8",
     "rollout.num_engines"),  # 1 engine x TP 2 for 1 rank
])
def test_tensor_parallel_and_transport_mismatches_name_the_field(overrides, spec, field):
    with pytest.raises(ConfigError, match=re.escape(field) + ":"):
        plan_placement(load_config(None, overrides), ClusterSpec.parse(spec))


def test_cpu_tensor_parallel_engines_read_the_same_field():
    """On CPU the one field sets vLLM's multiprocess workers: one bundle per engine with its CPUs, no worker
    bundles, and the executor the actor gets says tensor_parallel_size 2; the dry-run shows it."""
    from selfdistill.launch.placement import dry_run

    cfg = load_config(None, [*CPU_TP2, "rollout.num_engines=2", "rollout.prompts_per_step=4"])
    plan = plan_placement(cfg, ClusterSpec.parse("nodes=1,gpus_per_node=0,cpus_per_node=8"))
    assert plan.tensor_parallel_size == 2 and all(a.gpus == 0 for a in plan.actors)
    assert "tensor_parallel_size 2 (placement.rollout.tensor_parallel_size), 2 workers per engine (on the engine's " \
           "CPUs, vLLM's multiprocess executor)" in plan.table()
    layout = bundle_layout(cfg, plan)
    assert layout.groups["rollout"][0] == [{"CPU": 2.0}] * 2
    assert [layout.slots[("rollout", e)].workers for e in range(2)] == [[], []]
    executor = engine_executor(layout.slots[("rollout", 1)], [0, 1], cfg.placement.rollout.tensor_parallel_size)
    assert (executor.tensor_parallel_size, executor.bundle_indices) == (2, [])
    out = dry_run(cfg, "nodes=1,gpus_per_node=0,cpus_per_node=8")
    assert "tensor_parallel_size: 2" in out and "2 workers per engine" in out


def test_gpu_tensor_parallel_dry_run_names_the_ray_workers():
    cfg = load_config(None, [*TP2_GPU, "sync.transport=collective", "sync.backend=nccl"])
    table = plan_placement(cfg, ClusterSpec.parse("nodes=1,gpus_per_node=8")).table()
    assert "2 workers per engine (one GPU each, vLLM's Ray executor), one collective rank each" in table


def test_colocated_bundles_hold_a_learner_rank_and_a_share_of_an_engine():
    cfg = load_config(None, ["placement.mode=colocated", *TP2_GPU, "placement.learner.gpus=1",
                             "rollout.num_engines=2", "learner.num_ranks=4", "sync.transport=ipc",
                             "placement.rollout.resources={gpu_node: 0.1}", "placement.teacher.gpus=1"])
    spec = ClusterSpec([NodeSpec("gpu0", 128, 8, 80, {"gpu_node": 1})], "test")
    layout = bundle_layout(cfg, plan_placement(cfg, spec))
    bundles, strategy, _ = layout.groups["colocated"]
    assert strategy == "PACK" and [b["GPU"] for b in bundles] == [1.0] * 4  # vLLM's Ray executor: <= 1 GPU a bundle
    assert [b["CPU"] for b in bundles] == [2.0, 1.0, 2.0, 1.0]  # an engine's CPUs in its first rank's bundle
    assert [b.get("gpu_node") for b in bundles] == [0.1, None, 0.1, None]
    learners = [layout.slots[("learner", r)] for r in range(4)]
    assert [(s.bundle, s.gpus) for s in learners] == [(r, COLOCATED_SHARE) for r in range(4)]
    engines = [layout.slots[("rollout", e)] for e in range(2)]
    assert [(s.bundle, s.gpus, s.workers, s.worker_gpus) for s in engines] == [
        (0, 0.0, [0, 1], COLOCATED_SHARE), (2, 0.0, [2, 3], COLOCATED_SHARE)]  # the workers hold the GPU shares
    assert COLOCATED_SHARE * 2 <= 1.0  # a rank and a worker fit one GPU
    assert layout.groups["teacher"][0] == [{"CPU": 1.0, "GPU": 1.0}]  # the teacher keeps its own GPU


def test_colocated_cpu_engines_share_their_rank_bundle():
    cfg = load_config(None, ["placement.mode=colocated", "rollout.num_engines=2", "learner.num_ranks=2",
                             "rollout.prompts_per_step=4", "objective={name: grpo}"])
    layout = bundle_layout(cfg, plan_placement(cfg, ClusterSpec.parse("nodes=1,gpus_per_node=0,cpus_per_node=4")))
    assert list(layout.groups) == ["colocated"] and layout.groups["colocated"][0] == [{"CPU": 2.0}] * 2
    assert [layout.slots[("rollout", e)].bundle for e in range(2)] == [0, 1]
    assert all(s.gpus == 0.0 for s in layout.slots.values())


def test_separate_tensor_parallel_engines_get_one_gpu_bundle_per_worker_on_one_node():
    cfg = load_config(None, ["placement.rollout.tensor_parallel_size=4", "placement.rollout.gpus=4",
                             "placement.learner.gpus=1", "rollout.num_engines=2",
                             "learner.num_ranks=2", "sync.transport=collective", "sync.backend=nccl",
                             "objective={name: grpo}", "placement.rollout.resources={node_a: 1}"])
    spec = ClusterSpec([NodeSpec("a", 128, 8, 80, {"node_a": 2}), NodeSpec("b", 128, 8, 80)], "test")
    plan = plan_placement(cfg, spec)
    assert [a.node for a in plan.role("rollout")] == [0, 0] and [a.node for a in plan.role("learner")] == [1, 1]
    layout = bundle_layout(cfg, plan)
    for e in range(2):
        bundles, strategy, _ = layout.groups[f"rollout/{e}"]
        assert strategy == "STRICT_PACK"  # one node
        assert bundles == [{"GPU": 1.0, "CPU": 1.0, "node_a": 1.0}] + [{"GPU": 1.0}] * 3
        slot = layout.slots[("rollout", e)]
        assert (slot.group, slot.gpus, slot.workers, slot.worker_gpus) == (f"rollout/{e}", 0.0, [0, 1, 2, 3], 1.0)
    assert layout.groups["learner"][0] == [{"CPU": 1.0, "GPU": 1.0}] * 2


def test_engine_args_of_a_tensor_parallel_colocated_engine_are_vllm_engine_args():
    """What a GPU run hands vLLM for a planned engine (no GPU here to run it): the Ray executor over the engine's
    bundles, sleep mode, the weight-transfer backend; every keyword is one of vLLM's EngineArgs fields."""
    import dataclasses

    from vllm.engine.arg_utils import EngineArgs

    from selfdistill.rollout.base import EngineConfig, EngineExecutor
    from selfdistill.rollout.vllm_internals import llm_args

    cfg = load_config(None, ["placement.mode=colocated", *TP2_GPU, "placement.learner.gpus=1",
                             "rollout.num_engines=2", "learner.num_ranks=4", "sync.transport=ipc"])
    layout = bundle_layout(cfg, plan_placement(cfg, ClusterSpec.parse("nodes=1,gpus_per_node=8")))
    slot = layout.slots[("rollout", 1)]
    executor = engine_executor(slot, [7 - p for p in range(8)], 2)  # bundles granted in reverse order
    assert (executor.tensor_parallel_size, executor.worker_gpus) == (2, COLOCATED_SHARE)
    kwargs, env = llm_args("model", EngineConfig(kv_cache_gib=None), None, "ipc", executor, enable_sleep_mode=True)
    assert kwargs["tensor_parallel_size"] == 2 and kwargs["distributed_executor_backend"] == "ray"
    assert kwargs["enable_sleep_mode"] is True and kwargs["weight_transfer_config"] == {"backend": "ipc"}
    assert env == {"VLLM_RAY_BUNDLE_INDICES": "5,4", "VLLM_RAY_PER_WORKER_GPUS": "0.5", "CUDA_VISIBLE_DEVICES": None}
    assert set(kwargs) <= {f.name for f in dataclasses.fields(EngineArgs)}
    EngineArgs(**kwargs)  # vLLM accepts them as engine arguments

    single, env = llm_args("model", EngineConfig(), executor=None, enable_sleep_mode=False)
    assert (single["tensor_parallel_size"], single["distributed_executor_backend"], env) == (1, "uni", {})
    assert "enable_sleep_mode" not in single  # the CPU platform refuses sleep mode; its sleep calls do nothing
    with pytest.raises(ValueError, match="one bundle per worker"):
        llm_args("model", EngineConfig(), executor=EngineExecutor(2, [0], 1.0))
    if "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:  # CPU: vLLM's multiprocess workers, cores split between them
        cpu, env = llm_args("model", EngineConfig(), executor=EngineExecutor(2), ray_executor=False)
        assert (cpu["tensor_parallel_size"], cpu["distributed_executor_backend"]) == (2, "mp")
        parts = env["VLLM_CPU_OMP_THREADS_BIND"].split("|")
        assert len(parts) == 2 and all(parts) and {int(c) for p in parts for c in p.split(",")} <= os.sched_getaffinity(0)


def test_a_tensor_parallel_engine_is_checked_per_worker_gpu():
    """An engine's estimate is per worker (its 1/TP shard and KV cache): the GPU limit applies to it as it is."""
    path = next(p for p in GPU_CONFIGS if p.parent.name == "qwen3-8b" and p.stem == "grpo")
    tp2 = [*TP2_GPU, "rollout.num_engines=4", "sync.transport=collective", "sync.backend=nccl"]
    plan = plan_placement(load_config(path, tp2), ClusterSpec.parse("nodes=2,gpus_per_node=8,gpu_memory_gib=80"))
    per_worker = plan.role("rollout")[0].memory.total_gib
    assert "TP 2" in plan.role("rollout")[0].memory.what
    limit = 0.75 * per_worker  # above half of it: dividing by the engine's GPUs once more would pass
    with pytest.raises(ConfigError, match=r"placement\.rollout\.gpus: rollout/0 needs about"):
        plan_placement(load_config(path, tp2), ClusterSpec.parse(f"nodes=2,gpus_per_node=8,gpu_memory_gib={limit}"))
