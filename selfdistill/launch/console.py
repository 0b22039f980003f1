"""What a person sees: status lines, a live progress bar with the step's key numbers, a summary.

Where output is not a terminal (`ray job logs`, a file) or `run.progress` is off, the bar becomes one
plain line every `every` steps (and at the first and last): step, reward, loss, seconds per step, ETA.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console as RichConsole
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

SHOWN = {"train/loss": "loss", "reward/mean": "reward", "train/entropy": "entropy", "time/step": "s/step"}


class Console:
    def __init__(self, live: bool = True, every: int = 1):
        self.rich = RichConsole(stderr=False)
        self.live = live and self.rich.is_terminal
        self.every = every

    def status(self, message: str) -> None:
        self.rich.print(f"[bold cyan]>[/] {message}")

    def note(self, message: str) -> None:
        self.rich.print(f"  {message}")

    @contextmanager
    def progress(self, total: int, start: int, label: str = "train", every: int | None = None):
        """A bar over steps start+1..total (plain lines every `every` steps, default the console's, off a terminal)."""
        every = every or self.every
        bar = Progress(
            TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(), TimeRemainingColumn(), console=self.rich, disable=not self.live,
        )
        task = bar.add_task("train", total=total, completed=start, info="")
        began = time.monotonic()

        class _Handle:
            def advance(_, step: int, metrics: dict) -> None:
                info = "  ".join(f"{short} {metrics[k]:.3f}" for k, short in SHOWN.items() if k in metrics)
                bar.update(task, completed=step, info=info)
                if not self.live and (step % every == 0 or step in (start + 1, total)):
                    line = plain_line(step, total, info, (time.monotonic() - began) / (step - start))
                    self.rich.print(line if label == "train" else f"{label} {line}", soft_wrap=True)

        with bar:
            yield _Handle()

    def summary(self, summary: dict, metrics_path: Path) -> None:
        rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line]
        table = Table(title="selfdistill run summary")
        table.add_column("metric")
        table.add_column("value", justify="right")
        key = summary["accuracy_key"]
        table.add_row(f"held-out {key}, before training", f"{summary['accuracy_before']:.3f}")
        table.add_row(f"held-out {key}, after training", f"{summary['accuracy_after']:.3f}")
        table.add_row("held-out problems", str(summary["eval_problems"]))
        if rows:
            first, last = rows[0], rows[-1]
            for key in ("reward/mean", "train/loss", "train/entropy", "response/length"):
                if key in last:
                    table.add_row(f"{key} (first step -> last)", f"{first.get(key, float('nan')):.3f} -> {last[key]:.3f}")
            mean_step = sum(r.get("time/step", 0.0) for r in rows) / len(rows)
            table.add_row("mean seconds per step", f"{mean_step:.2f}")
        table.add_row("run folder", summary["run_dir"])
        table.add_row("last checkpoint", summary["checkpoint"])
        table.add_row("plots", summary["plot"])
        self.rich.print(table)


def plain_line(step: int, total: int, info: str, seconds_per_step: float) -> str:
    """`step 20/200  reward 0.41  loss 0.12 ...  ETA 0:05:12` (ETA from the mean wall time per step so far)."""
    eta = int(round(seconds_per_step * (total - step)))
    return f"step {step}/{total}  {info}  ETA {eta // 3600}:{eta % 3600 // 60:02d}:{eta % 60:02d}"
