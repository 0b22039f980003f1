"""The weight-transport interface."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from typing import Any

import torch

Bucket = dict[str, torch.Tensor]


class WeightTransport(ABC):
    """Moves full (gathered) weights from learner rank 0 to engines and teacher."""

    def __init__(self, cfg) -> None:
        self.cfg = cfg

    @abstractmethod
    def publish(self, buckets: Iterable[Bucket], version: int) -> Any:
        """Send the buckets (called on learner rank 0); return a handle receivers can use."""

    @abstractmethod
    def receive(self, handle: Any) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (name, tensor) for every parameter of a published version."""
