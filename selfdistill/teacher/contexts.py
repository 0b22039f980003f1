"""Privileged contexts the teacher can be shown, and how a prompt becomes token ids.

- `none`: the plain prompt the student sees (the teacher is then just the policy).
- `full`: the question and the whole reference solution.
- `partial`: the question, the first floor(alpha * m) reference steps and the final answer
  (adaptive teacher exposure); the step rule is `data.templates.split_reference`.
- `reference_only`: the reference without the question (the PMI baseline teacher).

The strings themselves come from `PromptTemplates`, so a config can change them.
"""

from __future__ import annotations

from typing import Literal

from selfdistill.data.templates import PromptTemplates, render
from selfdistill.records import Problem

Context = Literal["none", "full", "partial", "reference_only"]
CONTEXTS: tuple[str, ...] = ("none", "full", "partial", "reference_only")


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of a rendered prompt; no special tokens are added (templates carry their own)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def prompt_ids(tokenizer, templates: PromptTemplates, context: str, problem: Problem, alpha: float | None = None) -> list[int]:
    """Token ids of `problem` rendered under `context` ("plain" is the student's prompt)."""
    if context not in CONTEXTS and context != "plain":
        raise ValueError(f"unknown teacher context {context!r}; choose from {CONTEXTS}")
    return encode(tokenizer, render(templates, context, problem, alpha=alpha if context == "partial" else None))
