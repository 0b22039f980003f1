"""learner/safe_load.py: DeepSpeed checkpoint files are read with the weights-only unpickler.

A file whose pickle would run code is refused; DeepSpeed's own optimizer-state classes load,
including an Enum member pickled as `getattr(EnumClass, name)` (what Debian bookworm's Python
3.11.2 writes: the resume inside the CPU Docker image failed on it), and that `getattr` reaches
nothing but a member of the allowed enums.
"""

from __future__ import annotations

import os
import pickle
from types import SimpleNamespace

import pytest
import torch
from deepspeed.runtime.fp16.loss_scaler import LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum

from selfdistill.learner.safe_load import load_weights_only


def _loader():
    engine = SimpleNamespace(_config=None)
    load_weights_only(engine)
    return engine.checkpoint_engine


class _ByGetattr:
    """Pickles as `getattr(owner, name)`, the form some Pythons give an Enum member."""

    def __init__(self, owner, name):
        self.owner, self.name = owner, name

    def __reduce__(self):
        return getattr, (self.owner, self.name)


class _RunsCode:
    def __reduce__(self):
        return os.system, ("echo unpickled",)


def test_optimizer_state_with_an_enum_member_loads_in_either_pickled_form(tmp_path):
    for form, member in [("value", ZeroStageEnum.optimizer_states),
                         ("getattr", _ByGetattr(ZeroStageEnum, "optimizer_states"))]:
        path = tmp_path / f"{form}.pt"
        torch.save({"zero_stage": member, "loss_scaler": LossScaler(1.0), "state": torch.ones(2)}, path)
        loaded = _loader().load(str(path))
        assert loaded["zero_stage"] is ZeroStageEnum.optimizer_states, form
        assert isinstance(loaded["loss_scaler"], LossScaler) and torch.equal(loaded["state"], torch.ones(2))


@pytest.mark.parametrize("owner,name", [(LossScaler, "update_scale"), (ZeroStageEnum, "__class__"),
                                        (int, "from_bytes")])
def test_getattr_reaches_nothing_but_an_allowed_enum_member(tmp_path, owner, name):
    path = tmp_path / "ckpt.pt"
    torch.save({"x": _ByGetattr(owner, name)}, path)
    with pytest.raises(pickle.UnpicklingError):
        _loader().load(str(path))


def test_a_file_whose_pickle_runs_code_is_refused(tmp_path, capfd):
    path = tmp_path / "ckpt.pt"
    torch.save({"x": _RunsCode()}, path)
    with pytest.raises(pickle.UnpicklingError, match="system"):
        _loader().load(str(path))
    assert "unpickled" not in capfd.readouterr().out
