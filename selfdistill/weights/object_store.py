"""Weights through the Ray object store (CPU, tests, one node or several).

Sending: each bucket is `ray.put` once on learner rank 0; the object refs are the
handle, sent to every receiver in one `update_weights` call. Receiving: buckets are
fetched one at a time as the engine consumes them, so a receiver never holds the model twice.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import torch
from pydantic import Field

from selfdistill.weights.base import TRANSPORT_DOC, Receivers, SyncCommon


class ObjectStoreConfig(SyncCommon):
    transport: Literal["object_store"] = Field("object_store", description=TRANSPORT_DOC)


class ObjectStoreSender:
    """Learner side (every rank iterates the tensors, rank 0 puts and sends)."""

    packs = False  # ray.put keeps the tensors as given: they must own their storage

    def __init__(self, cfg: ObjectStoreConfig, rank: int, receivers: Receivers | None = None):
        self.cfg, self.rank, self.receivers = cfg, rank, receivers

    def connect(self, weights) -> None:
        """Nothing to rendezvous."""

    def send(self, weights, version: int):
        """Put every bucket; on rank 0 have every receiver load them; returns the list of bucket refs (rank 0)."""
        import ray

        if self.rank != 0:
            for _ in weights.buckets():  # take part in the ZeRO-3 gathers
                pass
            return None
        refs = [ray.put(bucket) for bucket in weights.buckets()]
        if self.receivers is not None and self.receivers.actors:
            self.receivers.begin(version, weights.kind)
            self.receivers.start_weight_update()
            self.receivers.update_weights({"refs": refs})
            self.receivers.finish_weight_update()
        return refs


class ObjectStoreReceiver:
    """Engine or teacher side: named tensors out of the bucket refs of one sync."""

    vllm_backend = None  # the engine reloads from named tensors itself

    def __init__(self, cfg: ObjectStoreConfig):
        self.cfg = cfg

    def init(self, init_info: dict) -> None:
        """Nothing to join."""

    def tensors(self, update_info: dict) -> Iterator[tuple[str, torch.Tensor]]:
        return bucket_tensors(update_info["refs"])


def bucket_tensors(buckets: list) -> Iterator[tuple[str, torch.Tensor]]:
    """Named tensors of a list of buckets (dicts of tensors, or Ray refs to them), fetched one at a time."""
    import ray

    for ref in buckets:
        yield from (ray.get(ref) if isinstance(ref, ray.ObjectRef) else ref).items()
