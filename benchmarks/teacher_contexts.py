"""What a self-teacher can know under each privileged context: greedy accuracy of one model per context.

    .venv/bin/python benchmarks/teacher_contexts.py [--model benchmarks/results/methods/warmstart] [--problems 200]

A self-distillation teacher is the model itself under a privileged prompt; it can only teach what it
gets right there. This scores the model's greedy answers on held-out problems under the plain prompt
(the student) and under every teacher context: the full reference, the reference only, and the partial
reference (the first alpha share of its steps plus the final answer: what adaptive exposure shows) at
several alphas. Writes OUT/teacher_contexts.json. In-process Hugging Face model; seconds per context.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "benchmarks/results/methods/warmstart"))
    ap.add_argument("--problems", type=int, default=200, help="first N held-out problems of the methods benchmark")
    ap.add_argument("--alphas", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/teacher_contexts"))
    args = ap.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from selfdistill.config import load_config
    from selfdistill.data.arithmetic import generate_problems
    from selfdistill.models.warmstart import greedy_accuracy

    torch.set_num_threads(2)
    cfg = load_config(None, ["data.num_eval=500", "run.eval_size=500"])  # the methods benchmark's held-out split
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    problems = generate_problems(cfg.data, "eval")[: args.problems]
    max_new = max(len(tokenizer(p.reference)["input_ids"]) for p in problems) + 8
    contexts = [("plain", None), ("full", None), ("reference_only", None), *(("partial", a) for a in args.alphas)]
    rows = []
    for context, alpha in contexts:
        accuracy = greedy_accuracy(model, tokenizer, problems, cfg.templates, context, max_new, alpha=alpha)
        rows.append({"context": context, "alpha": alpha, "greedy_accuracy": accuracy})
        print(f"{context:<15} {'' if alpha is None else f'alpha {alpha:.2f}':<11} {accuracy:.3f}", flush=True)
    report = {"model": args.model, "problems": len(problems), "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "teacher_contexts.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
