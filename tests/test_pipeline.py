"""The rollout pipeline's ordering and staleness bound (no Ray: `produce` records what it saw)."""

import threading
import time

import pytest

from selfdistill.launch.pipeline import RolloutPipeline
from selfdistill.launch.roles import chunk_bounds


def _run(max_staleness: int, steps: int = 5, train_seconds: float = 0.02, barriers=()):
    """Drive a pipeline like the training loop; returns, per step, the published version its batch saw."""
    state = {"version": 0}
    seen = {}

    def produce(step):
        seen[step] = state["version"]
        time.sleep(0.005)
        return f"batch-{step}"

    with RolloutPipeline(produce, 1, steps, max_staleness, barriers) as pipeline:
        for step in range(1, steps + 1):
            assert pipeline.get(step) == f"batch-{step}"
            time.sleep(train_seconds)  # train
            state["version"] = step
            pipeline.published(step)
    return seen


def test_staleness_zero_is_strictly_on_policy():
    seen = _run(max_staleness=0)
    assert seen == {step: step - 1 for step in range(1, 6)}


@pytest.mark.parametrize("k", [1, 2])
def test_batches_run_ahead_by_at_most_k_versions(k):
    seen = _run(max_staleness=k, train_seconds=0.05)
    for step, version in seen.items():
        assert step - 1 - k <= version <= step - 1
    # training is slower than producing, so the producer really runs ahead
    assert any(version < step - 1 for step, version in seen.items())


def test_the_batch_after_a_checkpoint_step_waits_for_its_weights():
    seen = _run(max_staleness=2, steps=6, train_seconds=0.05, barriers={3})
    assert seen[4] == 3  # as a run resumed from checkpoint 3 would make it
    assert all(step - 3 <= version <= step - 1 for step, version in seen.items())


def test_resumed_pipeline_starts_from_the_checkpoint_version():
    seen = {}
    with RolloutPipeline(lambda step: seen.setdefault(step, step), 11, 12, 0) as pipeline:
        assert pipeline.get(11) == 11
        assert pipeline.version == 10
        pipeline.published(11)
        assert pipeline.get(12) == 12


def test_a_failure_in_the_producer_reaches_the_training_thread():
    def produce(step):
        if step == 2:
            raise ValueError("engine died")
        return step

    with pytest.raises(RuntimeError, match="step 2") as info:
        with RolloutPipeline(produce, 1, 3, 1) as pipeline:
            pipeline.get(1)
            pipeline.published(1)
            pipeline.get(2)
    assert isinstance(info.value.__cause__, ValueError)


def test_leaving_early_stops_a_waiting_producer():
    started = threading.Event()

    def produce(step):
        started.set()
        return step

    with pytest.raises(KeyboardInterrupt):
        with RolloutPipeline(produce, 1, 100, 0) as pipeline:
            started.wait(5)
            raise KeyboardInterrupt
    pipeline.thread.join(5)
    assert not pipeline.thread.is_alive()  # it was waiting for version 1, which never came


def test_chunks_cover_the_batch_once():
    assert chunk_bounds(16, 1) == [(0, 16)]
    assert chunk_bounds(16, 4) == [(0, 4), (4, 8), (8, 12), (12, 16)]
    assert chunk_bounds(5, 4) == [(0, 2), (2, 3), (3, 4), (4, 5)]
    assert chunk_bounds(2, 4) == [(0, 1), (1, 2)]  # never an empty chunk
    assert chunk_bounds(0, 3) == []
