"""Where the policy's first weights come from: the tiny warm start, or a model folder."""

from __future__ import annotations

from pathlib import Path

from selfdistill.config import ConfigError, TrainConfig


def prepare_model(cfg: TrainConfig, console) -> str:
    """Return a Hugging Face model folder for the initial policy (built and cached if tiny)."""
    if cfg.model.kind == "tiny":
        if cfg.data.name != "arithmetic":
            raise ConfigError("model.kind=tiny warm-starts on the arithmetic task; set data.name=arithmetic "
                              "or use model.kind=pretrained")
        from selfdistill.models.warmstart import ensure_warm_start

        console.status("warm start: supervised stage on plain and privileged prompts (cached after the first run)")
        path = ensure_warm_start(cfg.data, cfg.templates, cfg.model.shape, cfg.model.warm_start,
                                 Path(cfg.run.cache_dir), progress=cfg.run.progress)
        return str(path)
    path = Path(cfg.model.path)
    if not (path / "config.json").is_file():
        raise ConfigError(f"model.path: {path} is not a Hugging Face model folder (no config.json there)")
    return str(path)
