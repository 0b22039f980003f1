"""Checks on a run's inputs made before any actor starts: the tokenizer can write what the
templates need, and every prompt fits the model's context with room for the response.

A prompt that does not fit is skipped and counted, or refused with the problem's id and
lengths (`rollout.long_prompts`); the student's plain prompt is held to the engine's
`max_model_len`, each teacher context to the model's `max_position_embeddings`.

A model that cannot fit the memory the config gives it is refused (`check_memory`), naming the
role and the numbers: each role's memory from the model's shape and the batch (launch/sizing.py)
against this machine's available RAM for the CPU roles of a local cluster, and against the GPU's
memory for a role on GPUs.
"""

from __future__ import annotations

from selfdistill.config import ConfigError, TrainConfig
from selfdistill.records import Problem
from selfdistill.data.templates import render
from selfdistill.teacher.contexts import prompt_ids

ANSWER_PROBE = "\\boxed{-12/5}"  # what every response must be able to end with


def check_tokenizer(tokenizer, cfg: TrainConfig, problem: Problem, contexts: tuple[str, ...], where: str) -> None:
    """ConfigError when `tokenizer` (loaded from `where`) lacks an EOS token or cannot encode the answer format or
    `problem` under the templates of every context the run uses."""
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"tokenizer of {where} has no EOS token: responses could never end")
    unknown = tokenizer.unk_token_id
    if unknown is None:  # byte-level tokenizers encode everything
        return
    texts = {"the answer format": ANSWER_PROBE}
    for context in ("plain", *contexts):
        texts[f"templates.{context} (problem {problem.uid!r})"] = render(
            cfg.templates, context, problem, alpha=0.5 if context == "partial" else None)
    for label, text in texts.items():
        missing = sorted({c for c in text if unknown in tokenizer(c, add_special_tokens=False)["input_ids"]})
        if missing:
            raise ConfigError(f"tokenizer of {where} cannot encode {''.join(missing)!r}, needed by {label}")


def fit_prompts(problems: list[Problem], tokenizer, cfg: TrainConfig, contexts: tuple[str, ...], max_model_len: int,
                max_positions: int, split: str) -> tuple[list[Problem], int]:
    """The problems whose prompts leave room for `max_new_tokens`, and how many were skipped.

    With `rollout.long_prompts: error` the first that does not fit is a ConfigError naming it.
    """
    budget = cfg.rollout.sampling.max_new_tokens
    kept = []
    for index, problem in enumerate(problems):
        problem_fits = True
        for context, limit, limit_name in [("plain", max_model_len, "the engine's max_model_len"),
                                           *[(c, max_positions, "the model's max_position_embeddings") for c in contexts]]:
            alpha = 1.0 if context == "partial" else None  # the longest partial context
            length = len(prompt_ids(tokenizer, cfg.templates, context, problem, alpha, cfg.chat))
            if length + budget > limit:
                if cfg.rollout.long_prompts == "error":
                    raise ConfigError(
                        f"data ({split} split, problem {index}, uid {problem.uid!r}): the {context} prompt has {length} "
                        f"tokens, and with max_new_tokens={budget} exceeds {limit_name} ({limit}); set "
                        f"rollout.long_prompts: skip to leave such prompts out")
                problem_fits = False
                break
        if problem_fits:
            kept.append(problem)
    return kept, len(problems) - len(kept)


def context_limits(cfg: TrainConfig, model_path: str) -> tuple[int, int]:
    """(engine max_model_len, model max_position_embeddings) for the model in `model_path`."""
    from transformers import AutoConfig

    positions = getattr(AutoConfig.from_pretrained(model_path), "max_position_embeddings", None) or 1 << 30
    return min(cfg.rollout.engine.max_model_len or positions, positions), positions


def checked_inputs(cfg: TrainConfig, policy: str, base_model: str, contexts: tuple[str, ...], train: list[Problem],
                   held_out: list[Problem], console) -> tuple[list[Problem], list[Problem]]:
    """Both splits after the checks above (tokenizer of `policy`, context limits of `base_model`)."""
    from transformers import AutoTokenizer

    check_memory(cfg, contexts)
    tokenizer = AutoTokenizer.from_pretrained(policy)
    check_tokenizer(tokenizer, cfg, train[0], contexts, policy)
    max_model_len, max_positions = context_limits(cfg, base_model)
    out = []
    for split, problems in (("train", train), ("eval", held_out)):
        kept, skipped = fit_prompts(problems, tokenizer, cfg, contexts, max_model_len, max_positions, split)
        if skipped:
            console.note(f"data: skipped {skipped} of {len(problems)} {split} prompts too long for the context "
                         f"(max_model_len {max_model_len}, max_new_tokens {cfg.rollout.sampling.max_new_tokens})")
        if problems and not kept:
            raise ConfigError(f"data: every {split} prompt is too long for the context ({max_model_len} tokens with "
                              f"max_new_tokens={cfg.rollout.sampling.max_new_tokens})")
        out.append(kept)
    return out[0], out[1]


def role_memory(cfg: TrainConfig, contexts: tuple[str, ...]) -> list[tuple[str, float, object]] | None:
    """(actor, GPUs, `sizing.RoleMemory`) for every actor of the run; None when the model's shape is unknown."""
    from selfdistill.launch import sizing

    shape = sizing.model_shape(cfg)
    if shape is None:
        return None
    pc = cfg.placement
    engine = sizing.engine_memory(cfg, shape, pc.rollout.gpus)
    actors = [(f"rollout/{i}", pc.rollout.gpus, engine) for i in range(cfg.rollout.num_engines)]
    if contexts:
        actors.append(("teacher", pc.teacher.gpus, sizing.teacher_memory(cfg, shape)))
    learner = sizing.learner_memory(cfg, shape)
    return actors + [(f"learner/{r}", pc.learner.gpus, learner) for r in range(cfg.learner.num_ranks)]


def check_memory(cfg: TrainConfig, contexts: tuple[str, ...], host_gib: float | None = None,
                 gpu_gib: float | None = None) -> None:
    """ConfigError when the run's actors cannot fit the memory they get: the CPU actors of a local cluster
    together against `host_gib` (default: this machine's available RAM), an actor on GPUs per GPU against
    `gpu_gib` (default: the first local GPU's memory; no check without one). Colocated engines share their
    learner rank's GPUs."""
    actors = role_memory(cfg, contexts)
    if actors is None:
        return
    on_cpu = [(name, mem.total_gib) for name, gpus, mem in actors if not gpus]
    if on_cpu and cfg.cluster.address is None:  # a joined cluster spreads them over nodes we cannot see from here
        if host_gib is None:
            import psutil

            host_gib = psutil.virtual_memory().available / 1024**3
        need = sum(gib for _, gib in on_cpu)
        if need > host_gib:
            each = ", ".join(f"{name} {gib:.1f}" for name, gib in on_cpu)
            raise ConfigError(f"model: the CPU roles need about {need:.1f} GiB together ({each} GiB; weights, "
                              f"optimizer state, KV cache and activations from the model's shape and the batch) and "
                              f"this machine has {host_gib:.1f} GiB of RAM available: use a smaller model, fewer "
                              f"engines or ranks (rollout.num_engines, learner.num_ranks), or smaller batches")
    if gpu_gib is None:
        gpu_gib = _local_gpu_gib()
    if gpu_gib is None:
        return
    colocated = cfg.placement.mode == "colocated"
    engine = next((mem for name, _, mem in actors if name.startswith("rollout/")), None)
    for name, gpus, mem in actors:
        if not gpus or (colocated and name.startswith("rollout/")):
            continue
        per_gpu = mem.total_gib / gpus
        if colocated and name.startswith("learner/"):
            per_gpu += engine.total_gib / max(cfg.placement.rollout.gpus, 1)
        if per_gpu > gpu_gib:
            role = name.split("/")[0]
            raise ConfigError(f"placement.{role}.gpus: {name} needs about {per_gpu:.1f} GiB per GPU ({mem.what}"
                              + (", with its colocated engine" if colocated and role == "learner" else "")
                              + f") and the GPU has {gpu_gib:.1f} GiB: give the role more GPUs or ranks, a higher "
                              f"ZeRO stage, or smaller micro-batches")


def _local_gpu_gib() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(0).total_memory / 1024**3
