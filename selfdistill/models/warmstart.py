"""The cached warm start of the CPU default: a short SFT of the tiny model on the task.

Each training example is a generated problem under the plain prompt or (with probability
`privileged_fraction`) a privileged prompt (full reference, partial reference, reference
only: `privileged_contexts`), and the target is the reference solution followed by EOS; the loss covers response tokens only. Training on both prompts
teaches the model to use a reference in context, as real LLMs do, so the self-teacher of
OPSD is better than the student from the start. The result is a Hugging Face folder under
`cache_dir/warmstart-<hash>`, keyed by every config that changes it and `WARMSTART_VERSION`.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import shutil
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, ContextManager, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from selfdistill.data.arithmetic import ArithmeticTaskConfig, detour, generate_problems
from selfdistill.data.templates import Context, PromptTemplates, render
from selfdistill.models.tiny import build_tiny_model
from selfdistill.records import Problem

# Bump when the training code changes its result, so old cached folders are not reused.
WARMSTART_VERSION = 3
NUM_THREADS = 2
IGNORE_INDEX = -100
_BOXED_INT = re.compile(r"\\boxed\{\s*(-?\d+)\s*\}")
ProgressFactory = Callable[[int], ContextManager[Any]]


class TinyModelConfig(BaseModel):
    """Shape of the tiny Llama-style model (intermediate size is 3 x hidden, embeddings tied)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    hidden_size: int = Field(128, ge=8, description="Width of the residual stream.")
    num_layers: int = Field(4, ge=1, description="Number of decoder layers.")
    num_heads: int = Field(4, ge=1, description="Attention heads per layer (must divide hidden_size).")
    max_positions: int = Field(512, ge=64, description="Longest sequence (prompt + response) in tokens.")

    @model_validator(mode="after")
    def _heads_divide_hidden(self) -> TinyModelConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must divide hidden_size ({self.hidden_size})")
        return self


class WarmStartConfig(BaseModel):
    """Supervised warm start: optimisation and the mix of plain and privileged prompts."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: int = Field(1000, ge=1, description="Optimizer steps.")
    batch_size: int = Field(32, ge=1, description="Examples per step.")
    lr: float = Field(3e-3, gt=0, description="Peak AdamW learning rate (linear warmup, cosine decay to 10%).")
    warmup: int = Field(20, ge=0, description="Linear warmup steps.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay.")
    grad_clip: float = Field(1.0, gt=0, description="Gradient-norm clip.")
    privileged_fraction: float = Field(
        0.5, ge=0, le=1, description="Share of examples shown the full privileged prompt (question + reference)."
    )
    privileged_contexts: dict[Literal["full", "partial", "reference_only"], float] = Field(
        default_factory=lambda: {"full": 0.6, "partial": 0.2, "reference_only": 0.2},
        description="Relative weights of the privileged contexts among privileged examples; 'partial' draws alpha "
        "uniformly in [0, 1]. Every context a teacher may be shown (OPSD, exposure, PMI) must be seen here.",
    )
    detour_fraction: float = Field(
        0.3, ge=0, le=1,
        description="Share of privileged examples whose solution goes wrong in one step and continues consistently "
        "(the wrong result itself is not trained on): teaches the teacher to follow what is written, not to copy.",
    )
    seed: int = Field(0, description="Seed of the initial weights and the example order.")

    @field_validator("privileged_contexts")
    @classmethod
    def _weights_usable(cls, weights: dict[str, float]) -> dict[str, float]:
        if not weights or any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
            raise ValueError(f"privileged_contexts needs non-negative weights with a positive sum, got {weights}")
        return weights
    eval_size: int = Field(200, ge=1, description="Held-out problems for the greedy accuracy written to warmstart.json.")


def cache_key(task: ArithmeticTaskConfig, templates: PromptTemplates, model: TinyModelConfig, cfg: WarmStartConfig) -> str:
    """A short hash of everything that changes the warm start's result."""
    payload = {
        "version": WARMSTART_VERSION,
        "task": task.model_dump(mode="json"),
        "templates": templates.model_dump(mode="json"),
        "model": model.model_dump(mode="json"),
        "warmstart": cfg.model_dump(mode="json"),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def ensure_warm_start(
    task: ArithmeticTaskConfig,
    templates: PromptTemplates,
    model: TinyModelConfig,
    cfg: WarmStartConfig,
    cache_dir: Path,
    progress: ProgressFactory | None = None,
) -> Path:
    """Return the warm-started model folder, training and caching it on the first call.

    `progress(total)` opens a progress display whose `.advance(step, metrics)` is called every
    step (the run's console); None trains silently.

    The folder is built in a temporary directory next to its final place and renamed when
    complete, so an interrupted run never leaves a partial `warmstart-<hash>` folder.
    """
    cache_dir = Path(cache_dir)
    final = cache_dir / f"warmstart-{cache_key(task, templates, model, cfg)}"
    if final.is_dir():
        return final
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=cache_dir))
    try:
        _build(task, templates, model, cfg, tmp, progress)
        try:
            tmp.rename(final)
        except OSError:
            if not final.is_dir():  # a concurrent run that finished first is fine
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _build(
    task: ArithmeticTaskConfig, templates: PromptTemplates, shape: TinyModelConfig, cfg: WarmStartConfig, out: Path,
    progress: ProgressFactory | None,
) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(NUM_THREADS)
    try:
        start = time.perf_counter()
        build_tiny_model(out, cfg.seed, shape.hidden_size, shape.num_layers, shape.num_heads, shape.max_positions)
        model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(out)
        final_loss = train_sft(model, tokenizer, generate_problems(task, "train"), templates, cfg, progress)
        train_seconds = time.perf_counter() - start
        model.save_pretrained(out, safe_serialization=True)
        eval_problems = generate_problems(task, "eval")[: cfg.eval_size]
        max_new = max(len(tokenizer(p.reference)["input_ids"]) for p in eval_problems) + 8
        report = {
            "params": sum(p.numel() for p in model.parameters()),
            "final_loss": final_loss,
            "train_seconds": round(train_seconds, 1),
            "eval_size": len(eval_problems),
        }
        for context in ("plain", "full"):
            report[f"accuracy_{context}"] = greedy_accuracy(model, tokenizer, eval_problems, templates, context, max_new)
        report["seconds"] = round(time.perf_counter() - start, 1)
        (out / "warmstart.json").write_text(json.dumps(report, indent=2) + "\n")
    finally:
        torch.set_num_threads(threads)


def sft_example(
    tokenizer: PreTrainedTokenizerBase, prompt: str, *response_parts: str, untrained: int | None = None
) -> tuple[list[int], list[int]]:
    """Token ids of prompt + response + EOS, and labels with the prompt (and part `untrained`) masked out."""
    ids = tokenizer(prompt)["input_ids"]
    labels = [IGNORE_INDEX] * len(ids)
    for i, part in enumerate(response_parts):
        part_ids = tokenizer(part)["input_ids"]
        ids += part_ids
        labels += [IGNORE_INDEX] * len(part_ids) if i == untrained else part_ids
    return ids + [tokenizer.eos_token_id], labels + [tokenizer.eos_token_id]


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of (input_ids, labels) into tensors for a causal-LM forward."""
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (ids, labs) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(labs)] = torch.tensor(labs)
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def sft_loss_sum(model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed next-token cross-entropy over the unmasked (response) tokens of the batch."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def train_sft(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    problems: list[Problem],
    templates: PromptTemplates,
    cfg: WarmStartConfig,
    progress: ProgressFactory | None = None,
) -> float:
    """Train `model` in place for `cfg.steps` steps; return the mean loss of the last 20 steps."""
    rng = random.Random(cfg.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))

    def lr_factor(step: int) -> float:
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        done = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * done))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    model.train()
    recent: list[float] = []
    with progress(cfg.steps) if progress else nullcontext() as bar:
        for step in range(1, cfg.steps + 1):
            # One forward per context: full prompts are about twice as long as plain ones, so
            # padding them together would waste a quarter of the compute.
            by_context: dict[str, list[tuple[list[int], list[int]]]] = {}
            for problem in rng.choices(problems, k=cfg.batch_size):
                context: Context = "plain"
                if rng.random() < cfg.privileged_fraction:
                    context = rng.choices(list(cfg.privileged_contexts), list(cfg.privileged_contexts.values()))[0]
                prompt = render(templates, context, problem, alpha=rng.random() if context == "partial" else None)
                wrong_turn = detour(problem.reference, rng) \
                    if context != "plain" and rng.random() < cfg.detour_fraction else None
                by_context.setdefault(context, []).append(
                    sft_example(tokenizer, prompt, problem.reference) if wrong_turn is None
                    else sft_example(tokenizer, prompt, *wrong_turn, untrained=1)
                )
            optimizer.zero_grad(set_to_none=True)
            batches = [collate(group, tokenizer.pad_token_id) for group in by_context.values() if group]
            num_targets = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches)
            loss = sum(sft_loss_sum(model, b) for b in batches) / num_targets
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            recent = (recent + [loss.item()])[-20:]
            if bar is not None:
                bar.advance(step, {"train/loss": loss.item()})
    model.eval()
    return sum(recent) / len(recent)


def boxed_integer(text: str) -> str | None:
    """The integer inside the last `\\boxed{...}` of `text`, or None."""
    found = _BOXED_INT.findall(text)
    return str(int(found[-1])) if found else None


@torch.no_grad()
def greedy_accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    problems: list[Problem],
    templates: PromptTemplates,
    context: Context,
    max_new_tokens: int,
    batch_size: int = 256,
    alpha: float | None = None,
) -> float:
    """Share of problems whose greedy response (left-padded batched decoding) boxes the exact answer
    (`alpha`: the share of reference steps a "partial" context shows)."""
    tokenizer.padding_side = "left"
    model.eval()
    correct = 0
    for start in range(0, len(problems), batch_size):
        chunk = problems[start : start + batch_size]
        inputs = tokenizer([render(templates, context, p, alpha) for p in chunk], return_tensors="pt", padding=True)
        out = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        texts = tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        correct += sum(boxed_integer(text) == p.answer for text, p in zip(texts, chunk))
    return correct / len(problems)
