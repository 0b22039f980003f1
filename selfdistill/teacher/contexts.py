"""Privileged contexts the teacher can be shown, and how a prompt becomes token ids.

- `none`: the plain prompt the student sees (the teacher is then just the policy).
- `full`: the question and the whole reference solution.
- `partial`: the question, the first floor(alpha * m) reference steps and the final answer
  (adaptive teacher exposure); the step rule is `data.templates.split_reference`.
- `reference_only`: the reference without the question (the PMI baseline teacher).

The strings themselves come from `PromptTemplates`, so a config can change them. For a
chat model (`ChatConfig`), the rendered string is the user message of a one-turn
conversation and the model's chat template, with the assistant's generation prompt,
gives the ids; the student and every teacher context go through the same path, so the
response tokens always follow the same assistant header.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from selfdistill.data.templates import PromptTemplates, render
from selfdistill.records import Problem

Context = Literal["none", "full", "partial", "reference_only"]
CONTEXTS: tuple[str, ...] = ("none", "full", "partial", "reference_only")


class ChatConfig(BaseModel):
    """Whether prompts are wrapped in the model's chat template, and with which system message."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Literal["auto", "on", "off"] = Field(
        "auto",
        description="auto: use the chat template when the tokenizer has one (instruct and chat models), plain "
        "text otherwise (base models, the tiny CPU model); on: always (an error without a template); off: never.",
    )
    system: str | None = Field(
        None, description="System message put before the user turn; None: none (the template's own default, if "
        "it has one, e.g. SmolLM2's 'You are a helpful AI assistant named SmolLM...')."
    )
    template_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Extra variables for the chat template, e.g. {enable_thinking: false} for Qwen3's "
        "non-thinking mode.",
    )


_DEFAULT_CHAT = ChatConfig()


def uses_chat(tokenizer, chat: ChatConfig | None = None) -> bool:
    """True when prompts for `tokenizer` go through its chat template under `chat` (None: the default, auto)."""
    chat = chat or _DEFAULT_CHAT
    if chat.mode == "off":
        return False
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if chat.mode == "on" and not has_template:
        raise ValueError("chat.mode is 'on' but the tokenizer has no chat template; set chat.mode: auto or off")
    return has_template


def encode(tokenizer, text: str, chat: ChatConfig | None = None) -> list[int]:
    """Token ids of a rendered prompt: plain (no special tokens added: templates carry their own),
    or, for a chat model, the chat template applied to [system?, user=text] with the generation prompt."""
    if not uses_chat(tokenizer, chat):
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    chat = chat or _DEFAULT_CHAT
    messages = ([{"role": "system", "content": chat.system}] if chat.system is not None else [])
    messages.append({"role": "user", "content": text})
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                        **chat.template_kwargs)["input_ids"]
    return list(ids)


def prompt_ids(tokenizer, templates: PromptTemplates, context: str, problem: Problem, alpha: float | None = None,
               chat: ChatConfig | None = None) -> list[int]:
    """Token ids of `problem` rendered under `context` ("plain" is the student's prompt).

    `chat=None` is the default `ChatConfig()` (mode auto): the chat template when the
    tokenizer has one, plain text otherwise.
    """
    if context not in CONTEXTS and context != "plain":
        raise ValueError(f"unknown teacher context {context!r}; choose from {CONTEXTS}")
    text = render(templates, context, problem, alpha=alpha if context == "partial" else None)
    return encode(tokenizer, text, chat)
