"""The gloo backend of vLLM's weight-transfer API (part of the collective transport, `weights/collective.py`).

vLLM's NCCL engines with the communicator swapped: the worker engine keeps NCCL's layerwise
reload (`start_weight_update` / `finish_weight_update`) and loads each received bucket with
`model.load_weights`; the trainer engine keeps NCCL's `send_weights` (metadata checked
against the tensors, `update_weights` run on the engines while it broadcasts). Only the
broadcast differs: a packed uint8 buffer per bucket over a `ProcessGroupGloo`, one bucket in
flight while the next is packed (sender) or the last is loaded (receiver). vLLM imports
this module when the backend is first used (registered by `collective.register_gloo`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import ClassVar, Self

import torch
from vllm.distributed.weight_transfer.base import ParamMeta, TrainerInitInfo, VLLMWeightSyncClient, WeightSource
from vllm.distributed.weight_transfer.nccl_engine import (
    NCCLTrainerWeightTransferEngine, NCCLWeightTransferEngine, NCCLWeightTransferUpdateInfo,
)

from selfdistill.weights.base import TensorMeta, bucket_plan, pack
from selfdistill.weights.collective import (
    GlooInitInfo,
    _gloo_broadcast,
    _gloo_group,
    open_with_workers,
    receive_buckets,
    take_listen_fd,
)


@dataclass
class GlooTrainerInitInfo(TrainerInitInfo):
    """Trainer-side init info of the gloo backend (the factory dispatches on `backend`)."""

    backend: ClassVar[str] = "gloo"

    master_address: str
    master_port: int
    world_size: int
    packed_buffer_size_bytes: int
    timeout_s: float
    listen_fd: int | None = None  # rank 0: its socket listening on master_port (`collective.held_port`)


class GlooWeightTransferEngine(NCCLWeightTransferEngine):
    """Worker side: joins the gloo group at `rank_offset` + its rank, receives packed buckets."""

    init_info_cls = GlooInitInfo
    update_info_cls = NCCLWeightTransferUpdateInfo

    def init_transfer_engine(self, init_info: GlooInitInfo) -> None:
        parallel = self.parallel_config
        rank = init_info.rank_offset + parallel.data_parallel_index * parallel.world_size + parallel.rank
        self.packed, self.packed_buffer_size_bytes = True, init_info.packed_buffer_size_bytes
        group = _gloo_group(init_info.master_address, init_info.master_port, rank, init_info.world_size,
                            init_info.timeout_s)
        self.model_update_group = group
        self._broadcast = _gloo_broadcast(group)

    def update_weights(self, update_info: dict) -> None:
        # The base class ends with torch.accelerator.synchronize(), which raises where there is no accelerator;
        # gloo broadcasts are synchronous.
        self.receive_weights(self.parse_update_info(update_info))

    def receive_weights(self, update_info: NCCLWeightTransferUpdateInfo) -> None:
        if self.model_update_group is None:
            raise RuntimeError("gloo weight transfer not initialized: call init_weight_transfer_engine first")
        meta = [TensorMeta(n, getattr(torch, d), tuple(s))
                for n, d, s in zip(update_info.names, update_info.dtype_names, update_info.shapes)]
        for bucket in receive_buckets(self._broadcast, meta, self.packed_buffer_size_bytes, self.device):
            self.model.load_weights(bucket)

    def shutdown(self) -> None:
        self.model_update_group = None


class GlooTrainerWeightTransferEngine(NCCLTrainerWeightTransferEngine):
    """Trainer side: NCCL's `send_weights` round trip with gloo broadcasts of packed buckets."""

    init_info_cls = GlooTrainerInitInfo

    @classmethod
    def trainer_init(cls, init_info: GlooTrainerInitInfo, *, client: VLLMWeightSyncClient,
                     source: WeightSource | None = None) -> Self:
        if source is None:
            raise ValueError("gloo trainer weight transfer requires a WeightSource.")
        engine = cls(client=client, source=source, is_sender=init_info.is_sender, packed=True,
                     packed_buffer_size_bytes=init_info.packed_buffer_size_bytes)
        if not engine.is_sender:
            return engine
        worker_info = GlooInitInfo(master_address=init_info.master_address, master_port=init_info.master_port,
                                   rank_offset=1, world_size=init_info.world_size,
                                   packed_buffer_size_bytes=init_info.packed_buffer_size_bytes,
                                   timeout_s=init_info.timeout_s)
        engine.model_update_group = open_with_workers(
            engine.client, asdict(worker_info),
            lambda: _gloo_group(init_info.master_address, init_info.master_port, 0, init_info.world_size,
                                init_info.timeout_s, take_listen_fd(init_info)))
        return engine

    def _broadcast(self, source: WeightSource, meta: list[ParamMeta]) -> None:
        if not self.is_sender:
            for _ in source:  # take part in the trainer-side gathers
                pass
            return
        start = _gloo_broadcast(self.model_update_group)
        pairs = self._checked_iter(source, meta)
        sending = None  # (work, buffer) of the bucket on the wire: bucket k+1 is packed while k travels
        for part in bucket_plan([TensorMeta(m.name, m.dtype, m.shape).nbytes for m in meta],
                                self.packed_buffer_size_bytes):
            buffer = pack([next(pairs)[1] for _ in part])
            if sending is not None:
                sending[0].wait()
            sending = (start(buffer), buffer)
        if sending is not None:
            sending[0].wait()
        for _ in pairs:  # ends the check: raises if the source yields more than its metadata declares
            pass

    def shutdown(self) -> None:
        self.model_update_group = None
