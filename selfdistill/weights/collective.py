"""Weights broadcast through vLLM 0.32's own weight-transfer API: backend `nccl` on GPUs, `gloo` on CPU.

Both sides run vLLM's call sequence. Engine: `WeightTransferConfig(backend=...)` in the engine
args, then `init_weight_transfer_engine`, and per sync `start_weight_update`, `update_weights`,
`finish_weight_update(weight_version=...)`. Learner: the backend's trainer engine from
`WeightTransferTrainerFactory.trainer_init(...)`, whose `send_weights()` drives the engines
through the `Receivers` client while it broadcasts packed buckets (ZeRO-3 parameters are
gathered one bucket at a time by the `Weights` pass it iterates).

`nccl` is vLLM's own backend. `gloo` is ours: the same engines with the NCCL communicator
replaced by a torch `ProcessGroupGloo` (with a timeout, so a lost peer raises instead of
hanging), registered with vLLM's `WeightTransferEngineFactory` and
`WeightTransferTrainerFactory` under the name "gloo". The teacher (a transformers model, not
a vLLM engine) joins the same group and receives the same broadcasts (`CollectiveReceiver`).
"""

from __future__ import annotations

import datetime
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field

from selfdistill.weights.base import (
    TRANSPORT_DOC, SyncCommon, TensorMeta, TrainerEngineSender, WeightSyncError, bucket_plan, meta_from_update_info,
    unpack,
)


class CollectiveConfig(SyncCommon):
    transport: Literal["collective"] = Field("collective", description=TRANSPORT_DOC)
    backend: Literal["gloo", "nccl"] = Field(
        "gloo", description="Communicator of the broadcast: 'gloo' (CPU, ours, registered with vLLM's factory) or "
        "'nccl' (GPU, vLLM's own)."
    )
    master_address: str | None = Field(
        None, description="Address the learner's rank 0 listens on for the group's rendezvous; None: the address of "
        "its Ray node."
    )


def _gloo_group(address: str, port: int, rank: int, world_size: int, timeout_s: float):
    """A gloo process group outside torch.distributed's global state (DeepSpeed owns that one).

    Its timeout bounds every broadcast: a peer that died or stalls raises here after `timeout_s`.
    """
    from torch.distributed import PrefixStore, ProcessGroupGloo

    timeout = datetime.timedelta(seconds=timeout_s)
    store = bound_store(address, port, rank, world_size, timeout_s)
    options = ProcessGroupGloo._Options()
    options._devices = [ProcessGroupGloo.create_device(hostname=_local_address(address))]
    options._timeout = timeout
    return ProcessGroupGloo(PrefixStore("selfdistill-weights", store), rank, world_size, options)


def bound_store(address: str, port: int, rank: int, world_size: int, timeout_s: float, listen_fd: int | None = None):
    """A TCPStore for `world_size` ranks; rank 0 (the master) serves on (address, port) and nowhere else
    (torch's TCPStore alone listens on every interface whatever the address). `listen_fd`: rank 0's socket
    already listening there (`listening_socket`), else rank 0 binds one now."""
    from torch.distributed import TCPStore

    if rank == 0 and listen_fd is None:
        listen_fd = listening_socket(address, port)
    return TCPStore(address, port, world_size, is_master=rank == 0, timeout=datetime.timedelta(seconds=timeout_s),
                    master_listen_fd=listen_fd)


def listening_socket(address: str, port: int) -> int:
    """A socket listening on (address, port) only (port 0: one the OS picks on this machine); its descriptor
    passes to the TCPStore that serves on it."""
    sock = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((address, port))
    sock.listen()
    return sock.detach()


def _local_address(master_address: str) -> str:
    """This process's address towards the master: loopback on one machine, else its Ray node address."""
    if master_address in ("127.0.0.1", "localhost"):
        return "127.0.0.1"
    import ray

    return ray.util.get_node_ip_address()


def receive_buckets(broadcast: Callable[[torch.Tensor], None], meta: list[TensorMeta], buffer_bytes: int,
                    device: torch.device | str = "cpu") -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Receive one sync bucket by bucket (the sender's `bucket_plan` over the same metadata); yield each
    bucket's named tensors (views of its buffer, valid until the next bucket arrives)."""
    for part in bucket_plan([m.nbytes for m in meta], buffer_bytes):
        bucket_meta = [meta[i] for i in part]
        buffer = torch.empty(sum(m.nbytes for m in bucket_meta), dtype=torch.uint8, device=device)
        broadcast(buffer)
        yield unpack(buffer, bucket_meta)


def _gloo_broadcast(group) -> Callable[[torch.Tensor], None]:
    return lambda tensor: group.broadcast(tensor, 0).wait()


# ---------------------------------------------------------------- the gloo backend, in vLLM's classes

def register_gloo() -> None:
    """Register the gloo backend with vLLM's worker and trainer factories (once per process). Also the package's
    `vllm.general_plugins` entry point: vLLM runs it in every process it starts, so the workers of a
    tensor-parallel engine (spawned, not forked, inside a Ray actor) know the backend too."""
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory, WeightTransferTrainerFactory

    for factory, cls in ((WeightTransferEngineFactory, "GlooWeightTransferEngine"),
                         (WeightTransferTrainerFactory, "GlooTrainerWeightTransferEngine")):
        if "gloo" not in factory._registry:
            factory.register_engine("gloo", "selfdistill.weights.gloo_engine", cls)


@dataclass(kw_only=True)
class GlooInitInfo:
    """Worker-side init info of the gloo backend (what `init_weight_transfer_engine` receives)."""

    master_address: str
    master_port: int
    rank_offset: int
    world_size: int
    packed_buffer_size_bytes: int
    timeout_s: float


# ---------------------------------------------------------------- learner side

class CollectiveSender(TrainerEngineSender):
    """Learner side: vLLM's trainer engine of the backend, on every rank (rank 0 opens the group and sends)."""

    def trainer_init_info(self):
        address = self.cfg.master_address or _local_address_of_node()
        if self.cfg.backend == "gloo":
            register_gloo()
        return _trainer_init_info(self.cfg, self.rank, address, _free_port(address), self.receivers.world_size)


def _trainer_init_info(cfg: CollectiveConfig, rank: int, address: str, port: int, world_size: int):
    if cfg.backend == "nccl":
        from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo

        return NCCLTrainerInitInfo(rank=rank, master_address=address, master_port=port, world_size=world_size,
                                   packed=True, packed_buffer_size_bytes=cfg.bucket_bytes)
    from selfdistill.weights.gloo_engine import GlooTrainerInitInfo

    return GlooTrainerInitInfo(rank=rank, master_address=address, master_port=port, world_size=world_size,
                               packed_buffer_size_bytes=cfg.bucket_bytes, timeout_s=cfg.timeout_s)


def _local_address_of_node() -> str:
    import ray

    return ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"


def _free_port(address: str) -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- receiving side outside vLLM (teacher, hf engine)

class CollectiveReceiver:
    """Receiver side. A vLLM engine receives natively (built with `WeightTransferConfig(backend=vllm_backend)`);
    a transformers model (the teacher) joins the same group as one rank and takes the same buckets."""

    def __init__(self, cfg: CollectiveConfig):
        self.cfg = cfg
        self.vllm_backend = cfg.backend
        self.broadcast = None
        self.buffer_bytes = cfg.bucket_bytes
        if cfg.backend == "gloo":
            register_gloo()

    def init(self, init_info: dict) -> None:
        self.buffer_bytes = init_info["packed_buffer_size_bytes"]
        if self.cfg.backend == "gloo":
            info = GlooInitInfo(**init_info)
            group = _gloo_group(info.master_address, info.master_port, info.rank_offset, info.world_size,
                                info.timeout_s)
            self.broadcast = _gloo_broadcast(group)
        else:  # vLLM's NCCL rendezvous, as its workers do it
            from vllm.distributed.weight_transfer.nccl_common import stateless_init_process_group

            comm = stateless_init_process_group(init_info["master_address"], init_info["master_port"],
                                                init_info["rank_offset"], init_info["world_size"],
                                                torch.cuda.current_device())
            self.broadcast = lambda t: comm.broadcast(t, src=0, stream=torch.cuda.current_stream())

    def tensors(self, update_info: dict) -> Iterator[tuple[str, torch.Tensor]]:
        if self.broadcast is None:
            raise WeightSyncError("collective weight transport: update_weights before init_weight_transfer_engine")
        device = "cuda" if self.cfg.backend == "nccl" else "cpu"
        for bucket in receive_buckets(self.broadcast, meta_from_update_info(update_info), self.buffer_bytes, device):
            yield from bucket

