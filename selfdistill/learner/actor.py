"""One DeepSpeed ZeRO rank as a Ray actor.

Each rank takes whole prompt groups, splits them into micro-batches, computes the student
log-probs with gradients (logits / temperature, log-softmax over the vocabulary), asks the
objective for a loss, and accumulates gradients; one optimizer step closes the training
step. Ranks communicate over gloo (CPU) or NCCL (GPU) and meet at rank 0's node
(learner/rendezvous.py: a file store on loopback, else a TCPStore listening on that node's address only).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from selfdistill.config import TrainConfig
from selfdistill.learner.batching import MicroBatch, collate, micro_batch_plan
from selfdistill.learner.objectives import build_objective
from selfdistill.learner.objectives.base import ObjectiveInputs
from selfdistill.learner.rendezvous import MasterEnd, rendezvous
from selfdistill.models.attention import attention_kernel, placement_device
from selfdistill.learner.safe_load import load_weights_only
from selfdistill.models import lora
from selfdistill.records import TeacherScores, Trajectory
from selfdistill import weights

DEEPSPEED_TAG = "state"


class LearnerActor:
    """Ray actor (created by `LearnerGroup`); see module docstring."""

    def __init__(self, cfg: TrainConfig, model_path: str, rank: int, world_size: int, master_port: int | None = None,
                 resume_from: str | None = None, master_addr: str = "127.0.0.1"):
        """`master_port` None (how `LearnerGroup` starts its ranks): two phases. Here rank 0 opens the rendezvous
        on its own node (`master_port()` reports the port it holds there) and nothing waits on another rank;
        `start(port)` on every rank then meets the others and loads the model. A port: both at once (one rank
        in one process, as tests and benchmarks make it)."""
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.model_path, self.resume_from, self.master_addr = model_path, resume_from, master_addr
        self.master_end = MasterEnd(master_addr) if rank == 0 and master_port is None else None
        if master_port is not None:
            self.start(master_port)

    def master_port(self) -> int:
        """Rank 0: the port it opened the rendezvous on, on its own node (give it to every rank's `start`)."""
        return self.master_end.port

    def start(self, master_port: int) -> int:
        """Meet the other ranks at (master address, `master_port`), initialise DeepSpeed and load the model;
        returns this process's id."""
        cfg, rank, world_size, master_addr = self.cfg, self.rank, self.world_size, self.master_addr
        model_path, resume_from = self.model_path, self.resume_from
        os.environ.update(
            MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(rank), WORLD_SIZE=str(world_size),
            LOCAL_RANK=str(rank) if not torch.cuda.is_available() else "0",
        )
        import ray

        job = ray.get_runtime_context().get_job_id() if ray.is_initialized() else str(os.getpid())
        # loopback: a file store; a cluster: a TCPStore listening on the master's address only (learner/rendezvous.py)
        meet = rendezvous(master_addr, master_port, rank, world_size, cfg.faults.start_timeout_s, job,
                          self.master_end.fd if self.master_end else None)
        torch.set_num_threads(max(1, int(cfg.learner.num_cpus_per_rank)))
        torch.manual_seed(cfg.run.seed)
        import deepspeed

        # The shared-memory comm op compiles for ~90 s at every init on CPU; gloo needs none of it.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if "store" in meet:  # DeepSpeed takes no store: it adopts the group torch.distributed already has
            torch.distributed.init_process_group(backend, store=meet["store"], rank=rank, world_size=world_size)
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, init_method=meet.get("init_method"),
                                   rank=rank, world_size=world_size)

        self.temperature = cfg.train_temperature
        self.objective = build_objective(cfg.objective)
        self.sender = weights.build_sender(cfg.sync, rank)  # no receivers until connect_weights
        lc = cfg.learner
        self.ds_config = {
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": 1,
            # We decide micro-batches (whole prompt groups) ourselves: backward() accumulates,
            # step() reduces across ranks and updates once per training step.
            "managed_gradient_accumulation": False,
            "gradient_clipping": lc.grad_clip,
            "zero_optimization": {"stage": lc.zero_stage},
            "zero_allow_untested_optimizer": True,
            "bf16": {"enabled": lc.dtype == "bfloat16"},
            "steps_per_print": 1 << 30,
        }
        model = self._load_model(resume_from if resume_from and lc.lora else model_path)
        trainable = [p for p in model.parameters() if p.requires_grad]  # with LoRA: the adapter only
        optimizer = torch.optim.AdamW(trainable, lr=lc.lr, betas=lc.betas, weight_decay=lc.weight_decay)
        warmup = lc.warmup_steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self.ds_config
        )
        load_weights_only(self.engine)  # checkpoints are read without unpickling (learner/safe_load.py)
        self.step = 0
        if resume_from:
            _, client = self.engine.load_checkpoint(str(Path(resume_from) / "deepspeed"), tag=DEEPSPEED_TAG,
                                                    load_module_strict=lc.lora is None)
            self.step = int(client["step"])
        return os.getpid()

    def _load_model(self, path: str):
        """The policy at `path`; with `learner.lora`, base + adapter (the adapter folder at `path`, or a fresh one)."""
        dtype = torch.bfloat16 if self.cfg.learner.dtype == "bfloat16" else torch.float32
        if self.cfg.learner.zero_stage == 3:
            importlib.import_module("torch._dynamo")  # deepspeed.zero.Init fails unless it is imported first
            from transformers.integrations import HfDeepSpeedConfig

            self._hf_ds_config = HfDeepSpeedConfig(self.ds_config)  # must stay alive: partitions at load
        lc = self.cfg.learner.lora
        attn = attention_kernel(self.cfg.learner.attn_implementation, placement_device())
        if lc is None or lora.is_adapter(path):
            return lora.load_policy(path, dtype, trainable=True, attn_implementation=attn)
        from peft import get_peft_model

        return get_peft_model(lora.load_policy(path, dtype, attn_implementation=attn), lora.peft_config(lc, path))

    def ready(self) -> int:
        return os.getpid()

    # ------------------------------------------------------------------ training

    def train_step(self, trajs: list[Trajectory], scores: list[TeacherScores] | None,
                   num_micro_batches: int | None = None) -> dict[str, float]:
        """One optimizer step over this rank's share of the batch (whole prompt groups).

        `num_micro_batches`: forward/backward passes every rank must make (ZeRO's collectives pair
        up across ranks); default: as many as this rank's own micro-batches.
        """
        self.engine.train()
        lc = self.cfg.learner
        pad = self.engine.module.config.pad_token_id or 0
        row_tokens = lc.packed_row_tokens if lc.packing else None
        plan = micro_batch_plan(trajs, lc.micro_batch_groups, lc.micro_batch_tokens, num_micro_batches)
        totals: dict[str, float] = {}
        for idx in plan:
            batch = collate([trajs[i] for i in idx], [scores[i] for i in idx] if scores else None, pad, row_tokens)
            student = self._batch_logprobs(batch)
            learner_lp = student.gather(-1, batch.tokens[..., None]).squeeze(-1).detach()
            old = learner_lp if lc.old_logprobs == "learner" else batch.sampling_logprobs
            is_weights, is_metrics = self._importance_weights(learner_lp, batch)
            inputs = ObjectiveInputs(
                student_logprobs=student, tokens=batch.tokens, mask=batch.mask, old_logprobs=old,
                rewards=batch.rewards, group_ids=batch.group_ids, teacher=batch.teacher, step=self.step,
                is_weights=is_weights,
            )
            loss, metrics = self.objective(inputs)
            metrics.update(is_metrics)
            share = len(idx) / len(trajs)
            self.engine.backward(loss * share, scale_wrt_gas=False)
            metrics = {"loss": float(loss.detach()), **metrics}
            for k, v in metrics.items():
                totals[k] = totals.get(k, 0.0) + share * float(v)
        for _ in range((num_micro_batches or len(plan)) - len(plan)):
            # Fewer groups than passes: a zero-weighted pass on one sequence still runs ZeRO's collectives.
            student = self._batch_logprobs(collate(trajs[:1], None, pad, row_tokens))
            self.engine.backward(student.sum() * 0.0, scale_wrt_gas=False)
        self.engine.step()
        self.step += 1
        grad_norm = self.engine.get_global_grad_norm()
        totals["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
        totals["lr"] = float(self.scheduler.get_last_lr()[0])
        return totals

    def _importance_weights(self, learner_lp, batch):
        """Truncated importance weights min(pi_learner / pi_sampler, cap) for possibly stale rollouts.

        None when rollouts are on-policy (max_staleness 0) or when the PPO ratio already uses the
        sampling log-probs (old_logprobs='sampling').
        """
        if self.cfg.rollout.max_staleness == 0 or self.cfg.learner.old_logprobs == "sampling":
            return None, {}
        with torch.no_grad():
            ratio = torch.exp(learner_lp - batch.sampling_logprobs) * batch.mask
            weights = ratio.clamp(max=self.cfg.learner.tis_cap)
            count = batch.mask.sum().clamp_min(1.0)
            metrics = {"is_weight_mean": float(weights.sum() / count),
                       "is_truncated_frac": float(((ratio > self.cfg.learner.tis_cap) * batch.mask).sum() / count)}
        return weights, metrics

    def _batch_logprobs(self, batch: MicroBatch):
        return self._student_logprobs(batch.input_ids, batch.response_row, batch.response_index,
                                      batch.attention_mask, batch.position_ids)

    def _student_logprobs(self, input_ids, response_row, response_index, attention_mask=None, position_ids=None,
                          temperature: float | None = None):
        """[B, T, V] log-probs at the response positions (row, column) of the (possibly packed) rows."""
        # Only columns holding a response position go through lm_head (prompt columns are most of a row,
        # and the vocabulary projection is a large share of a small model's FLOPs).
        keep = torch.unique(response_index)
        # use_cache=False: with a KV cache, transformers ignores the packed sequences in position_ids.
        logits = self.engine(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             use_cache=False, logits_to_keep=keep).logits
        rows = logits[response_row, torch.searchsorted(keep, response_index)].float()
        rows = rows / (temperature or self.temperature)
        return torch.log_softmax(rows, dim=-1)

    @torch.no_grad()
    def sequence_logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        """log p(x_t | x_<t), t >= 1, at temperature 1 (every rank must call it under ZeRO-3)."""
        self.engine.eval()
        out = []
        for seq in sequences:
            ids = torch.tensor([seq])
            index = torch.arange(len(seq) - 1)[None]
            lp = self._student_logprobs(ids, torch.zeros_like(index), index, temperature=1.0)
            out.append(lp.gather(-1, ids[:, 1:, None]).squeeze(-1)[0].tolist())
        return out

    # ------------------------------------------------------------------ weights out

    def _sync_units(self, merged: bool | None = None) -> list[lora.SyncUnit]:
        """What a sync or checkpoint carries: every weight, or with LoRA the adapter (or, `merged`, base + adapter)."""
        model = self.engine.module
        if self.cfg.learner.lora is None:
            return [(n, [p], lambda p=p: p) for n, p in model.named_parameters()]
        merged = self.cfg.learner.lora.sync == "merged" if merged is None else merged
        return lora.merged_units(model) if merged else lora.adapter_units(model)

    def _gathered_buckets(self, bucket_bytes: int, units: list[lora.SyncUnit], copy: bool = True
                          ) -> Iterator[dict[str, torch.Tensor]]:
        """The units' tensors, in the parameters' own dtype, in buckets; under ZeRO-3 every rank gathers one
        bucket at a time.

        Each tensor is a copy unless `copy` is False and the parameters outlive the pass (ZeRO 0-2): then it
        is the parameter's own storage, for a transport that copies every tensor into buffers of its own.
        A copy is needed where the tensors are kept: under ZeRO 0-2 parameters are views into one flat buffer,
        which pickling (ray.put) or safetensors would take whole, and under ZeRO-3 a bucket's gathered
        storage is released after it.
        """
        import deepspeed

        zero3 = self.cfg.learner.zero_stage == 3
        copy = copy or zero3
        bucket, size = [], 0
        for unit in units + [None]:
            first = None if unit is None else unit[1][0]  # the published tensor has the first part's size
            nbytes = 0 if first is None else (first.ds_numel if zero3 else first.numel()) * first.dtype.itemsize
            if bucket and (unit is None or size + nbytes > bucket_bytes):
                params = [p for _, parts, _ in bucket for p in parts]
                with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=zero3):
                    yield {n: compute().detach().clone() if copy else compute().detach() for n, _, compute in bucket}
                bucket, size = [], 0
            if unit is not None:
                bucket.append(unit)
                size += nbytes

    def _weights(self) -> weights.Weights:
        """What a sync carries: every weight, or with LoRA the adapter (`learner.lora.sync`), in buckets, in the
        learner's parameter dtype (what its own forward computes with)."""
        units = self._sync_units()
        zero3 = self.cfg.learner.zero_stage == 3
        meta = [weights.TensorMeta(name, parts[0].dtype, tuple(parts[0].ds_shape if zero3 else parts[0].shape))
                for name, parts, _ in units]
        lc = self.cfg.learner.lora
        kind = "adapter" if lc is not None and lc.sync != "merged" else "full"
        copy = not self.sender.packs  # a packing transport copies each tensor into its buffers itself
        return weights.Weights(meta, lambda: self._gathered_buckets(self.cfg.sync.bucket_bytes, units, copy), kind)

    def connect_weights(self, receivers: dict, workers: dict[str, int] | None = None) -> None:
        """Join the weight transport with the named receiver actors (every rank calls it; rank 0 sends)."""
        client = weights.Receivers(receivers, workers, self.cfg.sync.timeout_s) if self.rank == 0 else None
        self.sender = weights.build_sender(self.cfg.sync, self.rank, client)
        self.sender.connect(self._weights())

    def publish(self, version: int):
        """Send the current weights to every receiver; rank 0 returns (transport handle, stats), other ranks None.

        The handle is the object store's bucket refs (None for the other transports).
        """
        stats = {"sync/bytes": 0, "sync/buckets": 0}
        sync = self._weights()

        def counted():
            for bucket in sync.buckets():
                stats["sync/bytes"] += sum(t.numel() * t.element_size() for t in bucket.values())
                stats["sync/buckets"] += 1
                yield bucket

        handle = self.sender.send(weights.Weights(sync.meta, counted, sync.kind), version)
        return (handle, stats) if self.rank == 0 else None

    def save_checkpoint(self, path: str, client_state: dict) -> None:
        """Rank 0 writes a Hugging Face folder (safetensors + tokenizer), or with LoRA a PEFT adapter folder;
        every rank writes its DeepSpeed state (with LoRA: the adapter's only)."""
        state = {}
        for bucket in self._gathered_buckets(self.cfg.sync.bucket_bytes, self._sync_units(merged=False)):
            if self.rank == 0:
                state.update(bucket)
        if self.rank == 0:
            from transformers import AutoTokenizer

            Path(path).mkdir(parents=True, exist_ok=True)
            if self.cfg.learner.lora is None:
                self.engine.module.save_pretrained(path, state_dict=state, safe_serialization=True)
            else:
                from safetensors.torch import save_file

                save_file(state, str(Path(path) / lora.ADAPTER_WEIGHTS))
                self.engine.module.peft_config[lora.ADAPTER].save_pretrained(path)
            AutoTokenizer.from_pretrained(self.model_path).save_pretrained(path)
        self.engine.save_checkpoint(str(Path(path) / "deepspeed"), tag=DEEPSPEED_TAG,
                                    client_state={**client_state, "step": self.step},
                                    exclude_frozen_parameters=self.cfg.learner.lora is not None)
