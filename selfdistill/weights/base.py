"""What every transport shares: the config fields, bucket plans, metadata checks, and the receivers' client.

The client drives receivers (rollout engines, teacher) through the four calls of vLLM's
weight-sync control plane (`vllm.distributed.weight_transfer.base.VLLMWeightSyncClient`);
every call fans out to all receivers at once and waits until one deadline per sync, so a
receiver that dies or stalls becomes an error that names it instead of a hang.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from pydantic import BaseModel, ConfigDict, Field

Bucket = dict[str, torch.Tensor]


TRANSPORT_DOC = ("Weight transport: 'object_store' (Ray object store), 'collective' (vLLM's weight-transfer API "
                 "over gloo or NCCL) or 'ipc' (CUDA IPC, colocated engines). See selfdistill/weights/.")


class SyncCommon(BaseModel):
    """Fields every transport has."""

    model_config = ConfigDict(extra="forbid")

    bucket_mb: float = Field(64.0, gt=0, description="Weights travel in buckets of at most this many MiB.")
    check_every: int = Field(
        0, ge=0, description="Every N steps compare engine and learner log-probs after a sync (0: off; tests use 1)."
    )
    timeout_s: float = Field(
        300.0, gt=0,
        description="A sync (every receiver idle, weights sent, every receiver committed) that takes longer raises "
        "an error naming the engine or teacher that did not answer; the run never hangs on a lost receiver.",
    )

    @property
    def bucket_bytes(self) -> int:
        return int(self.bucket_mb * 2**20)


class WeightSyncError(RuntimeError):
    """A sync that failed or did not finish in time; the message names the receiver."""


@dataclass(frozen=True)
class TensorMeta:
    """Name, wire dtype and full shape of one published tensor."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def bucket_plan(sizes: list[int], buffer_bytes: int) -> list[range]:
    """Cut tensors (byte sizes, in order) into packed buckets: a bucket closes once it holds more than
    `buffer_bytes` (the rule of vLLM's packed NCCL producer and consumer), so a tensor larger than the
    buffer travels alone. Sender and receivers both compute it from the same metadata."""
    plan, start, total = [], 0, 0
    for i, size in enumerate(sizes):
        total += size
        if total > buffer_bytes:
            plan.append(range(start, i + 1))
            start, total = i + 1, 0
    if start < len(sizes):
        plan.append(range(start, len(sizes)))
    return plan


def checked(named_tensors: Iterable[tuple[str, torch.Tensor]], meta: list[TensorMeta]
            ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield the tensors, raising before the first one that disagrees with the metadata receivers were given
    (a receiver sizes its buffers from the metadata: a mismatch would hang a collective or load garbage)."""
    count = 0
    for name, tensor in named_tensors:
        if count >= len(meta):
            raise ValueError(f"weights to send hold more tensors than their metadata ({len(meta)}); first extra {name!r}")
        want = meta[count]
        if name != want.name or tensor.dtype != want.dtype or tuple(tensor.shape) != want.shape:
            raise ValueError(f"weights to send disagree with their metadata at tensor {count}: declared {want.name!r} "
                             f"{want.dtype} {want.shape}, got {name!r} {tensor.dtype} {tuple(tensor.shape)}")
        count += 1
        yield name, tensor
    if count != len(meta):
        raise ValueError(f"weights to send hold {count} tensors but their metadata declares {len(meta)}; "
                         f"the first missing is {meta[count].name!r}")


def pack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """One contiguous uint8 buffer holding the tensors back to back."""
    return torch.cat([t.contiguous().view(-1).view(torch.uint8) for t in tensors])


def unpack(buffer: torch.Tensor, meta: list[TensorMeta]) -> list[tuple[str, torch.Tensor]]:
    """The named tensors a `pack` buffer holds (views of it)."""
    parts = buffer.split([m.nbytes for m in meta])
    return [(m.name, part.view(m.dtype).view(m.shape)) for m, part in zip(meta, parts, strict=True)]


def update_info(meta: list[TensorMeta]) -> dict:
    """Per-round metadata in the form of vLLM's NCCL/IPC update info (names, dtype names, shapes)."""
    return {"names": [m.name for m in meta], "dtype_names": [str(m.dtype).removeprefix("torch.") for m in meta],
            "shapes": [list(m.shape) for m in meta]}


SYNC_HEADER = ("kind", "version")  # what `Receivers` adds to vLLM's update_info: the tensors' kind, the version


def without_header(update_info: dict) -> dict:
    """vLLM's own update_info, without the keys `Receivers` adds (`SYNC_HEADER`)."""
    return {k: v for k, v in update_info.items() if k not in SYNC_HEADER}


def meta_from_update_info(info: dict) -> list[TensorMeta]:
    """The inverse of `update_info`."""
    return [TensorMeta(n, getattr(torch, d), tuple(s)) for n, d, s in
            zip(info["names"], info["dtype_names"], info["shapes"], strict=True)]


class Receivers:
    """vLLM's `VLLMWeightSyncClient` over named Ray actors (engines, teacher), bounded by one deadline per sync.

    Each receiver exposes `init_weight_transfer_engine(init_info)`, `start_weight_update()`,
    `update_weights(update_info)` and `finish_weight_update(weight_version)`. `workers[name]` is how many
    ranks a receiver takes in a collective group (its tensor-parallel size); receiver i's ranks start at
    `rank_offset` + the ranks of the receivers before it.
    """

    def __init__(self, actors: dict, workers: dict[str, int] | None = None, timeout_s: float = 300.0):
        self.actors, self.timeout_s = dict(actors), timeout_s
        self.workers = {name: (workers or {}).get(name, 1) for name in self.actors}
        self.version: int | None = None
        self.kind = "full"
        self.deadline = time.monotonic() + timeout_s
        self.last: tuple[dict, str] = ({}, "")  # the latest fan-out: receiver -> ref, and the call

    @property
    def world_size(self) -> int:
        """Sender (rank 0) plus every receiver rank."""
        return 1 + sum(self.workers.values())

    def begin(self, version: int, kind: str = "full") -> None:
        """Start a sync of `version` carrying `kind` tensors: every call until the next `begin` must finish
        within `timeout_s`."""
        self.version, self.kind, self.deadline = version, kind, time.monotonic() + self.timeout_s

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        self.deadline = time.monotonic() + self.timeout_s
        offset = 0
        calls = {}
        for name, actor in self.actors.items():
            info = {**init_info, "rank_offset": init_info["rank_offset"] + offset} if "rank_offset" in init_info \
                else init_info
            calls[name] = actor.init_weight_transfer_engine.remote(info)
            offset += self.workers[name]
        self._wait(calls, "init_weight_transfer_engine")

    def start_weight_update(self) -> None:
        self._wait({n: a.start_weight_update.remote() for n, a in self.actors.items()}, "start_weight_update")

    def update_weights(self, update_info) -> None:
        payload = {**update_info, "kind": self.kind, "version": self.version}
        self._wait({n: a.update_weights.remote(payload) for n, a in self.actors.items()}, "update_weights")

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        version = weight_version if weight_version is not None else str(self.version)
        self._wait({n: a.finish_weight_update.remote(version) for n, a in self.actors.items()},
                   "finish_weight_update")

    def failure(self) -> WeightSyncError | None:
        """After the sender failed: the error of the receiver that caused it (waiting up to the deadline), if any."""
        calls, what = self.last
        try:
            self._collect(calls, what)
        except WeightSyncError as error:
            return error
        return None

    def _wait(self, calls: dict, what: str) -> None:
        self.last = (calls, what)
        self._collect(calls, what)

    def _collect(self, calls: dict, what: str) -> None:
        import ray

        pending = {ref: (name, what) for name, ref in calls.items()}
        while pending:
            left = self.deadline - time.monotonic()
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=max(0.0, left))
            if not ready:
                late = ", ".join(sorted(f"{name} ({what})" for name, what in pending.values()))
                raise WeightSyncError(f"weight sync of version {self.version}: {late} did not answer within "
                                      f"sync.timeout_s={self.timeout_s:g} s")
            name, what = pending.pop(ready[0])
            try:
                ray.get(ready[0])
            except Exception as error:
                raise WeightSyncError(f"weight sync of version {self.version}: {name} failed in {what}: "
                                      f"{_last_line(error)}") from error


def _last_line(error: Exception) -> str:
    """The innermost message of a (Ray-wrapped) error."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(error).__name__


@dataclass
class Weights:
    """What one sync carries: the tensors' metadata, a fresh pass over their buckets, and their kind.

    `buckets()` is called once per sync on every learner rank (under ZeRO-3 each bucket is a collective
    gather, so ranks iterate in lockstep); the tensors it yields must match `meta` in order, dtype and shape.
    `kind` tells receivers what the tensors are: "full" model weights, or e.g. "adapter" (LoRA).
    """

    meta: list[TensorMeta]
    buckets: Callable[[], Iterable[Bucket]]
    kind: str = "full"

    def named_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for bucket in self.buckets():
            yield from bucket.items()


class TrainerEngineSender:
    """Learner side of a transport built on vLLM's trainer engines: `trainer_init` on every rank at connect
    (rank 0 drives the receivers through the `Receivers` client), `send_weights()` per sync."""

    packs = True  # vLLM's packed producers copy every tensor into a buffer: views of parameters are fine

    def __init__(self, cfg: SyncCommon, rank: int, receivers: Receivers | None = None):
        self.cfg, self.rank = cfg, rank
        self.receivers = receivers if receivers is not None else Receivers({}, timeout_s=cfg.timeout_s)
        self.engine = None
        self.source = None

    def trainer_init_info(self):
        """The backend's `TrainerInitInfo` for this rank."""
        raise NotImplementedError

    def connect(self, weights: Weights) -> None:
        """Rendezvous with every receiver (every learner rank calls it)."""
        from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource
        from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory

        class Source(WeightSource):
            """vLLM's `WeightSource` over the `Weights` of the current sync (replaced before each send)."""

            def __init__(self, current: Weights):
                self.current = current

            def metadata(self) -> list:
                return [ParamMeta(m.name, m.dtype, m.shape) for m in self.current.meta]

            def __iter__(self):
                return self.current.named_tensors()

        self.source = Source(weights)
        info = self.trainer_init_info()
        try:
            self.receivers.begin(-1)
            self.engine = WeightTransferTrainerFactory.trainer_init(info, client=self.receivers, source=self.source)
        except BaseException:
            self.release(info)
            raise

    def release(self, init_info) -> None:
        """Free what `trainer_init_info` took (a port, a descriptor) when the connect that used it failed."""

    def send(self, weights: Weights, version: int):
        """Send one version to every receiver (every rank calls it); raises naming a receiver that failed."""
        if self.engine is None:
            raise WeightSyncError(f"sync.transport={self.cfg.transport!r}: send before connect (no receivers joined)")
        self.source.current = weights
        self.receivers.begin(version, weights.kind)
        try:
            self.engine.send_weights()
        except WeightSyncError:
            raise
        except Exception as error:
            cause = self.receivers.failure() if self.rank == 0 else None
            if cause is not None:
                raise cause from error
            raise
        return None
