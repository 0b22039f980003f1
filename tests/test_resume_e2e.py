"""Resume on the real stack: a run killed by SIGKILL while it writes a checkpoint continues with
`--resume auto` from the previous complete checkpoint; resumed, its learner rank is SIGKILLed
mid-run (the run stops with exit code 3 naming the rank, the checkpoint intact); resumed again,
it ends with the same weights as a run that was never interrupted (on-policy and max_staleness 1).

The kill during the write is deterministic: the run's driver (the process that writes checkpoints,
launch/run_dir.py save_checkpoint) runs under strace, which SIGKILLs it on entering the rename of
`.step-000004.partial` into `step-000004`: every file written and fsynced, the folder not yet in
place. Polling for the partial folder and killing raced the write (under load the write could finish
first). strace traces the driver's main thread only (no -f) and acts on that one path only.

The in-process runs share one local cluster (fixture `local_ray`); the child processes start their own,
which the SIGKILLs take down with them."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from selfdistill.config import load_config
from selfdistill.launch.cli import main as cli_main
from selfdistill.launch.run_dir import checkpoint_dir, latest_checkpoint
from selfdistill.launch.train import train

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("local_ray")]
WEIGHT_TOLERANCE = 1e-5  # float32 reductions may be ordered differently across processes


def _overrides(model: Path, output_dir: Path, *extra: str) -> list[str]:
    return [f"model={{kind: pretrained, path: {model}}}", f"run.output_dir={output_dir}", "run.name=resume",
            "run.steps=4", "run.save_every=2", "run.keep_checkpoints=3", "run.eval_size=2", "run.progress=false",
            "rollout.prompts_per_step=2", "rollout.sampling.n=2", "rollout.sampling.max_new_tokens=12",
            "learner.micro_batch_groups=1", "learner.lr=1e-3", "sync.check_every=0", *extra]


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    gaps = {k: float((wa[k] - wb[k]).abs().max()) for k in wa}
    assert max(gaps.values()) <= WEIGHT_TOLERANCE, sorted(gaps.items(), key=lambda kv: -kv[1])[:3]


def _losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows}


def _kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants (the driver, its Ray cluster and actors), by pid."""
    _kill_all([psutil.Process(pid), *psutil.Process(pid).children(recursive=True)])


def _kill_all(procs: list[psutil.Process]) -> None:
    for proc in procs:
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)


def _killed_at_the_rename_of(partial: Path, argv: list[str], log: Path) -> None:
    """Run `argv` (a train run) in a child process under strace, which SIGKILLs it on entering the rename of
    `partial` into place; then SIGKILL what is left of it (its Ray cluster). Fails, saying why, unless the
    run died exactly there (the kill landed after the write, before the rename)."""
    renames = "rename,renameat,renameat2"
    trace = log.with_suffix(".strace")
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    with log.open("w") as err:
        proc = subprocess.Popen(["strace", "-qq", "-o", str(trace), "-P", str(partial), "-e", f"trace={renames}",
                                 "-e", f"inject={renames}:signal=SIGKILL", sys.executable, "-m",
                                 "selfdistill.launch.cli", *argv], env=env, stdout=subprocess.DEVNULL, stderr=err,
                                start_new_session=True)
    seen: dict[int, psutil.Process] = {}  # its descendants: orphaned once the driver dies
    deadline = time.monotonic() + 1800
    try:
        while proc.poll() is None:
            assert time.monotonic() < deadline, f"the run did not end within 1800 s: {log.read_text()[-3000:]}"
            try:
                seen.update((p.pid, p) for p in psutil.Process(proc.pid).children(recursive=True))
            except psutil.NoSuchProcess:
                pass
            time.sleep(0.5)
    finally:
        if proc.poll() is None:
            _kill_tree(proc.pid)
        _kill_all([p for p in [*seen.values(), *_in_session(proc.pid)] if p.is_running()])
    traced = trace.read_text() if trace.exists() else "(no strace output)"
    assert proc.returncode in (-signal.SIGKILL, 128 + signal.SIGKILL) and "+++ killed by SIGKILL +++" in traced, (
        f"the run was not killed at the rename of {partial.name} (exit code {proc.returncode}); strace: "
        f"{traced[-1000:]}; stderr: {log.read_text()[-3000:]}")
    assert str(partial) in traced, traced[-1000:]


def _in_session(sid: int) -> list[psutil.Process]:
    procs = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid:
                procs.append(p)
        except (OSError, psutil.Error):
            pass
    return procs


def _title(proc: psutil.Process) -> str:
    """A process's first command-line word ('' once it exited)."""
    try:
        return (proc.cmdline() or [""])[0]
    except psutil.Error:
        return ""


def _learner_killed_mid_run(overrides: list[str], run_dir: Path, log: Path) -> tuple[int, int]:
    """Resume the run in a child process and SIGKILL its learner rank (by pid) once it logged a step past the
    checkpoint; returns (the child's exit code, the killed pid)."""
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    with log.open("w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "selfdistill.launch.cli", "train", *overrides, "--resume",
                                 "auto"], env=env, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    try:
        learner = None
        while learner is None or 3 not in _losses(run_dir):  # the learner exists once metrics.jsonl was cut back
            assert proc.poll() is None, log.read_text()[-3000:]
            learner = learner or next((p for p in psutil.Process(proc.pid).children(recursive=True)
                                       if _title(p).startswith("ray::LearnerActor")), None)
            time.sleep(0.05)
        learner.send_signal(signal.SIGKILL)
        return proc.wait(timeout=600), learner.pid
    finally:
        if proc.poll() is None:
            _kill_tree(proc.pid)


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace kills the run at its checkpoint's rename")
def test_sigkill_during_a_checkpoint_write_then_resume_auto_is_exact(tmp_path, tiny_model):
    reference = load_config(None, _overrides(tiny_model, tmp_path / "reference"))
    train(reference)

    overrides = _overrides(tiny_model, tmp_path / "killed")
    run_dir = tmp_path / "killed" / "resume"
    partial = run_dir / "checkpoints" / ".step-000004.partial"
    _killed_at_the_rename_of(partial, ["train", *overrides], tmp_path / "killed.log")
    assert partial.is_dir() and not checkpoint_dir(run_dir, 4).exists(), "the kill did not land mid-write"
    assert (partial / "trainer_state.json").is_file()  # written in full (the rename was all that was left)
    assert latest_checkpoint(run_dir).name == "step-000002"

    code, pid = _learner_killed_mid_run(overrides, run_dir, tmp_path / "learner-killed.log")
    assert code == 3, (tmp_path / "learner-killed.log").read_text()[-3000:]
    assert f"run stopped: learner rank 0 (pid {pid}) died during" in (tmp_path / "learner-killed.log").read_text()
    assert latest_checkpoint(run_dir).name == "step-000002"  # intact, and still the last complete one

    assert cli_main(["train", *overrides, "--resume", "auto"]) == 0
    assert latest_checkpoint(run_dir).name == "step-000004" and not partial.exists()
    _assert_same_weights(checkpoint_dir(reference.run_dir, 4), checkpoint_dir(run_dir, 4))
    reference_losses, resumed_losses = _losses(reference.run_dir), _losses(run_dir)
    assert resumed_losses.keys() == {1, 2, 3, 4}
    assert resumed_losses == pytest.approx(reference_losses, abs=1e-5)


def test_resume_with_max_staleness_one_is_exact(tmp_path, tiny_model):
    reference = load_config(None, _overrides(tiny_model, tmp_path / "reference", "rollout.max_staleness=1"))
    train(reference)
    resumed = load_config(None, _overrides(tiny_model, tmp_path / "resumed", "rollout.max_staleness=1",
                                           f"run.resume={checkpoint_dir(reference.run_dir, 2)}"))
    train(resumed)
    _assert_same_weights(checkpoint_dir(reference.run_dir, 4), checkpoint_dir(resumed.run_dir, 4))
