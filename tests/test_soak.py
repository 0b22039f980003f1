"""benchmarks/soak.py's measurement: real /proc readings of a process that opens files and starts threads, and
the trend and verdict its table states."""

from __future__ import annotations

import importlib.util
import threading
from pathlib import Path

import psutil
import pytest

_spec = importlib.util.spec_from_file_location("soak", Path(__file__).resolve().parent.parent / "benchmarks" / "soak.py")
soak = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(soak)


def test_trend_is_the_least_squares_slope_per_100_steps():
    assert soak.trend_per_100([0, 10, 20, 30], [5, 6, 7, 8]) == pytest.approx(10.0)
    assert soak.trend_per_100([0, 10, 20, 30], [7, 7, 7, 7]) == 0.0
    assert soak.trend_per_100([5], [1]) == 0.0 and soak.trend_per_100([5, 5], [1, 2]) == 0.0


def test_a_series_that_grows_after_warm_up_is_growing_and_one_that_only_warms_up_is_flat():
    steps = list(range(0, 300, 10))
    warm_then_flat = [500 + min(s, 50) for s in steps]  # +50 MB in the first 50 steps, then nothing
    leak = [500 + 0.2 * s for s in steps]  # +20 MB per 100 steps all along
    fds = [40 + s // 30 for s in steps]  # one more open file every 30 steps
    rows = {r["series"]: r for r in soak.summarise({
        "a[1] / rss_mb": list(zip(steps, warm_then_flat)), "b[2] / rss_mb": list(zip(steps, leak)),
        "b[2] / fds": list(zip(steps, fds)), "c[3] / threads": [(0, 9), (10, 9)]})}
    assert rows["a[1] / rss_mb"]["verdict"] == "flat" and rows["a[1] / rss_mb"]["max"] == 550
    assert rows["b[2] / rss_mb"]["verdict"] == "growing"
    assert rows["b[2] / rss_mb"]["second_half_trend_per_100"] == pytest.approx(20.0)
    assert rows["b[2] / fds"]["verdict"] == "growing" and rows["b[2] / fds"]["last"] == 49
    assert "c[3] / threads" not in rows  # too few samples to call


def test_local_processes_reads_open_files_and_threads_of_the_process(tmp_path):
    me = psutil.Process()
    before = soak.local_processes(me)[str(me.pid)]
    assert before["name"] == "driver" and before["rss_mb"] > 0
    files = [open(tmp_path / f"f{i}", "w") for i in range(5)]
    stop = threading.Event()
    threads = [threading.Thread(target=stop.wait) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        after = soak.local_processes(me)[str(me.pid)]
        assert after["fds"] - before["fds"] >= 5 and after["threads"] - before["threads"] >= 3
    finally:
        stop.set()
        for t in threads:
            t.join()
        for f in files:
            f.close()


def test_series_of_names_processes_and_keeps_remote_workers_apart():
    def sample(step, rss, objects):
        return {"step": step, "procs": {"11": {"name": "ray::RolloutActor", "rss_mb": rss, "fds": 9, "threads": 4}},
                "ray": {"nodes": {"n1": {"address": "127.0.0.1", "local": True, "plasma_objects": objects,
                                         "plasma_mb": 0.5},
                                  "n2": {"address": "10.0.0.2", "local": False, "plasma_objects": 1, "plasma_mb": 0}},
                        "workers": {"11": {"node": "n1", "owned_objects": 2, "refs_in_scope": 3, "actor": "A"},
                                    "22": {"node": "n2", "owned_objects": 1, "refs_in_scope": 1,
                                           "actor": "LearnerActor"}}}}

    series, remote = soak.series_of([sample(1, 100, 3), sample(2, 101, 4)])
    assert series["ray::RolloutActor[11] / rss_mb"] == [(1, 100), (2, 101)]
    assert series["plasma store (this node) / plasma_objects"] == [(1, 3), (2, 4)]
    assert series["all Ray workers / refs_in_scope"] == [(1, 4), (2, 4)]
    assert remote == {"22": {"node": "10.0.0.2", "actor": "LearnerActor"}}


def test_training_samples_leave_out_start_up_and_shut_down():
    def sample(step, up=True):
        return {"step": step, "ray": {"nodes": {}} if up else None}

    samples = [sample(0), sample(1), sample(2), sample(3), sample(3), sample(3, up=False)]
    assert [s["step"] for s in soak.training_samples(samples)] == [1, 2, 3]
    assert soak.training_samples([sample(0), sample(2, up=False)]) == []


def test_one_late_thread_or_a_noisy_flat_series_is_not_growth():
    steps = list(range(0, 300, 5))
    one_more = [66 + (s >= 140) for s in steps]  # a pool thread started once, around the middle
    noisy = [800.0] * (len(steps) - 2) + [900.0, 900.0]  # a big batch in flight as the last samples were taken
    rows = {r["series"]: r for r in soak.summarise({"a[1] / threads": list(zip(steps, one_more)),
                                                    "b[2] / rss_mb": list(zip(steps, noisy))})}
    assert rows["b[2] / rss_mb"]["second_half_trend_per_100"] > rows["b[2] / rss_mb"]["tolerance_per_100"]
    assert rows["a[1] / threads"]["verdict"] == "flat" and rows["b[2] / rss_mb"]["verdict"] == "flat"


def test_a_thread_count_that_grows_names_the_threads_that_appeared():
    me = psutil.Process()
    counts: dict[str, int] = {}
    samples = []

    def take(step):
        procs = {str(me.pid): {"name": "driver", "threads": me.num_threads()}}
        soak.name_threads_where_changed(procs, counts)
        samples.append({"step": step, "procs": procs})

    take(1)
    take(2)  # unchanged: not named again
    assert "thread_names" in samples[0]["procs"][str(me.pid)]
    assert "thread_names" not in samples[1]["procs"][str(me.pid)]
    stop = threading.Event()
    threads = [threading.Thread(target=stop.wait, name="soak-test-pool") for _ in range(2)]
    for t in threads:
        t.start()
    try:
        take(3)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert soak.threads_that_appeared(samples)[f"driver[{me.pid}]"]["py:soak-test-pool"] == 2
