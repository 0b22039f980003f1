"""Input checks before any actor starts: long prompts skipped or refused, tokenizers that cannot write the templates,
models that cannot fit the memory the config gives them."""

from __future__ import annotations

import pytest

from selfdistill.config import ConfigError, load_config
from selfdistill.launch.inputs import check_memory, check_tokenizer, fit_prompts
from selfdistill.models.tokenizer import build_char_tokenizer
from selfdistill.records import Problem


def _problem(uid: str, question: str = "What is 2+3?") -> Problem:
    return Problem(uid=uid, question=question, reference="2+3=5\n\\boxed{5}", answer="5")


def _cfg(*overrides):
    return load_config(None, ["rollout.sampling.max_new_tokens=20", *overrides])


def test_long_prompts_are_skipped_and_counted():
    tokenizer = build_char_tokenizer()
    problems = [_problem("short"), _problem("long", "x" * 200), _problem("short2")]
    kept, skipped = fit_prompts(problems, tokenizer, _cfg(), ("full",), max_model_len=120, max_positions=500,
                                split="train")
    assert [p.uid for p in kept] == ["short", "short2"] and skipped == 1


def test_a_teacher_context_over_the_model_positions_is_caught():
    tokenizer = build_char_tokenizer()
    problem = _problem("p", "y" * 60)
    kept, skipped = fit_prompts([problem], tokenizer, _cfg(), ("full",), max_model_len=10_000, max_positions=100,
                                split="train")
    assert kept == [] and skipped == 1


def test_long_prompts_error_names_the_problem_and_the_lengths():
    tokenizer = build_char_tokenizer()
    problems = [_problem("ok"), _problem("too-long", "x" * 200)]
    with pytest.raises(ConfigError, match=r"train split, problem 1, uid 'too-long'\): the plain prompt has \d+ tokens, "
                                          r"and with max_new_tokens=20 exceeds the engine's max_model_len \(120\)"):
        fit_prompts(problems, tokenizer, _cfg("rollout.long_prompts=error"), (), max_model_len=120, max_positions=500,
                    split="train")


def test_a_tokenizer_that_cannot_write_the_templates_is_refused():
    tokenizer = build_char_tokenizer()
    check_tokenizer(tokenizer, _cfg(), _problem("fine"), ("full",), "model/")
    with pytest.raises(ConfigError, match=r"tokenizer of model/ cannot encode '×', needed by templates.full "
                                          r"\(problem 'accented'\)"):
        check_tokenizer(tokenizer, _cfg(), Problem("accented", "2+3?", "2×3=6\n\\boxed{6}", "6"), ("full",), "model/")
    with pytest.raises(ConfigError, match=r"cannot encode 'é', needed by templates.plain"):
        check_tokenizer(tokenizer, _cfg(), _problem("q", "Combien font 2+3, café?"), (), "model/")


def test_a_tokenizer_without_eos_is_refused():
    tokenizer = build_char_tokenizer()
    tokenizer.eos_token = None
    with pytest.raises(ConfigError, match="tokenizer of model/ has no EOS token"):
        check_tokenizer(tokenizer, _cfg(), _problem("p"), (), "model/")


QWEN3_8B = "model={kind: pretrained, path: Qwen/Qwen3-8B}"  # a known shape (launch/sizing.py), no download


def test_cpu_roles_that_cannot_fit_the_host_ram_are_refused():
    check_memory(_cfg(), ("full",))  # the default job fits this machine
    cfg = _cfg(QWEN3_8B)
    with pytest.raises(ConfigError, match=r"model: the CPU roles need about \d+\.\d GiB together \(rollout/0 "
                                          r"\d+\.\d, teacher \d+\.\d, learner/0 \d+\.\d GiB.*this machine has "
                                          r"64\.0 GiB of RAM available"):
        check_memory(cfg, ("full",), host_gib=64.0)
    huge = _cfg("model.kind=tiny", "model.shape.hidden_size=65536", "model.shape.num_layers=64",
                "model.shape.num_heads=64")  # terabytes: more than any machine's RAM
    with pytest.raises(ConfigError, match=r"GiB of RAM available"):
        check_memory(huge, ("full",))
    check_memory(cfg.model_copy(update={"cluster": cfg.cluster.model_copy(update={"address": "auto"})}), ("full",),
                 host_gib=64.0)  # a joined cluster's CPU actors run on nodes this machine cannot see


def test_a_role_that_cannot_fit_its_gpu_is_refused():
    on_gpus = (QWEN3_8B, "placement.learner.gpus=1", "placement.rollout.gpus=1", "learner.dtype=bfloat16",
               "rollout.engine.dtype=bfloat16", "rollout.prompts_per_step=8")
    with pytest.raises(ConfigError, match=r"placement.learner.gpus: learner/0 needs about 1\d\d\.\d GiB per GPU "
                                          r"\(ZeRO-1 over 1 ranks, bfloat16\) and the GPU has 80\.0 GiB"):
        check_memory(_cfg(*on_gpus), (), host_gib=1e6, gpu_gib=80.0)
    check_memory(_cfg(*on_gpus, "learner.num_ranks=8", "learner.zero_stage=3"), (), host_gib=1e6, gpu_gib=80.0)
