"""Training objectives: RLVR baselines, OPSD and its family, and weighted mixes.

Each objective is a pure function of one micro-batch's tensors (`ObjectiveInputs`) to a
scalar loss and diagnostics, built from its typed config by `build_objective`; configs are
told apart by their `name`.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from selfdistill.learner.objectives.base import (
    Objective,
    ObjectiveInputs,
    TeacherTensors,
    aggregate_loss,
    build_objective,
    masked_mean,
    registered_objective_names,
)
from selfdistill.learner.objectives.dasd import DasdConfig
from selfdistill.learner.objectives.mix import MixComponent, MixConfig
from selfdistill.learner.objectives.opsd import OpdSampledConfig, OpsdConfig
from selfdistill.learner.objectives.pmi import PmiConfig
from selfdistill.learner.objectives.position_weighted import PositionWeightedConfig
from selfdistill.learner.objectives.rlvr import (
    DapoConfig,
    DrGrpoConfig,
    GrpoConfig,
    RlooConfig,
    groups_with_reward_variance,
    overlong_penalty,
)

ObjectiveConfig = Annotated[
    GrpoConfig
    | DapoConfig
    | DrGrpoConfig
    | RlooConfig
    | OpsdConfig
    | OpdSampledConfig
    | DasdConfig
    | PositionWeightedConfig
    | PmiConfig
    | MixConfig,
    Field(discriminator="name"),
]

OBJECTIVE_NAMES: tuple[str, ...] = registered_objective_names()

__all__ = [
    "OBJECTIVE_NAMES",
    "DapoConfig",
    "DasdConfig",
    "DrGrpoConfig",
    "GrpoConfig",
    "MixComponent",
    "MixConfig",
    "Objective",
    "ObjectiveConfig",
    "ObjectiveInputs",
    "OpdSampledConfig",
    "OpsdConfig",
    "PmiConfig",
    "PositionWeightedConfig",
    "RlooConfig",
    "TeacherTensors",
    "aggregate_loss",
    "build_objective",
    "groups_with_reward_variance",
    "masked_mean",
    "overlong_penalty",
]
