"""Weight transport from the learner to the rollout engines and the teacher, chosen by name.

`publish(buckets, version)` runs on learner rank 0 and returns a handle the driver passes
to every receiver; `receive(handle)` yields (name, tensor) pairs, one bucket at a time, so
a receiver never holds two copies of the model.
"""

from __future__ import annotations

from selfdistill.learner.sync.base import WeightTransport
from selfdistill.learner.sync.object_store import ObjectStoreTransport

TRANSPORTS: dict[str, type[WeightTransport]] = {"object_store": ObjectStoreTransport}


def build_transport(cfg) -> WeightTransport:
    try:
        return TRANSPORTS[cfg.transport](cfg)
    except KeyError:
        raise ValueError(f"sync.transport: unknown transport {cfg.transport!r}; choose from {sorted(TRANSPORTS)}") from None
