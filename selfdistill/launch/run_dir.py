"""What a run leaves on disk: runs/NAME/{config.yaml, metrics.jsonl, tb/, checkpoints/step-N/}.

A checkpoint folder is a Hugging Face model (safetensors + tokenizer, loadable by
transformers and vLLM) plus `deepspeed/` (optimizer and scheduler state of every rank)
and `trainer_state.json` (step, weight version, data position, random state, the initial
model path, and the before-training evaluation).
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch

TRAINER_STATE = "trainer_state.json"


class MetricsLog:
    """One JSON line per step in metrics.jsonl, mirrored to TensorBoard."""

    def __init__(self, run_dir: Path, start_step: int = 0):
        from torch.utils.tensorboard import SummaryWriter

        self.path = run_dir / "metrics.jsonl"
        if start_step and self.path.exists():  # resuming: drop lines past the checkpoint we resume from
            kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= start_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=start_step + 1 if start_step else None)

    def write(self, step: int, metrics: dict[str, float]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        for k, v in metrics.items():
            if isinstance(v, (int, float)):
                self.tb.add_scalar(k, v, step)
        self.tb.flush()

    def close(self) -> None:
        self.tb.close()


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step:06d}"


def latest_checkpoint(run_dir: Path) -> Path | None:
    done = sorted(p.parent for p in (run_dir / "checkpoints").glob(f"step-*/{TRAINER_STATE}"))
    return done[-1] if done else None


def write_trainer_state(path: Path, state: dict) -> None:
    """Written last, so a checkpoint folder without it is incomplete and ignored on resume."""
    state = {**state, "random": {"python": random.getstate(), "numpy": _np_state(), "torch": torch.get_rng_state().tolist()}}
    tmp = path / (TRAINER_STATE + ".tmp")
    tmp.write_text(json.dumps(state))
    tmp.rename(path / TRAINER_STATE)


def read_trainer_state(path: Path) -> dict:
    state = json.loads((path / TRAINER_STATE).read_text())
    rs = state["random"]
    random.setstate((rs["python"][0], tuple(rs["python"][1]), rs["python"][2]))
    np.random.set_state((rs["numpy"][0], np.array(rs["numpy"][1], dtype=np.uint32), *rs["numpy"][2:]))
    torch.set_rng_state(torch.tensor(rs["torch"], dtype=torch.uint8))
    return state


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    done = sorted(p.parent for p in (run_dir / "checkpoints").glob(f"step-*/{TRAINER_STATE}"))
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _np_state():
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]
