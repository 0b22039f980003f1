"""Input checks before any actor starts: long prompts skipped or refused, tokenizers that cannot write the templates."""

from __future__ import annotations

import pytest

from selfdistill.config import ConfigError, load_config
from selfdistill.launch.inputs import check_tokenizer, fit_prompts
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
