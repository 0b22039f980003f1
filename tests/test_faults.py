"""Failure policy and verifier-worker deaths (launch/faults.py, rewards/deadline_pool.py); the actor kills
on the real stack are in tests/test_faults_e2e.py."""

from __future__ import annotations

import os
import signal
import threading

import pytest

from selfdistill.config import FaultConfig
from selfdistill.launch import cli
from selfdistill.launch.faults import Faults, RoleFailed
from selfdistill.launch.processes import alive
from selfdistill.rewards import MathVerifier


def test_verifier_worker_killed_mid_check_is_retried():
    with MathVerifier(timeout_s=3.0, num_workers=1, limits=None) as verifier:
        assert verifier.score(["\\boxed{\\frac{1}{2}}"], ["0.5"])[0].status == "correct"  # worker up
        worker = verifier._pool._slots[0].process.pid
        # a check that never ends by itself (a power tower, with the caller's guard off), so the worker is
        # surely busy when it is killed; the check done again runs into the deadline
        hung = "\\boxed{9^{9^{9^{9}}}}"
        timer = threading.Timer(0.3, os.kill, (worker, signal.SIGKILL))
        timer.start()
        results = verifier.score([hung, "\\boxed{0.25}"], ["7", "\\frac{1}{4}"])
        timer.join()
        assert not alive(worker)
        assert verifier.worker_deaths == 1
        assert [r.status for r in results] == ["timeout", "correct"]  # the killed check was done again


def test_too_many_failures_stop_the_run_with_a_message():
    class Quiet:
        def note(self, message):
            self.last = message

    faults = Faults(FaultConfig(max_failures=2, window_s=60), Quiet())
    faults.failed("rollout", RuntimeError("engine died"))
    faults.failed("rollout", RuntimeError("engine died"))
    assert faults.counts["rollout"] == 2 and "fault: rollout failed" in faults.console.last
    with pytest.raises(RoleFailed, match=r"rollout role failed 3 times within 60 s \(faults.max_failures=2\)"):
        faults.failed("rollout", RuntimeError("engine died"))


def test_the_cli_reports_a_stopped_run_with_exit_code_3(monkeypatch, capsys):
    def fails(cfg, resume_from):
        try:
            raise RoleFailed("the teacher role failed 4 times within 3600 s")
        except RoleFailed as error:
            raise RuntimeError("making the batch for step 7 failed") from error  # as RolloutPipeline.get does

    import selfdistill.launch.train

    monkeypatch.setattr(selfdistill.launch.train, "train", fails)
    assert cli.main(["train", "run.steps=1"]) == 3
    assert "run stopped: the teacher role failed 4 times" in capsys.readouterr().err
