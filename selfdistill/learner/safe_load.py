"""DeepSpeed checkpoint files read with `torch.load(weights_only=True)`: nothing in them is unpickled.

DeepSpeed's own checkpoint engine loads with `weights_only=False`, which runs whatever a
checkpoint file's pickle says. `load_weights_only` swaps in an engine that writes the same
files and reads them with the weights-only unpickler, allowing only the few plain DeepSpeed
classes its optimizer state holds; a file that names anything else fails to load, with
torch's message naming it. Some Pythons (Debian bookworm's 3.11.2, for one) pickle an Enum
member as `getattr(EnumClass, name)`: that `getattr` is allowed, but only as a lookup of a
member of those enum classes. DeepSpeed is imported on use (the driver never loads it).
"""

from __future__ import annotations

import pickle

import torch


def load_weights_only(engine) -> None:
    """Make DeepSpeed `engine` read its checkpoints with the weights-only unpickler."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    def enum_member(cls, name: str):
        if cls is not ZeroStageEnum or name not in cls.__members__:
            raise pickle.UnpicklingError(f"checkpoint asks for getattr({cls!r}, {name!r}): only a member of "
                                         "ZeroStageEnum may be looked up")
        return cls[name]

    safe_globals = [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address, (enum_member, "builtins.getattr")]

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            with torch.serialization.safe_globals(safe_globals):
                return torch.load(path, map_location=map_location, weights_only=True)

    engine.checkpoint_engine = WeightsOnlyCheckpointEngine(engine._config)
