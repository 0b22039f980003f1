"""Teacher scoring, teacher weight modes, learner batching and the prompt sampler (no Ray)."""

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from selfdistill.config import TeacherConfig
from selfdistill.weights import ObjectStoreConfig
from selfdistill.data import PromptSampler
from selfdistill.data.templates import PromptTemplates
from selfdistill.learner.batching import collate
from selfdistill.models.tiny import build_tiny_model
from selfdistill.records import ContextScores, Problem, TeacherScores, Trajectory
from selfdistill.teacher.actor import TeacherActor
from selfdistill.teacher.scorer import score_responses

PROBLEM = Problem("p0", "(3+4)*2", "3+4=7\n7*2=14\n\\boxed{14}", "14")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("m") / "tiny", seed=0, hidden_size=32, num_layers=1, num_heads=2)


def test_scorer_matches_a_plain_forward(model_dir):
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    prompt, response = [5, 6, 7], [8, 9]
    (scores,) = score_responses(model, [(prompt, response)], temperature=2.0, top_k=3, full_rows=True, pad_id=0,
                                batch_size=4)
    with torch.no_grad():
        logits = model(torch.tensor([prompt + response])).logits[0] / 2.0
    logp = torch.log_softmax(logits, -1)
    # response token t is predicted at position len(prompt) - 1 + t
    expected = [logp[2, 8].item(), logp[3, 9].item()]
    np.testing.assert_allclose(scores.token_logprobs, expected, atol=1e-5)
    np.testing.assert_allclose(scores.full_logprobs, logp[2:4].numpy(), atol=1e-5)
    entropy = -(logp[2:4].exp() * logp[2:4]).sum(-1)
    np.testing.assert_allclose(scores.entropy, entropy.numpy(), atol=1e-5)
    top = logp[2].topk(3)
    np.testing.assert_array_equal(scores.support_ids[0], top.indices.numpy())


def test_padding_does_not_change_scores(model_dir):
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    short, long_ = ([5, 6], [7, 8, 9]), ([5, 6, 7, 8, 9, 10], [11])
    alone = score_responses(model, [short], temperature=1.0, top_k=0, full_rows=False, pad_id=0, batch_size=1)
    batched = score_responses(model, [short, long_], temperature=1.0, top_k=0, full_rows=False, pad_id=0,
                              batch_size=2)
    np.testing.assert_allclose(alone[0].token_logprobs, batched[0].token_logprobs, atol=1e-5)


def _teacher(model_dir, weights):
    return TeacherActor(str(model_dir), TeacherConfig(weights=weights, ema_rate=0.75), PromptTemplates(), 1.0,
                        ObjectStoreConfig())


def test_privileged_context_changes_the_teacher(model_dir):
    teacher = _teacher(model_dir, "live")
    tok = AutoTokenizer.from_pretrained(model_dir)
    response = tok("3+4=7", add_special_tokens=False)["input_ids"]
    (scores,) = teacher.score([(PROBLEM, response)], ["none", "full", "partial", "reference_only"], alpha=0.5)
    none, full = scores.contexts["none"].token_logprobs, scores.contexts["full"].token_logprobs
    assert not np.allclose(none, full)
    assert set(scores.contexts) == {"none", "full", "partial", "reference_only"}
    with pytest.raises(ValueError, match="alpha"):
        teacher.score([(PROBLEM, response)], ["partial"], alpha=None)


@pytest.mark.parametrize("mode", ["live", "frozen", "ema"])
def test_teacher_weight_modes(model_dir, mode):
    teacher = _teacher(model_dir, mode)
    name = "model.norm.weight"
    old = dict(teacher.model.named_parameters())[name].detach().clone()
    new_state = {n: torch.full_like(p, 2.0) for n, p in teacher.model.named_parameters()}
    version = teacher.load_weights([new_state], version=1)
    got = dict(teacher.model.named_parameters())[name].detach()
    expected = {"live": torch.full_like(old, 2.0), "frozen": old, "ema": 0.75 * old + 0.25 * 2.0}[mode]
    torch.testing.assert_close(got, expected)
    assert version == (0 if mode == "frozen" else 1)


def test_an_ema_teacher_blends_a_version_with_the_weight_of_every_version_since_the_one_it_holds(model_dir):
    """A replacement teacher started from the average of version 2 and sent version 5 gives version 5 the weight
    versions 3, 4 and 5 would have had; a version it already holds, sent again, changes nothing."""
    cfg = TeacherConfig(weights="ema", ema_rate=0.75)
    teacher = TeacherActor(str(model_dir), cfg, PromptTemplates(), 1.0, ObjectStoreConfig(), version=2)
    name = "model.norm.weight"
    old = dict(teacher.model.named_parameters())[name].detach().clone()
    live = {n: torch.full_like(p, 2.0) for n, p in teacher.model.named_parameters()}
    assert teacher.load_weights([live], version=5) == 5
    caught_up = 0.75**3 * old + (1 - 0.75**3) * 2.0
    torch.testing.assert_close(dict(teacher.model.named_parameters())[name].detach(), caught_up)
    teacher.load_weights([{n: torch.full_like(p, 9.0) for n, p in live.items()}], version=5)  # a re-send
    torch.testing.assert_close(dict(teacher.model.named_parameters())[name].detach(), caught_up)
    with pytest.raises(ValueError, match="older version 4"):
        teacher.load_weights([live], version=4)


def test_a_bfloat16_ema_teacher_averages_in_float32_and_resumes_from_its_saved_average(model_dir, tmp_path):
    cfg = TeacherConfig(weights="ema", ema_rate=0.999, dtype="bfloat16")
    teacher = TeacherActor(str(model_dir), cfg, PromptTemplates(), 1.0, ObjectStoreConfig())
    name = "model.norm.weight"  # all ones
    params = lambda t: dict(t.model.named_parameters())  # noqa: E731
    start = params(teacher)[name].detach().float().clone()
    live = {n: (p.detach().float() + 0.05).to(torch.bfloat16) for n, p in params(teacher).items()}
    for version in range(1, 201):
        teacher.load_weights([live], version)
    expected = start + (1 - 0.999**200) * (live[name].float() - start)  # 1 + 0.181 * 0.047: +0.0085
    torch.testing.assert_close(teacher.average[name], expected, rtol=1e-5, atol=0)
    # scored with the average rounded to bfloat16; blended in bfloat16 itself it would still be all ones
    assert torch.equal(params(teacher)[name], expected.to(torch.bfloat16))
    assert not torch.equal(params(teacher)[name], start.to(torch.bfloat16))
    teacher.save(str(tmp_path / "teacher"))
    resumed = TeacherActor(str(tmp_path / "teacher"), cfg, PromptTemplates(), 1.0, ObjectStoreConfig())
    for n, average in teacher.average.items():
        assert torch.equal(resumed.average[n], average)  # the float32 average, not its bfloat16 rounding


def _traj(group, prompt, response, reward):
    return Trajectory(problem=PROBLEM, group=group, prompt_ids=prompt, response_ids=response,
                      sampling_logprobs=[-0.5] * len(response), finish_reason="stop", weight_version=0, reward=reward)


def test_collate_aligns_response_tokens():
    trajs = [_traj(0, [1, 2, 3], [4, 5], 1.0), _traj(1, [1], [6, 7, 8], 0.0)]
    scores = [TeacherScores({"full": ContextScores(np.array([-1.0, -2.0], np.float32), np.zeros(2, np.float32),
                                                   np.zeros((2, 0), np.int64), np.zeros((2, 0), np.float32))}, 0),
              TeacherScores({"full": ContextScores(np.array([-3.0, -4.0, -5.0], np.float32), np.zeros(3, np.float32),
                                                   np.zeros((3, 0), np.int64), np.zeros((3, 0), np.float32))}, 0)]
    b = collate(trajs, scores, pad_id=0)
    assert b.input_ids.tolist() == [[1, 2, 3, 4, 5], [1, 6, 7, 8, 0]]
    assert b.tokens.tolist() == [[4, 5, 0], [6, 7, 8]]
    assert b.mask.tolist() == [[1, 1, 0], [1, 1, 1]]
    # logits at position i predict token i + 1
    assert b.response_index.tolist() == [[2, 3, 0], [0, 1, 2]]
    assert b.response_row.tolist() == [[0, 0, 0], [1, 1, 1]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]] and b.position_ids is None
    assert b.teacher["full"].token_logprobs.tolist() == [[-1.0, -2.0, 0.0], [-3.0, -4.0, -5.0]]
    assert b.rewards.tolist() == [1.0, 0.0] and b.group_ids.tolist() == [0, 1]


def test_sampler_is_deterministic_and_resumable():
    problems = [Problem(str(i), str(i), "", str(i)) for i in range(5)]
    a = PromptSampler(problems, seed=3)
    first = [p.uid for p in a.next_batch(7)]
    assert sorted(first[:5]) == [str(i) for i in range(5)]  # an epoch visits every problem once
    resumed = PromptSampler(problems, seed=3, **a.state())
    assert [p.uid for p in a.next_batch(6)] == [p.uid for p in resumed.next_batch(6)]
    with pytest.raises(ValueError, match="empty"):
        PromptSampler([], seed=0)
