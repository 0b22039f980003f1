"""The rollout actor in a real local Ray cluster: generate, then a weight sync through object refs."""

import os

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # keep Ray on loopback; read when ray starts a node

import pytest
import ray
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from selfdistill.models.tiny import build_tiny_model
from selfdistill.models.tokenizer import build_char_tokenizer
from selfdistill.rollout.actor import RolloutActor
from selfdistill.rollout.base import EngineConfig, SamplingConfig

pytestmark = pytest.mark.e2e

TOKENIZER = build_char_tokenizer()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return [str(build_tiny_model(root / f"seed{s}", seed=s, hidden_size=64, num_layers=2, num_heads=2)) for s in (0, 1)]


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def actor(cluster, models):
    cfg = EngineConfig(enforce_eager=True, kv_cache_gib=0.25, max_model_len=256)
    handle = ray.remote(RolloutActor).options(num_cpus=1).remote(models[0], cfg)
    ray.get(handle.ready.remote())
    return handle


@torch.no_grad()
def reference_logprobs(model_dir: str, sequence: list[int]) -> list[float]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([sequence])
    logp = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
    return logp.gather(-1, ids[0, 1:, None]).squeeze(-1).tolist()


def max_gap(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


def test_actor_runs_in_its_own_process(actor):
    assert ray.get(actor.ready.remote()) != os.getpid()
    assert ray.get(actor.weight_version.remote()) == 0


def test_generate(actor):
    prompts = [TOKENIZER.encode("<s>2+2="), TOKENIZER.encode("<s>hello")]
    out = ray.get(actor.generate.remote(prompts, SamplingConfig(n=2, max_new_tokens=5, seed=0)))
    assert [len(group) for group in out] == [2, 2]
    for s in (s for group in out for s in group):
        assert len(s.token_ids) == len(s.logprobs) and s.finish_reason in ("stop", "length")


def test_weights_sent_as_object_refs_land(actor, models):
    seq = TOKENIZER.encode("<s>3*4=12")
    new = reference_logprobs(models[1], seq)
    assert max_gap(ray.get(actor.sequence_logprobs.remote([seq]))[0], new) > 0.01  # still the old weights

    state = load_file(f"{models[1]}/model.safetensors")
    names = sorted(state)
    buckets = [
        ray.put({n: state[n] for n in names[:7]}),
        ray.put({n: state[n] for n in names[7:14]}),
        {n: state[n] for n in names[14:]},
    ]  # refs and a plain dict may be mixed
    assert ray.get(actor.load_weights.remote(buckets, 3)) == 3
    assert ray.get(actor.weight_version.remote()) == 3
    assert max_gap(ray.get(actor.sequence_logprobs.remote([seq]))[0], new) < 1e-4
