"""The trainer side of vLLM's NCCL backend with its rendezvous served on the sender's held socket.

vLLM 0.32's `NCCLTrainerWeightTransferEngine.trainer_init` opens rank 0's endpoint with
`nccl_common.trainer_init(init_info)` -> `stateless_init_process_group(address, port, ...)` ->
`StatelessProcessGroup.create(host, port, rank, world_size)`, which binds a new socket to the port
there: the port the sender chose earlier could have been taken by then. `StatelessProcessGroup.create`
itself accepts `listen_socket` (its TCPStore then serves on that socket: `create_tcp_store` passes it
as `master_listen_fd`), but neither `trainer_init` nor `stateless_init_process_group` passes one on.
So this engine is vLLM's, with `trainer_init` opening the endpoint the way vLLM's does
(`PyNcclCommunicator(StatelessProcessGroup, device=torch.accelerator.current_device_index())` under
`unpinned_nccl_env()`) from a `StatelessProcessGroup` made on the socket `CollectiveSender` opened
when it chose the port (`listen_fd`). The engines (vLLM workers, teacher) join with vLLM's own
`stateless_init_process_group`: the worker side is unchanged, and backend "nccl" there.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import ClassVar, Self

import torch
from vllm.distributed.weight_transfer.base import VLLMWeightSyncClient, WeightSource
from vllm.distributed.weight_transfer.nccl_common import worker_init_payload
from vllm.distributed.weight_transfer.nccl_engine import (
    NCCLTrainerInitInfo, NCCLTrainerWeightTransferEngine, NCCLWeightTransferInitInfo,
)

from selfdistill.weights.collective import open_with_workers, take_listen_fd


@dataclass
class HeldNCCLTrainerInitInfo(NCCLTrainerInitInfo):
    """vLLM's `NCCLTrainerInitInfo` plus rank 0's socket listening on `master_port` (`listen_fd`); dispatched
    to `HeldNCCLTrainerWeightTransferEngine` by the trainer factory."""

    backend: ClassVar[str] = "nccl_held"

    listen_fd: int | None = None


def trainer_group(init_info: HeldNCCLTrainerInitInfo):
    """Rank 0's vLLM `StatelessProcessGroup` of the transfer group, its TCPStore serving on `listen_fd`
    (None: on a socket `StatelessProcessGroup.create` binds to `master_port` now, as vLLM's does)."""
    from vllm.distributed.utils import StatelessProcessGroup

    fd = take_listen_fd(init_info)
    held = None if fd is None else socket.socket(fileno=fd)
    return StatelessProcessGroup.create(host=init_info.master_address, port=init_info.master_port, rank=0,
                                        world_size=init_info.world_size, listen_socket=held)


class HeldNCCLTrainerWeightTransferEngine(NCCLTrainerWeightTransferEngine):
    """vLLM's NCCL trainer engine; only where rank 0's endpoint listens differs (see the module docstring)."""

    init_info_cls = HeldNCCLTrainerInitInfo

    @classmethod
    def trainer_init(cls, init_info: HeldNCCLTrainerInitInfo, *, client: VLLMWeightSyncClient,
                     source: WeightSource | None = None) -> Self:
        if source is None:
            raise ValueError("NCCL trainer weight transfer requires a WeightSource.")
        engine = cls(client=client, source=source, is_sender=init_info.is_sender, packed=init_info.packed,
                     packed_buffer_size_bytes=init_info.packed_buffer_size_bytes,
                     packed_num_buffers=init_info.packed_num_buffers)
        if not engine.is_sender:
            return engine
        worker_info = NCCLWeightTransferInitInfo(
            master_address=init_info.master_address, master_port=init_info.master_port, rank_offset=1,
            world_size=init_info.world_size, packed=init_info.packed,
            packed_buffer_size_bytes=init_info.packed_buffer_size_bytes,
            packed_num_buffers=init_info.packed_num_buffers)
        engine.model_update_group = open_with_workers(engine.client, worker_init_payload(worker_info),
                                                      lambda: _communicator(trainer_group(init_info)))
        return engine


def _communicator(group):
    """vLLM's trainer endpoint over `group` (as `nccl_common.stateless_init_process_group` makes it)."""
    from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
    from vllm.utils.nccl import unpinned_nccl_env

    with unpinned_nccl_env():
        return PyNcclCommunicator(group, device=torch.accelerator.current_device_index())
