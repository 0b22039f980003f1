"""Where the policy's first weights come from: the tiny warm start, a GGUF file, or a model folder.

- `tiny`: built and warm-started by the project, cached under `run.cache_dir`.
- `gguf`: a GGUF file (a folder, a file, or `package:NAME`), dequantised once to a float32
  Hugging Face folder cached under `run.cache_dir` (`models/gguf.py`).
- `pretrained`: a Hugging Face folder; a path that is no folder but looks like a hub id
  (`Qwen/Qwen3-1.7B`) is downloaded into the Hugging Face cache, which needs the hub.
"""

from __future__ import annotations

import re
from pathlib import Path

from selfdistill.config import ConfigError, TrainConfig

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# What a policy needs from a hub repository: config, safetensors weights, tokenizer, chat template.
_HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.jinja"]


def prepare_model(cfg: TrainConfig, console) -> str:
    """Return a Hugging Face model folder for the initial policy (built, converted or fetched and cached)."""
    if cfg.model.kind == "tiny":
        if cfg.data.name != "arithmetic":
            raise ConfigError("model.kind=tiny warm-starts on the arithmetic task; set data.name=arithmetic "
                              "or use model.kind=pretrained or gguf")
        from selfdistill.models.warmstart import ensure_warm_start

        console.status("warm start: supervised stage on plain and privileged prompts (cached after the first run)")
        path = ensure_warm_start(cfg.data, cfg.templates, cfg.model.shape, cfg.model.warm_start,
                                 Path(cfg.run.cache_dir),
                                 progress=lambda total: console.progress(total, 0, "warm start", max(1, total // 10)))
        return str(path)
    if cfg.model.kind == "gguf":
        from selfdistill.models.gguf import GgufError, convert_gguf

        console.status(f"GGUF model {cfg.model.path}: float32 copy under run.cache_dir (dequantised on first use, "
                       f"about 30 s)")
        try:
            return str(convert_gguf(cfg.model.path, cfg.model.file, Path(cfg.run.cache_dir) / "models"))
        except GgufError as e:
            raise ConfigError(str(e)) from None
    return str(resolve_pretrained(cfg.model.path))


def resolve_pretrained(path_text: str) -> Path:
    """A local Hugging Face folder for `path_text`: the folder itself, or a hub id's downloaded snapshot."""
    path = Path(path_text)
    if (path / "config.json").is_file():
        return path
    if path.exists() or not _HUB_ID.fullmatch(path_text):
        raise ConfigError(f"model.path: {path} is not a Hugging Face model folder (no config.json there)")
    try:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(path_text, allow_patterns=_HUB_FILES))
    except Exception as e:  # noqa: BLE001  (offline, unknown repo, gated repo, proxy refusal: all end the same way)
        raise ConfigError(
            f"model.path: {path_text} is neither a local model folder nor downloadable from the Hugging Face hub "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); download it first and set "
            f"model.path to the folder"
        ) from None
    if not (folder / "config.json").is_file():
        raise ConfigError(f"model.path: hub repository {path_text} has no config.json (not a transformers model)")
    return folder
