"""Configs parse by name, reject impossible values naming the field, and build every objective."""

import typing

import pytest
import torch
from pydantic import TypeAdapter, ValidationError

from selfdistill.learner.objectives import (
    OBJECTIVE_NAMES,
    DapoConfig,
    DasdConfig,
    GrpoConfig,
    MixConfig,
    ObjectiveConfig,
    ObjectiveInputs,
    OpsdConfig,
    PmiConfig,
    PositionWeightedConfig,
    TeacherTensors,
    build_objective,
)

PARSE = TypeAdapter(ObjectiveConfig)
MIX = {"name": "mix", "components": [{"weight": 1.0, "objective": {"name": "opsd"}}]}


def _config(name):
    return PARSE.validate_python(MIX if name == "mix" else {"name": name})


def _error_fields(exc_info):
    return [error["loc"][-1] for error in exc_info.value.errors()]


def test_every_config_in_the_union_has_a_registered_objective():
    union_members = typing.get_args(typing.get_args(ObjectiveConfig)[0])
    config_names = {member.model_fields["name"].default for member in union_members}
    assert config_names == set(OBJECTIVE_NAMES)
    assert set(OBJECTIVE_NAMES) == {
        "grpo",
        "dapo",
        "dr_grpo",
        "rloo",
        "opsd",
        "opd_sampled",
        "dasd",
        "position_weighted",
        "pmi",
        "mix",
    }


@pytest.mark.parametrize("name", OBJECTIVE_NAMES)
def test_registry_builds_every_name_and_the_loss_runs(name):
    torch.manual_seed(0)
    B, T, V = 4, 3, 5
    logits = torch.randn(B, T, V, requires_grad=True)
    student = logits.log_softmax(-1)
    tokens = torch.randint(0, V, (B, T))
    teacher = {}
    for context in ("full", "reference_only", "none"):
        rows = torch.randn(B, T, V).log_softmax(-1)
        top = rows.topk(3, dim=-1)
        teacher[context] = TeacherTensors(
            token_logprobs=rows.gather(-1, tokens[..., None]).squeeze(-1),
            entropy=torch.special.entr(rows.exp()).sum(-1),
            support_ids=top.indices,
            support_logprobs=top.values,
            full_logprobs=rows,
        )
    x = ObjectiveInputs(
        student_logprobs=student,
        tokens=tokens,
        mask=torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 1.0]]),
        old_logprobs=student.detach().gather(-1, tokens[..., None]).squeeze(-1),
        rewards=torch.tensor([1.0, 0.0, 1.0, 1.0]),
        group_ids=torch.tensor([0, 0, 1, 1]),
        teacher=teacher,
    )
    objective = build_objective(_config(name))
    assert objective.name == name
    assert set(objective.contexts) <= set(teacher)
    loss, metrics = objective(x)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(logits.grad).all()
    assert metrics and all(type(value) is float for value in metrics.values())
    assert "entropy" in metrics


def test_contexts_and_full_vocab_needs():
    assert build_objective(GrpoConfig()).contexts == ()
    opsd = build_objective(OpsdConfig(context="partial"))
    assert opsd.contexts == ("partial",) and opsd.needs_full_vocab
    assert not build_objective(OpsdConfig(support="teacher_topk")).needs_full_vocab
    assert build_objective(PmiConfig()).contexts == ("full", "reference_only", "none")


def test_defaults_follow_the_methods():
    grpo = GrpoConfig()
    assert (grpo.loss_agg, grpo.scale_rewards, grpo.clip_high) == ("seq_mean_token_mean", True, 0.2)
    dr_grpo = _config("dr_grpo")
    assert (dr_grpo.loss_agg, dr_grpo.scale_rewards) == ("seq_mean_token_sum", False)
    assert (DapoConfig().clip_low, DapoConfig().clip_high, DapoConfig().loss_agg) == (0.2, 0.28, "token_mean")
    assert (OpsdConfig().beta, OpsdConfig().clip) == (0.0, None)  # the paper reruns set 0.05 (configs/gpu)
    pw = PositionWeightedConfig()
    assert (pw.w_min, pw.tau, pw.s, pw.clip) == (0.25, 0.30, 0.10, 0.05)
    dasd = DasdConfig()
    assert (dasd.rho, dasd.side) == (0.2, "low_entropy_pulls")  # the paper's
    assert (dasd.gap_norm, dasd.push_margin, dasd.push_groups) == ("none", 0.1, "mixed_rewards")  # ours, measured
    assert (PmiConfig().beta, PmiConfig().clip, PmiConfig().target_form) == (1.0, 10.0, "tanh_clip")


@pytest.mark.parametrize(
    ("config", "values", "field"),
    [
        (OpsdConfig, {"beta": 1.5}, "beta"),
        (OpsdConfig, {"beta": -0.1}, "beta"),
        (OpsdConfig, {"clip": -0.05}, "clip"),
        (OpsdConfig, {"support": "everything"}, "support"),
        (OpsdConfig, {"top_k": 0}, "top_k"),
        (GrpoConfig, {"clip_low": -0.1}, "clip_low"),
        (GrpoConfig, {"clip_low": 1.0}, "clip_low"),
        (GrpoConfig, {"clip_high": -0.1}, "clip_high"),
        (GrpoConfig, {"loss_agg": "sum"}, "loss_agg"),
        (GrpoConfig, {"max_response_len": 0}, "max_response_len"),
        (DasdConfig, {"rho": 0.0}, "rho"),
        (DasdConfig, {"rho": 1.0}, "rho"),
        (DasdConfig, {"gap_norm": "max"}, "gap_norm"),
        (PositionWeightedConfig, {"s": 0.0}, "s"),
        (PositionWeightedConfig, {"w_min": 1.5}, "w_min"),
        (PmiConfig, {"beta": 0.0}, "beta"),
        (PmiConfig, {"clip": -1.0}, "clip"),
        (OpsdConfig, {"temperature": 1.1}, "temperature"),
    ],
)
def test_impossible_values_name_the_field(config, values, field):
    with pytest.raises(ValidationError) as exc_info:
        config(**values)
    assert _error_fields(exc_info) == [field]


def test_dapo_overlong_window_must_fit_the_budget():
    with pytest.raises(ValidationError, match="overlong_buffer_len > 0 needs max_response_len"):
        DapoConfig(overlong_buffer_len=10)
    with pytest.raises(ValidationError, match=r"overlong_buffer_len \(10\) must not exceed max_response_len \(8\)"):
        DapoConfig(overlong_buffer_len=10, max_response_len=8)
    assert DapoConfig(overlong_buffer_len=4, max_response_len=8).overlong_buffer_len == 4


def test_mix_parses_components_and_rejects_nesting_and_bad_weights():
    mix = PARSE.validate_python(
        {
            "name": "mix",
            "components": [
                {"weight": 1.0, "objective": {"name": "opsd", "beta": 0.5}},
                {"weight": 0.1, "objective": {"name": "grpo"}},
            ],
        }
    )
    assert isinstance(mix, MixConfig)
    assert [type(c.objective) for c in mix.components] == [OpsdConfig, GrpoConfig]
    with pytest.raises(ValidationError, match="does not match any of the expected tags"):
        PARSE.validate_python({"name": "mix", "components": [{"weight": 1.0, "objective": MIX}]})
    with pytest.raises(ValidationError) as exc_info:
        PARSE.validate_python({"name": "mix", "components": [{"weight": 0.0, "objective": {"name": "grpo"}}]})
    assert _error_fields(exc_info) == ["weight"]
    with pytest.raises(ValidationError) as exc_info:
        PARSE.validate_python({"name": "mix", "components": []})
    assert _error_fields(exc_info) == ["components"]


def test_unknown_name_is_rejected():
    with pytest.raises(ValidationError, match="does not match any of the expected tags"):
        PARSE.validate_python({"name": "ppo"})
