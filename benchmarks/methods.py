"""Every core method from one warm start, several seeds, paired before/after on the held-out split.

    nohup .venv/bin/python benchmarks/methods.py > methods.log 2>&1 &        # the target setting
    .venv/bin/python benchmarks/methods.py --methods opsd grpo --steps 5 --seeds 1 --eval-size 20   # smoke

For each method (a config under configs/cpu/) and seed it trains the real stack (Ray, vLLM,
DeepSpeed) from the same cached warm start with `run.seed` = the seed (data order and
sampling), then scores the final checkpoint on the first `--eval-size` held-out problems:
greedy accuracy and Avg@k (k samples at the rollout temperature). The warm start itself is
scored the same way once, so every gain is paired problem by problem: the standard error is
that of the per-problem difference (after - before, averaged over seeds). `--trl` adds TRL's
GRPOTrainer on the same warm start, prompts, group size, lr, temperature, lengths and steps
(benchmarks/throughput.py's worker) as an outside reference row.

Resumable across sessions and machines: the warm start is built once and copied to OUT/warmstart/
(every later run, here or on another machine, starts from those exact weights), and each finished
method/seed leaves OUT/cells/NAME/ (bench.json, the plotted metrics, summary.json), skipped on a
rerun (delete the folder to redo it); `--report` rewrites the table from the finished cells
without running anything. Both are small enough to commit. Writes
  OUT/methods.md    the table (greedy and Avg@k before/after, paired gain +- s.e., entropy, reward)
  OUT/methods.json  the same numbers, per seed
  OUT/methods.png   held-out accuracy (with --eval-every), loss, KL, reward, entropy over steps
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

CORE_METHODS = ["opsd", "opsd_jsd", "dasd", "position_weighted", "exposure_fixed", "exposure", "pmi", "grpo", "dapo",
                "rloo"]


def _tail_mean(rows: list[dict], key: str, last: int = 10) -> float:
    values = [r[key] for r in rows[-last:] if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return sum(values) / len(values) if values else math.nan


def method_config(method: str, seed: int, args, out: Path, model_path: Path | None = None):
    """The method's config for one seed; `model_path` (the benchmark's warm start) replaces the tiny model."""
    from selfdistill.config import load_config

    overrides = [*([f"model={{kind: pretrained, path: '{model_path}'}}"] if model_path else []),
                 f"run.name={method}-s{seed}", f"run.output_dir={out / 'runs'}", f"run.steps={args.steps}",
                 f"run.seed={seed}", f"run.eval_size={args.eval_size}", f"run.eval_every={args.eval_every}",
                 "run.save_every=0", "run.progress=false"]
    if args.eval_size > 200:  # the arithmetic task holds out 200 problems unless told more (a new warm start)
        overrides.append(f"data.num_eval={args.eval_size}")
    user = [o for o in args.overrides if not (model_path and o.split("=")[0].split(".")[0] == "model")]
    return load_config(ROOT / "configs" / "cpu" / f"{method}.yaml", [*overrides, *user])  # model.*: the warm start's


def score_model(model_path: str, cfg, k: int) -> dict[str, list[float]]:
    """Per held-out problem: greedy correctness and the mean reward of k samples at the rollout temperature."""
    import gc

    from transformers import AutoTokenizer

    from selfdistill.data import load_split
    from selfdistill.eval.run import evaluate_problems
    from selfdistill.rewards import build_reward
    from selfdistill.rollout.base import build_engine

    problems = load_split(cfg.data, "eval", cfg.run.eval_size)
    tokenizer, engine = AutoTokenizer.from_pretrained(model_path), build_engine(cfg.rollout.engine, model_path)
    scores = {}
    with build_reward(cfg.reward) as verifier:
        for name, samples, temperature in (("greedy", 1, 0.0), (f"avg@{k}", k, cfg.rollout.sampling.temperature)):
            sampling = cfg.rollout.sampling.model_copy(update={"temperature": temperature, "n": samples, "seed": 0})
            result = evaluate_problems(engine, verifier, tokenizer, cfg.templates, problems, samples, sampling,
                                       chat=cfg.chat)
            by_uid: dict[str, list[float]] = {}
            for record in result.samples:
                by_uid.setdefault(record["uid"], []).append(record["reward"])
            scores[name] = [sum(by_uid[p.uid]) / len(by_uid[p.uid]) for p in problems]
    del engine
    gc.collect()
    return scores


def paired(before: list[float], afters: list[list[float]]) -> dict[str, float]:
    """Mean after, mean gain and the standard error of the per-problem gain (seeds averaged per problem)."""
    gains = [statistics.fmean(a[i] for a in afters) - before[i] for i in range(len(before))]
    se = statistics.stdev(gains) / math.sqrt(len(gains)) if len(gains) > 1 else math.nan
    return {"before": statistics.fmean(before), "after": statistics.fmean(x for a in afters for x in a),
            "gain": statistics.fmean(gains), "se": se}


def run_method(method: str, seed: int, args, out: Path, model_path: Path) -> dict:
    from selfdistill.eval.plots import read_metrics
    from selfdistill.launch.train import train

    cfg = method_config(method, seed, args, out, model_path)
    if cfg.run_dir.exists():  # an unfinished attempt: start it again
        shutil.rmtree(cfg.run_dir)
    start = time.perf_counter()
    summary = train(cfg)
    scores = score_model(summary["checkpoint"], cfg, args.k)
    rows = read_metrics(cfg.run_dir)
    return {"method": method, "seed": seed, "steps": args.steps, "scores": scores,
            "entropy": _tail_mean(rows, "train/entropy"), "reward": _tail_mean(rows, "reward/mean"),
            "teacher_student_kl": _tail_mean(rows, next((k for k in rows[-1] if k.startswith(
                "train/teacher_student_kl/")), "")),
            "seconds": time.perf_counter() - start}


def run_trl(seed: int, args, out: Path, model_path: Path) -> dict:
    """TRL's GRPOTrainer on the grpo config's prompts and settings (throughput.py's worker), then the same scoring."""
    import throughput

    cfg = method_config("grpo", seed, args, out, model_path)
    sampling = cfg.rollout.sampling
    run_dir = out / "runs" / f"trl_grpo-s{seed}"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    problems = throughput.prompt_schedule(cfg, args.steps)
    spec = throughput._trl_spec(cfg, str(model_path), problems, prompts=cfg.rollout.prompts_per_step, n=sampling.n,
                                max_new=sampling.max_new_tokens, lr=cfg.learner.lr, temperature=sampling.temperature,
                                steps=args.steps, micro_groups=cfg.rollout.prompts_per_step, threads=2,
                                out_dir=str(run_dir / "trainer"))
    spec["save_to"] = str(run_dir / "final")
    start = time.perf_counter()
    result = throughput.run_worker("worker_trl", spec, run_dir, threads=2)
    scores = score_model(spec["save_to"], cfg, args.k)
    return {"method": "trl_grpo", "seed": seed, "steps": args.steps, "scores": scores, "entropy": math.nan,
            "reward": _tail_mean([{"r": r} for r in result["mean_reward"]], "r"), "teacher_student_kl": math.nan,
            "seconds": time.perf_counter() - start}


def write_report(out: Path, results: dict, before: dict[str, list[float]], args) -> str:
    k_key = f"avg@{args.k}"
    by_method: dict[str, list[dict]] = {}
    for r in results.values():
        by_method.setdefault(r["method"], []).append(r)
    lines = [f"| method | seeds | greedy before | after | gain ± s.e. | {k_key} before | after | gain ± s.e. "
             "| token entropy | rollout reward | teacher-student KL | minutes / run |", "|" + "---|" * 12]
    table = {}
    for method, runs in by_method.items():
        g = paired(before["greedy"], [r["scores"]["greedy"] for r in runs])
        a = paired(before[k_key], [r["scores"][k_key] for r in runs])
        mean = lambda key: statistics.fmean(r[key] for r in runs)  # noqa: E731
        table[method] = {"greedy": g, k_key: a, "entropy": mean("entropy"), "reward": mean("reward"),
                         "teacher_student_kl": mean("teacher_student_kl"), "seeds": [r["seed"] for r in runs]}
        lines.append(f"| {method} | {len(runs)} | {g['before']:.3f} | {g['after']:.3f} | {g['gain']:+.3f} ± "
                     f"{g['se']:.3f} | {a['before']:.3f} | {a['after']:.3f} | {a['gain']:+.3f} ± {a['se']:.3f} | "
                     f"{mean('entropy'):.3f} | {mean('reward'):.3f} | {mean('teacher_student_kl'):.4f} | "
                     f"{mean('seconds') / 60:.1f} |")
    note = (f"\nSettings: {args.steps} steps, seeds {sorted({r['seed'] for r in results.values()})}, "
            f"{len(before['greedy'])} held-out problems, {k_key} at the rollout temperature, overrides "
            f"{args.overrides or 'none'}. Gains are paired per problem against the same warm start; s.e. of the "
            "per-problem gain (seeds averaged first). Entropy, reward and KL: means over each run's last 10 steps.\n")
    (out / "methods.json").write_text(json.dumps({"table": table, "runs": results, "before": before}, indent=1))
    (out / "methods.md").write_text("\n".join(lines) + "\n" + note)
    return "\n".join(lines) + "\n" + note


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="*", default=CORE_METHODS, help="configs under configs/cpu/ (default: core)")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per method")
    ap.add_argument("--eval-size", type=int, default=500, help="held-out problems scored before and after")
    ap.add_argument("--eval-every", type=int, default=50, help="held-out greedy accuracy during training (curves)")
    ap.add_argument("--k", type=int, default=4, help="samples per problem for Avg@k")
    ap.add_argument("--trl", action=argparse.BooleanOptionalAction, default=True,
                    help="add TRL's GRPOTrainer as a reference row")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "methods"))
    ap.add_argument("--report", action="store_true",
                    help="only rewrite the table and plot from the finished cells of these methods and seeds")
    ap.add_argument("overrides", nargs="*", help="dotted overrides applied to every method")
    args = ap.parse_args(argv)

    from selfdistill.eval.plots import plot_runs
    from selfdistill.launch.console import Console
    from selfdistill.launch.model import prepare_model

    out = Path(args.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    model_path = out / "warmstart"  # the one warm start every run begins from, kept with the results
    first = args.methods[0] if args.methods else "grpo"
    before_path = out / f"before-{args.eval_size}-k{args.k}.json"
    if args.report and not ((model_path / "config.json").is_file() and before_path.is_file()):
        raise SystemExit(f"--report: {out} has no warm start or no {before_path.name} to report against; run first")
    if not (model_path / "config.json").is_file():
        built = prepare_model(method_config(first, 0, args, out), Console(live=False))
        shutil.rmtree(model_path, ignore_errors=True)
        shutil.copytree(built, model_path)
    weights = hashlib.sha256((model_path / "model.safetensors").read_bytes()).hexdigest()
    if not before_path.is_file():
        cfg = method_config(first, 0, args, out, model_path)
        before_path.write_text(json.dumps({"model_sha256": weights, **score_model(str(model_path), cfg, args.k)}))
    before = json.loads(before_path.read_text())
    if before.get("model_sha256") != weights:
        raise SystemExit(f"{before_path} scored other weights than {model_path}: use another --out")

    jobs = [(m, s) for s in range(args.seeds) for m in args.methods] + (
        [("trl_grpo", s) for s in range(args.seeds)] if args.trl else [])
    results, report = {}, ""
    for method, seed in jobs:
        name = f"{method}-s{seed}"
        cell = out / "cells" / name
        kept = json.loads((cell / "bench.json").read_text()) if (cell / "bench.json").is_file() else None
        if kept and kept["steps"] == args.steps:
            print(f"{name}: done earlier, kept ({cell})", flush=True)
        elif args.report:
            print(f"{name}: not run yet, left out of the report", flush=True)
            continue
        else:
            result = run_trl(seed, args, out, model_path) if method == "trl_grpo" else run_method(
                method, seed, args, out, model_path)
            kept = {**result, "model_sha256": weights}
            keep_cell(out / "runs" / name, cell, kept)
            print(f"{name}: {result['seconds']:.0f} s", flush=True)
        results[name] = kept
        report = write_report(out, results, before, args)
    print(report)
    curves = [out / "cells" / f"{m}-s0" for m in args.methods if (out / "cells" / f"{m}-s0" / "metrics.jsonl").is_file()]
    if curves:
        plot_runs(curves, out / "methods.png")


def keep_cell(run_dir: Path, cell: Path, result: dict) -> None:
    """Keep what the report and the plot need of a finished run (small, committable) in `cell`."""
    from selfdistill.eval.plots import plotted, read_metrics

    cell.mkdir(parents=True, exist_ok=True)
    if (run_dir / "metrics.jsonl").is_file():
        kept = [{k: v for k, v in row.items() if plotted(k)} for row in read_metrics(run_dir)]
        (cell / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in kept))
    if (run_dir / "summary.json").is_file():
        shutil.copy(run_dir / "summary.json", cell / "summary.json")
    (cell / "bench.json").write_text(json.dumps(result))  # last: its presence marks the cell done


if __name__ == "__main__":
    main()
