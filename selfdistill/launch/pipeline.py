"""The rollout pipeline: batches are made in a background thread, at most `max_staleness`
weight versions ahead of the learner.

The batch for step n needs weights of version >= n - 1 - max_staleness (version v = the
learner after v steps). With max_staleness 0 the thread waits for step n-1's weights before
it starts step n: strictly on-policy, one stage after another. With k > 0, generation,
verification and teacher scoring for step n+k run while the learner trains step n.

Checkpoint steps are barriers: the batch after a checkpoint step c waits for version c, in
the run that wrote checkpoint c and in a run resumed from it alike, so resuming continues
exactly as the uninterrupted run would have (a batch made from pre-checkpoint weights could
not be remade after a restart).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Collection
from typing import Any


class RolloutPipeline:
    """Calls `produce(step)` for steps first..last in order, in a thread; `get(step)` returns its result."""

    def __init__(self, produce: Callable[[int], Any], first: int, last: int, max_staleness: int,
                 barriers: Collection[int] = ()):
        self.produce, self.first, self.last, self.max_staleness = produce, first, last, max_staleness
        self.barriers = set(barriers)  # steps whose successor waits for their weights (checkpoints)
        self.version = first - 1  # weights the engines hold when the pipeline starts
        self.ready: queue.Queue = queue.Queue()
        self.changed = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="rollout-pipeline", daemon=True)

    def __enter__(self) -> RolloutPipeline:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        with self.changed:
            self.stopping = True
            self.changed.notify_all()
        if exc[0] is None:
            self.thread.join()

    def get(self, step: int) -> Any:
        """Block until step `step`'s batch is made; re-raise whatever stopped the producer."""
        got_step, result = self.ready.get()
        if isinstance(result, BaseException):
            raise RuntimeError(f"making the batch for step {got_step} failed") from result
        assert got_step == step, (got_step, step)
        return result

    def published(self, version: int) -> None:
        """The engines now hold (or have queued) weights of `version`."""
        with self.changed:
            self.version = version
            self.changed.notify_all()

    def _run(self) -> None:
        for step in range(self.first, self.last + 1):
            needed = max(step - 1 - self.max_staleness, *(b for b in self.barriers if b < step), self.first - 1)
            with self.changed:
                self.changed.wait_for(lambda: self.stopping or self.version >= needed)
                if self.stopping:
                    return
            try:
                self.ready.put((step, self.produce(step)))
            except BaseException as error:  # handed to the training thread, which raises it
                self.ready.put((step, error))
                return
