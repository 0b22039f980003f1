"""`selfdistill eval`: Avg@k, pass@k, maj@k and reasoning health of a model on named data sets.

    selfdistill eval runs/NAME/checkpoints/step-000040 --k 8
    selfdistill eval configs/eval/aime.yaml sampling.temperature=0.6 --out evals/aime

The target is a Hugging Face model folder (config.json present), a LoRA adapter folder
(adapter_config.json: a LoRA run's checkpoint, served as base + adapter), or an `EvalConfig` YAML.
A checkpoint inside a run folder (runs/NAME/checkpoints/step-N) inherits the run's
templates, engine, sampling budget and, for the arithmetic task, its held-out split, so
the plain command scores what the run trained for. The engine runs in this process (no
Ray). Writes to the output folder:

- `results.json`: per data set n_problems, k, avg@k, maj@k, pass@k for every k from 1 to
  k, health metrics and verifier status counts; `macro`, the unweighted mean over data
  sets; the config.
- `samples.jsonl`: every response, one JSON object per line (data set, problem uid,
  sample index, prompt, response, extracted answer, gold, status, reward, finish reason,
  length in tokens).

`evaluate_problems` is the engine-agnostic core the training loop calls for periodic
held-out evaluation: anything with `generate(prompt_ids, SamplingConfig) ->
list[list[Sample]]` will do.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Protocol, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from selfdistill.data.arithmetic import ArithmeticTaskConfig, generate_problems
from selfdistill.data.files import FileSourceConfig, load_problems
from selfdistill.data.templates import PromptTemplates, render
from selfdistill.eval.health import HealthConfig, health_metrics
from selfdistill.eval.metrics import avg_at_k, maj_at_k, macro_average, pass_at_k_curve
from selfdistill.records import Problem
from selfdistill.rewards import RewardConfig, VerifyResult, extract_boxed, status_counts
from selfdistill.rollout.base import EngineConfig, Sample, SamplingConfig
from selfdistill.teacher.contexts import ChatConfig, prompt_ids

DataSource = Annotated[Union[ArithmeticTaskConfig, FileSourceConfig], Field(discriminator="name")]
_DATASET_NAME = re.compile(r"[A-Za-z0-9_.-]+")


class EvalConfig(BaseModel):
    """One evaluation: a model, the data sets it is scored on, and how responses are sampled."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(..., min_length=1, description="Hugging Face model folder (a run's checkpoint, or any model).")
    datasets: dict[str, DataSource] = Field(
        default_factory=lambda: {"arithmetic": ArithmeticTaskConfig()},
        description="Data sets by name (the name labels results and metric keys). An arithmetic source is scored "
        "on its held-out split (num_eval problems); a file source on every problem of the file (after its own "
        "limit/shuffle).",
    )
    k: int = Field(8, ge=1, description="Samples per problem: Avg@k, maj@k and pass@1..k are computed from them.")
    sampling: SamplingConfig = Field(
        default_factory=lambda: SamplingConfig(temperature=1.0, top_p=1.0, max_new_tokens=256, seed=0),
        description="Sampling of every response; `n` is set from `k` (leave it out). Temperature 0 samples once "
        "per problem and repeats that response k times. A seed makes the evaluation repeatable.",
    )
    engine: EngineConfig = Field(default_factory=EngineConfig, description="Inference engine, run in this process.")
    templates: PromptTemplates = Field(
        default_factory=PromptTemplates, description="Prompt templates; the plain template is the prompt."
    )
    reward: RewardConfig = Field(default_factory=RewardConfig, description="Verifier that scores the responses.")
    chat: ChatConfig = Field(default_factory=ChatConfig, description="Whether prompts go through the chat template.")
    health: HealthConfig = Field(default_factory=HealthConfig, description="Reasoning-health metric settings.")
    batch_size: int = Field(64, ge=1, description="Prompts per engine call (each with k samples).")
    output_dir: str | None = Field(None, description="Where results.json and samples.jsonl go; None: MODEL/eval.")

    @field_validator("datasets")
    @classmethod
    def _datasets_named(cls, datasets: dict[str, Any]) -> dict[str, Any]:
        if not datasets:
            raise ValueError("name at least one data set")
        bad = [name for name in datasets if not _DATASET_NAME.fullmatch(name)]
        if bad:
            raise ValueError(f"data set names may use letters, digits, '_', '.', '-' only: {bad}")
        return datasets

    @model_validator(mode="after")
    def _n_is_k(self) -> EvalConfig:
        if "n" in self.sampling.model_fields_set and self.sampling.n not in (1, self.k):
            raise ValueError(f"sampling.n ({self.sampling.n}) is set from k ({self.k}): drop sampling.n or set k")
        return self

    @property
    def out_dir(self) -> Path:
        return Path(self.output_dir) if self.output_dir else Path(self.model) / "eval"


class Engine(Protocol):
    def generate(self, prompts: list[list[int]], sampling: SamplingConfig) -> list[list[Sample]]: ...


class Verifier(Protocol):
    def score(self, responses: list[str], golds: list[str]) -> list[VerifyResult]: ...


@dataclass
class DatasetEval:
    """What `evaluate_problems` found: the metrics of one data set and every scored response."""

    metrics: dict[str, Any]
    samples: list[dict[str, Any]] = field(default_factory=list)

    def flat(self, prefix: str = "eval/") -> dict[str, float]:
        """Flat metric keys for metrics.jsonl: eval/avg@k, eval/maj@k, eval/pass@N, eval/health/NAME."""
        m, k = self.metrics, self.metrics["k"]
        out = {f"{prefix}avg@{k}": m[f"avg@{k}"], f"{prefix}maj@{k}": m[f"maj@{k}"]}
        out.update({f"{prefix}pass@{n}": v for n, v in m["pass@k"].items()})
        out.update({f"{prefix}health/{name}": v for name, v in m["health"].items()})
        return out


def evaluate_problems(
    engine: Engine,
    verifier: Verifier,
    tokenizer,
    templates: PromptTemplates,
    problems: list[Problem],
    k: int,
    sampling: SamplingConfig,
    health: HealthConfig = HealthConfig(),
    batch_size: int = 64,
    dataset: str = "",
    chat: ChatConfig | None = None,
) -> DatasetEval:
    """Sample `k` responses per problem under the plain prompt, verify them, compute every metric.

    `sampling.n` is replaced by k. With `sampling.seed` set, the prompts of the i-th chunk
    get seed + (chunk start) * k, so no two samples share a random stream and results do not
    depend on `batch_size` (vLLM). Temperature 0: one greedy response repeated k times.

    The training loop passes its rollout actors behind a small adapter, e.g.

        class ActorEngines:  # generate() over Ray rollout actors, prompts split evenly
            def generate(self, prompts, sampling):
                chunks = split(prompts, len(actors))  # offset sampling.seed by chunk start * n
                return [g for out in ray.get([a.generate.remote(c, s) for a, c, s in ...]) for g in out]

    and logs `evaluate_problems(...).flat("eval/")` into metrics.jsonl.
    """
    if not problems:
        raise ValueError(f"evaluate {dataset or 'problems'}: no problems")
    greedy = sampling.temperature == 0
    draw = 1 if greedy else k
    prompts = [prompt_ids(tokenizer, templates, "plain", p, chat=chat) for p in problems]
    outputs: list[list[Sample]] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        seed = None if sampling.seed is None else sampling.seed + start * draw
        got = engine.generate(chunk, sampling.model_copy(update={"n": draw, "seed": seed}))
        if len(got) != len(chunk) or any(len(g) != draw for g in got):
            raise RuntimeError(f"engine returned {[len(g) for g in got]} samples for {len(chunk)} prompts x {draw}")
        outputs.extend([group * k if greedy else group for group in got])

    flat = [(p, j, s) for p, group in zip(problems, outputs, strict=True) for j, s in enumerate(group)]
    results = verifier.score([s.text for _, _, s in flat], [p.answer for p, _, _ in flat])
    correct = [[r.status == "correct" for r in results[i * k : (i + 1) * k]] for i in range(len(problems))]
    answers = [[extract_boxed(s.text) for s in group] for group in outputs]
    samples = [s for group in outputs for s in group]
    metrics = {
        "n_problems": len(problems),
        "k": k,
        f"avg@{k}": avg_at_k(correct),
        f"maj@{k}": maj_at_k(answers, correct),
        "pass@k": {str(n): v for n, v in pass_at_k_curve(correct).items()},
        "health": health_metrics(
            [s.text for s in samples],
            [len(s.token_ids) for s in samples],
            [s.finish_reason for s in samples],
            logprobs=[s.logprobs for s in samples],
            cfg=health,
        ),
        "status": status_counts(results),
    }
    records = [
        {
            "dataset": dataset,
            "uid": p.uid,
            "sample": j,
            "prompt": render(templates, "plain", p),
            "response": s.text,
            "extracted": extract_boxed(s.text),
            "gold": p.answer,
            "status": r.status,
            "reward": r.reward,
            "finish_reason": s.finish_reason,
            "length": len(s.token_ids),
        }
        for (p, j, s), r in zip(flat, results, strict=True)
    ]
    return DatasetEval(metrics, records)


def load_eval_problems(source: ArithmeticTaskConfig | FileSourceConfig) -> list[Problem]:
    """The problems an evaluation scores: the arithmetic held-out split, or every problem of a file."""
    if isinstance(source, ArithmeticTaskConfig):
        return generate_problems(source, "eval")
    problems, report = load_problems(source)
    if report.skipped:
        print(f"selfdistill eval: {source.path}: skipped {report.skipped} bad rows, e.g. {report.errors[0]}")
    return problems


def run_eval(cfg: EvalConfig) -> dict[str, Any]:
    """Evaluate `cfg.model` on every data set; write results.json and samples.jsonl; return the results."""
    from transformers import AutoTokenizer

    from selfdistill.rewards import build_reward
    from selfdistill.rollout.base import build_engine

    started = time.perf_counter()
    problems = {name: load_eval_problems(source) for name, source in cfg.datasets.items()}  # fail before the engine
    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    engine = build_engine(cfg.engine, cfg.model)
    out = cfg.out_dir
    out.mkdir(parents=True, exist_ok=True)
    per_dataset: dict[str, dict[str, Any]] = {}
    with build_reward(cfg.reward) as verifier, (out / "samples.jsonl").open("w") as samples_file:
        for name, items in problems.items():
            result = evaluate_problems(
                engine, verifier, tokenizer, cfg.templates, items, cfg.k, cfg.sampling, cfg.health, cfg.batch_size, name,
                cfg.chat,
            )
            per_dataset[name] = result.metrics
            for record in result.samples:
                samples_file.write(json.dumps(record) + "\n")
    macro_keys = (f"avg@{cfg.k}", f"maj@{cfg.k}", "pass@k", "health")
    results = {
        "model": cfg.model,
        "k": cfg.k,
        "datasets": per_dataset,
        "macro": macro_average({n: {key: m[key] for key in macro_keys} for n, m in per_dataset.items()}),
        "seconds": time.perf_counter() - started,
        "config": cfg.model_dump(mode="json"),
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def load_eval_config(
    target: str, overrides: list[str] | tuple[str, ...] = (), k: int | None = None, out: str | None = None
) -> EvalConfig:
    """The `EvalConfig` of a model folder (with its run's defaults) or of a YAML file, plus dotted overrides."""
    from selfdistill.config import ConfigError, _apply_override, format_validation_error

    path = Path(target)
    if path.is_dir():
        if not any((path / name).is_file() for name in ("config.json", "adapter_config.json")):
            raise ConfigError(f"{path} is not a Hugging Face model folder (no config.json there), a LoRA adapter "
                              f"folder (no adapter_config.json) nor a YAML file")
        raw: dict[str, Any] = {**run_defaults(path), "model": str(path)}
    elif path.is_file():
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise ConfigError(f"cannot read eval config {path}: {e}") from e
        if not isinstance(raw, dict):
            raise ConfigError(f"eval config {path} must hold a mapping at the top level, got {type(raw).__name__}")
    else:
        raise ConfigError(f"{path}: no such model folder or eval config file")
    raw.setdefault("datasets", {"arithmetic": {"name": "arithmetic"}})  # so overrides can reach the default
    for item in overrides:
        _apply_override(raw, item)
    if k is not None:
        raw["k"] = k
    if out is not None:
        raw["output_dir"] = out
    try:
        return EvalConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"invalid eval config for {target}:\n" + format_validation_error(e)) from None


def run_defaults(checkpoint: Path) -> dict[str, Any]:
    """Eval settings inherited from the run a checkpoint belongs to (runs/NAME/checkpoints/step-N), else {}.

    Templates and engine as trained; sampling temperature, top-p/top-k and response budget
    of the rollouts; the arithmetic task's held-out split when the run trained on it.
    """
    run_config = checkpoint.resolve().parent.parent / "config.yaml"
    if checkpoint.resolve().parent.name != "checkpoints" or not run_config.is_file():
        return {}
    run = yaml.safe_load(run_config.read_text()) or {}
    rollout = run.get("rollout", {})
    out: dict[str, Any] = {}
    for key in ("templates", "chat"):
        if key in run:
            out[key] = run[key]
    if "engine" in rollout:
        out["engine"] = rollout["engine"]
    if "sampling" in rollout:
        kept = ("temperature", "top_p", "top_k", "max_new_tokens", "stop")
        out["sampling"] = {key: v for key, v in rollout["sampling"].items() if key in kept} | {"seed": 0}
    if run.get("data", {}).get("name") == "arithmetic":
        out["datasets"] = {"arithmetic": run["data"]}
    return out


def summary_table(results: dict[str, Any]) -> str:
    """Plain-text table of the headline numbers, one row per data set and the macro mean."""
    k = results["k"]
    head = (f"{'data set':<20} {'n':>5} {f'avg@{k}':>8} {'pass@1':>8} {f'pass@{k}':>8} {f'maj@{k}':>8} "
            f"{'length':>8} {'trunc':>6}")
    rows = [head]
    table = {**results["datasets"], "macro": {"n_problems": "", **results["macro"]}}
    for name, m in table.items():
        h = m["health"]
        rows.append(
            f"{name:<20} {m['n_problems']:>5} {m[f'avg@{k}']:>8.3f} {m['pass@k']['1']:>8.3f} "
            f"{m['pass@k'][str(k)]:>8.3f} {m[f'maj@{k}']:>8.3f} {h['length']:>8.1f} {h['truncation_rate']:>6.2f}"
        )
    return "\n".join(rows)
