"""`selfdistill sweep SWEEP.yaml [--submit ADDR] [--dry-run] [--report]`: a grid of training runs.

A sweep file names a base config, dotted fields set on every point, a grid (every combination
of its lists) and optionally zipped lists (stepped together, one axis of the grid):

    name: cpu-engines-staleness
    base: ../cpu/opsd.yaml            # relative to this file; omitted: the embedded CPU default
    set: {run.steps: 30}
    grid: {rollout.num_engines: [1, 2], rollout.max_staleness: [0, 1]}
    zip: [{model.path: [A, B], learner.lr: [1.0e-5, 5.0e-6]}]   # optional
    metrics: [train/loss]             # last-step metrics to report next to accuracy and timings

Point runs land in OUTPUT_DIR/NAME/POINT/ (POINT: the swept values, e.g.
`num_engines=2-max_staleness=1`) and run one after another, each a `selfdistill train`
subprocess, or are submitted as cluster jobs with `selfdistill submit`. A finished point (its
summary.json exists) is skipped; an interrupted one resumes from its last checkpoint; a failed one
is reported and the sweep goes on. The report (sweep.md, sweep.json and one plot per metric under
plots/) gathers what finished.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, field_validator

from selfdistill.config import ConfigError, Strict, TrainConfig, format_validation_error, load_config, save_config

POINT_STATE = "sweep_point.json"  # written into a point's run folder by the sweep: status, wall time
_RESERVED = ("run.name", "run.output_dir", "run.group", "run.resume")  # the sweep sets these itself


class SweepConfig(Strict):
    """One sweep: a base config, fields set on every point, and the axes swept."""

    name: str = Field(description="Sweep name: its folder under the base's run.output_dir, and the runs' group.")
    base: str | None = Field(None, description="Base config YAML, relative to the sweep file; None: the CPU default.")
    set: dict[str, Any] = Field(default_factory=dict, description="Dotted fields set on every point.")
    grid: dict[str, list[Any]] = Field(
        default_factory=dict, description="Dotted field -> values; the points are every combination."
    )
    zip: list[dict[str, list[Any]]] = Field(
        default_factory=list,
        description="Groups of dotted field -> values; the lists of a group have one length and are stepped "
        "together, each group one more grid axis (one group may be given as a plain mapping).",
    )
    metrics: list[str] = Field(
        default_factory=list, description="Keys of the last metrics.jsonl row reported next to accuracy and timings."
    )

    @field_validator("zip", mode="before")
    @classmethod
    def _one_group(cls, groups: Any) -> Any:
        return [groups] if isinstance(groups, dict) else groups

    @field_validator("name")
    @classmethod
    def _safe_name(cls, name: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
            raise ValueError(f"{name!r} must be letters, digits, '.', '_' or '-' (it names a folder)")
        return name


class Point:
    """One run of a sweep: its swept values, run name and resolved config."""

    def __init__(self, name: str, values: dict[str, Any], axes: list[str], cfg: TrainConfig, overrides: list[str]):
        self.name, self.values, self.cfg = name, values, cfg
        self.overrides = overrides  # what makes this point from the base config (a submitted job gets these)
        self.axes = axes  # the first field of each axis: what names the point, the table and the plots

    @property
    def run_dir(self) -> Path:
        return self.cfg.run_dir


def load_sweep(path: str | Path) -> tuple[SweepConfig, list[Point]]:
    """Read a sweep file and resolve every point's config; any bad point stops here, before a run starts."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"sweep file {path} is not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"sweep file {path} must hold a mapping (name, base, set, grid, zip, metrics)")
    try:
        sweep = SweepConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"invalid sweep file {path}:\n" + format_validation_error(e)) from None
    axes = _axes(sweep, path)
    base = str((path.parent / sweep.base).resolve()) if sweep.base else None
    output_dir = Path(load_config(base, _overrides(sweep.set)).run.output_dir) / sweep.name
    leads = [keys[0] for keys, _ in axes]  # a zipped group is named by its first field
    short = _short_names(leads)
    points, seen = [], {}
    for combo in itertools.product(*(values for _, values in axes)):
        values = {k: v for (keys, _), vals in zip(axes, combo) for k, v in zip(keys, vals)}
        name = "-".join(f"{short[k]}={_slug(values[k])}" for k in leads)
        if name in seen:
            raise ConfigError(f"{path}: points {seen[name]} and {values} get the same run name {name!r}")
        seen[name] = values
        fixed = {"run.name": name, "run.output_dir": str(output_dir), "run.group": sweep.name, "run.resume": "auto"}
        overrides = _overrides({**sweep.set, **values, **fixed})
        try:
            cfg = load_config(base, overrides)
        except ConfigError as e:
            shown = ", ".join(f"{k}={v!r}" for k, v in values.items())
            raise ConfigError(f"{path}: point {name} ({shown}) is refused: {e}") from None
        points.append(Point(name, values, leads, cfg, overrides))
    return sweep, points


def run_sweep(path: str | Path, submit: str | None = None, dry_run: bool = False, echo=print) -> list[dict]:
    """Run (or submit, or only list) every point of a sweep; returns the report rows."""
    sweep, points = load_sweep(path)
    sweep_dir = sweep_folder(points)
    base = _in_working_dir(Path(path).parent / sweep.base) if submit and sweep.base else None
    if dry_run:
        for p in points:
            echo(f"--- {p.name}  ({', '.join(f'{k}={v!r}' for k, v in p.values.items())}) -> {p.run_dir}")
            echo(yaml.safe_dump(p.cfg.model_dump(mode="json"), sort_keys=False).rstrip())
        echo(f"{len(points)} points (dry run: nothing started)")
        return []
    configs = sweep_dir / "configs"
    for i, p in enumerate(points, 1):
        state = point_state(p)
        if state == "finished":
            echo(f"[{i}/{len(points)}] {p.name}: finished earlier, skipped")
            continue
        if state == "finished-other-config":
            echo(f"[{i}/{len(points)}] {p.name}: {p.run_dir} holds a finished run of a different config; "
                 f"not overwritten (move it away to rerun this point)")
            continue
        config_file = configs / f"{p.name}.yaml"
        save_config(p.cfg, config_file)
        if submit:  # the job gets the base config (uploaded with the working dir) and this point's overrides
            cmd = [sys.executable, "-m", "selfdistill.launch.cli", "submit", *([base] if base else []), *p.overrides,
                   "--address", submit, "--no-wait"]
            r = subprocess.run(cmd, capture_output=True, text=True)
            status = "submitted" if r.returncode == 0 else f"submit failed (exit {r.returncode})"
            echo(f"[{i}/{len(points)}] {p.name}: {status} {(r.stdout + r.stderr).strip()[-500:]}")
            continue
        echo(f"[{i}/{len(points)}] {p.name}: running (log: {sweep_dir / 'logs' / (p.name + '.log')})")
        returncode, wall = _run_local(config_file, sweep_dir / "logs" / f"{p.name}.log")
        p.run_dir.mkdir(parents=True, exist_ok=True)
        (p.run_dir / POINT_STATE).write_text(json.dumps({"returncode": returncode, "wall_s": wall}))
        if returncode == 0 and point_state(p) == "finished":
            echo(f"[{i}/{len(points)}] {p.name}: finished in {wall:.0f} s")
        else:
            echo(f"[{i}/{len(points)}] {p.name}: FAILED (exit {returncode}); see {sweep_dir / 'logs' / (p.name + '.log')}")
    if submit:
        echo(f"submitted; once the jobs are done: selfdistill sweep {path} --report")
        return []
    return write_report(sweep, points, echo)


def _in_working_dir(path: Path) -> str:
    """The base config as a path inside the working directory, which `selfdistill submit` uploads."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        raise ConfigError(f"--submit: the base config {path} must lie inside the working directory "
                          f"{Path.cwd()} (it is uploaded with the job)") from None


def sweep_folder(points: list[Point]) -> Path:
    return points[0].run_dir.parent


def point_state(p: Point) -> str:
    """'finished', 'finished-other-config' (a finished run whose config is not this point's), or 'todo'."""
    if not (p.run_dir / "summary.json").is_file():
        return "todo"
    try:
        done = yaml.safe_load((p.run_dir / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return "finished-other-config"
    return "finished" if _comparable(done) == _comparable(p.cfg.model_dump(mode="json")) else "finished-other-config"


def write_report(sweep: SweepConfig, points: list[Point], echo=print) -> list[dict]:
    """sweep.md, sweep.json and plots/METRIC.png in the sweep folder, from what the points left on disk."""
    sweep_dir = sweep_folder(points)
    rows = [_report_row(p, sweep.metrics) for p in points]
    sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweep_dir / "sweep.json").write_text(json.dumps(rows, indent=2))
    columns = ["point", *points[0].axes, "status", *_metric_columns(sweep.metrics)]
    lines = [f"# Sweep {sweep.name}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    (sweep_dir / "sweep.md").write_text("\n".join(lines) + "\n")
    plots = _plot(rows, points[0].axes, _metric_columns(sweep.metrics), sweep_dir / "plots")
    echo("\n".join(lines[2:]))
    echo(f"report: {sweep_dir / 'sweep.md'}  {sweep_dir / 'sweep.json'}  plots: {len(plots)} in {sweep_dir / 'plots'}")
    return rows


def _axes(sweep: SweepConfig, path: Path) -> list[tuple[list[str], list[tuple]]]:
    """Each axis: its fields and its list of value tuples (a grid field is an axis of one field)."""
    if not sweep.grid and not sweep.zip:
        raise ConfigError(f"{path}: the grid is empty (give grid: and/or zip: with at least one field)")
    groups = [{key: values} for key, values in sweep.grid.items()] + sweep.zip
    seen: set[str] = set()
    for group in groups:
        if not group:
            raise ConfigError(f"{path}: a zip group is empty")
        for key, values in group.items():
            if not values:
                raise ConfigError(f"{path}: field {key} has an empty list of values")
            if key in _RESERVED:
                raise ConfigError(f"{path}: field {key} cannot be swept: the sweep sets it for each point")
            if key in seen:
                raise ConfigError(f"{path}: field {key} is swept twice")
            seen.add(key)
        lengths = {key: len(values) for key, values in group.items()}
        if len(set(lengths.values())) > 1:
            raise ConfigError(f"{path}: zipped lists differ in length: {lengths}")
    return [(list(group), list(zip(*group.values()))) for group in groups]


def _overrides(fields: dict[str, Any]) -> list[str]:
    return [f"{key}={json.dumps(value)}" for key, value in fields.items()]  # JSON is YAML: types survive


def _short_names(keys: list[str]) -> dict[str, str]:
    """The last part of each dotted field, or the whole field where two would share a last part."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}


def _slug(value: Any) -> str:
    if isinstance(value, str) and "/" in value:  # a model path: its last folder
        value = value.rstrip("/").rsplit("/", 1)[-1]
    if isinstance(value, dict) and "name" in value:  # an objective or data source: its name
        value = value["name"]
    text = json.dumps(value) if isinstance(value, (dict, list)) else str(value)
    return re.sub(r"[^A-Za-z0-9._]+", "_", text).strip("_") or "_"


def _comparable(dump: dict) -> dict:
    run = {k: v for k, v in dump.get("run", {}).items() if k not in ("resume", "progress")}
    return {**dump, "run": run}


def _run_local(config_file: Path, log_path: Path) -> tuple[int, float]:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with log_path.open("a") as log:
        r = subprocess.run([sys.executable, "-m", "selfdistill.launch.cli", "train", str(config_file)],
                           stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    return r.returncode, time.perf_counter() - start


def _metric_columns(extra: list[str]) -> list[str]:
    return ["accuracy_before", "accuracy_after", "step_s", "wall_s", *extra]


def _report_row(p: Point, extra: list[str]) -> dict:
    row: dict[str, Any] = {"point": p.name, **p.values, "run_dir": str(p.run_dir)}
    state = point_state(p)
    launched = _read_json(p.run_dir / POINT_STATE) or {}
    if state != "finished":
        failed = launched.get("returncode", 0) != 0
        row["status"] = "failed" if failed else ("other config" if state == "finished-other-config" else "not run")
        return row
    summary = _read_json(p.run_dir / "summary.json") or {}
    steps = [json.loads(line) for line in (p.run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    step_times = [r["time/step"] for r in steps if isinstance(r.get("time/step"), (int, float))]
    row.update(status="finished", accuracy_key=summary.get("accuracy_key"),
               accuracy_before=summary.get("accuracy_before"), accuracy_after=summary.get("accuracy_after"),
               step_s=sum(step_times) / len(step_times) if step_times else None, wall_s=launched.get("wall_s"))
    last = steps[-1] if steps else {}
    row.update({key: last.get(key) for key in extra})
    return row


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return "" if value is None else str(value)


def _plot(rows: list[dict], fields: list[str], metrics: list[str], out_dir: Path) -> list[Path]:
    """One PNG per metric: x = the first swept field, one line per combination of the others."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    x_field, others = fields[0], fields[1:]
    x_values = list(dict.fromkeys(_slug(r[x_field]) for r in rows))
    numeric_x = all(isinstance(r[x_field], (int, float)) and not isinstance(r[x_field], bool) for r in rows)
    written = []
    for metric in metrics:
        done = [r for r in rows if isinstance(r.get(metric), (int, float)) and not isinstance(r.get(metric), bool)]
        if not done:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        lines: dict[str, list[dict]] = {}
        for r in done:
            lines.setdefault(", ".join(f"{f}={_slug(r[f])}" for f in others) or metric, []).append(r)
        for label, members in lines.items():
            xs = [m[x_field] if numeric_x else x_values.index(_slug(m[x_field])) for m in members]
            ax.plot(xs, [m[metric] for m in members], marker="o", label=label)
        if not numeric_x:
            ax.set_xticks(range(len(x_values)), x_values)
        ax.set_xlabel(x_field)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        if others:
            ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / (re.sub(r"[^A-Za-z0-9._]+", "_", metric) + ".png")  # train/loss -> train_loss.png
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
