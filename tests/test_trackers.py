"""run.loggers: metrics.jsonl plus TensorBoard, Weights & Biases (offline) and MLflow (local file store)."""

import json
import struct
import subprocess
import sys

import pytest

from selfdistill.launch.run_dir import MetricsLog

STEPS = [{"train/loss": 0.5, "eval/avg@1": 0.25}, {"train/loss": 0.4, "eval/avg@1": 0.5},
         {"train/loss": 0.3, "eval/avg@1": 0.75}]


def _wandb_records(run_dir):
    """The records of the offline run's .wandb file (LevelDB log format: 32 KiB blocks of
    [crc32c:4][length:2][type:1] chunks after a 7-byte W&B header); wandb 0.31 ships no Python reader."""
    from wandb.proto import wandb_internal_pb2

    (offline,) = (run_dir / "wandb").glob("offline-run-*")
    (path,) = offline.glob("run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, records, chunk = 7, [], b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # block trailer
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        chunk += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            records.append(record)
            chunk = b""
    return records


def test_every_tracker_gets_every_step_offline(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dir = tmp_path / "runs" / "point-a"
    run_dir.mkdir(parents=True)
    log = MetricsLog(run_dir, 0, ["tensorboard", "wandb", "mlflow"], "sweep-x", {"learner": {"lr": 1e-3}})
    for step, metrics in enumerate(STEPS, 1):
        log.write(step, {**metrics, "note": "text is kept in metrics.jsonl only"})
    log.close()

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["train/loss"] for r in rows] == [0.5, 0.4, 0.3] and rows[0]["note"].startswith("text")
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))

    records = _wandb_records(run_dir)
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (run.run_group, run.display_name, run.run_id) == ("sweep-x", "point-a", (run_dir / "wandb_run_id").read_text())
    history = [(r.history.step.num, {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                      for item in r.history.item})
               for r in records if r.WhichOneof("record_type") == "history"]
    assert [(step, h["train/loss"], h["eval/avg@1"]) for step, h in history] == [
        (1, 0.5, 0.25), (2, 0.4, 0.5), (3, 0.3, 0.75)]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(tmp_path / "runs" / "mlruns").as_uri())  # MetricsLog allowed the file store
    run = client.get_run((run_dir / "mlflow_run_id").read_text())
    assert run.info.run_name == "point-a" and run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "sweep-x"
    assert run.data.params["learner.lr"] == "0.001"
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "eval/avg_1")] == [
        (1, 0.25), (2, 0.5), (3, 0.75)]

    # resuming from step 2 continues the same MLflow run and drops metrics.jsonl lines past the checkpoint
    log = MetricsLog(run_dir, 2, ["mlflow"], "sweep-x", {})
    log.write(3, {"train/loss": 0.2})
    log.close()
    assert [json.loads(line)["train/loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [0.5, 0.4, 0.2]
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted((m.step, m.value) for m in history)[-2:] == [(3, 0.2), (3, 0.3)]
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_a_tracker_not_installed_is_named(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # what `import wandb` does without the trackers extra
    with pytest.raises(ValueError, match=r"run.loggers names wandb, which is not installed.*trackers"):
        MetricsLog(tmp_path, 0, ["wandb"])


def test_trackers_are_imported_only_when_named(tmp_path):
    code = ("import sys; from pathlib import Path; from selfdistill.launch.run_dir import MetricsLog; "
            f"log = MetricsLog(Path({str(tmp_path)!r}), 0, ['tensorboard']); log.write(1, {{'a': 1.0}}); log.close(); "
            "print(sorted(m for m in ('wandb', 'mlflow') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


def test_unknown_logger_is_refused_naming_it():
    from selfdistill.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="run.loggers.1"):
        load_config(None, ["run.loggers=[tensorboard, comet]"])
