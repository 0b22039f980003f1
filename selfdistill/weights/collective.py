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

The sender holds the group's rendezvous port from choosing it until its store serves on it
(`CollectiveSender`): for `nccl` that takes vLLM's trainer engine with rank 0's endpoint opened on
the held socket (nccl_engine.py).
"""

from __future__ import annotations

import datetime
import os
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

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


def _gloo_group(address: str, port: int, rank: int, world_size: int, timeout_s: float,
                listen_fd: int | None = None):
    """A gloo process group outside torch.distributed's global state (DeepSpeed owns that one).

    Its timeout bounds every broadcast: a peer that died or stalls raises here after `timeout_s`.
    `listen_fd`: rank 0's socket already listening on (address, port) (see `bound_store`).
    """
    from torch.distributed import PrefixStore, ProcessGroupGloo

    timeout = datetime.timedelta(seconds=timeout_s)
    store = bound_store(address, port, rank, world_size, timeout_s, listen_fd)
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
    return _listening(address, port).detach()


def held_port(address: str) -> tuple[int, int]:
    """(descriptor, port) of a socket listening on (address, a port the OS picks there): the port is taken
    from the moment it is chosen, and stays so while the descriptor is held for the store that serves on it."""
    sock = _listening(address, 0)
    port = sock.getsockname()[1]
    return sock.detach(), port


def take_listen_fd(init_info) -> int | None:
    """Hand the descriptor `init_info` holds to the store that will serve on it (once: the store owns it from
    here on, so a failed connect closes only a descriptor that was never handed over)."""
    fd, init_info.listen_fd = init_info.listen_fd, None
    return fd


def _listening(address: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((address, port))
    sock.listen()
    return sock


def _local_address(master_address: str) -> str:
    """This process's address towards the master: loopback on one machine, else its Ray node address."""
    if master_address in ("127.0.0.1", "localhost"):
        return "127.0.0.1"
    import ray

    return ray.util.get_node_ip_address()


def receive_buckets(start: Callable[[torch.Tensor], Any], meta: list[TensorMeta], buffer_bytes: int,
                    device: torch.device | str = "cpu") -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Receive one sync bucket by bucket (the sender's `bucket_plan` over the same metadata); yield each
    bucket's named tensors (views of its buffer, valid until the next bucket arrives).

    `start(buffer)` begins receiving into the buffer and returns what to `wait()` on. Bucket k+1's receive
    starts before bucket k is yielded, so it arrives while the receiver loads bucket k (two buffers live)."""
    plan = bucket_plan([m.nbytes for m in meta], buffer_bytes)

    def begin(part: range):
        bucket_meta = [meta[i] for i in part]
        buffer = torch.empty(sum(m.nbytes for m in bucket_meta), dtype=torch.uint8, device=device)
        return buffer, bucket_meta, start(buffer)

    pending = begin(plan[0]) if plan else None
    for k in range(len(plan)):
        buffer, bucket_meta, receiving = pending
        receiving.wait()
        pending = begin(plan[k + 1]) if k + 1 < len(plan) else None
        yield unpack(buffer, bucket_meta)


def _gloo_broadcast(group) -> Callable[[torch.Tensor], Any]:
    """Start a broadcast from rank 0 on the gloo group; returns its work (`wait()` raises past the timeout)."""
    return lambda tensor: group.broadcast(tensor, 0)


class _Enqueued:
    """A collective enqueued on the current CUDA stream: what follows on that stream runs after it."""

    def wait(self) -> None:
        pass


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


def register_nccl_held() -> None:
    """Register the trainer side of the NCCL backend whose rendezvous serves on the sender's held socket
    (`nccl_engine.py`) under "nccl_held" (trainer factory only: the engines receive with vLLM's own "nccl")."""
    from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory

    if "nccl_held" not in WeightTransferTrainerFactory._registry:
        WeightTransferTrainerFactory.register_engine("nccl_held", "selfdistill.weights.nccl_engine",
                                                     "HeldNCCLTrainerWeightTransferEngine")


def open_with_workers(client, worker_info: dict, open_endpoint: Callable[[], object]):
    """Rank 0's endpoint, opened while the receivers join the group (`init_weight_transfer_engine` blocks
    until every rank has joined, so both sides rendezvous together); a receiver's error is raised first."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1) as exe:
        future = exe.submit(client.init_weight_transfer_engine, worker_info)
        try:
            endpoint = open_endpoint()
        except Exception:
            future.result()  # a receiver's error names it
            raise
        future.result()
    return endpoint


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
    """Learner side: vLLM's trainer engine of the backend, on every rank (rank 0 opens the group and sends).

    Rank 0 (the sender, on its own node) chooses the rendezvous port by opening a socket that listens on
    (master address, a port the OS picks) and holds it: its descriptor travels in the init info
    (`listen_fd`) to the store that serves the group on it, so no other process can take the port between
    choosing it and serving on it (closing a probe socket and binding again later leaves that window open).
    gloo: our `_gloo_group` serves on it (`bound_store`). NCCL: vLLM's trainer engine opens its endpoint
    with `nccl_common.trainer_init(init_info)`, whose `StatelessProcessGroup.create` is called without
    the `listen_socket` it accepts, so the trainer side is vLLM's engine with that one call given the held
    socket (`nccl_engine.HeldNCCLTrainerWeightTransferEngine`, registered as "nccl_held"); the engines
    receive with vLLM's own "nccl" backend, unchanged. The other ranks open nothing (port 0: they do not
    rendezvous). The descriptor is the store's once `connect` runs the engine's `trainer_init`.
    """

    def trainer_init_info(self):
        address = self.cfg.master_address or _local_address_of_node()
        if self.cfg.backend == "gloo":
            register_gloo()
        else:
            register_nccl_held()
        listen_fd, port = held_port(address) if self.rank == 0 else (None, 0)
        return _trainer_init_info(self.cfg, self.rank, address, port, listen_fd, self.receivers.world_size)

    def release(self, init_info) -> None:
        fd = take_listen_fd(init_info)
        if fd is not None:  # the connect failed before a store took the port: free it
            os.close(fd)


def _trainer_init_info(cfg: CollectiveConfig, rank: int, address: str, port: int, listen_fd: int | None,
                       world_size: int):
    if cfg.backend == "nccl":
        from selfdistill.weights.nccl_engine import HeldNCCLTrainerInitInfo

        return HeldNCCLTrainerInitInfo(rank=rank, master_address=address, master_port=port, world_size=world_size,
                                       packed=True, packed_buffer_size_bytes=cfg.bucket_bytes, listen_fd=listen_fd)
    from selfdistill.weights.gloo_engine import GlooTrainerInitInfo

    return GlooTrainerInitInfo(rank=rank, master_address=address, master_port=port, world_size=world_size,
                               packed_buffer_size_bytes=cfg.bucket_bytes, timeout_s=cfg.timeout_s,
                               listen_fd=listen_fd)


def _local_address_of_node() -> str:
    import ray

    return ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"


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
            def broadcast(tensor: torch.Tensor) -> _Enqueued:
                comm.broadcast(tensor, src=0, stream=torch.cuda.current_stream())
                return _Enqueued()

            self.broadcast = broadcast

    def tensors(self, update_info: dict) -> Iterator[tuple[str, torch.Tensor]]:
        if self.broadcast is None:
            raise WeightSyncError("collective weight transport: update_weights before init_weight_transfer_engine")
        device = "cuda" if self.cfg.backend == "nccl" else "cpu"
        for bucket in receive_buckets(self.broadcast, meta_from_update_info(update_info), self.buffer_bytes, device):
            yield from bucket

