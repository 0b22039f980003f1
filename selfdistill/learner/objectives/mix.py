"""A weighted sum of objectives, e.g. OPSD plus GRPO: loss = sum_i weight_i * loss_i.

Every component sees the same micro-batch; the teacher contexts needed are the union of
the components' contexts. Diagnostics keep each component's own keys under its name
(`opsd/teacher_student_kl/full`, `loss/grpo`; a name used twice gets its index appended),
plus the student entropy and teacher-student KLs once at the top level.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field
from torch import Tensor

from selfdistill.learner.objectives.base import (
    Objective,
    ObjectiveConfigBase,
    ObjectiveInputs,
    build_objective,
    common_metrics,
    register_objective,
)
from selfdistill.learner.objectives.dasd import DasdConfig
from selfdistill.learner.objectives.opsd import OpdSampledConfig, OpsdConfig
from selfdistill.learner.objectives.pmi import PmiConfig
from selfdistill.learner.objectives.position_weighted import PositionWeightedConfig
from selfdistill.learner.objectives.rlvr import DapoConfig, DrGrpoConfig, GrpoConfig, RlooConfig

ComponentConfig = Annotated[
    GrpoConfig
    | DapoConfig
    | DrGrpoConfig
    | RlooConfig
    | OpsdConfig
    | OpdSampledConfig
    | DasdConfig
    | PositionWeightedConfig
    | PmiConfig,
    Field(discriminator="name"),
]


class MixComponent(ObjectiveConfigBase):
    weight: float = Field(gt=0.0, description="Multiplier of this component's loss in the sum.")
    objective: ComponentConfig = Field(description="The component's own objective config (any but mix).")


class MixConfig(ObjectiveConfigBase):
    name: Literal["mix"] = "mix"
    components: list[MixComponent] = Field(min_length=1, description="Objectives summed with their weights.")


@register_objective("mix")
class WeightedMix(Objective):
    """Sum of weighted component objectives."""

    def __init__(self, cfg: MixConfig) -> None:
        super().__init__(cfg)
        self.components = [(c.weight, build_objective(c.objective)) for c in cfg.components]
        names = [objective.name for _, objective in self.components]
        self.prefixes = [name if names.count(name) == 1 else f"{name}{i}" for i, name in enumerate(names)]
        self.contexts = tuple(dict.fromkeys(ctx for _, objective in self.components for ctx in objective.contexts))
        self.needs_full_vocab = any(objective.needs_full_vocab for _, objective in self.components)

    def __call__(self, x: ObjectiveInputs) -> tuple[Tensor, dict[str, float]]:
        total: Tensor | None = None
        metrics = common_metrics(x, self.contexts)
        for prefix, (weight, objective) in zip(self.prefixes, self.components, strict=True):
            loss, component_metrics = objective(x)
            total = weight * loss if total is None else total + weight * loss
            metrics[f"loss/{prefix}"] = loss.item()
            metrics.update({f"{prefix}/{key}": value for key, value in component_metrics.items()})
        return total, metrics
