"""Which attention kernel a model is loaded with (`attn_implementation` of the teacher and the learner)."""

from __future__ import annotations

import importlib.util

import torch


def attention_kernel(name: str, device: torch.device | str) -> str:
    """`auto`: flash_attention_2 where flash-attn is installed and the model runs on a GPU (packed rows, which
    carry position_ids and no mask, then take its variable-length path), else sdpa; any other name as given."""
    if name != "auto":
        return name
    on_gpu = torch.device(device).type == "cuda"
    return "flash_attention_2" if on_gpu and importlib.util.find_spec("flash_attn") is not None else "sdpa"


def placement_device() -> torch.device:
    """The device of this actor's placement bundle: its GPU when Ray gave it one, else the CPU."""
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
