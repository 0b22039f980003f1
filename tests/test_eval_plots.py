"""`selfdistill plot` on synthetic runs and a synthetic evaluation."""

import json
import math

import pytest

from selfdistill.eval.plots import ema, plot_run, plot_runs, read_metrics, run_rows, training_panels
from selfdistill.launch import cli

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write_run(path, steps, accuracy_slope, eval_every=0):
    path.mkdir(parents=True)
    with (path / "metrics.jsonl").open("w") as f:
        for step in range(1, steps + 1):
            row = {"step": step, "reward/mean": accuracy_slope * step, "reward/accuracy": accuracy_slope * step,
                   "train/entropy": 2.0 * math.exp(-step / 20), "response/length": 40 + step % 7,
                   "train/loss": 1.0 / step, "train/teacher_student_kl/full": 0.5 / step}
            if eval_every and step % eval_every == 0:
                row["eval/avg@4"] = accuracy_slope * step
            f.write(json.dumps(row) + "\n")
    return path


def _write_eval(path):
    path.mkdir(parents=True)
    datasets = {name: {"n_problems": 4, "k": 4, "avg@4": a, "maj@4": a,
                       "pass@k": {str(k): min(1.0, a * k) for k in range(1, 5)}, "health": {"length": 9.0}}
                for name, a in (("arithmetic", 0.2), ("gsm8k", 0.1))}
    macro = {"pass@k": {str(k): (min(1.0, 0.2 * k) + min(1.0, 0.1 * k)) / 2 for k in range(1, 5)}}
    (path / "results.json").write_text(json.dumps({"k": 4, "datasets": datasets, "macro": macro}))
    return path


def test_plot_runs_and_eval_to_png(tmp_path):
    a = _write_run(tmp_path / "runs" / "grpo", 60, 0.01, eval_every=10)
    b = _write_run(tmp_path / "runs" / "opsd", 5, 0.05)
    ev = _write_eval(tmp_path / "evals" / "opsd-step5")
    out = plot_runs([a, b, ev], tmp_path / "figs" / "compare.png")
    data = out.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000


def test_plot_run_writes_into_the_run(tmp_path):
    run = _write_run(tmp_path / "r", 3, 0.1)
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 4, "reward/me')  # a run still being written
    assert len(read_metrics(run)) == 3
    _write_eval(run / "checkpoints" / "step-000003" / "eval")  # found and drawn as a pass@k panel
    path = plot_run(run)
    assert path == run / "plots.png" and path.read_bytes().startswith(PNG_MAGIC)


def test_cli_plot(tmp_path, capsys):
    run = _write_run(tmp_path / "r", 4, 0.1)
    assert cli.main(["plot", str(run)]) == 0
    assert (run / "plots.png").stat().st_size > 0
    assert cli.main(["plot", str(tmp_path / "nothing-here")]) == 2
    assert "neither metrics.jsonl" in capsys.readouterr().err


def test_ema_debiased():
    assert ema([1.0, 1.0, 1.0], 5) == pytest.approx([1.0, 1.0, 1.0])
    assert ema([0.0, 3.0], 1) == pytest.approx([0.0, 3.0])


def test_panels_show_held_out_accuracy_loss_and_kl_and_reward_once(tmp_path):
    run = _write_run(tmp_path / "r", 20, 0.01, eval_every=5)
    (run / "summary.json").write_text(json.dumps({"eval_before": {"eval/avg@4": 0.3, "eval/pass@4": 0.5}}))
    rows = run_rows(run)
    assert rows[0] == {"step": 0, "eval/avg@4": 0.3}  # the before-training point starts the held-out curve
    titles = [title for title, _ in training_panels([("r", rows)])]
    assert titles == ["held-out avg@4", "training loss", "teacher-student KL (nats / token)",
                      "rollout reward (mean)", "entropy (nats / token)", "response length (tokens)"]
    # an RLVR run without a teacher: no KL panel; no eval_every: no held-out panel
    rlvr = [{"step": 1, "reward/mean": 0.5, "train/loss": 0.1}]
    assert [t for t, _ in training_panels([("g", rlvr)])] == ["training loss", "rollout reward (mean)"]
