"""Weight transports through real processes: Ray on loopback, vLLM engines, DeepSpeed, teacher actors.

- The gloo collective transport (vLLM's weight-transfer API) and the object store give the very
  same weights after the same 3 training steps (same seeds), with every engine and the live
  teacher scoring exactly as the learner after every sync.
- A receiver killed in the middle of a transfer makes the send raise, naming it, within
  `sync.timeout_s`; nothing hangs.
- The gloo run's engine is tensor parallel (placement.rollout.tensor_parallel_size=2: vLLM's
  multiprocess executor on CPU), so that comparison also checks a 2-worker engine receiving through
  the collective at one rank per worker and scoring as the learner after every sync; its worker
  processes are seen during the run and gone after it.
"""

import os
import signal
import threading
import time

import psutil
import pytest
import ray
import torch
from safetensors.torch import load_file

from selfdistill.config import TeacherConfig, load_config
from selfdistill.data.templates import PromptTemplates
from selfdistill.launch.processes import alive
from selfdistill.launch.run_dir import latest_checkpoint
from selfdistill.launch.train import train
from selfdistill.teacher.actor import TeacherActor
from selfdistill.weights import CollectiveConfig, Receivers, TensorMeta, Weights, WeightSyncError, build_sender

pytestmark = pytest.mark.e2e


def _run(tmp_path, model, name, *overrides):
    cfg = load_config(None, [
        f"model={{kind: pretrained, path: {model}}}", f"run.output_dir={tmp_path}", f"run.name={name}",
        "run.steps=3", "run.save_every=0", "run.eval_size=1", "run.progress=false", "rollout.prompts_per_step=4",
        "rollout.sampling.n=2", "rollout.sampling.max_new_tokens=16", "learner.micro_batch_groups=1",
        "learner.lr=1e-3", "teacher.weights=live", "sync.check_every=1", "sync.bucket_mb=0.05", *overrides,
    ])
    summary = train(cfg)
    for pids in summary["pids"].values():
        for pid in (pids if isinstance(pids, list) else [pids]):
            assert pid is None or not alive(pid), f"actor process {pid} still alive after the run"
    import json

    rows = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(r["sync/max_logprob_gap"] <= 1e-4 for r in rows), rows
    return load_file(latest_checkpoint(cfg.run_dir) / "model.safetensors")


class _TensorParallelWorkers:
    """Process ids of vLLM's tensor-parallel workers (process title VLLM::Worker_TP<rank>) among this test's
    descendants (its Ray cluster's processes), seen while it runs."""

    def __init__(self):
        self.seen: dict[int, str] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self):
        me = psutil.Process()
        while not self.stop.wait(0.5):
            for proc in me.children(recursive=True):
                try:
                    title = " ".join(proc.cmdline())
                except psutil.Error:  # gone meanwhile
                    continue
                if title.startswith("VLLM::Worker_TP"):
                    self.seen.setdefault(proc.pid, title.split()[0])

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def test_gloo_collective_and_object_store_give_identical_weights(tmp_path, tiny_model, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "local")  # a cluster of its own, even where other Ray clusters run
    store = _run(tmp_path, tiny_model, "object-store")
    with _TensorParallelWorkers() as workers:  # the gloo run's engine: 2 tensor-parallel workers, a rank each
        gloo = _run(tmp_path, tiny_model, "gloo", "sync.transport=collective", "sync.backend=gloo",
                    "sync.timeout_s=60", "placement.rollout.tensor_parallel_size=2", "rollout.num_cpus_per_engine=2")
    assert sorted(set(workers.seen.values())) == ["VLLM::Worker_TP0", "VLLM::Worker_TP1"], workers.seen
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and any(alive(pid) for pid in workers.seen):
        time.sleep(0.2)
    assert not [pid for pid in workers.seen if alive(pid)], "worker processes left behind"
    before = load_file(tiny_model / "model.safetensors")
    assert set(store) == set(gloo)
    assert any(not torch.equal(store[k], before[k]) for k in store)  # training moved the weights
    for name in store:
        assert torch.equal(store[name], gloo[name]), name


def test_receiver_killed_mid_transfer_is_named_within_the_timeout(tiny_model):
    timeout_s = 20.0
    cfg = CollectiveConfig(backend="gloo", timeout_s=timeout_s, bucket_mb=0.01)
    state = {n: t for n, t in load_file(tiny_model / "model.safetensors").items()}
    meta = [TensorMeta(n, t.dtype, tuple(t.shape)) for n, t in state.items()]
    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    pids = []
    try:
        teacher_cls = ray.remote(TeacherActor).options(num_cpus=1)
        actors = [teacher_cls.remote(str(tiny_model), TeacherConfig(weights="live"), PromptTemplates(), 1.0, cfg)
                  for _ in range(2)]
        pids = ray.get([a.ready.remote() for a in actors])
        names = [f"teacher {i} (pid {pid})" for i, pid in enumerate(pids)]
        # this process is the learner's rank 0: the same sender the learner runs
        sender = build_sender(cfg, 0, Receivers(dict(zip(names, actors)), timeout_s=timeout_s))
        new = {n: t + 1.0 for n, t in state.items()}
        sender.connect(Weights(meta, lambda: [new]))
        sender.send(Weights(meta, lambda: [{n: t} for n, t in new.items()]), version=1)
        seq = [[1, 2, 3, 4, 5]]
        assert ray.get(actors[0].sequence_logprobs.remote(seq)) == ray.get(actors[1].sequence_logprobs.remote(seq))
        assert ray.get(actors[1].score.remote([], [], None)) == []

        def killing_buckets():
            items = list(state.items())
            yield dict(items[:1])
            os.kill(pids[1], signal.SIGKILL)  # receiver 1 dies with the transfer under way
            while alive(pids[1]):
                time.sleep(0.05)
            for name, tensor in items[1:]:
                yield {name: tensor}

        start = time.monotonic()
        with pytest.raises(WeightSyncError, match=rf"teacher 1 \(pid {pids[1]}\)"):
            sender.send(Weights(meta, killing_buckets), version=2)
        assert time.monotonic() - start < 3 * timeout_s  # bounded, never a hang (no timing claim beyond that)
    finally:
        ray.shutdown()
        for pid in pids:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
