"""Weight transport through the Ray object store (CPU, tests, single node).

Each bucket is `ray.put` once on the learner; receivers fetch buckets one at a time.
The handle is the list of object refs, so it crosses actors cheaply.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import ray
import torch

from selfdistill.learner.sync.base import Bucket, WeightTransport


class ObjectStoreTransport(WeightTransport):
    def publish(self, buckets: Iterable[Bucket], version: int) -> list[ray.ObjectRef]:
        return [ray.put({name: t.detach().cpu().contiguous() for name, t in bucket.items()}) for bucket in buckets]

    def receive(self, handle: list) -> Iterator[tuple[str, torch.Tensor]]:
        for ref in handle:
            bucket = ray.get(ref) if isinstance(ref, ray.ObjectRef) else ref
            yield from bucket.items()
