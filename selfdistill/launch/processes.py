"""Stopping Ray actors so that nothing is left behind: kill each one, then wait for its process.

`ray.kill` and `ray.shutdown` return before the worker processes have exited (on a slow
machine, seconds later), so a run that only calls them can leave processes behind.
"""

from __future__ import annotations

import time

import psutil
import ray


def stop_actors(actors: list, pids: list[int | None], timeout_s: float = 60.0) -> list[int]:
    """Kill `actors` (no restart) and wait up to `timeout_s` for those of `pids` that run on this machine.

    A pid counts as this machine's when a local process with it is a Ray worker (`ray::...`);
    on a cluster the driver joined, workers of other nodes are left to their raylets.
    Returns the pids still running after the wait (empty when all exited).
    """
    for actor in actors:
        try:
            ray.kill(actor, no_restart=True)
        except Exception:  # already dead, or the cluster is gone: nothing left to stop
            pass
    procs = [p for p in (_local_ray_worker(pid) for pid in pids if pid is not None) if p is not None]
    deadline = time.monotonic() + timeout_s
    while procs and time.monotonic() < deadline:
        procs = [p for p in procs if _running(p)]
        if procs:
            time.sleep(0.05)
    return [p.pid for p in procs]


def alive(pid: int) -> bool:
    """Whether process `pid` still runs (an exited process that awaits reaping counts as gone)."""
    try:
        return _running(psutil.Process(pid))
    except psutil.NoSuchProcess:
        return False


def _local_ray_worker(pid: int) -> psutil.Process | None:
    try:
        proc = psutil.Process(pid)
        return proc if proc.name().startswith("ray::") or "ray::" in " ".join(proc.cmdline()[:1]) else None
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
