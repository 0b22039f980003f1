"""The training loop: generate -> verify -> score -> train -> publish.

Batches come from `RolloutPipeline` (launch/pipeline.py), which streams each group through
the verifier and the teacher as it finishes (launch/collect.py) and, with
`rollout.max_staleness` k > 0, makes the batch of step n+k while step n trains.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from selfdistill.config import TrainConfig, save_config
from selfdistill.data import PromptSampler, load_split
from selfdistill.launch.cluster import ray_cluster
from selfdistill.launch.collect import Batch, collect_batch
from selfdistill.launch.console import Console
from selfdistill.launch.evaluate import held_out_eval
from selfdistill.launch.inputs import checked_inputs
from selfdistill.launch.model import prepare_model
from selfdistill.launch.placement import cpus_needed
from selfdistill.launch.pipeline import RolloutPipeline
from selfdistill.launch.policy import policy_paths
from selfdistill.launch.run_dir import (MetricsLog, checkpoint_dir, read_trainer_state, resume_checkpoint,
                                        save_checkpoint)
from selfdistill.launch.step_metrics import step_metrics
from selfdistill.eval.plots import plot_run
from selfdistill.learner.objectives import build_objective
from selfdistill.teacher.exposure import ExposureController


def train(cfg: TrainConfig, resume_from: Path | None = None) -> dict:
    """Run `cfg` (or continue it from checkpoint `resume_from`); returns the final summary."""
    console = Console(cfg.run.progress, cfg.run.log_every)
    resume_from = resume_from or resume_checkpoint(cfg.run_dir, cfg.run.resume)
    if resume_from:
        console.note(f"resuming from {resume_from}")
    state = read_trainer_state(resume_from) if resume_from else {}
    train_problems = load_split(cfg.data, "train", cfg.run.eval_size)
    eval_problems = load_split(cfg.data, "eval", cfg.run.eval_size)
    initial_model = state.get("initial_model") or prepare_model(cfg, console)
    policy, teacher = policy_paths(cfg, initial_model, resume_from)  # with LoRA: adapter folders (launch/policy.py)
    contexts = build_objective(cfg.objective).contexts
    train_problems, eval_problems = checked_inputs(cfg, policy, initial_model, contexts, train_problems, eval_problems,
                                                   console)  # before any actor starts (launch/inputs.py)
    sampler = PromptSampler(train_problems, cfg.run.seed, **state.get("data", {}))
    exposure = ExposureController(cfg.teacher.exposure, cfg.run.steps)
    if "exposure" in state:
        exposure.load_state_dict(state["exposure"])
    run_dir, start = cfg.run_dir, state.get("step", 0)
    if not resume_from and run_dir.exists():  # keep an earlier run, never overwrite it
        kept = run_dir.with_name(f"{run_dir.name}.{time.strftime('%Y%m%d-%H%M%S')}")
        run_dir.rename(kept)
        console.note(f"{run_dir} held an earlier run: moved to {kept} (use --resume {run_dir} to continue a run)")
    save_config(cfg, run_dir / "config.yaml")
    log = MetricsLog(run_dir, start, cfg.run.loggers, cfg.run.group, cfg.model_dump(mode="json"))

    from transformers import AutoTokenizer

    from selfdistill.launch.faults import Faults
    from selfdistill.launch.roles import Roles

    tokenizer = AutoTokenizer.from_pretrained(policy)
    num_cpus = cfg.cluster.num_cpus or cpus_needed(cfg, contexts)
    with ray_cluster(cfg.cluster.address, num_cpus, cfg.cluster.node_ip_address,
                     max_task_events=cfg.cluster.max_task_events):
        console.status("starting Ray actors (vLLM engines, teacher, DeepSpeed ranks)")
        with Roles(cfg, policy, teacher, tokenizer, contexts, str(resume_from) if resume_from else None, start) as roles:
            (run_dir / "placement.json").write_text(json.dumps(roles.placement, indent=2))  # actor -> node id
            faults = Faults(cfg.faults, console)  # replaces actors that die (launch/faults.py)
            before = state.get("eval_before") or held_out_eval(roles, eval_problems, cfg, start)
            accuracy_key = f"eval/avg@{cfg.run.eval_k}"
            console.note(f"held-out accuracy before training ({accuracy_key}): {before.get(accuracy_key, float('nan')):.3f} "
                         f"on {len(eval_problems)} problems")
            probe = tokenizer(train_problems[0].question + train_problems[0].reference)["input_ids"]  # sync check
            exposure_lock = threading.Lock()  # alpha() runs in the pipeline's thread, observe() in this one

            def make_batch(step: int) -> Batch:
                sampling = cfg.rollout.sampling.model_copy(update={"seed": cfg.run.seed * 100_003 + step})
                with exposure_lock:
                    alpha = exposure.alpha(step) if "partial" in contexts else None
                return collect_batch(roles, sampler, cfg, sampling, alpha, faults)

            # before any sync the engines (and a live teacher) must hold the learner's policy (on resume: the checkpoint)
            start_gap = {"sync/start_gap": faults.retrying(roles, roles.sync_gap, probe)} if cfg.sync.check_every else {}
            saves = [s for s in range(start + 1, cfg.run.steps + 1) if _saves_at(cfg, s)]
            evaluated: dict[int, dict] = {}  # step -> its held-out evaluation (the last one is reused as `after`)
            pipeline = RolloutPipeline(make_batch, start + 1, cfg.run.steps, cfg.rollout.max_staleness, saves)
            with console.progress(cfg.run.steps, start) as bar, pipeline:
                for step in range(start + 1, cfg.run.steps + 1):
                    t = {}
                    with _timed(t, "idle"):  # the learner waits for the batch
                        batch = pipeline.get(step)
                    with _timed(t, "train"):
                        train_metrics = faults.call("learner", roles.train, batch.trajs, batch.scores)
                    with _timed(t, "sync"):
                        sync_info = faults.retrying(roles, roles.publish, step)
                    t["step"] = t["idle"] + t["train"] + t["sync"]
                    metrics = {**step_metrics(batch.trajs, train_metrics, {**batch.seconds, **t}, step), **batch.info,
                               **sync_info}
                    if "partial" in contexts:
                        with exposure_lock:
                            metrics.update(exposure.observe(step, metrics))
                    pipeline.published(step)  # after observe: the next alpha always sees this step
                    if cfg.run.eval_every and step % cfg.run.eval_every == 0:
                        evaluated[step] = faults.retrying(roles, held_out_eval, roles, eval_problems, cfg, step)
                        metrics.update(evaluated[step])
                    if cfg.sync.check_every and step % cfg.sync.check_every == 0:
                        metrics["sync/max_logprob_gap"] = faults.retrying(roles, roles.sync_gap, probe)
                    if step == start + 1:
                        metrics.update(start_gap)
                    # read last: a death noticed during this step's sync or evaluation is in this step's row
                    metrics.update(faults.metrics(roles))
                    log.write(step, metrics)
                    bar.advance(step, metrics)
                    if _saves_at(cfg, step):
                        with exposure_lock:
                            exposure_state = exposure.state_dict()
                        saved = save_checkpoint(run_dir, step, cfg.run.keep_checkpoints,
                                                lambda path: roles.save_checkpoint(path, {"data": batch.data_state}),
                                                {"step": step, "data": batch.data_state, "initial_model": initial_model,
                                                 "eval_before": before, "exposure": exposure_state})
                        roles.checkpointed(saved)
            after = evaluated.get(cfg.run.steps) or faults.retrying(roles, held_out_eval, roles, eval_problems, cfg,
                                                                   cfg.run.steps)
            pids, placement = roles.pids, roles.placement
    log.close()
    plot_run(run_dir)
    summary = {"run_dir": str(run_dir), "steps": cfg.run.steps, "accuracy_key": accuracy_key,
               "accuracy_before": before.get(accuracy_key, float("nan")),
               "accuracy_after": after.get(accuracy_key, float("nan")), "eval_before": before, "eval_after": after,
               "eval_problems": len(eval_problems), "pids": pids, "placement": placement, "checkpoint": str(checkpoint_dir(run_dir, cfg.run.steps)),
               "plot": str(run_dir / "plots.png")}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    console.summary(summary, log.path)
    return summary


def _saves_at(cfg: TrainConfig, step: int) -> bool:
    return step == cfg.run.steps or bool(cfg.run.save_every and step % cfg.run.save_every == 0)


class _timed:
    def __init__(self, sink: dict, name: str):
        self.sink, self.name = sink, name

    def __enter__(self):
        self.start = time.perf_counter()

    def __exit__(self, *exc):
        self.sink[self.name] = time.perf_counter() - self.start
