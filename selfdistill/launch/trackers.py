"""Experiment trackers fed by MetricsLog (`run.loggers`): TensorBoard, Weights & Biases, MLflow.

Each is imported only when a run names it; wandb and mlflow come with the `trackers` extra.
A resumed run continues the same tracker run (its id is kept in the run folder).
"""

from __future__ import annotations

import os
import re
import time
import uuid
from pathlib import Path
from typing import Any


class TensorBoardTracker:
    def __init__(self, run_dir: Path, start_step: int, group: str | None, config: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tb"), purge_step=start_step + 1 if start_step else None)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """Offline unless WANDB_MODE says otherwise (`wandb sync RUN/wandb/offline-run-*` uploads later)."""

    def __init__(self, run_dir: Path, start_step: int, group: str | None, config: dict):
        wandb = _import("wandb")
        run_id = _tracker_id(run_dir, "wandb", start_step, lambda: uuid.uuid4().hex[:12])
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "selfdistill"), name=run_dir.name, group=group, id=run_id,
            resume="allow", dir=str(run_dir), config=config, mode=os.environ.get("WANDB_MODE", "offline"),
            settings=wandb.Settings(silent=True, console="off", save_code=False, x_disable_stats=True),
        )

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


class MlflowTracker:
    """MLFLOW_TRACKING_URI (a server; sqlite:// needs the full `mlflow` package), or a local file store
    `output_dir/mlruns` shared by the runs of one output folder (`mlflow ui --backend-store-uri` shows it)."""

    def __init__(self, run_dir: Path, start_step: int, group: str | None, config: dict):
        _import("mlflow")
        from mlflow.entities import Metric, Param
        from mlflow.tracking import MlflowClient

        self._metric = Metric
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:  # MLflow 3 keeps its file store in maintenance mode behind this switch; it needs no database
            uri = (run_dir.parent / "mlruns").resolve().as_uri()
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        experiment_name = group or run_dir.name
        experiment = self.client.get_experiment_by_name(experiment_name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(experiment_name)

        def new_run() -> str:
            run = self.client.create_run(experiment_id, run_name=run_dir.name)
            params = [Param(_key(k), str(v)[:6000]) for k, v in _flatten(config).items()]
            for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
                self.client.log_batch(run.info.run_id, params=params[i:i + 100])
            return run.info.run_id

        self.run_id = _tracker_id(run_dir, "mlflow", start_step, new_run)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[self._metric(_key(k), float(v), now, step) for k, v in metrics.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


TRACKERS = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker, "mlflow": MlflowTracker}


def open_trackers(names: list[str], run_dir: Path, start_step: int, group: str | None, config: dict) -> list:
    return [TRACKERS[name](run_dir, start_step, group, config) for name in names]


def _import(name: str):
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise ValueError(f"run.loggers names {name}, which is not installed: pip install 'selfdistill[trackers]' "
                         f"(or scripts/install.sh --trackers)") from e


def _tracker_id(run_dir: Path, tracker: str, start_step: int, new) -> str:
    """The tracker run id kept in the run folder: reused when resuming, new for a fresh run."""
    path = run_dir / f"{tracker}_run_id"
    if start_step and path.is_file():
        return path.read_text().strip()
    run_id = new()
    path.write_text(run_id)
    return run_id


def _key(name: str) -> str:
    return re.sub(r"[^\w./\- ]", "_", name)  # MLflow's allowed characters ("eval/avg@1" -> "eval/avg_1")


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _flatten(sub, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): tree}
