"""The vLLM rollout engine against a transformers float32 forward of the same weights.

One in-process engine (no Ray) on a tiny random Llama; a second model with other weights
checks that `load_weights` really lands (the stale-weights bug).
"""

import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from selfdistill.models.tiny import build_tiny_model
from selfdistill.models.tokenizer import build_char_tokenizer
from selfdistill.rollout.base import EngineConfig, SamplingConfig, build_engine

pytestmark = pytest.mark.e2e

TOL = 1e-4
TOKENIZER = build_char_tokenizer()
PROMPTS = [TOKENIZER.encode(t) for t in ["<s>12+7=", "<s>What is 3*4? ", "<s>x"]]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return [str(build_tiny_model(root / f"seed{s}", seed=s, hidden_size=64, num_layers=2, num_heads=2)) for s in (0, 1)]


@pytest.fixture(scope="module")
def engine(models):
    torch.set_num_threads(1)  # the machine is shared; vLLM freezes the thread count from here on
    return build_engine(EngineConfig(enforce_eager=True, kv_cache_gib=0.25, max_model_len=256), models[0])


@pytest.fixture(scope="module")
def reference(models):
    """Transformers models of both checkpoints: the log-probs the learner would compute."""
    return [AutoModelForCausalLM.from_pretrained(m, dtype=torch.float32).eval() for m in models]


@torch.no_grad()
def reference_logprobs(model, sequence: list[int], temperature: float = 1.0) -> list[float]:
    """log softmax(logits / T) of each token t >= 1 given the tokens before it."""
    ids = torch.tensor([sequence])
    logp = (model(input_ids=ids).logits[0, :-1] / temperature).log_softmax(-1)
    return logp.gather(-1, ids[0, 1:, None]).squeeze(-1).tolist()


def max_gap(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


def test_generate_returns_n_samples_per_prompt(engine):
    sampling = SamplingConfig(n=3, max_new_tokens=6, seed=0)
    out = engine.generate(PROMPTS, sampling)
    assert [len(group) for group in out] == [3, 3, 3]
    for s in (s for group in out for s in group):
        assert len(s.logprobs) == len(s.token_ids) and 1 <= len(s.token_ids) <= 6
        assert all(math.isfinite(lp) and lp <= 0 for lp in s.logprobs)
        assert all(0 <= t < len(TOKENIZER) for t in s.token_ids)
        ended_by_eos = s.token_ids[-1] == TOKENIZER.eos_token_id
        assert s.finish_reason == ("stop" if ended_by_eos else "length")
        assert ended_by_eos or len(s.token_ids) == 6
        assert s.text == TOKENIZER.decode(s.token_ids, skip_special_tokens=True)
    assert any(s.finish_reason == "length" for group in out for s in group)


def test_stream_yields_each_prompt_once_with_the_samples_of_generate(engine):
    sampling = SamplingConfig(n=2, max_new_tokens=12, seed=5)
    batch = engine.generate(PROMPTS, sampling)
    streamed = list(engine.generate_stream(PROMPTS, sampling))
    assert sorted(i for i, _ in streamed) == list(range(len(PROMPTS)))
    for i, samples in streamed:
        assert [s.token_ids for s in samples] == [s.token_ids for s in batch[i]]
        for got, want in zip(samples, batch[i]):
            assert got.logprobs == pytest.approx(want.logprobs)


def test_seed_reproduces_a_call_and_no_two_samples_share_a_stream(engine):
    sampling = SamplingConfig(n=4, max_new_tokens=8, seed=123)
    first = engine.generate([PROMPTS[0], PROMPTS[0]], sampling)
    again = engine.generate([PROMPTS[0], PROMPTS[0]], sampling)
    tokens = [tuple(s.token_ids) for group in first for s in group]
    assert tokens == [tuple(s.token_ids) for group in again for s in group]
    assert len(set(tokens)) == len(tokens)  # the same prompt twice still gets 8 different samples


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_logprobs_match_transformers(engine, reference, temperature):
    sampling = SamplingConfig(n=2, max_new_tokens=8, seed=1, temperature=temperature)
    for prompt, group in zip(PROMPTS, engine.generate(PROMPTS, sampling), strict=True):
        for s in group:
            expected = reference_logprobs(reference[0], prompt + s.token_ids, temperature)[len(prompt) - 1 :]
            assert max_gap(s.logprobs, expected) < TOL


def test_stop_string_ends_the_sample_and_stays_in_it(engine):
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=12)
    free = engine.generate(PROMPTS[:1], greedy)[0][0]
    stop = free.text[3]
    cut = free.text.index(stop) + 1
    stopped = engine.generate(PROMPTS[:1], greedy.model_copy(update={"stop": [stop]}))[0][0]
    assert stopped.finish_reason == "stop"
    assert stopped.text == free.text[:cut]
    assert stopped.token_ids == free.token_ids[:cut]


def test_sequence_logprobs_match_transformers(engine, reference):
    sequences = [p + TOKENIZER.encode(" 19 is the answer") for p in PROMPTS] + [PROMPTS[2][:1]]
    for seq, got in zip(sequences, engine.sequence_logprobs(sequences), strict=True):
        assert len(got) == len(seq) - 1
        if got:
            assert max_gap(got, reference_logprobs(reference[0], seq)) < TOL


def test_load_weights_lands_and_can_be_undone(engine, reference, models):
    seq = PROMPTS[1] + TOKENIZER.encode("12, since 3*4=12")
    old = reference_logprobs(reference[0], seq)
    new = reference_logprobs(reference[1], seq)
    assert max_gap(old, new) > 0.01  # the two checkpoints really differ

    long_prompt = TOKENIZER.encode("<s>" + "Add the numbers step by step. " * 6)
    sampling = SamplingConfig(max_new_tokens=8, seed=2)
    engine.generate([long_prompt], sampling)  # its KV blocks, from the old weights, enter the prefix cache

    engine.load_weights(load_file(f"{models[1]}/model.safetensors").items())
    assert max_gap(engine.sequence_logprobs([seq])[0], new) < TOL
    sample = engine.generate([long_prompt], sampling)[0][0]
    expected = reference_logprobs(reference[1], long_prompt + sample.token_ids)[len(long_prompt) - 1 :]
    assert max_gap(sample.logprobs, expected) < TOL  # sampling sees the new weights, not stale cached KV

    engine.load_weights(load_file(f"{models[0]}/model.safetensors").items())
    assert max_gap(engine.sequence_logprobs([seq])[0], old) < TOL


def test_incomplete_sync_is_an_error(engine, models):
    state = load_file(f"{models[1]}/model.safetensors")
    del state["model.layers.1.mlp.down_proj.weight"]
    with pytest.raises(ValueError, match="1 of 20 checkpoint tensors were not sent"):
        engine.load_weights(state.items())
    engine.load_weights(load_file(f"{models[0]}/model.safetensors").items())


def test_hf_engine_agrees_with_vllm(engine, models):
    hf = build_engine(EngineConfig(name="hf"), models[0])
    sequences = [p + TOKENIZER.encode(" 19") for p in PROMPTS]
    for a, b in zip(hf.sequence_logprobs(sequences), engine.sequence_logprobs(sequences), strict=True):
        assert max_gap(a, b) < TOL
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=10, stop=["7"])
    for a, b in zip(hf.generate(PROMPTS, greedy), engine.generate(PROMPTS, greedy), strict=True):
        assert (a[0].token_ids, a[0].finish_reason, a[0].text) == (b[0].token_ids, b[0].finish_reason, b[0].text)
        assert max_gap(a[0].logprobs, b[0].logprobs) < TOL


def test_hf_engine_samples_scores_and_loads_weights(reference, models):
    hf = build_engine(EngineConfig(name="hf"), models[0])
    out = hf.generate(PROMPTS, SamplingConfig(n=2, max_new_tokens=6, temperature=0.7, seed=0))
    for prompt, group in zip(PROMPTS, out, strict=True):
        assert len(group) == 2
        for s in group:
            assert s.finish_reason == ("stop" if s.token_ids[-1] == TOKENIZER.eos_token_id else "length")
            expected = reference_logprobs(reference[0], prompt + s.token_ids, 0.7)[len(prompt) - 1 :]
            assert max_gap(s.logprobs, expected) < TOL
    raw = build_engine(EngineConfig(name="hf", logprobs_mode="raw_logprobs"), models[0])
    s = raw.generate(PROMPTS[:1], SamplingConfig(max_new_tokens=6, temperature=0.7, seed=0))[0][0]
    expected = reference_logprobs(reference[0], PROMPTS[0] + s.token_ids)[len(PROMPTS[0]) - 1 :]
    assert max_gap(s.logprobs, expected) < TOL  # raw: before temperature
    seq = PROMPTS[1] + TOKENIZER.encode("12")
    hf.load_weights(load_file(f"{models[1]}/model.safetensors").items())
    assert max_gap(hf.sequence_logprobs([seq])[0], reference_logprobs(reference[1], seq)) < TOL
    with pytest.raises(ValueError, match="weight sync incomplete"):
        hf.load_weights([("model.norm.weight", torch.ones(64))])
