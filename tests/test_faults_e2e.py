"""Actor failures on the real stack: the rollout engine is SIGKILLed (by pid) while it generates, the
teacher while it scores, a verifier worker while it checks; each run still trains every step on a
full batch, counts the failure under fault/*, and its replacement engine holds the learner's weights."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest

from selfdistill.config import load_config
from selfdistill.launch.faults import Faults, RoleFailed
from selfdistill.launch.processes import alive
from selfdistill.launch.roles import Roles
from selfdistill.launch.train import train
from selfdistill.rewards import MathVerifier

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
        "sync.check_every=1",
    ])
    summary = train(cfg)
    rows = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(r["rollout/responses"] == 8 and r["rollout/prompts"] == 4 for r in rows)  # full batches
    assert rows[-1]["fault/rollout"] == 1 and rows[-1]["fault/teacher"] == 1
    assert rows[-1]["fault/learner"] == 0
    assert all(r["sync/max_logprob_gap"] <= SYNC_TOLERANCE for r in rows)  # replacement holds the weights
    assert killed_engine and killed_teacher and killed_engine[0] not in summary["pids"]["rollout"]
    for pid in [*summary["pids"]["rollout"], summary["pids"]["teacher"], *killed_engine, *killed_teacher]:
        assert not alive(pid)


def test_verifier_worker_killed_mid_check_is_retried():
    with MathVerifier(timeout_s=20.0, num_workers=1, limits=None) as verifier:
        assert verifier.score(["\\boxed{\\frac{1}{2}}"], ["0.5"])[0].status == "correct"  # worker up
        worker = verifier._pool._slots[0].process.pid
        # a slow check: math-verify on a long sum (a few seconds), killed a moment after it starts
        slow = "\\boxed{" + "+".join(f"\\frac{{{i}}}{{{i + 1}}}" for i in range(1, 60)) + "}"
        timer = threading.Timer(0.3, os.kill, (worker, signal.SIGKILL))
        timer.start()
        results = verifier.score([slow, "\\boxed{0.25}"], ["7", "\\frac{1}{4}"])
        timer.join()
        assert not alive(worker)
        assert verifier.worker_deaths == 1
        assert [r.status for r in results] == ["wrong", "correct"]  # the killed check was done again


def test_too_many_failures_stop_the_run_with_a_message():
    class Quiet:
        def note(self, message):
            self.last = message

    from selfdistill.config import FaultConfig

    faults = Faults(FaultConfig(max_failures=2, window_s=60), Quiet(), "policy", "teacher", 0)
    faults.failed("rollout", RuntimeError("engine died"))
    faults.failed("rollout", RuntimeError("engine died"))
    assert faults.counts["rollout"] == 2 and "fault: rollout failed" in faults.console.last
    with pytest.raises(RoleFailed, match=r"rollout role failed 3 times within 60 s \(faults.max_failures=2\)"):
        faults.failed("rollout", RuntimeError("engine died"))
