"""Which folder each role loads the policy from: full weights, or with `learner.lora` a base + adapter.

- Full fine-tuning: the initial model, or the checkpoint being resumed.
- LoRA, `sync: adapter`: an adapter folder (a fresh adapter, cached under run.cache_dir, or
  the checkpoint); engines serve it with vLLM's LoRA support, the learner trains it, a live or
  EMA teacher scores with it; the frozen teacher is the base itself and is never synced.
- LoRA, `sync: merged`: engines and teacher hold full weights (the base, or the resumed
  checkpoint merged once into a folder under run.cache_dir); the learner starts its own adapter.

The LoRA settings are checked against the model here, before any actor starts.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from selfdistill.config import ConfigError, TrainConfig
from selfdistill.models import lora


def policy_paths(cfg: TrainConfig, initial_model: str, resume_from: Path | None) -> tuple[str, str]:
    """(policy folder for the engines and learner, teacher folder)."""
    lc = cfg.learner.lora
    if resume_from:
        lora.check_resume(lc, resume_from)
    if lc is None:
        policy = str(resume_from) if resume_from else initial_model
    else:
        check_lora(cfg, initial_model)
        cache = Path(cfg.run.cache_dir)
        if lc.sync == "adapter":
            policy = str(resume_from) if resume_from else str(_initial_adapter(cfg, initial_model, cache))
        elif resume_from:
            policy = str(_merged_checkpoint(resume_from, cache))
        else:
            policy = initial_model
    ema = str(resume_from / "teacher") if resume_from else policy
    return policy, {"frozen": initial_model, "live": policy, "ema": ema}[cfg.teacher.weights]


def check_lora(cfg: TrainConfig, base: str) -> None:
    """ConfigError naming the field when the model cannot take or serve the adapter `learner.lora` asks for."""
    lc = cfg.learner.lora
    lora.check_targets(lc, base)
    if lc.sync == "adapter" and cfg.rollout.engine.name == "vllm":
        from selfdistill.rollout import vllm_internals

        reason = vllm_internals.lora_unsupported_reason(base)
        if reason:
            raise ConfigError(f"learner.lora.sync: adapter serving needs vLLM's LoRA support: {reason}; "
                              f"set learner.lora.sync=merged to ship full merged weights instead")
        try:
            vllm_internals.lora_rank_slot(lc.rank)
        except ValueError as e:
            raise ConfigError(str(e)) from None


def _merged_checkpoint(checkpoint: Path, cache: Path) -> Path:
    """The adapter checkpoint merged into a full folder, cached by its base and adapter bytes (another run's
    checkpoint of the same name and step is another entry)."""
    digest = hashlib.sha256(lora.base_model_path(checkpoint).encode())
    digest.update((checkpoint / lora.ADAPTER_WEIGHTS).read_bytes())
    return _cached(cache / "merged" / digest.hexdigest()[:16], "config.json",
                   lambda tmp: lora.export_merged(str(checkpoint), tmp))


def _initial_adapter(cfg: TrainConfig, base: str, cache: Path) -> Path:
    """A fresh adapter for this base, LoRA config and seed (B = 0: it equals the base), cached by those."""
    key = json.dumps([str(Path(base).resolve()), cfg.learner.lora.model_dump(mode="json"), cfg.run.seed],
                     sort_keys=True)
    return _cached(cache / "adapters" / hashlib.sha256(key.encode()).hexdigest()[:16], lora.ADAPTER_CONFIG,
                   lambda tmp: lora.write_initial_adapter(cfg.learner.lora, base, tmp, cfg.run.seed))


def _cached(folder: Path, marker: str, build) -> Path:
    """`folder` once it holds `marker`; else `build` writes it into a temporary sibling, renamed when complete."""
    if not (folder / marker).is_file():
        tmp = folder.with_name(folder.name + ".tmp")
        build(tmp)
        tmp.rename(folder)
    return folder
