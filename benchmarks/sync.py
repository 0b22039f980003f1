"""Weight sync per training step: the Ray object store against the gloo collective transport.

    .venv/bin/python benchmarks/sync.py --out benchmarks/results/sync [--models tiny smollm2] [--steps N]

For each model, the real trainer (Ray, vLLM engine, DeepSpeed, teacher) runs the same job
once per transport in this invocation, same seeds, stages in turn (max_staleness 0), each
actor with every core (as the `trl` section of throughput.py). From metrics.jsonl, medians
over steps 2..N: time/sync (the driver's publish: pause, send, every receiver committed),
its share of time/step, and collective / object store. `sync.check_every` is 0 (the
log-prob check is not part of the work). Writes OUT/sync.md and OUT/sync.json.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from throughput import CPU_CORES, MODELS, ROOT, _median, _steady, _table, _versions, run_selfdistill  # noqa: E402

TRANSPORTS = {"object_store": {"sync.transport": "object_store"},
              "collective (gloo)": {"sync.transport": "collective", "sync.backend": "gloo"}}
JOBS = {  # per model: the work of a step (the `trl` section's shapes)
    "tiny": {"rollout.prompts_per_step": 16, "rollout.sampling.n": 4},
    "smollm2": {"rollout.prompts_per_step": 4, "rollout.sampling.n": 4, "rollout.sampling.max_new_tokens": 64,
                "objective": {"name": "grpo"}, "learner.zero_stage": 1},
}


def measure(model: str, steps: int, out: Path) -> list[dict]:
    rows = []
    for transport, overrides in TRANSPORTS.items():
        metrics, wall = run_selfdistill({"run.steps": steps, "run.eval_size": 1, "sync.check_every": 0,
                                         "rollout.max_staleness": 0, "learner.num_cpus_per_rank": CPU_CORES,
                                         "rollout.num_cpus_per_engine": CPU_CORES, **JOBS[model], **overrides},
                                        out, model, name=f"{model}-{overrides['sync.transport']}")
        steady = _steady(metrics)
        rows.append({"model": model, "transport": transport,
                     "sync s": _median([r["time/sync"] for r in steady]),
                     "learner send s": _median([r["sync/learner_s"] for r in steady]),
                     "step s": _median([r["time/step"] for r in steady]),
                     "sync share": f'{_median([r["time/sync"] / r["time/step"] for r in steady]):.1%}',
                     "MB": _median([r["sync/bytes"] for r in steady]) / 1e6, "wall s": wall})
    store, gloo = rows
    gloo["collective / object store"] = gloo["sync s"] / store["sync s"]
    store["collective / object store"] = 1.0
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sync"))
    ap.add_argument("--models", nargs="+", default=["tiny", "smollm2"], choices=list(MODELS))
    ap.add_argument("--steps", type=int, default=5, help="training steps per run (medians over steps 2..N)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = shlex.join([".venv/bin/python", "benchmarks/sync.py", *(argv if argv is not None else sys.argv[1:])])
    import os

    load_before = os.getloadavg()
    rows = [row for model in args.models for row in measure(model, args.steps, out)]
    meta = {**_versions(), "load_average_before": load_before, "load_average_after": os.getloadavg()}
    (out / "sync.json").write_text(json.dumps({"command": command, "meta": meta, "rows": rows}, indent=1))
    notes = []
    for model in args.models:
        store, gloo = [r for r in rows if r["model"] == model]
        notes.append(f"{model}: collective / object store = {gloo['sync s'] / store['sync s']:.2f} (target <= 0.5); "
                     f"collective share of the step {gloo['sync share']} (target < 5%).")
    text = "\n".join(["# weight sync: object store vs gloo collective", "", "```", command, "```", "",
                      f"Machine: {meta['cpu_cores']} CPU cores; torch {meta['torch']}, vllm {meta['vllm']}. "
                      f"{meta['date']}. Load average (1, 5, 15 min) before {tuple(round(x, 1) for x in load_before)}, "
                      f"after {tuple(round(x, 1) for x in meta['load_average_after'])}.", "",
                      *_table(rows), "", *[f"- {n}" for n in notes], ""])
    (out / "sync.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
