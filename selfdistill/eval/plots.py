"""`selfdistill plot`: training curves of one or more runs, and pass@k curves of evaluations, as one PNG.

    selfdistill plot runs/grpo runs/opsd --out compare.png
    selfdistill plot runs/opsd runs/opsd/checkpoints/step-000040/eval

Each PATH is a run folder (holds metrics.jsonl) or an evaluation (a results.json, or a
folder holding one). Training panels, each drawn when some run logged it: held-out Avg@k
over steps (`eval/avg@K`, logged with `run.eval_every`; the before-training value from
summary.json is step 0), the training loss, the teacher-student KL (the first context a run
has), the rollout reward (for a 0/1 verifier this is the rollout accuracy too, so it is
drawn once), entropy and response length; one line per run, legend = run name. Noisy curves (20 points or more) are drawn faint with an exponential moving
average on top. Evaluations add a pass@k panel: one line per evaluation and data set
(the macro mean when there are several data sets), k on a log2 axis.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

# (title, metric keys tried in order: the first one a run has is drawn); held-out accuracy gets a 0-1 axis
PANELS: list[tuple[str, tuple[str, ...]]] = [
    ("training loss", ("train/loss",)),
    ("teacher-student KL (nats / token)", tuple(f"train/teacher_student_kl/{c}"
                                               for c in ("full", "partial", "reference_only", "none"))),
    ("rollout reward (mean)", ("reward/mean",)),
    ("entropy (nats / token)", ("train/entropy", "train/student_entropy")),
    ("response length (tokens)", ("response/length",)),
]
_HELD_OUT = re.compile(r"^eval/avg@\d+$")
SMOOTH_FROM = 20  # points; shorter curves are drawn as they are


def plotted(key: str) -> bool:
    """Whether `plot_runs` draws metric `key` (a panel's key or a held-out accuracy)."""
    return key == "step" or bool(_HELD_OUT.match(key)) or any(key in keys for _, keys in PANELS)


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of a run's metrics.jsonl (one dict per logged step); a broken last line is ignored."""
    rows = []
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i != len(lines) - 1:  # a run being written may have a partial last line
                raise
    return rows


def run_rows(run_dir: str | Path) -> list[dict[str, Any]]:
    """A run's metric rows, led by a step-0 row of its before-training evaluation when summary.json has one."""
    rows = read_metrics(run_dir)
    summary = Path(run_dir) / "summary.json"
    if summary.is_file():
        before = json.loads(summary.read_text()).get("eval_before") or {}
        held_out = {k: v for k, v in before.items() if _HELD_OUT.match(k)}
        if held_out:
            rows = [{"step": 0, **held_out}, *rows]
    return rows


def training_panels(runs: list[tuple[str, list[dict[str, Any]]]]) -> list[tuple[str, tuple[str, ...]]]:
    """(title, metric keys) of the panels some run has data for, held-out accuracy first."""
    panels = [(title, keys) for title, keys in PANELS if any(_first_key(rows, keys) for _, rows in runs)]
    held_out = sorted({key for _, rows in runs for row in rows for key in row if _HELD_OUT.match(key)})
    if held_out:
        panels.insert(0, (f"held-out {held_out[0].removeprefix('eval/')}", tuple(held_out)))
    return panels


def series(rows: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of `key` over the rows that have a finite value for it."""
    xs, ys = [], []
    for row in rows:
        value = row.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value):
            xs.append(row["step"])
            ys.append(float(value))
    return xs, ys


def ema(values: list[float], span: int) -> list[float]:
    """Exponential moving average with weight 2 / (span + 1), debiased at the start."""
    alpha, avg, weight, out = 2.0 / (span + 1), 0.0, 0.0, []
    for v in values:
        avg = (1 - alpha) * avg + alpha * v
        weight = (1 - alpha) * weight + alpha
        out.append(avg / weight)
    return out


def _is_eval(path: Path) -> bool:
    return path.name == "results.json" or (path.is_dir() and (path / "results.json").is_file()
                                            and not (path / "metrics.jsonl").is_file())


def _label(path: Path, taken: set[str]) -> str:
    """Run name (folder name); the parent is prepended while names clash."""
    parts = path.resolve().parts
    for depth in range(1, len(parts) + 1):
        label = "/".join(parts[-depth:])
        if label not in taken:
            taken.add(label)
            return label
    return str(path)


def plot_runs(paths: list[str | Path], out: str | Path) -> Path:
    """Draw every run folder and evaluation in `paths` into one PNG at `out`; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    if not paths:
        raise ValueError("plot: give at least one run folder or results.json")
    runs, evals, taken = [], [], set()
    for p in map(Path, paths):
        if _is_eval(p):
            results_path = p if p.name == "results.json" else p / "results.json"
            folder = results_path.parent
            name = _label(folder.parent if folder.name == "eval" else folder, taken)  # CKPT/eval: named by CKPT
            evals.append((name, json.loads(results_path.read_text())))
        elif (p / "metrics.jsonl").is_file():
            runs.append((_label(p, taken), run_rows(p)))
        else:
            raise FileNotFoundError(f"plot: {p} holds neither metrics.jsonl (a run) nor results.json (an evaluation)")

    panels = training_panels(runs)
    count = len(panels) + bool(evals)
    if count == 0:
        raise ValueError("plot: the runs logged none of the plotted metrics")
    cols = min(count, 2 if count <= 4 else 3)
    rows_n = math.ceil(count / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(5.2 * cols, 3.6 * rows_n), squeeze=False)
    flat_axes = list(axes.flat)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    if len(runs) > len(colors):  # many runs: a longer palette so no two share a colour
        colors = [plt.cm.tab20(i % 20) for i in range(len(runs))]

    for ax, (title, keys) in zip(flat_axes, panels):
        for i, (name, rows) in enumerate(runs):
            key = _first_key(rows, keys)
            if key is None:
                continue
            xs, ys = series(rows, key)
            color = colors[i % len(colors)]
            if len(xs) >= SMOOTH_FROM:
                ax.plot(xs, ys, color=color, alpha=0.25, linewidth=0.8)
                ax.plot(xs, ema(ys, max(5, len(xs) // 20)), color=color, linewidth=1.8, label=name)
            else:
                ax.plot(xs, ys, color=color, linewidth=1.8, marker="o" if len(xs) < 12 else None, markersize=3,
                        label=name)
        ax.set_title(title, fontsize=11)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if title.startswith("held-out"):
            ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    if evals:
        _pass_at_k_panel(flat_axes[len(panels)], evals, colors[len(runs) :] + colors[: len(runs)])  # own colours
    for ax in flat_axes[count:]:
        ax.set_visible(False)

    # one legend for the runs, above the panels
    handles, labels = [], []
    for ax in flat_axes[: len(panels)]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    ncol = min(len(labels), 6)
    legend_rows = -(-len(labels) // ncol) if labels else 0
    top = 1 - (0.065 * legend_rows) / rows_n
    if handles:
        fig.legend(handles, labels, loc="upper center", ncol=ncol, frameon=False, bbox_to_anchor=(0.5, 1.0))
    fig.tight_layout(rect=(0, 0, 1, top))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _pass_at_k_panel(ax, evals: list[tuple[str, dict[str, Any]]], colors: list[str]) -> None:
    """One evaluation: a line per data set (and the macro mean, dashed); several: one line each."""
    from matplotlib.ticker import FixedLocator, NullLocator

    curves = []  # (label, pass@k dict, dashed)
    for name, results in evals:
        datasets = results["datasets"]
        if len(evals) == 1 or len(datasets) == 1:
            curves += [(f"{name}: {ds}", m["pass@k"], False) for ds, m in datasets.items()]
        if len(datasets) > 1:
            curves.append((f"{name}: macro of {len(datasets)}", results["macro"]["pass@k"], True))
    all_ks: set[int] = set()
    for i, (label, values, dashed) in enumerate(curves):
        ks = sorted(int(k) for k in values)
        all_ks.update(ks)
        ax.plot(ks, [values[str(k)] for k in ks], marker="o", markersize=3, linewidth=1.8,
                linestyle="--" if dashed else "-", color=colors[i % len(colors)], label=label)
    ax.set_xscale("log", base=2)
    ticks = sorted(all_ks) if len(all_ks) <= 8 else [k for k in sorted(all_ks) if k & (k - 1) == 0]
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([str(k) for k in ticks])
    ax.set_title("pass@k (evaluation)", fontsize=11)
    ax.set_xlabel("k (samples per problem)")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _first_key(rows: list[dict[str, Any]], keys: tuple[str, ...]) -> str | None:
    for key in keys:
        if any(key in row for row in rows):
            return key
    return None


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Training curves of one run as RUN_DIR/plots.png (default), with the pass@k curves of any
    evaluation found in RUN_DIR/eval/ or a checkpoint's eval/ (what `selfdistill eval CKPT` writes)."""
    run_dir = Path(run_dir)
    found = [run_dir / "eval", *sorted((run_dir / "checkpoints").glob("step-*/eval"))]
    paths = [run_dir, *(p for p in found if (p / "results.json").is_file())]
    return plot_runs(paths, out or run_dir / "plots.png")
