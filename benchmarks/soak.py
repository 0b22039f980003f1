"""Soak: the default job trained for many steps, with the memory, open files and threads of the driver and of
every actor process, and the Ray object store, sampled as it goes; a table says what stays flat and what grows.

    nice -n 10 .venv/bin/python benchmarks/soak.py [--steps 300] [--every 10] [--out benchmarks/results/soak]
        [--warm-start benchmarks/results/methods/warmstart] [field=value ...]

The run is `selfdistill train` with the embedded default config (plus the overrides given), run in this
process, which is then the run's driver; it only trains: `run.eval_size=0` (no held-out evaluation before,
during or after), `run.steps=--steps`. Checkpoints (`run.save_every`) and sync checks (`sync.check_every`) stay
as the default job has them. `--warm-start DIR` trains from a model folder built before instead
(`model={kind: pretrained, path: DIR}`, e.g. the methods benchmark's committed warm start), so the soak does
not spend minutes building one.

Every `--every` seconds a thread of the driver records:
- each process of this machine in the run (the driver and its descendants: Ray's own processes, every actor,
  vLLM and verifier workers): resident memory (RSS), open file descriptors (/proc/PID/fd), threads; and, for a
  process whose thread count differs from its last sample, the names of its threads (the kernel's, from
  /proc/PID/task/*/comm, and its Python threads', from `py-spy dump`), so that a thread count that grows says
  which threads appeared (the table's last section);
- every Ray worker of every node, as its raylet reports it (the calls `ray memory` makes): pid, actor, node,
  objects it owns, object refs in scope; and per node the plasma store's objects and bytes;
- the task events the GCS holds (about 8 KB of gcs_server memory each, up to `cluster.max_task_events`).
On a cluster the driver joined, processes on other nodes are listed with their pid and node and their Ray object
counts, but their RSS, files and threads cannot be read from here (no /proc of another machine): the table
says so. The results (every sample, and per series first / last / max and the linear trend per 100 steps over
all training samples and over the second half) go to OUT/soak.json and OUT/soak.md, every sample to
OUT/samples.jsonl as it is taken (`--summarise` makes the table again from it). A series is called growing
when its second-half trend (after warm-up: allocator pools, caches, compiled kernels) exceeds its tolerance
per 100 steps (RSS: the larger of 1% of its first value and 4 MB; plasma bytes: 1 MB; counts: 1) and the
lowest value of the second half's last quarter is above the highest of its first quarter (a rising floor, not
one more thread started late or the noise of a batch in flight).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import psutil

PY_SPY = Path(sys.executable).with_name("py-spy")  # installed with ray[default]

ROOT = Path(__file__).resolve().parents[1]
COUNTS = ("fds", "threads")


# ------------------------------------------------------------------ sampling

def _name(proc: psutil.Process, driver_pid: int) -> str:
    """A process's role: `driver`, its Ray title's class (`ray::RolloutActor`), or its program's name."""
    if proc.pid == driver_pid:
        return "driver"
    try:
        cmdline = proc.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return "?"
    if cmdline and cmdline[0].startswith("ray::"):
        return cmdline[0].split()[0].split(".")[0]  # the actor class, not the method running now
    return Path(cmdline[0]).name if cmdline else proc.name()


def local_processes(driver: psutil.Process) -> dict[str, dict]:
    """The driver and its descendants on this machine: name, RSS (MB), open descriptors, threads; keyed by pid."""
    out = {}
    for proc in [driver, *driver.children(recursive=True)]:
        try:
            out[str(proc.pid)] = {"name": _name(proc, driver.pid), "rss_mb": proc.memory_info().rss / 2**20,
                                  "fds": proc.num_fds(), "threads": proc.num_threads()}
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


def thread_names(pid: int) -> dict[str, int]:
    """A process's threads by name: the kernel's names (`comm`), and its Python threads' as `py:NAME` where
    `py-spy dump` can read the process (a C++ process such as gcs_server has none)."""
    names: Counter[str] = Counter()
    for task in Path(f"/proc/{pid}/task").glob("*/comm"):
        try:
            names[task.read_text().strip()] += 1
        except OSError:  # the thread ended while listed
            continue
    if PY_SPY.is_file():
        try:
            dump = subprocess.run([str(PY_SPY), "dump", "--pid", str(pid), "--json"], capture_output=True,
                                  timeout=10, check=True).stdout
            names.update(f"py:{t['thread_name']}" for t in json.loads(dump))
        except (subprocess.SubprocessError, ValueError):
            pass
    return dict(names)


def name_threads_where_changed(procs: dict[str, dict], counts: dict[str, int]) -> None:
    """Add `thread_names` to each process whose thread count is not the one `counts` last saw (and record it)."""
    for pid, p in procs.items():
        if counts.get(pid) != p["threads"]:
            p["thread_names"] = thread_names(int(pid))
            counts[pid] = p["threads"]


def threads_that_appeared(samples: list[dict]) -> dict[str, dict[str, int]]:
    """Per process (`name[pid]`) whose thread count grew from its first to its last named sample: the names
    whose count rose, by how much."""
    named: dict[str, list[tuple[int, dict[str, int]]]] = {}
    for s in samples:
        for pid, p in s["procs"].items():
            if "thread_names" in p:
                named.setdefault(f"{p['name']}[{pid}]", []).append((p["threads"], p["thread_names"]))
    out = {}
    for proc, seen in named.items():
        (first_count, first), (last_count, last) = seen[0], seen[-1]
        grown = {name: n - first.get(name, 0) for name, n in last.items() if n > first.get(name, 0)}
        if last_count > first_count and grown:
            out[proc] = grown
    return out


def ray_workers_and_store() -> dict | None:
    """Every node's raylet: its Ray workers (pid, actor, owned objects, refs in scope) and its plasma store
    (objects, bytes); None while no cluster is up."""
    import ray
    from ray._private.internal_api import node_stats

    if not ray.is_initialized():
        return None
    try:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        here = ray.get_runtime_context().get_node_id()
        out = {"nodes": {}, "workers": {}}
        for node in nodes:
            stats = node_stats(node["NodeManagerAddress"], node["NodeManagerPort"], include_memory_info=False)
            out["nodes"][node["NodeID"]] = {"address": node["NodeManagerAddress"], "local": node["NodeID"] == here,
                                            "plasma_objects": stats.store_stats.num_local_objects,
                                            "plasma_mb": stats.store_stats.object_store_bytes_used / 2**20}
            for w in stats.core_workers_stats:
                out["workers"][str(w.pid)] = {"node": node["NodeID"], "actor_id": w.actor_id.hex(),
                                              "owned_objects": w.num_owned_objects,
                                              "refs_in_scope": w.num_object_refs_in_scope}
        from ray._private.state import state

        out["gcs_task_events"] = len(state._get_all_task_events())  # kept up to cluster.max_task_events
        return out
    except Exception:  # the cluster is starting or going away
        return None


def _actor_classes() -> dict[str, str]:
    """Actor id -> class name, from the GCS's actor table (no dashboard needed)."""
    import ray

    try:
        return {aid: a.get("ActorClassName", "?") for aid, a in ray._private.state.actors().items()}
    except Exception:
        return {}


def _step(metrics: Path) -> int:
    try:
        with metrics.open("rb") as f:
            f.seek(max(0, metrics.stat().st_size - 65536))
            lines = f.read().decode(errors="replace").splitlines()
        return json.loads(lines[-1])["step"] if lines else 0
    except (OSError, ValueError, KeyError, IndexError):
        return 0


# ------------------------------------------------------------------ summary

def trend_per_100(steps: list[float], values: list[float]) -> float:
    """Least-squares slope of `values` over `steps`, per 100 steps (0 with fewer than 2 distinct steps)."""
    if len(set(steps)) < 2:
        return 0.0
    return 100 * statistics.linear_regression(steps, values).slope


def tolerance(metric: str, first: float) -> float:
    """Growth per 100 steps a series may show and still count as flat (see the module docstring)."""
    if metric == "rss_mb":
        return max(0.01 * first, 4.0)
    if metric == "plasma_mb":
        return 1.0
    return 1.0


def summarise(series: dict[str, list[tuple[int, float]]]) -> list[dict]:
    """Per series ("process / metric" -> [(step, value)]): first, last, max, trends, verdict."""
    rows = []
    for key, points in sorted(series.items()):
        if len(points) < 3:
            continue
        steps, values = [float(s) for s, _ in points], [float(v) for _, v in points]
        half = [(s, v) for s, v in points if s >= (steps[0] + steps[-1]) / 2]
        late = trend_per_100([float(s) for s, _ in half], [float(v) for _, v in half])
        q = max(1, len(half) // 4)
        rising = min(v for _, v in half[-q:]) > max(v for _, v in half[:q])  # the floor rose above the ceiling
        metric = key.rsplit(" / ", 1)[-1]
        tol = tolerance(metric, values[0])
        rows.append({"series": key, "samples": len(points), "first": values[0], "last": values[-1],
                     "max": max(values), "trend_per_100": trend_per_100(steps, values),
                     "second_half_trend_per_100": late, "tolerance_per_100": tol,
                     "verdict": "growing" if late > tol and rising else "flat"})
    return rows


def training_samples(samples: list[dict]) -> list[dict]:
    """The samples taken while the run trained: from its first step to the first sample at its last step (none
    from before step 1, nor from the shutdown after it, when the cluster and its processes go away)."""
    trained = [s for s in samples if s["step"] > 0 and s.get("ray")]
    if not trained:
        return []
    last = max(s["step"] for s in trained)
    return trained[:next(i for i, s in enumerate(trained) if s["step"] == last) + 1]


def series_of(samples: list[dict]) -> tuple[dict, dict]:
    """From the training samples (step > 0): measured series, and processes seen only through their raylet."""
    series: dict[str, list[tuple[int, float]]] = {}
    remote: dict[str, dict] = {}
    for s in samples:
        step = s["step"]
        for pid, p in s["procs"].items():
            for metric in ("rss_mb", *COUNTS):
                series.setdefault(f"{p['name']}[{pid}] / {metric}", []).append((step, p[metric]))
        ray_info = s.get("ray") or {}
        for node, n in ray_info.get("nodes", {}).items():
            where = "this node" if n["local"] else f"node {n['address']}"
            for metric in ("plasma_objects", "plasma_mb"):
                series.setdefault(f"plasma store ({where}) / {metric}", []).append((step, n[metric]))
        if "gcs_task_events" in ray_info:
            series.setdefault("GCS / task_events", []).append((step, ray_info["gcs_task_events"]))
        workers = ray_info.get("workers", {})
        for metric in ("owned_objects", "refs_in_scope"):
            series.setdefault(f"all Ray workers / {metric}", []).append(
                (step, sum(w[metric] for w in workers.values())))
        for pid, w in workers.items():
            if pid not in s["procs"] and not ray_info["nodes"].get(w["node"], {}).get("local", True):
                remote[pid] = {"node": ray_info["nodes"][w["node"]]["address"], "actor": w.get("actor", "")}
    return series, remote


def _fmt(v: float) -> str:
    return f"{v:.0f}" if abs(v) >= 100 or float(v).is_integer() else f"{v:.2f}"


def markdown(rows: list[dict], remote: dict, head: dict, appeared: dict | None = None) -> str:
    growing = [r for r in rows if r["verdict"] == "growing"]
    lines = [f"# Soak (benchmarks/soak.py), {head['date']}", "", "```", head["command"], "```", "",
             f"{head['steps']} training steps ({head['seconds_per_step']:.2f} s/step), {head['samples']} samples "
             f"every {head['every']:g} s, exit code {head['exit_code']}; load average {head['load_start']:.1f} at "
             f"the start, {head['load_end']:.1f} at the end ({os.cpu_count()} cores).", "",
             *([head["note"], ""] if head.get("note") else []),
             f"**Verdict: {'GROWING: ' + ', '.join(r['series'] for r in growing) if growing else 'flat'}** "
             "(a series grows when its second-half trend exceeds its tolerance per 100 steps, RSS max(1% of first, "
             "4 MB), plasma bytes 1 MB, counts 1, and the minimum of the second half's last quarter exceeds the "
             "maximum of its first quarter).", "",
             "| series | samples | first | last | max | trend / 100 steps | 2nd half / 100 steps | verdict |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        lines.append(f"| {r['series']} | {r['samples']} | {_fmt(r['first'])} | {_fmt(r['last'])} | {_fmt(r['max'])} "
                     f"| {r['trend_per_100']:+.2f} | {r['second_half_trend_per_100']:+.2f} | {r['verdict']} |")
    if remote:
        lines += ["", "Processes on other nodes (RSS, files and threads not measurable from this machine; their "
                  "Ray objects are in the worker totals):", ""]
        lines += [f"- pid {pid} on {w['node']} {w['actor']}" for pid, w in sorted(remote.items())]
    if appeared:
        lines += ["", "Threads that appeared (names whose count rose between a process's first and last named "
                  "sample; `py:` a Python thread, else the kernel's name):", ""]
        lines += [f"- {proc}: " + ", ".join(f"{name} +{n}" for name, n in sorted(grown.items()))
                  for proc, grown in sorted(appeared.items())]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ the run

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    parser.add_argument("--every", type=float, default=10.0, help="seconds between samples (default 10)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "soak"), help="results folder")
    parser.add_argument("--warm-start", type=Path, help="a model folder built before to train from (no warm start)")
    parser.add_argument("--summarise", action="store_true",
                        help="run nothing: make the table again from OUT/samples.jsonl (a run writes it as it samples)")
    parser.add_argument("--note", help="with --summarise: a line for the table's head (e.g. why the run stopped)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides for `selfdistill train`")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.summarise:
        head = json.loads((out / "soak.json").read_text()) if (out / "soak.json").is_file() else {}
        samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines() if line]
        head = {k: v for k, v in head.items() if k not in ("rows", "remote", "threads_appeared")}
        if args.note:
            head["note"] = args.note
        return report(samples, out, head, args, head.get("exit_code", 0), head.get("load_start", float("nan")))
    from selfdistill.config import load_config

    overrides = ["run.name=soak", "run.progress=false", "run.eval_size=0", f"run.steps={args.steps}",
                 *([f"model={{kind: pretrained, path: '{args.warm_start.resolve()}'}}"] if args.warm_start else []),
                 *args.overrides]
    cfg = load_config(None, overrides)
    samples, done = [], threading.Event()
    load_start = os.getloadavg()[0]
    out.mkdir(parents=True, exist_ok=True)
    head = {"command": " ".join(["nice -n 10 .venv/bin/python benchmarks/soak.py", *(argv or sys.argv[1:])]),
            "overrides": overrides, "every": args.every, "load_start": load_start, "exit_code": None}
    (out / "soak.json").write_text(json.dumps(head, indent=1))  # so that --summarise can name a run cut short
    stream = (out / "samples.jsonl").open("w")  # as they come: a run cut short keeps what it sampled

    def sample() -> None:  # a thread of the driver, so that it reaches the run's raylets
        driver, thread_counts = psutil.Process(), {}
        while not done.is_set():
            ray_info = ray_workers_and_store()
            if ray_info:
                classes = _actor_classes()
                for w in ray_info["workers"].values():
                    w["actor"] = classes.get(w["actor_id"], "") if w["actor_id"].strip("f0") else ""
            procs = local_processes(driver)
            name_threads_where_changed(procs, thread_counts)
            samples.append({"t": time.time(), "step": _step(cfg.run_dir / "metrics.jsonl"), "procs": procs,
                            "ray": ray_info})
            stream.write(json.dumps(samples[-1]) + "\n")
            stream.flush()
            done.wait(args.every)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    from selfdistill.launch.train import train

    code = 0
    try:
        train(cfg)
    except Exception as error:  # the samples so far are still summarised
        print(f"soak: the run failed: {type(error).__name__}: {error}")
        code = 1
    finally:
        done.set()
        sampler.join()
        stream.close()
    return report(samples, out, head, args, code, load_start)


def report(samples: list[dict], out: Path, head: dict, args, code: int, load_start: float) -> int:
    """Summarise the samples of the training steps into OUT/soak.json and OUT/soak.md (the samples themselves:
    OUT/samples.jsonl)."""
    training = training_samples(samples)
    if len(training) < 2:
        print("soak: fewer than 2 samples during training; nothing to summarise")
        return code or 1
    series, remote = series_of(training)
    rows = summarise(series)
    span = training[-1]["step"] - training[0]["step"]
    head = {**head, "date": head.get("date") or time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "steps": training[-1]["step"],
            "seconds_per_step": (training[-1]["t"] - training[0]["t"]) / span if span else float("nan"),
            "samples": len(training), "every": head.get("every", args.every),
            "exit_code": code if code is not None else "none (stopped before it ended)", "load_start": load_start,
            "load_end": head.get("load_end") or os.getloadavg()[0]}
    appeared = threads_that_appeared(training)
    (out / "soak.json").write_text(json.dumps({**head, "rows": rows, "remote": remote, "threads_appeared": appeared},
                                              indent=1))
    (out / "soak.md").write_text(markdown(rows, remote, head, appeared))
    print(markdown(rows, remote, head, appeared))
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
