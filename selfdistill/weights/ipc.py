"""Weights shared through CUDA IPC handles, for engines colocated with the learner on the same GPUs.

vLLM's own `ipc` backend on both sides: the engine is built with
`WeightTransferConfig(backend="ipc")`; the learner's trainer engine
(`IPCTrainerWeightTransferEngine`, packed) runs on every learner rank: each rank copies the
bucket (gathered in full on every rank, ZeRO-3 included) into a shared buffer on its own GPU and
exports its IPC handle keyed by its GPU's UUID; the handles are all-gathered over the learner's
process group (DeepSpeed's default group: exactly the learner ranks), and rank 0 ships the merged
{UUID: handle} map with the bucket's metadata in one `update_weights` call per bucket to every
engine. Each engine worker maps the entry of its own GPU, that is the buffer of the learner rank
colocated with it (`launch.placement.ipc_routes` lists the pairs a layout makes; a worker whose GPU
has no entry fails naming its engine). Nothing is copied between processes.
Needs CUDA and colocated GPU engines (refused otherwise by `launch.placement.check_modes`, as is a
live or EMA teacher, which has a GPU of its own); on CPU `check_update_info` (the handle metadata)
and `handle_for` are what runs.
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
    """Learner side: vLLM's IPC trainer engine on every rank (each exports its own GPU's buffer; rank 0 ships
    the merged handles of all ranks)."""

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


def handle_for(update_info: dict, gpu_uuid: str) -> tuple:
    """The handle a receiver on GPU `gpu_uuid` maps: the buffer of the learner rank on that GPU (vLLM's consumer
    looks it up the same way), or an error listing the GPUs the learner ranks hold."""
    handles = update_info["ipc_handles"]
    if gpu_uuid not in handles:
        raise WeightSyncError(f"ipc weight transport: no learner rank shares this GPU ({gpu_uuid}); the learner "
                              f"ranks' GPUs are {sorted(handles)}: a receiver must be colocated with a learner rank")
    return handles[gpu_uuid]


class IpcReceiver:
    """Receiver side. A vLLM engine receives natively (`vllm_backend`); a receiver that applies the tensors
    itself (an engine serving a LoRA adapter) maps its GPU's shared buffer of each bucket and copies out of it."""

    vllm_backend = "ipc"

    def __init__(self, cfg: IpcConfig):
        self.cfg = cfg

    def init(self, init_info: dict) -> None:
        if not init_info.get("packed", False):
            raise WeightSyncError("ipc weight transport: a non-vLLM receiver takes packed buckets only")

    def tensors(self, update_info: dict) -> Iterator[tuple[str, torch.Tensor]]:
        from torch.multiprocessing.reductions import rebuild_cuda_tensor

        meta = check_update_info(update_info)
        device = torch.cuda.current_device()
        args = list(handle_for(update_info, str(torch.cuda.get_device_properties(device).uuid)))
        args[6] = device  # rebuild on this process's device index
        buffer = rebuild_cuda_tensor(*args)
        for name, view in unpack(buffer, meta):
            yield name, view.clone()  # the learner reuses the buffer for the next bucket
