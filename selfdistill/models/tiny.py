"""The embedded CPU default model: a Llama-style decoder of about 1M parameters."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from selfdistill.models.tokenizer import build_char_tokenizer


def tiny_llama_config(
    vocab_size: int, hidden_size: int = 128, num_layers: int = 4, num_heads: int = 4, max_positions: int = 512
) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 3,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        torch_dtype="float32",
    )


def build_tiny_model(
    out_dir: str | Path, seed: int = 0, hidden_size: int = 128, num_layers: int = 4, num_heads: int = 4,
    max_positions: int = 512,
) -> Path:
    """Initialise the tiny model with its tokenizer and save both as a Hugging Face folder."""
    out = Path(out_dir)
    tokenizer = build_char_tokenizer()
    torch.manual_seed(seed)
    cfg = tiny_llama_config(len(tokenizer), hidden_size, num_layers, num_heads, max_positions)
    model = LlamaForCausalLM(cfg).to(torch.float32)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
