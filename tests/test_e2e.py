"""End to end through the real stack: a local Ray cluster on loopback, vLLM engines,
DeepSpeed ZeRO ranks, the teacher actor and math-verify, on a tiny model.

The runs share one local cluster (fixture `local_ray`); each starts and stops its own actors, and
afterwards no actor process is left alive.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from selfdistill.config import load_config
from selfdistill.launch.processes import alive
from selfdistill.launch.run_dir import latest_checkpoint
from selfdistill.launch.train import train

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("local_ray")]
SYNC_TOLERANCE = 1e-4


def _config(tmp_path, model, *overrides):
    return load_config(None, [
        f"model={{kind: pretrained, path: {model}}}",
        f"run.output_dir={tmp_path}", "run.name=e2e", "run.steps=3", "run.save_every=2", "run.eval_size=8",
        "run.progress=false", "rollout.prompts_per_step=4", "rollout.sampling.n=2",
        "rollout.sampling.max_new_tokens=24", "learner.micro_batch_groups=1", "sync.check_every=1",
        "learner.lr=1e-3", *overrides,
    ])


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _assert_run(cfg, summary, initial_model: Path):
    run_dir = cfg.run_dir
    rows = _metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, cfg.run.steps + 1))
    for r in rows:
        assert all(v == v and abs(v) != float("inf") for k, v in r.items() if k.startswith("train/")), r
        # every sync landed: the engine scores a fixed sequence exactly as the learner does
        assert r["sync/max_logprob_gap"] <= SYNC_TOLERANCE, r
        # the teacher under the reference context is not the student
        if "train/teacher_student_kl/full" in r:
            assert r["train/teacher_student_kl/full"] > 1e-6, r
        assert {"time/generate", "time/verify", "time/teacher", "time/train", "time/sync"} <= set(r)
    assert (run_dir / "config.yaml").is_file()
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))
    ckpt = latest_checkpoint(run_dir)
    assert ckpt is not None and ckpt.name == f"step-{cfg.run.steps:06d}"
    # the learner's weights moved
    before, after = load_file(initial_model / "model.safetensors"), load_file(ckpt / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before if k in after)
    # the checkpoint is a Hugging Face folder transformers loads directly
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(ckpt)
    AutoTokenizer.from_pretrained(ckpt)
    assert torch.equal(model.state_dict()["model.norm.weight"], after["model.norm.weight"])
    for pids in summary["pids"].values():
        for pid in (pids if isinstance(pids, list) else [pids]):
            assert pid is None or not alive(pid), f"actor process {pid} still alive after the run"
    return rows


def test_opsd_one_rank_zero1_then_resume(tmp_path, tiny_model):
    cfg = _config(tmp_path, tiny_model)
    summary = train(cfg)
    rows = _assert_run(cfg, summary, tiny_model)
    assert 0.0 <= summary["accuracy_after"] <= 1.0
    assert rows[-1]["train/loss"] >= 0.0

    # resume: continue the same run from its last checkpoint for two more steps
    from selfdistill.launch.run_dir import read_trainer_state

    resumed = cfg.model_copy(update={"run": cfg.run.model_copy(update={"steps": 5})})
    ckpt = latest_checkpoint(cfg.run_dir)
    assert read_trainer_state(ckpt)["data"]["cursor"] == 12  # 3 steps x 4 prompts
    train(resumed, ckpt)
    rows = _metrics(cfg.run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert latest_checkpoint(cfg.run_dir).name == "step-000005"


def test_dasd_two_ranks_zero3(tmp_path, tiny_model):
    cfg = _config(tmp_path, tiny_model, "learner.num_ranks=2", "learner.zero_stage=3", "objective.name=dasd")
    summary = train(cfg)
    _assert_run(cfg, summary, tiny_model)


def test_async_pipeline_on_two_engines(tmp_path, tiny_model):
    """max_staleness 1: step n+1 is generated while step n trains, on two engines sharing the batch."""
    from selfdistill.launch.run_dir import read_trainer_state

    cfg = _config(tmp_path, tiny_model, "rollout.max_staleness=1", "rollout.num_engines=2")
    summary = train(cfg)
    rows = _assert_run(cfg, summary, tiny_model)
    assert rows[0]["rollout/staleness_max"] == 0  # the first batch comes from the initial weights
    # step 2's batch was started while step 1 trained, from version 0 (a chunk an engine takes after
    # loading version 1 is fresh); importance weights corrected it
    assert rows[1]["rollout/staleness_max"] == 1 and rows[1]["rollout/staleness_mean"] > 0
    assert all(r["rollout/staleness_max"] <= 1 for r in rows)
    assert all(0 < r["train/is_weight_mean"] <= cfg.learner.tis_cap for r in rows)
    # the checkpoint of step 2 records the data position after batch 2, although batch 3 was already drawn
    assert read_trainer_state(cfg.run_dir / "checkpoints" / "step-000002")["data"]["cursor"] == 8
    assert len(summary["pids"]["rollout"]) == 2


def test_cli_bad_inputs_fail_fast_with_a_clear_message(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "selfdistill.launch.cli", "train", *args],
                              capture_output=True, text=True, timeout=120)

    r = run(str(tmp_path / "missing.yaml"))
    assert r.returncode == 2 and "config file not found" in r.stderr and "missing.yaml" in r.stderr
    r = run("objective.name=nonesuch")
    assert r.returncode == 2 and "objective" in r.stderr and "nonesuch" in r.stderr
    r = run(f"model={{kind: pretrained, path: {tmp_path}/no_model}}")
    assert r.returncode == 2 and "no_model" in r.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "1+1", "answer": "2"}\n{"question": "2+2"}\n')
    r = run("data={name: file, path: " + str(bad) + ", on_bad_row: error}", "run.eval_size=1")
    assert r.returncode == 2 and "bad.jsonl:2" in r.stderr
    assert "Started a local Ray instance" not in r.stdout + r.stderr


@pytest.mark.parametrize("method", ["pmi", "exposure", "dapo", "position_weighted"])
def test_method_configs_run_on_the_real_stack(tmp_path, tiny_model, method):
    """The shipped per-method configs, on the real stack (tiny random model, 2 steps)."""
    root = Path(__file__).parent.parent
    cfg = load_config(root / "configs" / "cpu" / f"{method}.yaml", [
        f"model={{kind: pretrained, path: {tiny_model}}}", f"run.output_dir={tmp_path}", "run.steps=2",
        "run.save_every=0", "run.eval_size=4", "run.progress=false", "rollout.prompts_per_step=4",
        "rollout.sampling.n=2", "rollout.sampling.max_new_tokens=16", "sync.check_every=1",
    ])
    summary = train(cfg)
    rows = _metrics(cfg.run_dir)
    assert len(rows) == 2 and all(r["sync/max_logprob_gap"] <= SYNC_TOLERANCE for r in rows)
    assert all(v == v for r in rows for k, v in r.items() if k.startswith("train/")), rows
    if method == "exposure":
        assert all(0.1 <= r["exposure/alpha"] <= 1.0 for r in rows)
    if method == "pmi":
        assert "train/teacher_student_kl/reference_only" in rows[-1] or "train/teacher_student_kl/full" in rows[-1]
    assert Path(summary["plot"]).is_file()
