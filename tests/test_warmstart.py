import json

import pytest
import torch
from pydantic import ValidationError
from transformers import AutoModelForCausalLM, AutoTokenizer

from selfdistill.data.arithmetic import ArithmeticTaskConfig, generate_problems
from selfdistill.data.templates import PromptTemplates, render
from selfdistill.models import warmstart
from selfdistill.models.tokenizer import build_char_tokenizer
from selfdistill.models.warmstart import (
    IGNORE_INDEX,
    TinyModelConfig,
    WarmStartConfig,
    boxed_integer,
    cache_key,
    collate,
    ensure_warm_start,
    greedy_accuracy,
    sft_example,
)

TASK = ArithmeticTaskConfig(num_train=64, num_eval=8)
SHAPE = TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2, max_positions=128)
CFG = WarmStartConfig(steps=3, batch_size=4, warmup=1, eval_size=4)


def test_warm_start_writes_caches_and_loads(tmp_path, monkeypatch):
    folder = ensure_warm_start(TASK, PromptTemplates(), SHAPE, CFG, tmp_path, progress=None)
    assert folder.parent == tmp_path and folder.name == f"warmstart-{cache_key(TASK, PromptTemplates(), SHAPE, CFG)}"
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]  # no temp folder left behind
    report = json.loads((folder / "warmstart.json").read_text())
    assert {"accuracy_plain", "accuracy_full", "final_loss", "seconds", "params"} <= report.keys()
    assert 0.0 <= report["accuracy_plain"] <= 1.0 and report["final_loss"] > 0

    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.config.hidden_size == 32 and model.config.num_hidden_layers == 1
    assert len(AutoTokenizer.from_pretrained(folder)) == len(build_char_tokenizer())

    mtime = (folder / "model.safetensors").stat().st_mtime_ns

    def no_retraining(*args, **kwargs):
        raise AssertionError("cached warm start was rebuilt")

    monkeypatch.setattr(warmstart, "_build", no_retraining)
    assert ensure_warm_start(TASK, PromptTemplates(), SHAPE, CFG, tmp_path, progress=None) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == mtime


def test_interrupted_warm_start_leaves_no_folder(tmp_path, monkeypatch):
    calls = 0
    real_loss = warmstart.sft_loss_sum

    def fail_on_second_step(model, batch):
        nonlocal calls
        calls += 1
        if calls > 2:  # up to two forwards (plain and full) per step
            raise KeyboardInterrupt
        return real_loss(model, batch)

    monkeypatch.setattr(warmstart, "sft_loss_sum", fail_on_second_step)
    with pytest.raises(KeyboardInterrupt):
        ensure_warm_start(TASK, PromptTemplates(), SHAPE, CFG, tmp_path, progress=None)
    assert calls == 3
    assert list(tmp_path.iterdir()) == []


def test_cache_key_covers_every_config():
    base = cache_key(TASK, PromptTemplates(), SHAPE, CFG)
    variants = [
        cache_key(TASK.model_copy(update={"seed": 1}), PromptTemplates(), SHAPE, CFG),
        cache_key(TASK, PromptTemplates(plain="{question}="), SHAPE, CFG),
        cache_key(TASK, PromptTemplates(), SHAPE.model_copy(update={"num_layers": 2}), CFG),
        cache_key(TASK, PromptTemplates(), SHAPE, CFG.model_copy(update={"lr": 1e-4})),
    ]
    assert len({base, *variants}) == 5


def test_sft_example_masks_the_prompt_and_ends_with_eos():
    tok = build_char_tokenizer()
    ids, labels = sft_example(tok, "Q: 1+2\nA: ", "1+2=3\n\\boxed{3}")
    assert tok.decode(ids) == "Q: 1+2\nA: 1+2=3\n\\boxed{3}</s>"
    assert labels[:10] == [IGNORE_INDEX] * 10 and labels[10:] == ids[10:] and ids[-1] == 2
    batch = collate([(ids, labels), ([5, 6], [IGNORE_INDEX, 6])], tok.pad_token_id)
    assert batch["input_ids"][1].tolist() == [5, 6] + [tok.pad_token_id] * (len(ids) - 2)
    assert batch["attention_mask"][1].sum() == 2 and (batch["labels"][1, 2:] == IGNORE_INDEX).all()


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1+2=3\n\\boxed{3}", "3"), ("\\boxed{1} \\boxed{ 07 }", "7"), ("\\boxed{-4}", "-4"), ("\\boxed{x}", None), ("", None)],
)
def test_boxed_integer(text, expected):
    assert boxed_integer(text) == expected


class ScriptedModel(torch.nn.Module):
    """Answers each prompt with a fixed text, through the same left-padded generate path."""

    def __init__(self, tokenizer, answers: dict[str, str]):
        super().__init__()
        self.tokenizer, self.answers = tokenizer, answers

    def generate(self, input_ids, attention_mask, max_new_tokens, **_):
        prompts = self.tokenizer.batch_decode(input_ids, skip_special_tokens=True)
        replies = [self.tokenizer(self.answers[p])["input_ids"][:max_new_tokens] for p in prompts]
        width = max(map(len, replies))
        padded = [r + [self.tokenizer.pad_token_id] * (width - len(r)) for r in replies]
        return torch.cat([input_ids, torch.tensor(padded)], dim=1)


def test_greedy_accuracy_scores_the_generated_boxed_answer():
    tok = build_char_tokenizer()
    tok.padding_side = "right"  # greedy_accuracy must switch to left padding itself
    problems = generate_problems(TASK, "eval")[:4]
    templates = PromptTemplates()
    answers = {render(templates, "plain", p): p.reference for p in problems[:3]}
    answers[render(templates, "plain", problems[3])] = f"\\boxed{{{int(problems[3].answer) + 1}}}"
    model = ScriptedModel(tok, answers)
    assert greedy_accuracy(model, tok, problems, templates, "plain", max_new_tokens=64, batch_size=3) == 0.75


def test_greedy_accuracy_renders_the_partial_context_at_the_alpha_given():
    tok = build_char_tokenizer()
    problems = generate_problems(TASK, "eval")[:3]
    templates = PromptTemplates()
    model = ScriptedModel(tok, {render(templates, "partial", p, 0.5): p.reference for p in problems})
    assert greedy_accuracy(model, tok, problems, templates, "partial", max_new_tokens=64, alpha=0.5) == 1.0
    with pytest.raises(ValueError, match="needs alpha"):
        greedy_accuracy(model, tok, problems, templates, "partial", max_new_tokens=64)


@pytest.mark.parametrize(
    ("model", "field"),
    [({"hidden_size": 30, "num_heads": 4}, "num_heads"), ({"num_layers": 0}, "num_layers")],
)
def test_bad_model_shape_names_the_field(model, field):
    with pytest.raises(ValidationError, match=field):
        TinyModelConfig(**model)


@pytest.mark.parametrize(("overrides", "field"), [({"privileged_fraction": 1.5}, "privileged_fraction"), ({"lr": 0}, "lr")])
def test_bad_warm_start_values_name_the_field(overrides, field):
    with pytest.raises(ValidationError, match=field):
        WarmStartConfig(**overrides)
