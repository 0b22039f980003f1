"""The generated multi-step arithmetic task of the CPU default run.

A problem starts from a number and applies `num_steps` operations, each with a small
operand: the question is the expression (parenthesised where precedence needs it, so it
is ordinary arithmetic, e.g. `(12+7)*3-5`), the reference works it one operation per line
(`12+7=19`, `19*3=57`, `57-5=52`) and ends with `\\boxed{52}`. Results are never negative:
a subtraction whose operand exceeds the running value becomes an addition.
"""

from __future__ import annotations

import random
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from selfdistill.records import Problem

Operator = Literal["+", "-", "*"]


class ArithmeticTaskConfig(BaseModel):
    """How to generate the arithmetic task: difficulty, split sizes and seed."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Literal["arithmetic"] = Field("arithmetic", description="Task name used to pick this source.")
    min_steps: int = Field(2, ge=1, description="Fewest operations (reference lines before the boxed one).")
    max_steps: int = Field(3, ge=1, description="Most operations; the count is drawn uniformly in [min, max].")
    operand_max: int = Field(
        15, ge=2, description="Start value and +/- operands are drawn uniformly in [1, operand_max]."
    )
    multiplier_max: int = Field(4, ge=2, description="Multiplication operands are drawn uniformly in [2, multiplier_max].")
    operators: tuple[Operator, ...] = Field(
        ("+", "-", "*"), description="Operators drawn uniformly for each step (repeats raise their weight)."
    )
    seed: int = Field(0, description="Seed of the generator; the same config always gives the same problems.")
    num_train: int = Field(20000, ge=1, description="Number of training problems (all distinct).")
    num_eval: int = Field(500, ge=1, description="Number of held-out problems (distinct, none in the training split).")

    @field_validator("operators")
    @classmethod
    def _operators_not_empty(cls, ops: tuple[str, ...]) -> tuple[str, ...]:
        if not ops:
            raise ValueError("operators must name at least one of '+', '-', '*'")
        return ops

    @model_validator(mode="after")
    def _steps_ordered(self) -> ArithmeticTaskConfig:
        if self.min_steps > self.max_steps:
            raise ValueError(f"min_steps ({self.min_steps}) must be <= max_steps ({self.max_steps})")
        return self


def _needs_parentheses(expression_top_op: str | None, op: str) -> bool:
    return op == "*" and expression_top_op in ("+", "-")


def _sample_problem(cfg: ArithmeticTaskConfig, rng: random.Random) -> tuple[str, list[str], int]:
    value = rng.randint(1, cfg.operand_max)
    expression, top_op = str(value), None
    lines = []
    for _ in range(rng.randint(cfg.min_steps, cfg.max_steps)):
        op = rng.choice(cfg.operators)
        operand = rng.randint(2, cfg.multiplier_max) if op == "*" else rng.randint(1, cfg.operand_max)
        if op == "-" and operand > value:
            op = "+"
        result = {"+": value + operand, "-": value - operand, "*": value * operand}[op]
        lines.append(f"{value}{op}{operand}={result}")
        if _needs_parentheses(top_op, op):
            expression = f"({expression})"
        expression, top_op, value = f"{expression}{op}{operand}", op, result
    return expression, lines, value


def _distinct_problems(
    cfg: ArithmeticTaskConfig, rng: random.Random, count: int, exclude: set[str], split: str
) -> list[Problem]:
    problems: list[Problem] = []
    seen = set(exclude)
    attempts = 0
    while len(problems) < count:
        attempts += 1
        if attempts > 20 * count + 1000:
            raise ValueError(
                f"arithmetic task: could not draw {count} distinct {split} problems "
                f"(got {len(problems)}); raise operand_max/max_steps or lower num_train/num_eval"
            )
        question, lines, answer = _sample_problem(cfg, rng)
        if question in seen:
            continue
        seen.add(question)
        reference = "\n".join([*lines, f"\\boxed{{{answer}}}"])
        problems.append(
            Problem(
                uid=f"arithmetic-{cfg.seed}-{split}-{len(problems)}",
                question=question,
                reference=reference,
                answer=str(answer),
                source="arithmetic",
            )
        )
    return problems


def generate_problems(cfg: ArithmeticTaskConfig, split: Literal["train", "eval"]) -> list[Problem]:
    """Return the split's problems: deterministic in `cfg`, distinct, train and eval disjoint."""
    eval_problems = _distinct_problems(cfg, random.Random(f"{cfg.seed}-eval"), cfg.num_eval, set(), "eval")
    if split == "eval":
        return eval_problems
    if split != "train":
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    held_out = {p.question for p in eval_problems}
    return _distinct_problems(cfg, random.Random(f"{cfg.seed}-train"), cfg.num_train, held_out, "train")


_STEP = re.compile(r"^(-?\d+)([+\-*])(\d+)=(-?\d+)$")
_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def detour(reference: str, rng: random.Random) -> tuple[str, str, str] | None:
    """A worked solution that goes wrong in one step and then carries on consistently.

    Returns (text before the wrong result, the wrong result, the rest: later steps computed
    from the wrong value and the boxed final value), or None when the reference has no
    step in this task's format. The warm start trains the privileged prompt on the first
    and last parts (never on the wrong result itself), so that, like a real LLM given a
    reference and someone else's partial solution, the teacher continues what is written
    instead of copying reference lines that no longer follow from it.
    """
    lines = reference.splitlines()
    steps = [(i, _STEP.match(line)) for i, line in enumerate(lines)]
    steps = [(i, m) for i, m in steps if m]
    if not steps:
        return None
    k = rng.randrange(len(steps))
    index, match = steps[k]
    right = int(match.group(4))
    wrong = right + rng.choice([d for d in (-2, -1, 1, 2) if right + d >= 0])
    head = "\n".join(lines[:index] + [f"{match.group(1)}{match.group(2)}{match.group(3)}="])
    value, tail = wrong, []
    for _, later in steps[k + 1 :]:
        op, operand = later.group(2), int(later.group(3))
        result = _OPS[op](value, operand)
        tail.append(f"{value}{op}{operand}={result}")
        value = result
    rest = "".join("\n" + line for line in tail) + f"\n\\boxed{{{value}}}"
    return head, str(wrong), rest
