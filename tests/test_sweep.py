"""`selfdistill sweep`: points, run names, bad input, and a real two-point sweep of the CPU default."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from selfdistill.config import ConfigError, save_config
from selfdistill.launch.sweep import load_sweep, point_state, run_sweep
from selfdistill.models.tiny import build_tiny_model


def _sweep_file(tmp_path, **sweep) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"name": "s", "set": {"run.output_dir": str(tmp_path / "runs")}, **sweep}))
    return path


def _cli(*args, timeout=900):
    return subprocess.run([sys.executable, "-m", "selfdistill.launch.cli", "sweep", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)


def test_grid_times_zip_gives_named_points_with_resolved_configs(tmp_path):
    path = _sweep_file(tmp_path, grid={"rollout.max_staleness": [0, 2]},
                       zip=[{"learner.lr": [1e-3, 1e-4], "rollout.sampling.n": [2, 4]}])
    sweep, points = load_sweep(path)
    assert [p.name for p in points] == ["max_staleness=0-lr=0.001", "max_staleness=0-lr=0.0001",
                                        "max_staleness=2-lr=0.001", "max_staleness=2-lr=0.0001"]
    last = points[-1].cfg
    assert (last.rollout.max_staleness, last.learner.lr, last.rollout.sampling.n) == (2, 1e-4, 4)
    assert last.run_dir == tmp_path / "runs" / "s" / "max_staleness=2-lr=0.0001"
    assert last.run.group == "s" and last.run.resume == "auto"
    r = _cli(path, "--dry-run", timeout=120)
    assert r.returncode == 0 and "4 points (dry run" in r.stdout and "max_staleness: 2" in r.stdout
    assert not (tmp_path / "runs").exists()  # a dry run starts nothing and writes nothing


def test_objective_values_are_named_by_their_name(tmp_path):
    path = _sweep_file(tmp_path, grid={"objective": [{"name": "grpo"}, {"name": "dasd", "rho": 0.3}]})
    _, points = load_sweep(path)
    assert [p.name for p in points] == ["objective=grpo", "objective=dasd"]
    assert points[1].cfg.objective.rho == 0.3


@pytest.mark.parametrize("sweep, message", [
    ({"grid": {"rollout.nonesuch": [1, 2]}}, "rollout.nonesuch: unknown field"),
    ({"grid": {"rollout.num_engines": [1, 0]}}, "num_engines=0"),
    ({"grid": {}}, "the grid is empty"),
    ({}, "the grid is empty"),
    ({"grid": {"learner.lr": []}}, "field learner.lr has an empty list"),
    ({"zip": {"learner.lr": [1e-3, 1e-4], "rollout.sampling.n": [2]}}, "zipped lists differ in length"),
    ({"grid": {"run.name": ["a", "b"]}}, "run.name cannot be swept"),
    ({"grid": {"learner.lr": [1e-3]}, "zip": {"learner.lr": [1e-4]}}, "learner.lr is swept twice"),
    ({"grid": {"learner.lr": [1e-3]}, "extra_key": 1}, "extra_key: unknown field"),
])
def test_bad_sweeps_are_refused_naming_the_field(tmp_path, sweep, message):
    path = _sweep_file(tmp_path, **sweep)
    with pytest.raises(ConfigError, match="sweep.yaml") as e:
        load_sweep(path)
    assert message in str(e.value)
    if message == "rollout.nonesuch: unknown field":  # the command line says the same, and starts nothing
        r = _cli(path, timeout=300)
        assert r.returncode == 2 and message in r.stderr and not (tmp_path / "runs").exists()


def test_refused_value_names_the_point_and_the_field(tmp_path):
    path = _sweep_file(tmp_path, grid={"rollout.num_engines": [1, 0]})
    with pytest.raises(ConfigError) as e:
        load_sweep(path)
    assert "point num_engines=0" in str(e.value) and "rollout.num_engines" in str(e.value)
    assert "greater than or equal to 1" in str(e.value)


def test_a_finished_run_of_another_config_is_never_overwritten(tmp_path):
    path = _sweep_file(tmp_path, grid={"learner.lr": [1e-3]})
    _, (point,) = load_sweep(path)
    assert point_state(point) == "todo"
    other = point.cfg.model_copy(update={"learner": point.cfg.learner.model_copy(update={"lr": 5e-4})})
    save_config(other, point.run_dir / "config.yaml")
    (point.run_dir / "summary.json").write_text("{}")
    assert point_state(point) == "finished-other-config"
    lines = []
    run_sweep(path, echo=lines.append)
    assert any("not overwritten" in line for line in lines)
    assert yaml.safe_load((point.run_dir / "config.yaml").read_text())["learner"]["lr"] == 5e-4
    save_config(point.cfg, point.run_dir / "config.yaml")
    assert point_state(point) == "finished"


def test_failed_points_are_reported_and_the_sweep_goes_on(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "1+1", "answer": "2"}\n{"question": "2+2"}\n')
    path = _sweep_file(tmp_path, grid={"learner.lr": [1e-3, 1e-4]})
    raw = yaml.safe_load(path.read_text())
    raw["set"].update({"data": {"name": "file", "path": str(bad), "on_bad_row": "error"}, "run.eval_size": 1})
    path.write_text(yaml.safe_dump(raw))
    lines = []
    run_sweep(path, echo=lines.append)
    assert sum("FAILED (exit 2)" in line for line in lines) == 2  # the second point ran after the first failed
    rows = json.loads((tmp_path / "runs" / "s" / "sweep.json").read_text())
    assert [row["status"] for row in rows] == ["failed", "failed"]
    assert "bad.jsonl:2" in (tmp_path / "runs" / "s" / "logs" / "lr=0.001.log").read_text()


@pytest.mark.e2e
def test_two_point_sweep_runs_reports_and_skips_on_rerun(tmp_path):
    model = build_tiny_model(tmp_path / "tiny", seed=0, hidden_size=64, num_layers=2, num_heads=2)
    path = _sweep_file(tmp_path, grid={"learner.lr": [1e-3, 1e-4]}, metrics=["train/loss"])
    raw = yaml.safe_load(path.read_text())
    raw["set"].update({"model": {"kind": "pretrained", "path": str(model)}, "run.steps": 2, "run.save_every": 0,
                       "run.eval_size": 4, "run.progress": False, "rollout.prompts_per_step": 2,
                       "rollout.sampling.n": 2, "rollout.sampling.max_new_tokens": 16})
    path.write_text(yaml.safe_dump(raw))
    r = _cli(path)
    assert r.returncode == 0, r.stdout + r.stderr
    sweep_dir = tmp_path / "runs" / "s"
    rows = json.loads((sweep_dir / "sweep.json").read_text())
    assert [(row["point"], row["status"]) for row in rows] == [("lr=0.001", "finished"), ("lr=0.0001", "finished")]
    for row in rows:
        assert 0.0 <= row["accuracy_after"] <= 1.0 and row["step_s"] > 0 and row["wall_s"] > row["step_s"]
        assert row["train/loss"] == json.loads((Path(row["run_dir"]) / "metrics.jsonl").read_text().splitlines()[-1])["train/loss"]
    table = (sweep_dir / "sweep.md").read_text()
    assert "| lr=0.001 | 0.001 | finished |" in table and "accuracy_after" in table
    assert {p.name for p in (sweep_dir / "plots").glob("*.png")} >= {"accuracy_after.png", "step_s.png", "train_loss.png"}
    stamps = {p.name: (p.run_dir / "summary.json").stat().st_mtime_ns for p in load_sweep(path)[1]}

    r = _cli(path)
    assert r.returncode == 0 and r.stdout.count("finished earlier, skipped") == 2, r.stdout + r.stderr
    assert stamps == {p.name: (p.run_dir / "summary.json").stat().st_mtime_ns for p in load_sweep(path)[1]}
    assert sorted(p.name for p in sweep_dir.iterdir()) == ["configs", "logs", "lr=0.0001", "lr=0.001", "plots",
                                                           "sweep.json", "sweep.md"]


@pytest.mark.parametrize("path", sorted((Path(__file__).parent.parent / "configs" / "scaling").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_every_shipped_sweep_resolves(path):
    sweep, points = load_sweep(path)
    assert len(points) >= 2 and len({p.run_dir for p in points}) == len(points)
