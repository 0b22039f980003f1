"""OPSD with a LoRA adapter through the real stack (Ray, vLLM serving the adapter, DeepSpeed, the
frozen base as teacher), its checkpoint, `selfdistill export --merged` and `--resume`."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from selfdistill.launch.cli import main as cli
from selfdistill.launch.run_dir import latest_checkpoint
from selfdistill.launch.train import train
from selfdistill.models import lora
from tests.test_e2e import SYNC_TOLERANCE, _config, _metrics

pytestmark = pytest.mark.e2e
SEQUENCE = [1, *range(3, 40)]


@torch.no_grad()
def _hf_logprobs(model, sequence):
    ids = torch.tensor([sequence])
    return model(input_ids=ids).logits[0, :-1].log_softmax(-1).gather(-1, ids[0, 1:, None]).squeeze(-1)


def _vllm_logprobs(path):
    from selfdistill.rollout.base import EngineConfig, build_engine

    engine = build_engine(EngineConfig(enforce_eager=True, kv_cache_gib=0.25, max_model_len=128), str(path))
    out = torch.tensor(engine.sequence_logprobs([SEQUENCE])[0])
    del engine
    return out


def test_opsd_lora_adapter_sync_checkpoint_export_resume(tmp_path, tiny_model):
    cfg = _config(tmp_path, tiny_model, "learner.lora={rank: 8, alpha: 16, sync: adapter}",
                  f"run.cache_dir={tmp_path / 'cache'}",
                  "learner.lr=1e-2", "run.eval_size=0")
    assert cfg.teacher.weights == "frozen"
    train(cfg)
    rows = _metrics(cfg.run_dir)
    full_bytes = sum(t.numel() * 4 for t in load_file(tiny_model / "model.safetensors").values())
    ckpt = latest_checkpoint(cfg.run_dir)
    adapter = load_file(ckpt / lora.ADAPTER_WEIGHTS)
    for r in rows:
        assert r["sync/max_logprob_gap"] <= SYNC_TOLERANCE, r  # the engine serves exactly the learner's adapter
        assert r["sync/bytes"] == sum(t.numel() * 4 for t in adapter.values()) < full_bytes / 5
    # the checkpoint is a PEFT adapter folder next to the trainer state; it moved away from B = 0
    assert {"adapter_config.json", "adapter_model.safetensors", "trainer_state.json"} <= {p.name for p in ckpt.iterdir()}
    assert lora.base_model_path(ckpt) == str(Path(tiny_model).resolve())
    assert any(not torch.all(t == 0) for n, t in adapter.items() if "lora_B" in n)

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    peft_lp = _hf_logprobs(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), ckpt), SEQUENCE)
    base_lp = _hf_logprobs(AutoModelForCausalLM.from_pretrained(tiny_model), SEQUENCE)
    assert (peft_lp - base_lp).abs().max() > 1e-3  # training changed the policy

    merged = tmp_path / "merged"
    assert cli(["export", str(cfg.run_dir), "--merged", str(merged)]) == 0
    merged_lp = _hf_logprobs(AutoModelForCausalLM.from_pretrained(merged), SEQUENCE)
    for other in (merged_lp, _vllm_logprobs(merged), _vllm_logprobs(ckpt)):
        assert (other - peft_lp).abs().max() <= SYNC_TOLERANCE

    # --resume continues the adapter and its optimizer state
    resumed = cfg.model_copy(update={"run": cfg.run.model_copy(update={"steps": 4})})
    train(resumed, ckpt)
    rows = _metrics(cfg.run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[-1]["sync/max_logprob_gap"] <= SYNC_TOLERANCE


def test_opsd_lora_merged_sync_live_teacher(tmp_path, tiny_model):
    """merged: the learner folds the adapter into full weights for engines and teacher (ZeRO-3 gathers: see
    test_lora.py's two-rank test)."""
    cfg = _config(tmp_path, tiny_model, "learner.lora={rank: 8, alpha: 16, sync: merged}", "teacher.weights=live",
                  "run.steps=2", "run.eval_size=0", f"run.cache_dir={tmp_path / 'cache'}")
    train(cfg)
    full_bytes = sum(t.numel() * 4 for t in load_file(tiny_model / "model.safetensors").values())
    for r in _metrics(cfg.run_dir):
        assert r["sync/max_logprob_gap"] <= SYNC_TOLERANCE, r
        assert r["sync/bytes"] == full_bytes  # merged: the full weights travel
    assert json.loads((latest_checkpoint(cfg.run_dir) / "adapter_config.json").read_text())["r"] == 8
