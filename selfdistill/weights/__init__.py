"""Weight transports: the learner's weights (or a LoRA adapter) to every rollout engine and the teacher.

One file per transport, each holding its config, its sending side and its receiving side:

- `object_store` (object_store.py): buckets `ray.put` on learner rank 0, fetched by receivers.
- `collective` (collective.py, gloo_engine.py): a broadcast through vLLM 0.32's weight-transfer
  API, backend `nccl` on GPUs (vLLM's) or `gloo` on CPU (ours, registered with vLLM's factories).
- `ipc` (ipc.py): vLLM's CUDA IPC backend, for engines colocated with the learner.

This package imports none of rollout/, teacher/ or learner/; they all import it. vLLM is
imported only inside the collective and ipc transports, when they are used.

The interface
-------------
What travels is a `Weights`: `meta` (a `TensorMeta` per tensor: name, wire dtype, full
shape), `buckets()` (a fresh pass over dicts of named tensors, in `meta` order; called on
every learner rank in lockstep, each bucket one ZeRO-3 gather), and `kind` ("full", or e.g.
"adapter": receivers get it as `update_info["kind"]`, and the version being sent as
`update_info["version"]`). Any set of named tensors can travel.

Learner side, on every rank: `sender = build_sender(cfg, rank, receivers)` where `receivers`
(rank 0) is a `Receivers` client over the receiving Ray actors by name; then
`sender.connect(weights)` once (the rendezvous: every receiver joins at once) and
`sender.send(weights, version)` per sync (object store: returns the bucket refs on rank 0).

Receiving side: each receiving actor exposes vLLM's four control-plane calls, which the
`Receivers` client fans out to all of them at once, each bounded by `sync.timeout_s`:
`init_weight_transfer_engine(init_info)`, `start_weight_update()`,
`update_weights(update_info)` (possibly several per sync), `finish_weight_update(weight_version)`.
Inside, `receiver = build_receiver(cfg)`: a vLLM engine built with
`WeightTransferConfig(backend=receiver.vllm_backend)` (when not None) forwards the calls
to vLLM; anything else calls `receiver.init(init_info)` and applies
`receiver.tensors(update_info)`, an iterator of (name, tensor).
A receiver that fails or does not answer in time raises `WeightSyncError` naming it.
"""

from __future__ import annotations

from typing import Annotated, Union

from pydantic import Discriminator, Tag

from selfdistill.weights.base import (
    Bucket, Receivers, TensorMeta, Weights, WeightSyncError, bucket_plan, checked, without_header,
)
from selfdistill.weights.collective import CollectiveConfig, CollectiveReceiver, CollectiveSender
from selfdistill.weights.ipc import IpcConfig, IpcReceiver, IpcSender
from selfdistill.weights.object_store import ObjectStoreConfig, ObjectStoreReceiver, ObjectStoreSender



def _transport(value) -> str | None:
    """The union's tag: `transport`, 'object_store' where a config leaves it out."""
    return value.get("transport", "object_store") if isinstance(value, dict) else getattr(value, "transport", None)


SyncConfig = Annotated[
    Union[Annotated[ObjectStoreConfig, Tag("object_store")], Annotated[CollectiveConfig, Tag("collective")],
          Annotated[IpcConfig, Tag("ipc")]],
    Discriminator(_transport, custom_error_type="sync_transport",
                  custom_error_message="sync.transport must be 'object_store', 'collective' or 'ipc'"),
]

_SENDERS = {"object_store": ObjectStoreSender, "collective": CollectiveSender, "ipc": IpcSender}
_RECEIVERS = {"object_store": ObjectStoreReceiver, "collective": CollectiveReceiver, "ipc": IpcReceiver}


def build_sender(cfg, rank: int, receivers: Receivers | None = None):
    """The learner side of `cfg.transport` for learner rank `rank` (rank 0 sends, to `receivers`)."""
    return _SENDERS[cfg.transport](cfg, rank, receivers)


def build_receiver(cfg):
    """The receiving side of `cfg.transport`, in an engine or teacher process."""
    return _RECEIVERS[cfg.transport](cfg)


__all__ = ["Bucket", "CollectiveConfig", "IpcConfig", "ObjectStoreConfig", "Receivers", "SyncConfig", "TensorMeta",
           "WeightSyncError", "Weights", "bucket_plan", "build_receiver", "build_sender", "checked",
           "without_header"]
