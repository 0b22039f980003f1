"""Every method from the same warm start for the same number of steps: a table and a plot.

    .venv/bin/python benchmarks/methods.py --steps 30 --out benchmarks/results/methods

For each config under configs/cpu/ (tiny model, arithmetic task) it runs the real stack
(Ray, vLLM, DeepSpeed) with identical data order, seeds and step count, evaluates the
held-out split every `--eval-every` steps, and writes:
  OUT/methods.md   held-out accuracy before/after, mean token entropy, response length,
                   teacher-student KL, fraction of tokens pushed away (last 5 steps)
  OUT/methods.json the same numbers
  OUT/methods.png  held-out accuracy and entropy over steps, one line per method
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_METHODS = ["opsd", "opsd_clip", "opsd_jsd", "opsd_topk", "opsd_live_teacher", "opsd_ema_teacher", "opd_sampled", "dasd",
                   "position_weighted", "exposure_fixed",
                   "exposure", "pmi", "opsd_grpo_mix", "grpo", "dr_grpo", "dapo", "rloo"]


def _tail_mean(rows: list[dict], key_prefix: str, last: int = 5) -> float:
    values = [v for r in rows[-last:] for k, v in r.items() if k.startswith(key_prefix) and isinstance(v, (int, float))]
    return sum(values) / len(values) if values else math.nan


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--methods", nargs="*", default=DEFAULT_METHODS)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "methods"))
    ap.add_argument("overrides", nargs="*", help="dotted overrides applied to every method")
    args = ap.parse_args()

    from selfdistill.config import load_config
    from selfdistill.eval.plots import plot_runs
    from selfdistill.launch.train import train

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # Re-running some methods keeps the others' rows (all come from the same warm start and settings).
    results = json.loads((out / "methods.json").read_text()) if (out / "methods.json").is_file() else {}
    for method in args.methods:
        cfg = load_config(ROOT / "configs" / "cpu" / f"{method}.yaml", [
            f"run.name={method}", f"run.output_dir={out / 'runs'}", f"run.steps={args.steps}",
            f"run.eval_every={args.eval_every}", "run.save_every=0", "run.progress=false", *args.overrides,
        ])
        start = time.perf_counter()
        summary = train(cfg)
        rows = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
        results[method] = {
            "accuracy_before": summary["accuracy_before"],
            "accuracy_after": summary["accuracy_after"],
            "entropy": _tail_mean(rows, "train/entropy"),
            "response_length": _tail_mean(rows, "response/length"),
            "teacher_student_kl": _tail_mean(rows, "train/teacher_student_kl/"),
            "frac_pushed_away": _tail_mean(rows, "train/frac_pushed_away"),
            "reward": _tail_mean(rows, "reward/mean"),
            "seconds": time.perf_counter() - start,
        }
        print(f"{method}: {results[method]}", flush=True)
        (out / "methods.json").write_text(json.dumps(results, indent=2))

    header = ("| method | held-out acc. before | after | Δ | token entropy | response length | teacher-student KL "
              "| pushed away | train reward | seconds |")
    lines = [header, "|" + "---|" * 10]
    for m, r in results.items():
        delta = r["accuracy_after"] - r["accuracy_before"]
        lines.append(f"| {m} | {r['accuracy_before']:.3f} | {r['accuracy_after']:.3f} | {delta:+.3f} | "
                     f"{r['entropy']:.3f} | {r['response_length']:.1f} | {r['teacher_student_kl']:.4f} | "
                     f"{r['frac_pushed_away']:.3f} | {r['reward']:.3f} | {r['seconds']:.0f} |")
    note = (f"\n{args.steps} steps per method, same warm start, data order and seeds; metrics other than accuracy are "
            "means over the last 5 steps (nan: the method does not report it).\n")
    (out / "methods.md").write_text("\n".join(lines) + note)
    plot_runs([out / "runs" / m for m in results if (out / "runs" / m / "metrics.jsonl").is_file()], out / "methods.png")
    print("\n".join(lines) + note)


if __name__ == "__main__":
    main()
