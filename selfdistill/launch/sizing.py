"""Memory per role, computed from the model's shape and the batch (what a dry-run plan prints).

Estimates, in GiB per actor, of what each role holds at its peak:

- learner rank: weights, gradients and AdamW state (two fp32 moments, plus an fp32 master copy when
  training in bfloat16), each divided across ranks as the ZeRO stage shards it, plus activations of one
  micro-batch (about 34 * hidden bytes per token per layer in 16-bit, twice that in fp32; layer inputs
  kept for backward) and the fp32 log-softmax over the vocabulary for the response tokens;
- rollout engine: its shard of the weights (divided by tensor-parallel size) plus the KV cache for every
  sequence of its share of the batch at full length (2 * layers * kv_heads * head_dim per token);
- teacher: the weights (an EMA teacher below float32 adds its float32 average) plus one forward of
  `teacher.batch_size` sequences (activations and fp32 logits over the vocabulary, or the top-k the
  teacher sends).

They are meant for sizing (which GPU, how many ranks), not for the last GiB: CUDA context, allocator
fragmentation and vLLM's CUDA graphs come on top (vLLM takes `gpu_memory_utilization` of the GPU anyway).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

GIB = 1024**3

# Published config.json values of models whose folders may not be on the planning machine (a dry-run is
# offline): hidden, layers, heads, kv heads, head dim, intermediate, vocab, tied embeddings.
KNOWN_SHAPES = {
    "Qwen/Qwen3-1.7B": dict(hidden_size=2048, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                            head_dim=128, intermediate_size=6144, vocab_size=151936, tie_word_embeddings=True),
    "Qwen/Qwen3-4B": dict(hidden_size=2560, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                          head_dim=128, intermediate_size=9728, vocab_size=151936, tie_word_embeddings=True),
    "Qwen/Qwen3-8B": dict(hidden_size=4096, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                          head_dim=128, intermediate_size=12288, vocab_size=151936, tie_word_embeddings=False),
}

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class ModelShape:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool

    @classmethod
    def from_config(cls, c: dict) -> ModelShape:
        heads = c["num_attention_heads"]
        return cls(c["hidden_size"], c["num_hidden_layers"], heads, c.get("num_key_value_heads") or heads,
                   c.get("head_dim") or c["hidden_size"] // heads, c["intermediate_size"], c["vocab_size"],
                   bool(c.get("tie_word_embeddings", False)))

    @property
    def parameters(self) -> int:
        """Parameters of a Llama/Qwen-style decoder (attention, gated MLP, norms, embeddings)."""
        h, d = self.hidden_size, self.head_dim
        attention = h * self.num_attention_heads * d * 2 + h * self.num_key_value_heads * d * 2
        mlp = 3 * h * self.intermediate_size
        per_layer = attention + mlp + 2 * h + 2 * d  # two RMSNorms (and Qwen3's q/k norms)
        embeddings = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * per_layer + embeddings + h


@dataclass(frozen=True)
class RoleMemory:
    weights_gib: float
    other_gib: float  # optimizer + gradients (learner), KV cache (engine), forward activations (teacher)
    activations_gib: float
    what: str

    @property
    def total_gib(self) -> float:
        return self.weights_gib + self.other_gib + self.activations_gib


def model_shape(cfg) -> ModelShape | None:
    """The shape of `cfg.model`: the tiny config, a local/cached config.json, or a known hub id; None if unknown."""
    if cfg.model.kind == "tiny":
        from selfdistill.models.tiny import tiny_llama_config
        from selfdistill.models.tokenizer import build_char_tokenizer

        s = cfg.model.shape
        return ModelShape.from_config(tiny_llama_config(len(build_char_tokenizer()), s.hidden_size, s.num_layers,
                                                        s.num_heads, s.max_positions).to_dict())
    path = getattr(cfg.model, "path", None)
    if cfg.model.kind == "pretrained" and path:
        local = Path(path) / "config.json"
        if local.is_file():
            return ModelShape.from_config(json.loads(local.read_text()))
        cached = _hub_cache_config(path)
        if cached is not None:
            return ModelShape.from_config(json.loads(Path(cached).read_text()))
        if path in KNOWN_SHAPES:
            return ModelShape.from_config(KNOWN_SHAPES[path])
    return None


def _hub_cache_config(repo_id: str) -> str | None:
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # not a valid repo id, or no hub library: unknown
        return None
    return found if isinstance(found, str) else None


def learner_memory(cfg, shape: ModelShape) -> RoleMemory:
    lc, n = cfg.learner, cfg.learner.num_ranks
    p, b = shape.parameters, DTYPE_BYTES[lc.dtype]
    trained = p if lc.lora is None else max(1, p // 100)  # LoRA: adapters are ~1% of the weights at most
    weights = p * b / (n if lc.zero_stage == 3 else 1)
    grads = trained * b / (n if lc.zero_stage >= 2 else 1)
    optimizer = trained * (8 + (4 if lc.dtype != "float32" else 0)) / (n if lc.zero_stage >= 1 else 1)
    tokens = _micro_batch_tokens(cfg)
    act_per_token = 34 * shape.hidden_size * shape.num_hidden_layers * b / 2
    logits = _response_tokens(cfg) * shape.vocab_size * 4 * 2 / max(1, _micro_batches(cfg))
    return RoleMemory(weights / GIB, (grads + optimizer) / GIB, (tokens * act_per_token + logits) / GIB,
                      f"ZeRO-{lc.zero_stage} over {n} ranks, {lc.dtype}")


def engine_memory(cfg, shape: ModelShape, tensor_parallel_size: int) -> RoleMemory:
    ec = cfg.rollout.engine
    b = DTYPE_BYTES[ec.dtype]
    tp = max(1, tensor_parallel_size)
    weights = shape.parameters * b / tp
    sequences = -(-cfg.rollout.prompts_per_step * cfg.rollout.sampling.n // cfg.rollout.num_engines)
    kv_per_token = 2 * shape.num_hidden_layers * shape.num_key_value_heads * shape.head_dim * b / tp
    kv = sequences * _sequence_len(cfg) * kv_per_token
    return RoleMemory(weights / GIB, kv / GIB, 0.0, f"TP {tp}, KV cache for {sequences} sequences")


def teacher_memory(cfg, shape: ModelShape) -> RoleMemory:
    b = DTYPE_BYTES[cfg.teacher.dtype]
    weights = shape.parameters * b
    if cfg.teacher.weights == "ema" and cfg.teacher.dtype != "float32":
        weights += shape.parameters * 4  # the float32 average beside the model (teacher/actor.py)
    tokens = cfg.teacher.batch_size * _sequence_len(cfg)
    activations = tokens * shape.hidden_size * b * 4  # inference: a few live hidden-state tensors per token
    logits = tokens * shape.vocab_size * 4
    return RoleMemory(weights / GIB, 0.0, (activations + logits) / GIB, f"forward of {cfg.teacher.batch_size} sequences")


def _sequence_len(cfg) -> int:
    ec = cfg.rollout.engine
    return ec.max_model_len or (_prompt_len(cfg) + cfg.rollout.sampling.max_new_tokens)


def _prompt_len(cfg) -> int:
    if cfg.model.kind == "tiny":
        return max(1, cfg.model.shape.max_positions - cfg.rollout.sampling.max_new_tokens)
    return 1024  # prompt tokens assumed when max_model_len is unset


def _micro_batches(cfg) -> int:
    groups = cfg.rollout.prompts_per_step // cfg.learner.num_ranks
    return max(1, -(-groups // cfg.learner.micro_batch_groups))


def _micro_batch_tokens(cfg) -> int:
    lc = cfg.learner
    if lc.micro_batch_tokens:
        return lc.micro_batch_tokens
    return min(lc.micro_batch_groups, cfg.rollout.prompts_per_step // lc.num_ranks) * cfg.rollout.sampling.n * _sequence_len(cfg)


def _response_tokens(cfg) -> int:
    per_rank = cfg.rollout.prompts_per_step // cfg.learner.num_ranks * cfg.rollout.sampling.n
    return per_rank * cfg.rollout.sampling.max_new_tokens
