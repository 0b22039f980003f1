"""A real two-node Ray cluster on loopback, and a training run submitted to it with `selfdistill submit`.

The head (with its dashboard) carries resource node_a, the second node node_b; the config pins the
rollout engine to node_a and the learner to node_b. A dry-run against the live cluster plans them there
(starting nothing). The test asserts where the actors ran from the node
ids the run records, that the job succeeded with metrics and a loadable checkpoint, that engine and
learner agreed after every sync over the gloo collective transport (selfdistill/weights/collective.py), that every socket the cluster and the job listened on was on
127.0.0.1, and that no process is left once the cluster is stopped.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from selfdistill.launch.processes import alive

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening(procs: dict[int, psutil.Process]) -> set[tuple[str, str, int]]:
    """(process name, address, port) of every socket one of `procs` listens on. One machine-wide table read
    (a tenth of the CPU time of asking each of ~35 processes, which parses the tables once per process)."""
    found = set()
    for c in psutil.net_connections(kind="inet"):
        if c.status == psutil.CONN_LISTEN and c.pid in procs:
            try:
                found.add((procs[c.pid].name(), c.laddr.ip, c.laddr.port))
            except psutil.NoSuchProcess:
                pass
    return found


def _descendants(seen: dict[int, psutil.Process]) -> None:
    for proc in psutil.Process().children(recursive=True):
        seen.setdefault(proc.pid, proc)


class _Submitted:
    """`selfdistill submit` in a child process, its output read as it comes. The job counts as hung when it shows
    no progress (no output line, no new cluster process, no change in its run folder) for STALL_S; LIMIT_S bounds
    it however slowly a loaded machine runs it (idle, the whole job takes a fraction of STALL_S)."""

    STALL_S, LIMIT_S = 600.0, 1800.0

    def __init__(self, args: list[str]):
        self.proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    def wait(self, run_dir: Path, seen: dict[int, psutil.Process], sockets: set) -> str | None:
        """Wait for the submit to exit, recording the cluster's processes and their listening sockets meanwhile;
        returns why it was killed instead, or None."""
        start = last = time.monotonic()
        progress = None
        while self.proc.poll() is None:
            _descendants(seen)
            sockets |= _listening(seen)
            now, state = time.monotonic(), (len(self.lines), len(seen), _files(run_dir))
            if state != progress:
                progress, last = state, now
            if now - last > self.STALL_S or now - start > self.LIMIT_S:
                self.proc.kill()
                self.proc.wait()
                return (f"job killed after {now - start:.0f} s, {now - last:.0f} s since its last progress "
                        f"(limits: {self.STALL_S:.0f} s without progress, {self.LIMIT_S:.0f} s in all); its run "
                        f"folder: {[name for name, _ in progress[2]]}")
            time.sleep(1.0)
        return None

    def output(self) -> str:
        self.reader.join(timeout=30)
        return "".join(self.lines)


def _files(run_dir: Path) -> tuple[tuple[str, int], ...]:
    """The run folder's files and their sizes (its progress: placement, metrics rows, checkpoints)."""
    found = []
    for path in sorted(run_dir.rglob("*")) if run_dir.exists() else []:
        try:
            found.append((str(path.relative_to(run_dir)), path.stat().st_size))
        except OSError:  # renamed meanwhile (a checkpoint's partial folder)
            pass
    return tuple(found)


def _job_state(address: str, output: str) -> str:
    """The submitted job's state and its log tail, from the cluster (the submit's own output where it has none)."""
    from ray.job_submission import JobSubmissionClient

    job = re.search(r"submitted job (\S+)", output)
    if job is None:
        return f"no job was submitted; submit's output:\n{output[-4000:]}"
    try:
        client = JobSubmissionClient(address)
        info = client.get_job_info(job[1])
        return (f"job {job[1]} was {info.status.value} ({info.message}); its log tail:\n"
                f"{client.get_job_logs(job[1])[-4000:]}")
    except Exception as e:  # the cluster no longer answers: the submit's output holds the logs it streamed
        return f"job {job[1]}: state unknown ({e!r}); submit's output:\n{output[-4000:]}"


@pytest.mark.e2e
def test_submitted_run_on_two_loopback_nodes(tmp_path, monkeypatch, tiny_model):
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    # The cluster's processes, and the job's, inherit these. VLLM_ENABLE_V1_MULTIPROCESSING is one the driver also
    # gives its actors: set in the user's shell, `submit` ships it in the job's runtime env, and the driver must not
    # name it again (Ray refuses the job's driver otherwise).
    for key, value in {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "GLOO_SOCKET_IFNAME": "lo",
                       "VLLM_HOST_IP": "127.0.0.1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)  # ray was imported before the variable was set
    dashboard = _free_port()
    cluster = Cluster(initialize_head=True, connect=False, head_node_args={
        "num_cpus": 2, "resources": {"node_a": 1}, "include_dashboard": True, "dashboard_host": "127.0.0.1",
        "dashboard_port": dashboard, "node_ip_address": "127.0.0.1", "gcs_server_port": _free_port(),
        "dashboard_agent_listen_port": _free_port()})
    seen: dict[int, psutil.Process] = {}
    sockets: set = set()
    try:
        node_b = cluster.add_node(num_cpus=1, resources={"node_b": 1}, node_ip_address="127.0.0.1",
                                  dashboard_agent_listen_port=_free_port())
        node_a_id, node_b_id = cluster.head_node.node_id, node_b.node_id
        overrides = [
            f"model={{kind: pretrained, path: {tiny_model}}}",  # no warm start: the job's cost is the run itself
            "run.steps=3", "run.eval_size=4", "run.save_every=0", "rollout.prompts_per_step=4", "sync.check_every=1",
            f"run.output_dir={tmp_path}", "run.name=two-node", "run.log_every=1",
            "placement.rollout.resources={node_a: 0.5}", "placement.teacher.resources={node_a: 0.5}",
            "placement.learner.resources={node_b: 1}",
            "sync.transport=collective", "sync.backend=gloo", "sync.timeout_s=120",  # vLLM's weight-transfer API
        ]
        dry = subprocess.run([str(Path(sys.executable).parent / "selfdistill"), "train", "--dry-run", *overrides,
                              f"cluster.address={cluster.address}"], cwd=ROOT, capture_output=True, text=True)
        assert dry.returncode == 0, dry.stderr[-3000:]
        plan = {line.split()[0]: line.split()[1] for line in dry.stdout.splitlines() if line.startswith("  ")
                and line.split()[0] in ("rollout/0", "teacher", "learner/0")}
        assert plan == {"rollout/0": node_a_id[:10], "teacher": node_a_id[:10], "learner/0": node_b_id[:10]}, plan
        address = f"http://127.0.0.1:{dashboard}"
        submit = _Submitted([str(Path(sys.executable).parent / "selfdistill"), "submit", *overrides,
                             "--address", address])
        stalled = submit.wait(tmp_path / "two-node", seen, sockets)
        output = submit.output()
        if stalled:
            pytest.fail(f"{stalled}; {_job_state(address, output)}")
        assert submit.proc.returncode == 0, output[-4000:]
        assert "ended SUCCEEDED" in output, output[-4000:]
        assert "follow its logs: ray job logs" in output
        assert "ETA" in output  # job logs are no terminal: plain progress lines
    finally:
        cluster.shutdown()

    run_dir = tmp_path / "two-node"
    placement = json.loads((run_dir / "placement.json").read_text())
    assert placement["rollout/0"] == node_a_id and placement["teacher"] == node_a_id
    assert placement["learner/0"] == node_b_id and node_a_id != node_b_id
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["sync/max_logprob_gap"] <= 1e-4 for r in rows)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["placement"] == placement

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(summary["checkpoint"])
    assert sum(p.numel() for p in model.parameters()) > 0

    assert sockets, "no listening socket seen during the run"
    outside = sorted(s for s in sockets if s[1] not in ("127.0.0.1", "::ffff:127.0.0.1"))
    assert not outside, f"listening beyond loopback: {outside}"
    names = {name for name, _, _ in sockets}
    assert {"gcs_server", "raylet"} <= names and any("RolloutActor" in n for n in names)

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and any(alive(p.pid) for p in seen.values()):
        time.sleep(0.2)
    left = [p.pid for p in seen.values() if alive(p.pid)]
    assert not left, f"processes left after the cluster stopped: {left}"


@pytest.mark.e2e
def test_colocated_engine_sleeps_while_the_learner_trains(tmp_path, tiny_model):
    """Engine and learner rank in one shared bundle; every step the engine sleeps before the learner trains and
    wakes in two stages around the weight update, in that order (vLLM's own sleep state recorded after each call:
    on CPU sleep and wake_up free nothing, but the call sequence and the state are those of a GPU run)."""
    import re

    from selfdistill.config import load_config
    from selfdistill.launch.train import train

    cfg = load_config(None, [
        f"model={{kind: pretrained, path: {tiny_model}}}", f"run.output_dir={tmp_path}", "run.name=colocated",
        "run.steps=2", "run.save_every=0", "run.eval_size=4", "run.progress=false", "rollout.prompts_per_step=2",
        "rollout.sampling.n=2", "rollout.sampling.max_new_tokens=16", "sync.check_every=1", "learner.lr=1e-3",
        "objective={name: grpo}", "placement.mode=colocated", "sync.transport=collective", "sync.backend=gloo",
        "sync.timeout_s=120",
    ])
    summary = train(cfg)
    rows = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    cycle = re.compile(r"sleep \[asleep\],wake_up\(weights\) \[asleep\],start_weight_update \[asleep\],"
                       r"(update_weights \[asleep\],)+finish_weight_update \[asleep\],wake_up\(kv_cache\)")
    for r in rows:
        calls = r["colocate/engine_calls"]["engine 0"]
        first_sleep = calls.index("sleep [asleep]")
        assert set(calls[:first_sleep]) <= {"generate", "sequence_logprobs"} and "generate" in calls[:first_sleep]
        assert cycle.fullmatch(",".join(calls[first_sleep:])), calls  # nothing else between sleep and waking
        assert r["sync/max_logprob_gap"] <= 1e-4, r
        assert r["train/colocate_sleep_s"] >= 0 and r["sync/wake_kv_cache_s"] >= 0
    assert summary["placement"]["rollout/0"] == summary["placement"]["learner/0"]
    for pids in summary["pids"].values():
        for pid in (pids if isinstance(pids, list) else [pids]):
            assert pid is None or not alive(pid), f"actor process {pid} still alive after the run"
