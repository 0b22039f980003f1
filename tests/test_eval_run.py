"""`selfdistill eval`: configs, `evaluate_problems` on a scripted engine, end to end on a tiny model."""

import json

import pytest
import yaml

from selfdistill.config import ConfigError, TrainConfig, save_config
from selfdistill.data.templates import PromptTemplates
from selfdistill.eval.run import EvalConfig, evaluate_problems, load_eval_config
from selfdistill.launch import cli
from selfdistill.models.tiny import build_tiny_model
from selfdistill.models.tokenizer import build_char_tokenizer
from selfdistill.records import Problem
from selfdistill.rewards import MathVerifier
from selfdistill.rollout.base import Sample, SamplingConfig

TOKENIZER = build_char_tokenizer()
PROBLEMS = [Problem("p0", "2+3", "2+3=5\n\\boxed{5}", "5"), Problem("p1", "4*2", "4*2=8\n\\boxed{8}", "8")]
RESPONSES = {  # by question: k=3 scripted responses
    "2+3": ["\\boxed{5}", "\\boxed{6}", "so \\boxed{5}"],  # correct, wrong, correct
    "4*2": ["\\boxed{1}", "\\boxed{2}", "wait, no answer"],  # wrong, wrong, unparsable
}


class ScriptedEngine:
    """Answers each prompt with its scripted responses; records the sampling of every call."""

    def __init__(self):
        self.calls = []

    def generate(self, prompts, sampling):
        self.calls.append((len(prompts), sampling))
        out = []
        for ids in prompts:
            question = TOKENIZER.decode(ids).removeprefix("Q: ").split("\n")[0]
            texts = RESPONSES[question][: sampling.n]
            out.append([Sample([7] * (i + 2), [-0.5] * (i + 2), "stop" if i < 2 else "length", t)
                        for i, t in enumerate(texts)])
        return out


@pytest.fixture(scope="module")
def verifier():
    with MathVerifier(num_workers=1) as v:
        yield v


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("m") / "m", seed=0, hidden_size=64, num_layers=2, num_heads=2)


def test_evaluate_problems_by_hand(verifier):
    engine = ScriptedEngine()
    result = evaluate_problems(engine, verifier, TOKENIZER, PromptTemplates(), PROBLEMS, 3,
                               SamplingConfig(seed=10), batch_size=1, dataset="toy")
    m = result.metrics
    assert m["n_problems"] == 2 and m["k"] == 3
    assert m["avg@3"] == pytest.approx((2 / 3 + 0) / 2)
    assert m["pass@k"] == pytest.approx({"1": 1 / 3, "2": (1 + 0) / 2, "3": 0.5})
    assert m["maj@3"] == pytest.approx(0.5)  # "5" wins p0; p1 ties 1-2 -> "1", wrong
    assert m["status"] == {"correct": 2, "wrong": 3, "unparsable": 1, "refused": 0, "timeout": 0, "error": 0}
    assert m["health"]["length"] == pytest.approx(3.0) and m["health"]["truncation_rate"] == pytest.approx(1 / 3)
    assert m["health"]["reflection_rate"] == pytest.approx(1 / 6) and m["health"]["surprisal"] == pytest.approx(0.5)
    # batch_size=1: two calls, each sample gets its own seed (chunk start * k)
    assert [(n, s.n, s.seed) for n, s in engine.calls] == [(1, 3, 10), (1, 3, 13)]
    first = result.samples[0]
    assert first == {"dataset": "toy", "uid": "p0", "sample": 0, "prompt": "Q: 2+3\nA: ", "response": "\\boxed{5}",
                     "extracted": "5", "gold": "5", "status": "correct", "reward": 1.0, "finish_reason": "stop",
                     "length": 2}
    assert len(result.samples) == 6 and result.samples[-1]["extracted"] is None
    flat = result.flat()
    assert flat["eval/avg@3"] == m["avg@3"] and flat["eval/pass@3"] == 0.5 and "eval/health/length" in flat


def test_greedy_samples_once_and_repeats(verifier):
    engine = ScriptedEngine()
    result = evaluate_problems(engine, verifier, TOKENIZER, PromptTemplates(), PROBLEMS, 4,
                               SamplingConfig(temperature=0.0, seed=None))
    assert [s.n for _, s in engine.calls] == [1]
    assert result.metrics["avg@4"] == pytest.approx(0.5) and result.metrics["pass@k"]["4"] == pytest.approx(0.5)
    assert len(result.samples) == 8


def test_eval_config_checks():
    with pytest.raises(ValueError, match="extra"):
        EvalConfig(model="m", nonsense=1)
    with pytest.raises(ValueError, match="sampling.n"):
        EvalConfig(model="m", k=4, sampling={"n": 2})
    with pytest.raises(ValueError, match="names"):
        EvalConfig(model="m", datasets={"a b": {"name": "arithmetic"}})
    assert EvalConfig(model="m").out_dir.as_posix() == "m/eval"


def test_load_eval_config_from_yaml_and_folder(tmp_path, tiny_model):
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump({
        "model": str(tiny_model),
        "datasets": {"gsm8k": {"name": "file", "path": "tests/fixtures/gsm8k.jsonl", "preset": "gsm8k"},
                     "arith": {"name": "arithmetic", "num_eval": 5}},
    }, sort_keys=False))
    cfg = load_eval_config(str(path), ["sampling.temperature=0.6"], k=4, out=str(tmp_path / "o"))
    assert cfg.k == 4 and cfg.sampling.temperature == 0.6 and list(cfg.datasets) == ["gsm8k", "arith"]
    assert cfg.out_dir == tmp_path / "o"
    cfg = load_eval_config(str(tiny_model), ["engine.name=hf"])  # a bare model folder: defaults
    assert cfg.model == str(tiny_model) and cfg.engine.name == "hf" and cfg.k == 8
    with pytest.raises(ConfigError, match="no config.json"):
        load_eval_config(str(tmp_path))
    with pytest.raises(ConfigError, match="k"):
        load_eval_config(str(path), ["k=0"])
    with pytest.raises(ConfigError, match="no such"):
        load_eval_config(str(tmp_path / "missing"))


def test_checkpoint_of_a_run_inherits_its_settings(tmp_path, tiny_model):
    run = TrainConfig.model_validate({"templates": {"plain": "Question: {question}\nAnswer: "},
                                      "data": {"name": "arithmetic", "num_eval": 7, "seed": 3},
                                      "rollout": {"sampling": {"max_new_tokens": 33, "n": 4}}})
    save_config(run, tmp_path / "run" / "config.yaml")
    ckpt = tmp_path / "run" / "checkpoints" / "step-000002"
    ckpt.mkdir(parents=True)
    (ckpt / "config.json").write_text("{}")
    cfg = load_eval_config(str(ckpt), k=2)
    assert cfg.templates.plain == "Question: {question}\nAnswer: "
    assert cfg.sampling.max_new_tokens == 33 and cfg.sampling.n == 1 and cfg.k == 2
    assert cfg.datasets["arithmetic"].num_eval == 7 and cfg.datasets["arithmetic"].seed == 3
    assert cfg.engine.enforce_eager == run.rollout.engine.enforce_eager


def _check_outputs(out, n_problems, k):
    results = json.loads((out / "results.json").read_text())
    ds = results["datasets"]["arithmetic"]
    assert ds["n_problems"] == n_problems and ds["k"] == k and set(ds["pass@k"]) == {str(i) for i in range(1, k + 1)}
    assert sum(ds["status"].values()) == n_problems * k
    assert {"length", "truncation_rate", "repetition_rate", "reflection_rate", "surprisal"} <= set(ds["health"])
    assert results["macro"][f"avg@{k}"] == ds[f"avg@{k}"]
    lines = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(lines) == n_problems * k and len({r["uid"] for r in lines}) == n_problems
    assert all(r["dataset"] == "arithmetic" and 1 <= r["length"] <= 8 and r["prompt"].startswith("Q: ") for r in lines)


def test_cli_eval_hf_engine(tmp_path, tiny_model, capsys):
    out = tmp_path / "out"
    rc = cli.main(["eval", str(tiny_model), "engine.name=hf", "datasets.arithmetic.num_eval=4",
                   "--k", "2", "--out", str(out), "sampling.max_new_tokens=8"])  # overrides may follow options
    assert rc == 0
    assert "avg@2" in capsys.readouterr().out
    _check_outputs(out, 4, 2)


def test_cli_eval_reports_bad_config(tmp_path, tiny_model, capsys):
    assert cli.main(["eval", str(tiny_model), "sampling.nonsense=1"]) == 2
    assert "sampling.nonsense: unknown field" in capsys.readouterr().err


@pytest.mark.e2e
def test_cli_eval_vllm_engine(tmp_path, tiny_model):
    import torch

    torch.set_num_threads(1)  # the machine is shared; vLLM freezes the thread count from here on
    out = tmp_path / "out"
    rc = cli.main(["eval", str(tiny_model), "engine.name=vllm", "engine.enforce_eager=true",
                   "engine.kv_cache_gib=0.25", "engine.max_model_len=256", "datasets.arithmetic.num_eval=4",
                   "sampling.max_new_tokens=8", "--k", "2", "--out", str(out)])
    assert rc == 0
    _check_outputs(out, 4, 2)
