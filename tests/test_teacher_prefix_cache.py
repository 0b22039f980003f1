"""Teacher scoring with a shared prefix cache matches one plain forward per pair (no Ray)."""

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from selfdistill.config import TeacherConfig
from selfdistill.weights import ObjectStoreConfig
from selfdistill.data.templates import PromptTemplates
from selfdistill.models.tiny import build_tiny_model
from selfdistill.records import Problem
from selfdistill.teacher import actor as actor_module
from selfdistill.teacher.actor import TeacherActor
from selfdistill.teacher.scorer import score_responses

VOCAB = 50


def _model(attn_implementation: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      attn_implementation=attn_implementation)
    return LlamaForCausalLM(cfg).to(torch.float32).eval()


def _tokens(rng: np.random.Generator, n: int) -> list[int]:
    return rng.integers(3, VOCAB, size=n).tolist()


def _groups(rng, prefix_lengths, group_size, response_lengths):
    """`group_size` pairs per prefix; response lengths cycle through `response_lengths`."""
    pairs = []
    for prefix_length in prefix_lengths:
        prefix = _tokens(rng, prefix_length)
        pairs += [(prefix, _tokens(rng, response_lengths[(len(pairs) + j) % len(response_lengths)]))
                  for j in range(group_size)]
    return pairs


@torch.no_grad()
def _reference(model, prompt, response, temperature):
    """Log-softmax rows [len(response), V] from one unpadded forward of prompt + response."""
    logits = model(torch.tensor([prompt + response])).logits[0].float() / temperature
    return torch.log_softmax(logits[len(prompt) - 1 : len(prompt) - 1 + len(response)], -1)


def _assert_matches_reference(model, pairs, scores, temperature, top_k):
    assert len(scores) == len(pairs)
    for (prompt, response), got in zip(pairs, scores):
        if not response:
            assert got.token_logprobs.shape == (0,) and got.support_ids.shape == (0, top_k)
            continue
        logp = _reference(model, prompt, response, temperature)
        assert np.isfinite(got.full_logprobs).all()
        np.testing.assert_allclose(got.full_logprobs, logp.numpy(), atol=1e-5)
        np.testing.assert_allclose(got.token_logprobs, logp.gather(-1, torch.tensor(response)[:, None])[:, 0],
                                   atol=1e-5)
        np.testing.assert_allclose(got.entropy, -(logp.exp() * logp).sum(-1), atol=1e-5)
        top = logp.topk(min(top_k, VOCAB), dim=-1)
        np.testing.assert_array_equal(got.support_ids, top.indices.numpy())
        np.testing.assert_allclose(got.support_logprobs, top.values.numpy(), atol=1e-5)


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize(
    ("case", "batch_size", "temperature", "top_k"),
    [
        ("shared", 64, 1.0, 5),
        ("shared", 3, 0.7, 5),  # fewer rows per forward than responses: chunked passes
        ("shared", 1, 1.0, 100),  # top_k above the vocabulary is clamped
        ("distinct", 4, 1.3, 3),
    ],
)
def test_scores_match_one_forward_per_pair(attn_implementation, case, batch_size, temperature, top_k):
    model = _model(attn_implementation)
    rng = np.random.default_rng(0)
    if case == "shared":
        pairs = _groups(rng, [9, 4, 17], group_size=4, response_lengths=[5, 1, 8, 3])
        pairs[5] = (pairs[5][0], [])  # an empty response inside a group
        pairs.append((_tokens(rng, 6), []))  # a prompt whose only response is empty
    else:
        pairs = [(_tokens(rng, n), _tokens(rng, m)) for n, m in [(3, 4), (11, 2), (1, 6), (7, 1), (5, 5)]]
    rng.shuffle(pairs)
    scores = score_responses(model, pairs, temperature=temperature, top_k=top_k, full_rows=True, pad_id=0,
                             batch_size=batch_size)
    _assert_matches_reference(model, pairs, scores, temperature, top_k)


def test_each_distinct_prefix_runs_once():
    model = _model("sdpa")
    rng = np.random.default_rng(1)
    pairs = _groups(rng, [12, 20, 7], group_size=4, response_lengths=[6, 3])
    calls = []
    forward = model.forward

    def counting_forward(*args, **kwargs):
        calls.append(kwargs)
        return forward(*args, **kwargs)

    model.forward = counting_forward
    score_responses(model, pairs, temperature=1.0, top_k=0, full_rows=False, pad_id=0, batch_size=8)
    prefix_calls = [c for c in calls if c.get("past_key_values") is None]
    response_calls = [c for c in calls if c.get("past_key_values") is not None]
    assert len(prefix_calls) == 1 and prefix_calls[0]["input_ids"].shape[0] == 3
    assert int(prefix_calls[0]["attention_mask"].sum()) == 12 + 20 + 7
    # 12 responses in forwards of at most 8 rows, each feeding its tokens but the last (predicted by the prefix)
    assert [c["input_ids"].shape[0] for c in response_calls] == [8, 4]
    fed = sum(int(c["attention_mask"][:, -c["input_ids"].shape[1] :].sum()) for c in response_calls)
    assert fed == sum(len(r) - 1 for _, r in pairs)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("m") / "tiny", seed=0, hidden_size=32, num_layers=1, num_heads=2)


def test_teacher_scores_all_contexts_in_one_call(model_dir, monkeypatch):
    teacher = TeacherActor(str(model_dir), TeacherConfig(batch_size=5), PromptTemplates(), 1.0, ObjectStoreConfig())
    problems = [Problem("p0", "(3+4)*2", "3+4=7\n7*2=14\n\\boxed{14}", "14"),
                Problem("p1", "9-2", "9-2=7\n\\boxed{7}", "7")]
    items = [(problem, teacher.tokenizer(text, add_special_tokens=False)["input_ids"])
             for problem in problems for text in ["3+4=7", "14", "", "7*2=14 done"]]
    contexts = ["none", "full", "partial", "reference_only"]
    per_context = {c: teacher.score(items, [c], alpha=0.5) for c in contexts}

    calls = []
    monkeypatch.setattr(actor_module, "score_responses",
                        lambda model, pairs, **kw: calls.append(pairs) or score_responses(model, pairs, **kw))
    together = teacher.score(items, contexts, alpha=0.5)
    assert len(calls) == 1 and len(calls[0]) == len(items) * len(contexts)
    assert len(together) == len(items)
    for i, scores in enumerate(together):
        assert list(scores.contexts) == contexts
        for c in contexts:
            alone = per_context[c][i].contexts[c]
            np.testing.assert_allclose(scores.contexts[c].token_logprobs, alone.token_logprobs, atol=1e-5)
            np.testing.assert_allclose(scores.contexts[c].support_logprobs, alone.support_logprobs, atol=1e-5)


def test_a_response_needs_a_prompt():
    with pytest.raises(ValueError, match="non-empty context prompt"):
        score_responses(_model("sdpa"), [([], [5, 6])], temperature=1.0, top_k=0, full_rows=False, pad_id=0,
                        batch_size=4)
