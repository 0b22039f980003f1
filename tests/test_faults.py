"""Failure policy, verifier-worker deaths and learner ranks that die or hang (launch/faults.py,
rewards/deadline_pool.py, learner/group.py); the actor kills on the real stack are in tests/test_faults_e2e.py."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from selfdistill.config import FaultConfig
from selfdistill.launch import cli
from selfdistill.launch.cluster import ray_cluster
from selfdistill.launch.faults import Faults, RoleFailed
from selfdistill.launch.processes import alive, stop_actors
from selfdistill.records import Problem, Trajectory
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


def _learner_group(monkeypatch, timeout_s: float, rank_1_answers: bool):
    """A LearnerGroup of two real Ray actors standing in for the DeepSpeed ranks: rank 0's train step never ends
    by itself (as a rank waiting in a collective on a dead peer), nor rank 1's unless `rank_1_answers`."""
    from selfdistill.config import load_config
    from selfdistill.learner import group

    class Rank:
        def __init__(self, cfg, model_path, rank, world_size, port, resume_from, master):
            self.waits = rank == 0 or model_path == "rank 1 waits too"

        def ready(self):
            return os.getpid()

        def master_port(self):
            return 0  # no rendezvous: these ranks never meet

        def start(self, port):
            return os.getpid()

        def train_step(self, trajs, scores, num_micro_batches):
            while self.waits:
                time.sleep(1)
            return {"train/loss": 1.0}

        def save_checkpoint(self, path, client_state):
            time.sleep(3600)

    monkeypatch.setattr(group, "LearnerActor", Rank)
    cfg = load_config(None, ["learner.num_ranks=2", "learner.num_cpus_per_rank=0.5", "rollout.prompts_per_step=2",
                             f"faults.learner_timeout_s={timeout_s}"])
    return group.LearnerGroup(cfg, "rank 1 answers" if rank_1_answers else "rank 1 waits too")


def _trajectories() -> list[Trajectory]:
    problem = Problem("p0", "1+1?", "2", "2")
    return [Trajectory(problem, g, [1, 2], [3], [-0.5], "stop", 0) for g in (0, 1)]


def test_a_learner_rank_that_hangs_or_dies_is_named(monkeypatch):
    with ray_cluster(None, 2):
        learners = _learner_group(monkeypatch, timeout_s=1, rank_1_answers=True)
        try:
            with pytest.raises(RoleFailed, match=rf"learner rank 0 \(pid {learners.pids[0]}\) did not finish the "
                                                 r"train step within faults.learner_timeout_s=1 s"):
                learners.train_step(_trajectories(), None)
            with pytest.raises(RoleFailed, match=r"learner rank 0 \(pid \d+\), learner rank 1 \(pid \d+\) did not "
                                                 r"finish saving the checkpoint /x within faults.learner_timeout_s"):
                learners.save_checkpoint("/x", {})
        finally:
            assert not stop_actors(learners.actors, learners.pids, timeout_s=30)

        learners = _learner_group(monkeypatch, timeout_s=600, rank_1_answers=False)
        victim = learners.pids[1]
        try:
            timer = threading.Timer(1.0, os.kill, (victim, signal.SIGKILL))
            timer.start()
            with pytest.raises(RoleFailed, match=rf"learner rank 1 \(pid {victim}\) died during the train step"):
                learners.train_step(_trajectories(), None)  # rank 0 would wait forever: the death ends the call
            timer.join()
        finally:
            assert not stop_actors(learners.actors, learners.pids, timeout_s=30)
