import re

import pytest
from pydantic import ValidationError

from selfdistill.data.arithmetic import ArithmeticTaskConfig, generate_problems
from selfdistill.data.templates import split_reference

STEP = re.compile(r"(\d+)([-+*])(\d+)=(\d+)")


def small_cfg(**overrides) -> ArithmeticTaskConfig:
    return ArithmeticTaskConfig(**{"num_train": 500, "num_eval": 100, **overrides})


def test_generation_is_deterministic_by_seed():
    cfg = small_cfg()
    assert generate_problems(cfg, "train") == generate_problems(cfg, "train")
    assert generate_problems(cfg, "eval") == generate_problems(cfg, "eval")
    assert generate_problems(cfg, "train") != generate_problems(small_cfg(seed=1), "train")


def test_splits_are_disjoint_distinct_and_sized():
    cfg = small_cfg()
    train, held_out = generate_problems(cfg, "train"), generate_problems(cfg, "eval")
    assert len(train) == 500 and len(held_out) == 100
    train_questions = {p.question for p in train}
    assert len(train_questions) == 500
    assert train_questions.isdisjoint(p.question for p in held_out)
    assert len({p.uid for p in train + held_out}) == 600
    assert all(p.source == "arithmetic" for p in train + held_out)


@pytest.mark.parametrize("operators", [("+", "-", "*"), ("-",), ("*",)])
def test_every_step_and_answer_is_correct(operators):
    cfg = small_cfg(operators=operators, min_steps=1, max_steps=4)
    for problem in generate_problems(cfg, "train") + generate_problems(cfg, "eval"):
        steps, final = split_reference(problem.reference)
        assert cfg.min_steps <= len(steps) <= cfg.max_steps
        running = None
        for line in steps:
            left, op, right, result = STEP.fullmatch(line).groups()
            assert op in operators or (op == "+" and "-" in operators)
            assert running is None or int(left) == running  # each step continues from the last
            assert eval(f"{left}{op}{right}") == int(result)
            running = int(result)
        assert final == f"\\boxed{{{problem.answer}}}"
        assert int(problem.answer) == running == eval(problem.question) >= 0


def test_too_small_problem_space_is_an_error():
    with pytest.raises(ValueError, match="distinct"):
        generate_problems(small_cfg(min_steps=1, max_steps=1, operand_max=2, operators=("+",)), "train")


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"operand_max": 1}, "operand_max"),
        ({"min_steps": 0}, "min_steps"),
        ({"min_steps": 4, "max_steps": 2}, "min_steps"),
        ({"operators": ("/",)}, "operators"),
        ({"operators": ()}, "operators"),
        ({"num_eval": 0}, "num_eval"),
        ({"unknown": 1}, "unknown"),
    ],
)
def test_bad_config_values_name_the_field(overrides, field):
    with pytest.raises(ValidationError, match=field):
        ArithmeticTaskConfig(**overrides)
