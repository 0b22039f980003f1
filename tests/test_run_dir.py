"""Checkpoint folders: atomic writes, last-K pruning, `resume: auto`, and clear errors for folders not ours."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from selfdistill.launch.run_dir import (check_checkpoint, complete_checkpoints, latest_checkpoint, read_trainer_state,
                                        resume_checkpoint, save_checkpoint)


def _write_model(folder: Path) -> None:
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"weights")
    (folder / "deepspeed").mkdir()
    (folder / "deepspeed" / "state.pt").write_bytes(b"optimizer")


def _save(run_dir: Path, step: int, keep: int = 2, write_model=_write_model) -> Path:
    return save_checkpoint(run_dir, step, keep, write_model, {"step": step, "data": {"epoch": 0, "cursor": step}})


def test_checkpoints_are_complete_and_the_last_k_are_kept(tmp_path):
    for step in (1, 2, 3):
        path = _save(tmp_path, step)
        assert path.name == f"step-{step:06d}"
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step-000002", "step-000003"]
    assert read_trainer_state(latest_checkpoint(tmp_path))["data"]["cursor"] == 3
    assert not list((tmp_path / "checkpoints").glob(".*"))


def test_an_interrupted_write_is_never_taken_for_a_checkpoint(tmp_path):
    _save(tmp_path, 2)

    def dies_half_way(folder: Path) -> None:
        (folder / "config.json").write_text("{}")
        raise KeyboardInterrupt  # stands in for a kill while writing

    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 4, write_model=dies_half_way)
    assert (tmp_path / "checkpoints" / ".step-000004.partial").is_dir()
    assert latest_checkpoint(tmp_path).name == "step-000002"
    assert resume_checkpoint(tmp_path, "auto").name == "step-000002"
    _save(tmp_path, 4)  # the next save clears the partial folder
    assert not (tmp_path / "checkpoints" / ".step-000004.partial").exists()
    assert latest_checkpoint(tmp_path).name == "step-000004"


def test_resume_auto_starts_fresh_without_a_checkpoint(tmp_path):
    assert resume_checkpoint(tmp_path / "never-ran", "auto") is None
    assert resume_checkpoint(tmp_path, None) is None


def test_a_folder_that_is_not_ours_gives_a_clear_error(tmp_path):
    stranger = tmp_path / "some-model"
    stranger.mkdir()
    (stranger / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"some-model: not a selfdistill checkpoint \(missing trainer_state.json, "
                                         r"deepspeed, \*.safetensors\)"):
        resume_checkpoint(tmp_path, str(stranger))
    with pytest.raises(ValueError, match="not a folder"):
        check_checkpoint(tmp_path / "missing")
    path = _save(tmp_path, 1)
    (path / "trainer_state.json").write_text('{"step": 1, "da')  # truncated
    with pytest.raises(ValueError, match=r"step-000001/trainer_state.json: unreadable"):
        read_trainer_state(path)
    (path / "trainer_state.json").write_text(json.dumps({"weights": 1}))
    with pytest.raises(ValueError, match="not a selfdistill trainer state"):
        read_trainer_state(path)


def test_a_truncated_checkpoint_names_the_file(tmp_path):
    path = _save(tmp_path, 1)
    weights = path / "deepspeed" / "state.pt"
    weights.write_bytes(weights.read_bytes()[:3])
    with pytest.raises(ValueError, match=r"step-000001/deepspeed/state.pt: truncated or changed \(3 bytes, 9 written\)"):
        read_trainer_state(path)
    (path / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"missing \*.safetensors"):
        resume_checkpoint(tmp_path, str(path))
