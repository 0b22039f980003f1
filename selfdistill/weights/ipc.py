"""Weights shared through CUDA IPC handles, for engines colocated with the learner on the same GPUs.

vLLM's own `ipc` backend on both sides: the engine is built with
`WeightTransferConfig(backend="ipc")`; the learner's trainer engine
(`IPCTrainerWeightTransferEngine`, packed) copies each bucket into one shared GPU buffer and
ships its IPC handle (keyed by the GPU's UUID) with the bucket's metadata in one
`update_weights` call per bucket. Nothing is copied between processes: the engine maps the
buffer and loads from it. A colocated teacher maps the same handles (`IpcReceiver`).
Needs CUDA; on CPU `check_update_info` (the handle metadata) is what runs.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import torch
from pydantic import Field

from selfdistill.weights.base import TRANSPORT_DOC, SyncCommon, TrainerEngineSender, WeightSyncError, \
    meta_from_update_info, unpack


class IpcConfig(SyncCommon):
    transport: Literal["ipc"] = Field("ipc", description=TRANSPORT_DOC)


class IpcSender(TrainerEngineSender):
    """Learner side: vLLM's IPC trainer engine on every rank (rank 0 ships the handles)."""

    def trainer_init_info(self):
        from vllm.distributed.weight_transfer.ipc_engine import IPCTrainerInitInfo

        if not torch.cuda.is_available():
            raise WeightSyncError("sync.transport='ipc' shares CUDA memory and needs a GPU; on CPU use 'collective' "
                                  "(backend gloo) or 'object_store'")
        return IPCTrainerInitInfo(rank=self.rank, packed=True, packed_buffer_size_bytes=self.cfg.bucket_bytes)


def check_update_info(update_info: dict) -> list:
    """The metadata of one IPC bucket, checked: byte sizes must match shapes x dtypes (they cut the shared
    buffer: a mismatch would read neighbouring tensors), and the handle must be one dict keyed by GPU UUID."""
    meta = meta_from_update_info(update_info)
    sizes = update_info.get("tensor_sizes")
    if sizes is None or len(sizes) != len(meta):
        raise ValueError(f"ipc update_info: tensor_sizes {sizes!r} must give one byte size per tensor ({len(meta)})")
    for m, size in zip(meta, sizes):
        if m.nbytes != size:
            raise ValueError(f"ipc update_info: {m.name!r} {m.dtype} {m.shape} holds {m.nbytes} bytes, "
                             f"tensor_sizes says {size}")
    handles = update_info.get("ipc_handles")
    if not isinstance(handles, dict) or not handles:
        raise ValueError("ipc update_info: ipc_handles must map GPU UUIDs to a packed buffer's handle")
    return meta


class IpcReceiver:
    """Receiver side. A vLLM engine receives natively (`vllm_backend`); a colocated teacher maps the shared
    buffer of each bucket and copies out of it."""

    vllm_backend = "ipc"

    def __init__(self, cfg: IpcConfig):
        self.cfg = cfg

    def init(self, init_info: dict) -> None:
        if not init_info.get("packed", False):
            raise WeightSyncError("ipc weight transport: the teacher receives packed buckets only")

    def tensors(self, update_info: dict) -> Iterator[tuple[str, torch.Tensor]]:
        from torch.multiprocessing.reductions import rebuild_cuda_tensor

        meta = check_update_info(update_info)
        device = torch.cuda.current_device()
        uuid = str(torch.cuda.get_device_properties(device).uuid)
        if uuid not in update_info["ipc_handles"]:
            raise WeightSyncError(f"ipc weight transport: no handle for this GPU ({uuid}); the teacher must be "
                                  f"colocated with the learner's rank 0")
        args = list(update_info["ipc_handles"][uuid])
        args[6] = device  # rebuild on this process's device index
        buffer = rebuild_cuda_tensor(*args)
        for name, view in unpack(buffer, meta):
            yield name, view.clone()  # the learner reuses the buffer for the next bucket
