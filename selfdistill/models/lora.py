"""LoRA adapters on the policy, through PEFT: the config, adapter folders, names and merging.

An adapter folder is PEFT's own format (adapter_config.json + adapter_model.safetensors,
plus the tokenizer) and stands for a policy: the base model its config names plus the
adapter. Every role that loads a policy path accepts one: the learner trains it, vLLM
engines serve it with their LoRA support, a live or EMA teacher scores with it, and
`selfdistill export --merged` folds it into a full Hugging Face folder.

Tensors travel under the names of adapter_model.safetensors
(`base_model.model.<module>.lora_A.weight`): what PEFT writes, and what vLLM reads.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER = "default"  # PEFT's name for the one adapter a model carries
BASE_PREFIX = "base_model.model."


class LoraConfig(BaseModel):
    """`learner.lora`: train a LoRA adapter instead of every weight (absent: full fine-tuning)."""

    model_config = ConfigDict(extra="forbid")

    rank: int = Field(16, ge=1, description="LoRA rank r (the adapter's inner dimension).")
    alpha: float = Field(32.0, gt=0, description="LoRA alpha; the update is scaled by alpha / rank.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the adapter's input during training.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear",
        description="Module names that get an adapter (e.g. [q_proj, v_proj]), matched as name suffixes, or "
        "'all-linear' (every linear layer but the output head).",
    )
    sync: Literal["adapter", "merged"] = Field(
        "merged",
        description="What the learner publishes: 'adapter' ships only the adapter (27x fewer bytes at r 16 on "
        "SmolLM2-135M), which vLLM serves with its LoRA support (a live or EMA teacher takes it too); 'merged' folds "
        "it into full weights and ships those. Default merged: measured on CPU, vLLM's LoRA path generates 3x "
        "slower, which costs more per step than the smaller sync saves (docs/performance.md).",
    )

    @field_validator("target_modules", mode="before")
    @classmethod
    def _names_or_all_linear(cls, value):
        if value == "all-linear":
            return value
        if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
            raise ValueError("a non-empty list of module names (e.g. [q_proj, v_proj]) or all-linear")
        return value


def peft_config(cfg: LoraConfig, base_path: str):
    """The PEFT `LoraConfig` for `cfg` on the base model at `base_path`."""
    import peft

    return peft.LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                           target_modules=cfg.target_modules, task_type="CAUSAL_LM",
                           base_model_name_or_path=str(Path(base_path).resolve()))


def is_adapter(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def adapter_settings(path: str | Path) -> dict:
    """The adapter folder's adapter_config.json."""
    return json.loads((Path(path) / ADAPTER_CONFIG).read_text())


def base_model_path(path: str | Path) -> str:
    """The policy's base model: the folder an adapter names, or `path` itself for a full model."""
    return adapter_settings(path)["base_model_name_or_path"] if is_adapter(path) else str(path)


def linear_module_names(base_path: str) -> tuple[list[str], str | None]:
    """Names of the base model's linear layers, and of its output head (built on the meta device: no weights read)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base_path))
    head = model.get_output_embeddings()
    names = {m: name for name, m in model.named_modules()}
    return [name for m, name in names.items() if isinstance(m, torch.nn.Linear)], names.get(head)


def _targeted(targets: list[str] | str, names: list[str], head: str | None) -> set[str]:
    """The linear modules `targets` (names matched as suffixes, or all-linear) puts an adapter on."""
    if targets == "all-linear":
        return {n for n in names if n != head}
    return {n for n in names if any(n == t or n.endswith("." + t) for t in targets)}


def check_targets(cfg: LoraConfig, base_path: str) -> None:
    """Raise ConfigError naming learner.lora.target_modules when the model lacks one of them, or one is its
    output head (PEFT would save the whole head with the adapter; with tied embeddings a merge changes both)."""
    if cfg.target_modules == "all-linear":
        return
    from selfdistill.config import ConfigError

    names, head = linear_module_names(base_path)
    missing = [t for t in cfg.target_modules if not _targeted([t], names, head)]
    if missing:
        kinds = sorted({n.rsplit(".", 1)[-1] for n in names})
        raise ConfigError(f"learner.lora.target_modules: the model at {base_path} has no linear module named "
                          f"{missing}; its linear layers are {kinds} (or use all-linear)")
    on_head = [t for t in cfg.target_modules if head in _targeted([t], names, head)]
    if on_head:
        raise ConfigError(f"learner.lora.target_modules: {on_head} is the output head ({head}) of the model at "
                          f"{base_path}; adapters go on the transformer's linear layers (all-linear leaves the head out)")


def check_resume(cfg: LoraConfig | None, checkpoint: Path) -> None:
    """Raise ConfigError naming the learner.lora field when the config would not continue the checkpoint's
    policy: full weights with LoRA, an adapter without it, or another rank, alpha or set of target modules."""
    from selfdistill.config import ConfigError

    if not is_adapter(checkpoint):
        if cfg is not None:
            raise ConfigError(f"learner.lora: {checkpoint} holds full weights (trained without learner.lora); "
                              f"resume it without learner.lora")
        return
    saved = adapter_settings(checkpoint)
    if cfg is None:
        raise ConfigError(f"learner.lora: {checkpoint} holds a LoRA adapter (r {saved['r']}, alpha "
                          f"{saved['lora_alpha']}); resume it with the learner.lora it was trained with")
    for field, key in (("rank", "r"), ("alpha", "lora_alpha")):
        if getattr(cfg, field) != saved[key]:
            raise ConfigError(f"learner.lora.{field}: {checkpoint} was trained with {field} {saved[key]} "
                              f"(got {getattr(cfg, field)})")
    names, head = linear_module_names(base_model_path(checkpoint))
    trained = _targeted(saved["target_modules"], names, head)
    if _targeted(cfg.target_modules, names, head) != trained:
        raise ConfigError(f"learner.lora.target_modules: {checkpoint} has adapters on "
                          f"{sorted({n.rsplit('.', 1)[-1] for n in trained})} (got {cfg.target_modules})")


def write_initial_adapter(cfg: LoraConfig, base_path: str, out: Path, seed: int) -> Path:
    """A fresh adapter folder for `base_path` (A: PEFT's Kaiming init from `seed`, B = 0, so it equals the base).

    The base is built on the meta device; only the adapter's tensors are materialised.
    """
    from peft import get_peft_model
    from peft.tuners.lora import LoraLayer
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base_path))
    model = get_peft_model(base, peft_config(cfg, base_path))
    torch.manual_seed(seed)
    for module in model.modules():
        if isinstance(module, LoraLayer):
            module.lora_A[ADAPTER].to_empty(device="cpu")
            module.lora_B[ADAPTER].to_empty(device="cpu")
            module.reset_lora_parameters(ADAPTER, True)
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(base_path).save_pretrained(out)
    return out


def load_policy(path: str, dtype: torch.dtype, trainable: bool = False, attn_implementation: str | None = None):
    """A transformers model for a full model folder, or base + adapter (a `PeftModel`) for an adapter folder."""
    from transformers import AutoModelForCausalLM

    if not is_adapter(path):
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation)
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(base_model_path(path), dtype=dtype,
                                                attn_implementation=attn_implementation)
    return PeftModel.from_pretrained(base, path, is_trainable=trainable)


def published_name(param_name: str) -> str:
    """A PEFT parameter's name in adapter_model.safetensors (the adapter's name dropped)."""
    return param_name.replace(f".{ADAPTER}.", ".")


def published_parameters(model) -> dict[str, torch.nn.Parameter]:
    """The tensors a weight sync replaces, by published name: the adapter of a PeftModel, else every parameter."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        return {published_name(n): p for n, p in model.named_parameters() if ".lora_" in n}
    return dict(model.named_parameters())


# A unit of a weight sync: the published name, the parameters it is computed from, and how.
SyncUnit = tuple[str, list[torch.nn.Parameter], Callable[[], torch.Tensor]]


def adapter_units(model) -> list[SyncUnit]:
    """The trainable adapter tensors under their published names."""
    return [(published_name(n), [p], lambda p=p: p) for n, p in model.named_parameters() if p.requires_grad]


def merged_units(model) -> list[SyncUnit]:
    """Every base weight under its Hugging Face name, with the adapter's delta added (W + B A * alpha / r).

    The delta is PEFT's own `get_delta_weight`; the parameters must be gathered when it runs.
    """
    from peft.tuners.lora import LoraLayer

    merged = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            weight = module.get_base_layer().weight
            parts = [weight, module.lora_A[ADAPTER].weight, module.lora_B[ADAPTER].weight]
            merged[id(weight)] = (parts, lambda w=weight, m=module: w + m.get_delta_weight(ADAPTER).to(w.dtype))
    units = []
    for name, p in model.named_parameters():
        if ".lora_" in name:
            continue
        hf_name = name.removeprefix(BASE_PREFIX).replace(".base_layer.", ".")
        parts, compute = merged.get(id(p), ([p], lambda p=p: p))
        units.append((hf_name, parts, compute))
    return units


def export_merged(source: str, out: str | Path) -> Path:
    """Write `source` (an adapter or a full model folder) as a full Hugging Face folder with its tokenizer."""
    from transformers import AutoTokenizer

    model = load_policy(source, torch.float32)
    if is_adapter(source):
        model = model.merge_and_unload()
    out = Path(out)
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(source).save_pretrained(out)
    return out
