"""Evaluation: benchmark metrics (pass@k, Avg@k, maj@k), reasoning health, `selfdistill eval` and plots.

- `metrics`: pure functions over per-sample correctness and answers.
- `health`: pure functions over response texts, lengths, finish reasons, log-probs.
- `run`: `EvalConfig`, `run_eval` (the CLI), `evaluate_problems` (engine-agnostic, for the
  training loop's periodic held-out evaluation).
- `plots`: `plot_runs` (the CLI), `plot_run` (end of a training run). Imports matplotlib.
"""

from selfdistill.eval.health import HealthConfig, health_metrics
from selfdistill.eval.metrics import avg_at_k, maj_at_k, macro_average, majority_vote, pass_at_k, pass_at_k_curve
from selfdistill.eval.run import DatasetEval, EvalConfig, evaluate_problems, load_eval_config, run_eval

__all__ = [
    "DatasetEval",
    "EvalConfig",
    "HealthConfig",
    "avg_at_k",
    "evaluate_problems",
    "health_metrics",
    "load_eval_config",
    "maj_at_k",
    "macro_average",
    "majority_vote",
    "pass_at_k",
    "pass_at_k_curve",
    "run_eval",
]
