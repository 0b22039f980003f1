"""The teacher actor: holds a copy of the policy and scores responses under privileged contexts.

Weights follow `teacher.weights`: `live` takes every published version, `frozen` keeps the
initial weights, `ema` blends each published version into a moving average. Given a LoRA
adapter folder, the teacher is base + adapter and takes (or averages) adapter tensors. One call
scores every response under every context the objective asked for.

An EMA teacher whose dtype is below float32 keeps its average in float32 beside the model and
scores with the average rounded to its dtype: blended in bfloat16 itself, an update of
(1 - ema_rate) x (live - average) is far below half a bfloat16 step (2^-9 of the value), so every
blend would round back and the teacher would never move. The float32 average is saved with the
teacher (`EMA_AVERAGE` in its folder) and read back when the teacher starts from that folder.

An EMA teacher blends version v into an average that holds version u with rate ema_rate^(v - u): one
step of decay per version (v = u + 1 in a run), none for a version it holds already (a re-send), and,
for a replacement started from the average of an older checkpoint, the weight the versions it missed
would have had, given to the version it receives (their own values are gone with the dead teacher).
"""

from __future__ import annotations

import os

import torch

from selfdistill import weights
from selfdistill.config import SyncConfig, TeacherConfig
from selfdistill.data.templates import PromptTemplates
from selfdistill.models import lora
from selfdistill.records import Problem, TeacherScores
from selfdistill.teacher.contexts import ChatConfig, prompt_ids
from selfdistill.models.attention import attention_kernel, placement_device
from selfdistill.teacher.scorer import score_responses
from selfdistill.weights.object_store import bucket_tensors

EMA_AVERAGE = "ema_average.safetensors"  # an EMA teacher's float32 average, when its dtype is lower


class TeacherActor:
    """Ray actor (created with `ray.remote(TeacherActor)`); see module docstring."""

    def __init__(self, model_path: str, cfg: TeacherConfig, templates: PromptTemplates, temperature: float,
                 sync: SyncConfig, chat: ChatConfig | None = None, version: int = 0):
        from transformers import AutoTokenizer

        torch.set_num_threads(max(1, int(cfg.num_cpus)))
        self.cfg, self.templates, self.temperature, self.chat = cfg, templates, temperature, chat
        device = placement_device()  # the GPU of the teacher's bundle, if it has one
        attn = attention_kernel(cfg.attn_implementation, device)
        self.model = lora.load_policy(model_path, getattr(torch, cfg.dtype), attn_implementation=attn).to(device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.average = self._float32_average(model_path) if cfg.weights == "ema" else None
        self.receiver = weights.build_receiver(sync)
        self.version = version  # of the weights in model_path (an EMA teacher: the version its average holds)
        self.pid = os.getpid()

    def ready(self) -> int:
        return self.pid

    def score(self, items: list[tuple[Problem, list[int]]], contexts: list[str], alpha: float | None) -> list[TeacherScores]:
        """Score each (problem, response ids) under every context in `contexts` ("partial" shows alpha of the steps)."""
        full_rows = self.model.config.vocab_size <= self.cfg.full_vocab_max
        # One call for all contexts: every distinct prompt runs once and responses share forwards across contexts.
        pairs = [(prompt_ids(self.tokenizer, self.templates, context, p, alpha, self.chat), r)
                 for context in contexts for p, r in items]
        scores = score_responses(
            self.model, pairs, temperature=self.temperature, top_k=self.cfg.top_k, full_rows=full_rows,
            pad_id=self.tokenizer.pad_token_id or 0, batch_size=self.cfg.batch_size,
        )
        n = len(items)
        return [TeacherScores({c: scores[k * n + i] for k, c in enumerate(contexts)}, self.version) for i in range(n)]

    def load_weights(self, buckets, version: int) -> int:
        """Take one version from a list of buckets (dicts of tensors, or Ray refs to them) in one call;
        returns the version now held."""
        if self.cfg.weights == "frozen":
            return self.version
        self._apply(bucket_tensors(buckets), version)
        self.version = version
        return version

    # vLLM's weight-sync calls, driven by the learner through the weight transport (selfdistill/weights/)

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        self.receiver.init(init_info)

    def start_weight_update(self) -> None:
        pass

    def update_weights(self, update_info: dict) -> None:
        self._apply(self.receiver.tensors(update_info), int(update_info["version"]))

    def finish_weight_update(self, weight_version: str) -> None:
        self.version = int(weight_version)

    @torch.no_grad()
    def _float32_average(self, model_path: str) -> dict[str, torch.Tensor] | None:
        """An EMA teacher's float32 average of its published parameters (None in float32: the parameters are
        the average): the one saved in `model_path`, else the parameters as loaded."""
        params = lora.published_parameters(self.model)
        if all(p.dtype == torch.float32 for p in params.values()):
            return None
        saved = os.path.join(model_path, EMA_AVERAGE)
        if os.path.isfile(saved):
            from safetensors.torch import load_file

            average = load_file(saved, device=str(next(iter(params.values())).device))
            if set(average) != set(params):
                raise ValueError(f"{saved}: its tensors are not the teacher's published parameters")
            return average
        return {name: p.detach().float().clone() for name, p in params.items()}

    @torch.no_grad()
    def _apply(self, named_tensors, version: int) -> None:
        """Copy (live) or blend (ema) received tensors of `version` into the teacher's parameters."""
        if self.cfg.weights == "frozen":
            raise RuntimeError("a frozen teacher receives no weights (it is not a weight-sync receiver)")
        if version < self.version:
            raise ValueError(f"teacher holds version {self.version} and was sent the older version {version}")
        params = lora.published_parameters(self.model)
        rate = self.cfg.ema_rate ** (version - self.version)
        for name, tensor in named_tensors:
            if name not in params:
                raise KeyError(f"teacher received unknown parameter {name!r}")
            if self.cfg.weights == "live":
                params[name].copy_(tensor)
                continue
            average = params[name] if self.average is None else self.average[name]
            average.mul_(rate).add_(tensor.to(average.dtype), alpha=1 - rate)
            if average is not params[name]:
                params[name].copy_(average)

    def save(self, path: str) -> None:
        """Write the teacher's own weights (needed to resume an EMA teacher) as a Hugging Face folder, with its
        float32 average where it keeps one."""
        self.model.save_pretrained(path, safe_serialization=True)
        self.tokenizer.save_pretrained(path)
        if self.average is not None:
            from safetensors.torch import save_file

            save_file({n: t.contiguous() for n, t in self.average.items()}, os.path.join(path, EMA_AVERAGE))

    def sequence_logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        """log p(x_t | x_<t) for t >= 1 under the teacher's current weights (temperature 1)."""
        scores = score_responses(self.model, [(s[:1], s[1:]) for s in sequences], temperature=1.0, top_k=0,
                                 full_rows=False, pad_id=0, batch_size=self.cfg.batch_size)
        return [s.token_logprobs.tolist() for s in scores]
