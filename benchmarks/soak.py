"""Soak test: a long CPU training run, with the memory, open files and threads of every process of
the run (driver, Ray's own processes, each actor) sampled as it goes.

    .venv/bin/python benchmarks/soak.py --every 15 --out runs/soak.json run.steps=300

It runs `selfdistill train` with the given overrides (default: the CPU default job) in this process
(the driver) and samples it and all its descendants every `--every` seconds from a thread. At the end it prints,
per process (named by its Ray actor class or program), the resident memory, open files and
threads in the first and the last quarter of the run's steps, and the run's live Ray objects (asked
of its raylet: objects in the plasma store, objects owned by its workers, object refs in scope), and
writes every sample to --out. Growth from first to last is what a leak looks like.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import psutil


def _name(proc: psutil.Process, root_pid: int) -> str:
    """A process's role: its Ray actor or task title (`ray::RolloutActor`), `driver`, or its program's name."""
    if proc.pid == root_pid:
        return "driver"
    try:
        cmdline = proc.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return "?"
    if cmdline and cmdline[0].startswith("ray::"):
        return cmdline[0].split()[0].split(".")[0]  # the actor class, not the method running now
    return Path(cmdline[0]).name if cmdline else proc.name()


def _sample(root: psutil.Process) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for proc in [root, *root.children(recursive=True)]:
        try:
            key = f"{_name(proc, root.pid)}[{proc.pid}]"
            out[key] = {"rss_mb": proc.memory_info().rss / 2**20, "fds": proc.num_fds(), "threads": proc.num_threads()}
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


def _ray_objects() -> dict[str, int] | None:
    """Live Ray objects of the run's cluster, asked of its raylet: objects in the plasma store, objects owned by
    its workers, object refs in scope; None while no cluster is up."""
    import ray
    from ray._private.internal_api import node_stats

    try:
        node = ray._private.worker.global_worker.node
        stats = node_stats(node.node_ip_address, node.node_manager_port, include_memory_info=False)
    except Exception:  # no cluster yet, or it is going away
        return None
    workers = stats.core_workers_stats
    return {"plasma_objects": stats.store_stats.num_local_objects,
            "owned_objects": sum(w.num_owned_objects for w in workers),
            "refs_in_scope": sum(w.num_object_refs_in_scope for w in workers)}


def _step(metrics: Path) -> int:
    try:
        lines = metrics.read_text().splitlines()
        return json.loads(lines[-1])["step"] if lines else 0
    except (OSError, ValueError, KeyError):
        return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--every", type=float, default=15.0, help="seconds between samples")
    parser.add_argument("--out", default="runs/soak.json", help="where every sample goes (JSON)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides for `selfdistill train`")
    args = parser.parse_args()
    overrides = ["run.name=soak", "run.progress=false", *args.overrides]
    from selfdistill.config import load_config

    cfg = load_config(None, overrides)
    samples, done = [], threading.Event()

    def sample() -> None:  # in a thread of the driver, so that it can ask the run's raylet
        root = psutil.Process()
        while not done.is_set():
            samples.append({"t": time.time(), "step": _step(cfg.run_dir / "metrics.jsonl"), "procs": _sample(root),
                            "ray": _ray_objects()})
            done.wait(args.every)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    from selfdistill.launch.train import train

    try:
        train(cfg)
        code = 0
    except Exception as error:  # the samples so far are still written and summarised
        print(f"soak: the run failed: {type(error).__name__}: {error}")
        code = 1
    finally:
        done.set()
        sampler.join()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(samples))
    training = [s for s in samples if s["step"] > 0]
    if not training:
        print("no training step was sampled")
        return code
    last_step = training[-1]["step"]
    first = [s for s in training if s["step"] <= last_step / 4]
    last = [s for s in training if s["step"] >= 3 * last_step / 4]
    print(f"{len(samples)} samples, steps 1..{last_step}, exit code {code}")
    print(f"{'process':40s} {'rss MB first -> last':>22s} {'fds':>12s} {'threads':>12s}")
    for key in sorted({k for s in first for k in s["procs"]} & {k for s in last for k in s["procs"]}):
        cols = []
        for field in ("rss_mb", "fds", "threads"):
            a = statistics.median(s["procs"][key][field] for s in first if key in s["procs"])
            b = statistics.median(s["procs"][key][field] for s in last if key in s["procs"])
            cols.append(f"{a:.0f} -> {b:.0f}")
        print(f"{key:40s} {cols[0]:>22s} {cols[1]:>12s} {cols[2]:>12s}")
    for field in ("plasma_objects", "owned_objects", "refs_in_scope"):
        a, b = ([s["ray"][field] for s in part if s.get("ray")] for part in (first, last))
        if a and b:
            print(f"ray {field:36s} {statistics.median(a):.0f} -> {statistics.median(b):.0f}")
    return code


if __name__ == "__main__":
    sys.exit(main())
