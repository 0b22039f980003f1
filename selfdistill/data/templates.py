"""Prompt templates: the plain student prompt and the privileged teacher contexts.

The model's response to every prompt is the reference format itself: worked steps, one
per line, then the `\\boxed{}` line, then EOS. The defaults are short because the default
model reads one character per token.
"""

from __future__ import annotations

import math
import string
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from selfdistill.records import Problem

Context = Literal["plain", "full", "partial", "reference_only", "none"]


def split_reference(reference: str) -> tuple[list[str], str]:
    """Split a reference solution into its reasoning steps and its final answer line.

    Rule: the steps are the non-empty lines (stripped of surrounding whitespace). If the
    last of them contains `\\boxed{`, it is the final answer line and the others are the
    steps; otherwise the final line is "" and every non-empty line is a step.
    """
    lines = [line.strip() for line in reference.splitlines() if line.strip()]
    if lines and "\\boxed{" in lines[-1]:
        return lines[:-1], lines[-1]
    return lines, ""


def partial_reference(reference: str, alpha: float) -> str:
    """The first floor(alpha * m) of the m reference steps, then the final answer line."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    steps, final = split_reference(reference)
    kept = steps[: math.floor(alpha * len(steps))]
    return "\n".join(kept + ([final] if final else []))


class PromptTemplates(BaseModel):
    """Format strings for each context; they may use the fields {question} and {reference}."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    plain: str = Field("Q: {question}\nA: ", description="Student prompt (also the 'none' context): the question only.")
    full: str = Field(
        "Q: {question}\nR: {reference}\nA: ", description="Teacher prompt with the whole reference solution."
    )
    partial: str = Field(
        "Q: {question}\nR: {reference}\nA: ",
        description="Teacher prompt for adaptive exposure; {reference} is cut to the first "
        "floor(alpha*m) steps followed by the final answer line.",
    )
    reference_only: str = Field(
        "R: {reference}\nA: ", description="Teacher prompt with the reference but not the question (PMI targets)."
    )

    @field_validator("plain", "full", "partial", "reference_only")
    @classmethod
    def _known_fields(cls, template: str, info) -> str:
        names = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
        unknown = names - {"question", "reference"}
        if unknown:
            raise ValueError(f"template {info.field_name!r} uses unknown fields {sorted(unknown)}")
        return template


def render(templates: PromptTemplates, context: Context, problem: Problem, alpha: float | None = None) -> str:
    """Render the prompt of `problem` under `context` ("none" is the plain prompt).

    `alpha` (in [0, 1]) is required for "partial" and ignored otherwise.
    """
    if context in ("plain", "none"):
        return templates.plain.format(question=problem.question, reference=problem.reference)
    if context == "full":
        return templates.full.format(question=problem.question, reference=problem.reference)
    if context == "reference_only":
        return templates.reference_only.format(question=problem.question, reference=problem.reference)
    if context == "partial":
        if alpha is None:
            raise ValueError("context 'partial' needs alpha (the share of reference steps shown)")
        return templates.partial.format(question=problem.question, reference=partial_reference(problem.reference, alpha))
    raise ValueError(f"unknown context {context!r}; expected plain, full, partial, reference_only or none")
