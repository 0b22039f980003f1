"""Config loading: YAML + dotted overrides, and errors that name the field and the value."""

from pathlib import Path

import pytest

from selfdistill.config import ConfigError, TrainConfig, load_config, save_config

# Training configs; evaluation configs (configs/eval/) are EvalConfigs, checked in test_paper_configs.py.
# Sweep files (configs/scaling/) are checked in test_sweep.py.
CONFIGS = sorted(p for p in (Path(__file__).parent.parent / "configs").glob("**/*.yaml")
                 if "eval" not in p.parts and "scaling" not in p.parts)


def test_default_is_the_cpu_job():
    cfg = load_config()
    assert cfg == TrainConfig()
    assert cfg.model.kind == "tiny" and cfg.data.name == "arithmetic" and cfg.objective.name == "opsd"


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("learner:\n  lr: 0.001\nobjective:\n  name: grpo\n")
    cfg = load_config(path, ["learner.lr=1e-5", "rollout.sampling.n=8", "run.name=abc"])
    assert cfg.learner.lr == 1e-5
    assert cfg.rollout.sampling.n == 8
    assert cfg.run.name == "abc"
    assert cfg.objective.name == "grpo"


def test_untagged_sections_are_fields_of_the_default_source(tmp_path):
    # A config file without a data or model section, given one field of each: the default source's
    # fields (this used to fail with "Unable to extract tag using discriminator 'name'").
    path = tmp_path / "x.yaml"
    path.write_text("objective: {name: grpo}\n")
    cfg = load_config(path, ["data.num_eval=500", "model.warm_start.steps=10"])
    assert (cfg.data.name, cfg.data.num_eval) == ("arithmetic", 500)
    assert (cfg.model.kind, cfg.model.warm_start.steps) == ("tiny", 10)
    with pytest.raises(ConfigError, match="path"):  # a tag given stays the user's choice
        load_config(path, ["model.kind=pretrained"])


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["objective.name=dasd", "learner.zero_stage=3"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


@pytest.mark.parametrize(
    "override, field, value",
    [
        ("learner.lr=abc", "learner.lr", "'abc'"),
        ("learner.lr=-1", "learner.lr", "-1"),
        ("learner.zero_stage=4", "learner.zero_stage", "4"),
        ("learner.typo_field=1", "learner.typo_field", None),
        ("objective.name=not_a_method", "objective", "not_a_method"),
        ("rollout.sampling.n=0", "rollout.sampling.n", "0"),
    ],
)
def test_bad_values_name_field_and_value(override, field, value):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert field in str(e.value)
    if value is not None:
        assert value in str(e.value)


def test_unknown_field_says_so():
    with pytest.raises(ConfigError, match=r"learner\.typo_field: unknown field"):
        load_config(None, ["learner.typo_field=1"])


def test_cross_field_check():
    with pytest.raises(ConfigError, match="prompts_per_step"):
        load_config(None, ["rollout.prompts_per_step=3", "learner.num_ranks=2"])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("learner: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(listy)


def test_malformed_override():
    with pytest.raises(ConfigError, match="section.field=value"):
        load_config(None, ["learner.lr"])
    with pytest.raises(ConfigError, match="is a value, not a section"):
        load_config(None, ["run.name=x", "run.name.deeper=1"])


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(p.parent.parent)))
def test_every_shipped_config_validates(path):
    load_config(path)
