"""Profiles behind docs/performance.md's "what bounds it": where a stage's time goes.

    .venv/bin/python benchmarks/profile_stages.py engine          # tiny model: vLLM generate and weight reload
    .venv/bin/python benchmarks/profile_stages.py learner [KEY=VALUE ...]   # SmolLM2: LearnerActor.train_step
    .venv/bin/python benchmarks/profile_stages.py lm-head         # SmolLM2: forward/backward, all vs response logits

Each prints its timings and the top functions of a cProfile. Models come from the project's
own cache (`prepare_model`), as in benchmarks/throughput.py. `learner` takes dotted config
overrides (e.g. learner.micro_batch_groups=4 learner.packing=true learner.packed_row_tokens=600).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import socket
import time

import torch

from selfdistill.config import load_config

SMOLLM2 = "configs/cpu/smollm2_gsm_symbolic.yaml"


def _model_path(config: str | None) -> str:
    from selfdistill.launch.console import Console
    from selfdistill.launch.model import prepare_model

    return prepare_model(load_config(config, []), Console(live=False))


def _profiled(fn, top: int = 15, sort: str = "cumulative"):
    profile = cProfile.Profile()
    start = time.perf_counter()
    profile.enable()
    result = fn()
    profile.disable()
    seconds = time.perf_counter() - start
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats(sort).print_stats(top)
    return result, seconds, text.getvalue()


def profile_engine(_overrides) -> None:
    """vLLM on the tiny default model, 1 thread: the model forward's share of a generate call, and a reload."""
    from safetensors.torch import load_file

    from selfdistill.rollout import vllm_internals

    vllm_internals.configure_env()
    torch.set_num_threads(1)
    from selfdistill.rollout.base import EngineConfig, SamplingConfig, build_engine

    path = _model_path(None)
    engine = build_engine(EngineConfig(enforce_eager=True), path)
    prompts = [[5, 6, 7, 8] + [9] * (i % 7) + [10] * 20 for i in range(16)]
    sampling = SamplingConfig(n=4, max_new_tokens=48, temperature=1.0, seed=3)
    engine.generate(prompts, sampling)  # warm-up
    out, seconds, text = _profiled(lambda: engine.generate(prompts, sampling), top=25)
    tokens = sum(len(s.token_ids) for group in out for s in group)
    print(f"generate: {seconds:.3f} s, {tokens} tokens, {tokens / seconds:.0f} tok/s "
          "(model forward: the cumulative time of vllm/model_executor/models/llama.py forward below)")
    print(text)
    state = load_file(os.path.join(path, "model.safetensors"))
    engine.load_weights(state.items())  # warm-up
    _, seconds, text = _profiled(lambda: [engine.load_weights(state.items()) for _ in range(10)], top=20)
    print(f"load_weights: {seconds / 10 * 1000:.1f} ms per reload")
    print(text)


def profile_learner(overrides) -> None:
    """One LearnerActor.train_step (GRPO, ZeRO-1, 2 threads) on 4 groups x 4 responses of 64 tokens
    after prompts of 180-240 tokens, SmolLM2-135M."""
    from selfdistill.learner.actor import LearnerActor
    from selfdistill.records import Problem, Trajectory

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    path = _model_path(SMOLLM2)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = load_config(None, [f"model={{kind: pretrained, path: {path}}}", "objective.name=grpo",
                             "learner.zero_stage=1", "learner.num_cpus_per_rank=2", "learner.micro_batch_groups=1",
                             "rollout.sampling.n=4", *overrides])
    learner = LearnerActor(cfg, path, rank=0, world_size=1, master_port=port)
    generator = torch.Generator().manual_seed(0)
    trajs = []
    for group in range(4):
        prompt = torch.randint(0, 40000, (180 + 20 * group,), generator=generator).tolist()
        for i in range(4):
            response = torch.randint(0, 40000, (64,), generator=generator).tolist()
            trajs.append(Trajectory(Problem("p", "q", "r", "1"), group, prompt, response, [-1.0] * 64, "length", 0,
                                    reward=float(i % 2)))
    learner.train_step(trajs, None)  # warm-up (optimizer state, allocator)
    _, seconds, text = _profiled(lambda: learner.train_step(trajs, None), sort="tottime")
    print(f"train_step: {seconds:.2f} s ({' '.join(overrides) or 'no overrides'}; "
          f"torch threads {torch.get_num_threads()})")
    print(text)


def profile_lm_head(_overrides) -> None:
    """Forward + backward of 16 x (150 + 64) tokens through SmolLM2-135M, 2 threads: lm_head on every
    position vs only on the 64 response positions (`logits_to_keep`)."""
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(_model_path(SMOLLM2), dtype=torch.float32)
    batch, prompt, response = 16, 150, 64
    ids = torch.randint(0, 40000, (batch, prompt + response))
    keep = torch.arange(prompt - 1, prompt + response - 1)
    for label, kwargs in [("all logits", {}), ("response logits", {"logits_to_keep": keep})]:
        for repeat in range(2):  # the first pass warms up
            start = time.perf_counter()
            logits = model(input_ids=ids, use_cache=False, **kwargs).logits
            logp = torch.log_softmax(logits[:, -response:].float(), -1)
            loss = logp.gather(-1, ids[:, -response:, None]).mean()
            forward = time.perf_counter() - start
            loss.backward()
            model.zero_grad()
            if repeat:
                print(f"{label}: forward {forward:.2f} s, backward {time.perf_counter() - start - forward:.2f} s")


PROFILES = {"engine": profile_engine, "learner": profile_learner, "lm-head": profile_lm_head}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("profile", choices=list(PROFILES))
    ap.add_argument("overrides", nargs="*", help="dotted config overrides (learner profile)")
    args = ap.parse_args()
    PROFILES[args.profile](args.overrides)


if __name__ == "__main__":
    main()
