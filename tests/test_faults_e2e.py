"""Actor failures on the real stack: the rollout engine is SIGKILLed (by pid) while it generates, the
teacher while it scores (a verifier worker killed mid-check: tests/test_faults.py); the run still
trains every step on a full batch, counts the failures under fault/*, and its replacement engine
holds the learner's weights. Both weight transports are covered: the gloo collective one, whose
group every replacement rejoins (a fresh rendezvous of all receivers), in an asynchronous pipeline
run (`rollout.max_staleness: 1`, the engine killed mid-generation as the learner trains); the object store, the
default job's, whose kept buckets a replacement loads before it serves (a short run, one kill; its
objective must move the weights in one step, or the check could not tell old weights from new). An EMA
teacher's replacement starts from the average saved in the last checkpoint.

The runs share one local cluster (fixture `local_ray`)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest
import ray
import torch
from safetensors.torch import load_file

from selfdistill.config import load_config
from selfdistill.launch.faults import Faults
from selfdistill.launch.processes import alive
from selfdistill.launch.roles import Roles
from selfdistill.launch.train import train
from selfdistill.weights.object_store import bucket_tensors

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("local_ray")]
SYNC_TOLERANCE = 1e-4
PROBE = list(range(3, 40))  # a fixed token sequence both sides score


def _kill_on_call(monkeypatch, method: str, role: str, call: int | None = None,
                  version: int | None = None) -> list[int]:
    """SIGKILL the `role` actor's process right after Roles.`method` sent it its `call`-th request, or (`version`)
    its first request once the learner holds that version."""
    original, calls, killed = getattr(Roles, method), [], []

    def sends_then_kills(self, *args):
        out = original(self, *args)
        calls.append(1)
        if not killed and (len(calls) == call if version is None else self.learner_version == version):
            time.sleep(0.05)  # let it start on the request
            pid = self.pids[role][0] if role == "rollout" else self.pids[role]
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        return out

    monkeypatch.setattr(Roles, method, sends_then_kills)
    return killed


def _kill_engine_generating_step_3_as_step_2_trains(monkeypatch) -> list[int]:
    """SIGKILL the engine just before the learner's step 2, once the pipeline has sent it step 3's prompts."""
    start_stream, train, streams, killed = Roles.start_stream, Roles.train, [], []
    third = threading.Event()

    def counted(self, *args):
        out = start_stream(self, *args)
        streams.append(1)
        if len(streams) == 3:  # one engine, one chunk per step until the kill
            third.set()
        return out

    def kills_then_trains(self, *args):
        if self.learner_version == 1:
            assert third.wait(120), "the pipeline never started step 3"
            time.sleep(0.05)  # let it start on the request
            os.kill(self.pids["rollout"][0], signal.SIGKILL)
            killed.append(self.pids["rollout"][0])
        return train(self, *args)

    monkeypatch.setattr(Roles, "start_stream", counted)
    monkeypatch.setattr(Roles, "train", kills_then_trains)
    return killed


def _gaps_at_start(monkeypatch) -> list[tuple[float, float]]:
    """Each replacement's log-prob gap to the learner on PROBE, before and after Faults._start (where it loads
    the object store's buckets). Faults holds its lock there, so the learner is not training meanwhile."""
    gaps, start = [], Faults._start

    def measured_start(self, actor, roles):
        ray.get(actor.ready.remote())
        learner = roles.learner.sequence_logprobs([PROBE])[0]
        gap = lambda: max(abs(a - b) for a, b in zip(ray.get(actor.sequence_logprobs.remote([PROBE]))[0], learner))  # noqa: E731
        before = gap()
        pid = start(self, actor, roles)
        gaps.append((before, gap()))
        return pid

    monkeypatch.setattr(Faults, "_start", measured_start)
    return gaps


def _config(tmp_path, model, name: str, *overrides):
    return load_config(None, [
        f"model={{kind: pretrained, path: {model}}}", f"run.output_dir={tmp_path}", f"run.name={name}",
        "run.save_every=0", "run.progress=false", "rollout.sampling.n=2", "learner.micro_batch_groups=1",
        "sync.check_every=1", "learner.lr=1e-3", *overrides,  # lr: one step moves the log-probs well past 1e-4
    ])


def _rows(cfg) -> list[dict]:
    return [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]


def _assert_full_batches(cfg, rows, fault_rollout: int, fault_teacher: int) -> None:
    """Every step ran, each on prompts_per_step distinct prompts of n responses (nothing lost or duplicated),
    every receiver held the learner's weights after each sync, and the faults were counted."""
    prompts, n = cfg.rollout.prompts_per_step, cfg.rollout.sampling.n
    assert [r["step"] for r in rows] == list(range(1, cfg.run.steps + 1))
    assert all(r["rollout/responses"] == prompts * n and r["rollout/prompts"] == prompts for r in rows)
    assert rows[-1]["fault/rollout"] == fault_rollout and rows[-1]["fault/teacher"] == fault_teacher
    assert rows[-1]["fault/learner"] == 0
    assert all(r["sync/max_logprob_gap"] <= SYNC_TOLERANCE for r in rows), [r["sync/max_logprob_gap"] for r in rows]


def _assert_stopped(summary, *killed: list[int]) -> None:
    dead = [pid for pids in killed for pid in pids]
    last = [*summary["pids"]["rollout"], summary["pids"]["teacher"]]
    assert dead and not set(dead) & set(last)
    for pid in [*last, *dead]:
        assert not alive(pid)


def test_collective_async_run_replaces_engine_killed_during_train_and_teacher(tmp_path, tiny_model, monkeypatch):
    """Over the collective transport with one step of staleness: the engine dies generating step 3's batch as the
    learner starts step 2, the teacher while it scores."""
    killed_engine = _kill_engine_generating_step_3_as_step_2_trains(monkeypatch)
    killed_teacher = _kill_on_call(monkeypatch, "score_async", "teacher", call=3)
    gaps = _gaps_at_start(monkeypatch)
    cfg = _config(tmp_path, tiny_model, "faults", "run.steps=4", "run.eval_size=2", "rollout.prompts_per_step=4",
                  "rollout.sampling.max_new_tokens=24", "sync.transport=collective", "rollout.max_staleness=1")
    summary = train(cfg)
    rows = _rows(cfg)
    _assert_full_batches(cfg, rows, fault_rollout=1, fault_teacher=1)
    staleness = [r["rollout/staleness_max"] for r in rows]
    assert max(staleness) == 1 and all(s >= 0 for s in staleness), staleness  # asynchronous, within the bound
    # the replacement waited for step 2 to end and rejoined with its weights, under their version (2): the groups
    # it redid are on-policy, those done before the kill one version behind
    assert rows[2]["rollout/staleness_mean"] < 1, rows[2]
    # both replacements started from weights the learner had trained past; the fresh group gave them its own
    assert len(gaps) == 2 and all(before > 10 * SYNC_TOLERANCE for before, _ in gaps), gaps
    _assert_stopped(summary, killed_engine, killed_teacher)


def test_object_store_replacement_loads_the_published_weights_before_it_serves(tmp_path, tiny_model, monkeypatch):
    """Over the object store: the engine dies generating step 2's batch; its replacement starts from the run's
    starting weights, which the learner has left behind, and loads step 1's published buckets before it serves."""
    killed_engine = _kill_on_call(monkeypatch, "start_stream", "rollout", call=2)  # step 2's generation
    gaps = _gaps_at_start(monkeypatch)
    # responses up to 256 tokens (the random model rarely stops early) keep the engine generating well past the
    # kill on a loaded machine: with 12 it could finish step 2 first, and the death was then seen at step 2's
    # sync, when the learner had trained past the buckets the replacement loads
    cfg = _config(tmp_path, tiny_model, "faults-object-store", "run.steps=2", "run.eval_size=0",
                  "rollout.prompts_per_step=2", "rollout.sampling.max_new_tokens=256", "sync.transport=object_store")
    summary = train(cfg)
    rows = _rows(cfg)
    _assert_full_batches(cfg, rows, fault_rollout=1, fault_teacher=0)
    assert len(gaps) == 1
    before, after = gaps[0]
    assert before > 10 * SYNC_TOLERANCE  # the starting weights are not the learner's: the check can tell
    assert after <= SYNC_TOLERANCE  # the object store's buckets made the replacement the learner's copy
    assert [r["rollout/staleness_max"] for r in rows] == [0, 0]  # and it redid the lost groups on them
    _assert_stopped(summary, killed_engine)


def test_replacement_ema_teacher_starts_from_the_average_of_the_last_checkpoint(tmp_path, tiny_model, monkeypatch):
    """An EMA teacher killed while it scores for step 6 is rebuilt from the average saved in the step-3 checkpoint
    (not from the run's starting weights, which would drop every version averaged so far), then blends the
    published version 5 in with the weight of the two versions since (rate ema_rate^(5 - 3))."""
    # step 6's first scoring call: after step 5 trained, so after checkpoint 3 was saved
    killed_teacher = _kill_on_call(monkeypatch, "score_async", "teacher", version=5)
    rebuilt, caught_up, start = [], [], Faults._start

    def saved(actor, name):
        ray.get(actor.save.remote(str(tmp_path / name)))
        return load_file(tmp_path / name / "model.safetensors")

    def saved_then_start(self, actor, roles):  # only the teacher dies here
        ray.get(actor.ready.remote())
        rebuilt.append(saved(actor, f"replacement-{len(rebuilt)}"))
        pid = start(self, actor, roles)
        handle, version = roles.published
        caught_up.append((saved(actor, "caught-up"), dict(bucket_tensors(handle)), version))
        return pid

    monkeypatch.setattr(Faults, "_start", saved_then_start)
    cfg = _config(tmp_path, tiny_model, "faults-ema", "run.steps=6", "run.eval_size=0", "run.save_every=3",
                  "rollout.prompts_per_step=2", "rollout.sampling.max_new_tokens=24", "teacher.weights=ema",
                  "run.keep_checkpoints=2")  # step 3's checkpoint is read after the run
    summary = train(cfg)
    rows = _rows(cfg)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6] and rows[-1]["fault/teacher"] == 1
    [replacement] = rebuilt
    average = load_file(cfg.run_dir / "checkpoints" / "step-000003" / "teacher" / "model.safetensors")
    initial = load_file(tiny_model / "model.safetensors")
    assert replacement.keys() == average.keys()
    assert all(torch.equal(replacement[n], average[n]) for n in average), "not rebuilt from the step-3 average"
    assert not all(torch.equal(average[n], initial[n].to(average[n].dtype)) for n in average)  # it had moved
    [(teacher, published, version)] = caught_up
    rate = cfg.teacher.ema_rate ** (version - 3)
    assert version == 5
    for n in average:  # as the teacher blends: average * rate + published * (1 - rate)
        assert torch.equal(teacher[n], average[n].clone().mul_(rate).add_(published[n].to(average[n].dtype),
                                                                          alpha=1 - rate)), n
    _assert_stopped(summary, [], killed_teacher)
