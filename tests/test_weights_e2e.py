"""Weight transports through real processes: Ray on loopback, vLLM engines, DeepSpeed, teacher actors.

- The gloo collective transport (vLLM's weight-transfer API) and the object store give the very
  same weights after the same 3 training steps (same seeds), with every engine and the live
  teacher scoring exactly as the learner after every sync.
- A receiver killed in the middle of a transfer makes the send raise, naming it, within
  `sync.timeout_s`; nothing hangs.
- A tensor-parallel engine (2 workers) receives through the same collective, one rank per worker.
"""

import os
import signal
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


def test_gloo_collective_and_object_store_give_identical_weights(tmp_path, tiny_model, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "local")  # a cluster of its own, even where other Ray clusters run
    store = _run(tmp_path, tiny_model, "object-store")
    gloo = _run(tmp_path, tiny_model, "gloo", "sync.transport=collective", "sync.backend=gloo", "sync.timeout_s=60")
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


def test_tensor_parallel_engine_receives_at_one_collective_rank_per_worker(tiny_model):
    """A rollout engine over 2 tensor-parallel workers (vLLM's multiprocess executor on CPU; the Ray executor on
    GPUs) takes weights through the gloo collective with each worker its own rank (the learner's client counts 2
    ranks for it), and then scores exactly as transformers does with those weights."""
    from transformers import AutoModelForCausalLM

    from selfdistill.rollout.actor import RolloutActor
    from selfdistill.rollout.base import EngineConfig, EngineExecutor

    cfg = CollectiveConfig(backend="gloo", timeout_s=120.0, bucket_mb=0.05)
    state = load_file(tiny_model / "model.safetensors")
    meta = [TensorMeta(n, t.dtype, tuple(t.shape)) for n, t in state.items()]
    generator = torch.Generator().manual_seed(0)
    new = {n: t + 0.05 * torch.randn(t.shape, generator=generator) for n, t in state.items()}
    sequence = [1, 5, 9, 2, 7, 3, 11, 4]

    def reference(weights) -> list[float]:
        model = AutoModelForCausalLM.from_pretrained(tiny_model, torch_dtype=torch.float32)
        model.load_state_dict(weights, strict=False)
        logits = model(torch.tensor([sequence])).logits[0, :-1].log_softmax(-1)
        return logits.gather(-1, torch.tensor(sequence[1:])[:, None])[:, 0].tolist()

    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    pid, workers = None, []
    try:
        engine = EngineConfig(enforce_eager=True, kv_cache_gib=0.1, max_model_len=64)
        actor = ray.remote(RolloutActor).options(num_cpus=2).remote(str(tiny_model), engine, cfg, 0, EngineExecutor(2))
        pid = ray.get(actor.ready.remote())
        workers = psutil.Process(pid).children(recursive=True)  # vLLM's worker processes
        tp = ray.get(actor.__ray_call__.remote(
            lambda a: a.engine.llm.llm_engine.vllm_config.parallel_config.tensor_parallel_size))
        assert tp == 2
        before = ray.get(actor.sequence_logprobs.remote([sequence]))[0]
        assert max(abs(a - b) for a, b in zip(before, reference(state))) <= 1e-4
        receivers = Receivers({"engine 0": actor}, {"engine 0": 2}, timeout_s=cfg.timeout_s)
        assert receivers.world_size == 3  # the sender and both workers
        sender = build_sender(cfg, 0, receivers)
        sender.connect(Weights(meta, lambda: [new]))
        sender.send(Weights(meta, lambda: [{n: t} for n, t in new.items()]), version=1)
        after = ray.get(actor.sequence_logprobs.remote([sequence]))[0]
        assert max(abs(a - b) for a, b in zip(after, reference(new))) <= 1e-4
        assert max(abs(a - b) for a, b in zip(after, before)) > 1e-3  # the update changed what it scores
        assert ray.get(actor.weight_version.remote()) == 1
    finally:
        ray.shutdown()
        if pid is not None and alive(pid):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and any(alive(w.pid) for w in workers):
        time.sleep(0.2)
    assert len(workers) >= 2 and not [w.pid for w in workers if alive(w.pid)], "worker processes left behind"
