"""What a run leaves on disk: runs/NAME/{config.yaml, metrics.jsonl, tb/, checkpoints/step-N/}.

A checkpoint folder is a Hugging Face model (safetensors + tokenizer, loadable by
transformers and vLLM) plus `deepspeed/` (optimizer and scheduler state of every rank)
and `trainer_state.json` (step, weight version, data position, random state, the initial
model path, and the before-training evaluation).

Checkpoints are atomic: one is written into `checkpoints/.step-N.partial/`, every file and
folder is fsynced, and only then is it renamed to `step-N/`. A run killed mid-write leaves a
`.partial` folder that is never taken for a checkpoint (and is removed by the next save).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

TRAINER_STATE = "trainer_state.json"
_CHECKPOINT_NAME = re.compile(r"step-\d{6,}")
_CHECKPOINT_FILES = (TRAINER_STATE, "deepspeed")  # what every checkpoint of ours holds (and *.safetensors)


class MetricsLog:
    """One JSON line per step in metrics.jsonl, mirrored to the trackers named in `loggers` (launch/trackers.py)."""

    def __init__(self, run_dir: Path, start_step: int = 0, loggers: list[str] = ("tensorboard",),
                 group: str | None = None, config: dict | None = None):
        from selfdistill.launch.trackers import open_trackers

        self.path = run_dir / "metrics.jsonl"
        if start_step and self.path.exists():  # resuming: drop lines past the checkpoint we resume from
            kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= start_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        self.trackers = open_trackers(list(loggers), run_dir, start_step, group, config or {})

    def write(self, step: int, metrics: dict[str, float]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        for tracker in self.trackers:
            tracker.log(step, scalars)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step:06d}"


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """The run's complete checkpoints, oldest first (partial writes are never among them)."""
    folder = run_dir / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _CHECKPOINT_NAME.fullmatch(p.name) and (p / TRAINER_STATE).is_file())


def latest_checkpoint(run_dir: Path) -> Path | None:
    done = complete_checkpoints(run_dir)
    return done[-1] if done else None


def resume_checkpoint(run_dir: Path, resume: str | None) -> Path | None:
    """The checkpoint `run.resume` names: "auto" -> the run folder's last complete one (None if it has none),
    a path -> that checkpoint (checked), None -> None (a fresh run)."""
    if resume is None:
        return None
    if resume == "auto":
        return latest_checkpoint(run_dir)
    return check_checkpoint(Path(resume))


def save_checkpoint(run_dir: Path, step: int, keep: int, write_model: Callable[[Path], None], state: dict) -> Path:
    """Write checkpoint `step` atomically (see module docstring) and keep only the last `keep`.

    `write_model(folder)` writes the model and optimizer state into the temporary folder;
    `state` becomes its trainer_state.json, written last.
    """
    final = checkpoint_dir(run_dir, step)
    partial = final.with_name(f".{final.name}.partial")
    for stale in final.parent.glob(".step-*.partial"):  # left by a run killed mid-write
        shutil.rmtree(stale, ignore_errors=True)
    partial.mkdir(parents=True)
    write_model(partial)
    files = {str(f.relative_to(partial)): f.stat().st_size for f in sorted(partial.rglob("*")) if f.is_file()}
    write_trainer_state(partial, {**state, "files": files})
    _fsync_tree(partial)
    if final.exists():  # a rerun of a step after resuming from an earlier checkpoint
        shutil.rmtree(final)
    partial.rename(final)
    _fsync(final.parent)
    prune_checkpoints(run_dir, keep)
    return final


def check_checkpoint(path: Path) -> Path:
    """`path` if it is a complete checkpoint of ours; else ValueError naming the folder and what is missing."""
    if not path.is_dir():
        raise ValueError(f"checkpoint {path}: not a folder")
    missing = [name for name in _CHECKPOINT_FILES if not (path / name).exists()]
    if not list(path.glob("*.safetensors")):
        missing.append("*.safetensors")
    if missing:
        raise ValueError(f"checkpoint {path}: not a selfdistill checkpoint (missing {', '.join(missing)})")
    try:
        state = json.loads((path / TRAINER_STATE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"checkpoint {path / TRAINER_STATE}: unreadable ({e})") from None
    missing = [key for key in ("step", "data", "random") if key not in state]
    if missing:
        raise ValueError(f"checkpoint {path / TRAINER_STATE}: not a selfdistill trainer state (no {', '.join(missing)})")
    for name, size in state.get("files", {}).items():  # sizes as written: a copy cut short shows here
        file = path / name
        if not file.is_file():
            raise ValueError(f"checkpoint {path}: {name} is missing (written with {size} bytes)")
        if file.stat().st_size != size:
            raise ValueError(f"checkpoint {file}: truncated or changed ({file.stat().st_size} bytes, {size} written)")
    return path


def write_trainer_state(path: Path, state: dict) -> None:
    """Written last, so a checkpoint folder without it is incomplete and ignored on resume."""
    state = {**state, "random": {"python": random.getstate(), "numpy": _np_state(), "torch": torch.get_rng_state().tolist()}}
    (path / TRAINER_STATE).write_text(json.dumps(state))


def read_trainer_state(path: Path) -> dict:
    state = json.loads(check_checkpoint(path).joinpath(TRAINER_STATE).read_text())
    rs = state["random"]
    random.setstate((rs["python"][0], tuple(rs["python"][1]), rs["python"][2]))
    np.random.set_state((rs["numpy"][0], np.array(rs["numpy"][1], dtype=np.uint32), *rs["numpy"][2:]))
    torch.set_rng_state(torch.tensor(rs["torch"], dtype=torch.uint8))
    return state


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    for old in complete_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _fsync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            _fsync(Path(folder) / name)
        _fsync(Path(folder))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _np_state():
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]
