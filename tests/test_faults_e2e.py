"""Actor failures on the real stack: the rollout engine is SIGKILLed (by pid) while it generates, the
teacher while it scores (a verifier worker killed mid-check: tests/test_faults.py); the run still
trains every step on a full batch, counts the failures under fault/*, and its replacement engine
holds the learner's weights. The weights travel over the gloo collective transport, whose group
every replacement rejoins (a fresh rendezvous of all receivers; the object store's path is the
default job's)."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from selfdistill.config import load_config
from selfdistill.launch.processes import alive
from selfdistill.launch.roles import Roles
from selfdistill.launch.train import train

pytestmark = pytest.mark.e2e
SYNC_TOLERANCE = 1e-4


def _kill_on_call(monkeypatch, method: str, role: str, call: int) -> list[int]:
    """SIGKILL the `role` actor's process right after Roles.`method` sent it its `call`-th request."""
    original, calls, killed = getattr(Roles, method), [], []

    def sends_then_kills(self, *args):
        out = original(self, *args)
        calls.append(1)
        if len(calls) == call:
            time.sleep(0.05)  # let it start on the request
            pid = self.pids[role][0] if role == "rollout" else self.pids[role]
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        return out

    monkeypatch.setattr(Roles, method, sends_then_kills)
    return killed


def test_rollout_and_teacher_killed_mid_call_are_replaced(tmp_path, tiny_model, monkeypatch):
    killed_engine = _kill_on_call(monkeypatch, "start_stream", "rollout", call=2)  # step 2's generation
    killed_teacher = _kill_on_call(monkeypatch, "score_async", "teacher", call=3)  # during step 2 or 3
    cfg = load_config(None, [
        f"model={{kind: pretrained, path: {tiny_model}}}", f"run.output_dir={tmp_path}", "run.name=faults",
        "run.steps=4", "run.save_every=0", "run.eval_size=2", "run.progress=false", "rollout.prompts_per_step=4",
        "rollout.sampling.n=2", "rollout.sampling.max_new_tokens=24", "learner.micro_batch_groups=1",
        "sync.check_every=1", "sync.transport=collective",
    ])
    summary = train(cfg)
    rows = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(r["rollout/responses"] == 8 and r["rollout/prompts"] == 4 for r in rows)  # full batches
    assert rows[-1]["fault/rollout"] == 1 and rows[-1]["fault/teacher"] == 1
    assert rows[-1]["fault/learner"] == 0
    assert all(r["sync/max_logprob_gap"] <= SYNC_TOLERANCE for r in rows)  # replacement holds the weights
    assert all(r["rollout/staleness_max"] == 0 for r in rows)  # and redid the lost work on the current ones
    assert killed_engine and killed_teacher and killed_engine[0] not in summary["pids"]["rollout"]
    for pid in [*summary["pids"]["rollout"], summary["pids"]["teacher"], *killed_engine, *killed_teacher]:
        assert not alive(pid)
