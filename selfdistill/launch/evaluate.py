"""Held-out evaluation during training, through the run's own rollout engines and verifier."""

from __future__ import annotations

import json

from selfdistill.config import TrainConfig
from selfdistill.eval.run import evaluate_problems
from selfdistill.records import Problem


class _RolloutEngines:
    """The engine interface `evaluate_problems` expects, over the run's rollout actors."""

    def __init__(self, roles):
        self.generate = roles.sample


def held_out_eval(roles, problems: list[Problem], cfg: TrainConfig, step: int) -> dict[str, float]:
    """Avg@k, pass@k, maj@k and reasoning health on the held-out split (greedy by default).

    Every response (uid, response, reward, ...) goes to RUN_DIR/held_out/step-NNNNNN.jsonl, step 0
    being the model before training, so gains can be paired problem by problem.
    """
    if not problems:
        return {}
    sampling = cfg.rollout.sampling.model_copy(update={"temperature": cfg.run.eval_temperature, "seed": cfg.run.seed})
    result = evaluate_problems(_RolloutEngines(roles), roles.verifier, roles.tokenizer, cfg.templates, problems,
                               cfg.run.eval_k, sampling, dataset=cfg.data.name, chat=cfg.chat)
    out = cfg.run_dir / "held_out"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"step-{step:06d}.jsonl").write_text("".join(json.dumps(record) + "\n" for record in result.samples))
    return result.flat("eval/")
