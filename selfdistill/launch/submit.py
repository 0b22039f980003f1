"""`selfdistill submit CONFIG [overrides] --address ADDR [--no-wait]`: a training run as a Ray job.

The config is validated here first (a bad field fails before anything is uploaded). The job runs
`selfdistill train` on the cluster with `cluster.address=auto`, so its driver joins that cluster and
never starts another. The working directory is uploaded without virtual environments, run folders,
caches, git data or credentials; the environment variables the run reads (NCCL_*, GLOO_*, VLLM_*, HF_*,
...) go with the job as set here, except secrets, and NCCL defaults fill in only what is unset.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
import time
from pathlib import Path

# Never uploaded: environments, outputs, caches, version control, and anything that holds credentials.
EXCLUDES = [
    ".venv", "venv", ".tox", "runs", "**/__pycache__", "*.pyc", ".cache", ".pytest_cache", ".mypy_cache",
    ".ruff_cache", "*.egg-info", "build", "dist", ".git", ".hg", "*.safetensors", "*.bin", "*.pt", "*.gguf",
    ".env", ".env.*", "*.env", ".envrc", "*.pem", "*.key", "*.p12", "*.pfx", "*.crt", ".netrc", ".git-credentials",
    ".pypirc", ".npmrc", ".ssh", "id_rsa*", "id_ecdsa*", "id_ed25519*", ".aws", ".azure", ".gcloud", ".kube",
    ".docker", ".huggingface", "credentials", "credentials.json", "*.kdbx",
]
# Variables the run reads, passed on from the submitting shell.
PASSED_ENV = re.compile(r"^(NCCL_|GLOO_|VLLM_|HF_|TRANSFORMERS_|TORCH_|OMP_|SELFDISTILL_|WANDB_|MLFLOW_|PYTORCH_)")
SECRET = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|API_KEY|_KEY$|CREDENTIAL", re.IGNORECASE)
# Safe NCCL settings for a run that mixes vLLM's and the learner's communicators; set only where unset.
NCCL_DEFAULTS = {"NCCL_CUMEM_ENABLE": "0", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1", "NCCL_ASYNC_ERROR_HANDLING": "1"}


def job_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The job's env vars: what the run reads from `environ` (no secrets), then NCCL defaults where unset."""
    environ = dict(os.environ if environ is None else environ)
    env = {k: v for k, v in environ.items() if PASSED_ENV.match(k) and not SECRET.search(k)}
    return {**NCCL_DEFAULTS, **env}


def runtime_env(working_dir: Path, environ: dict[str, str] | None = None) -> dict:
    return {"working_dir": str(working_dir), "excludes": list(EXCLUDES), "env_vars": job_env(environ)}


def entrypoint(config: str | None, overrides: list[str], python: str) -> str:
    args = [python, "-m", "selfdistill.launch.cli", "train", *([config] if config else []), *overrides,
            "cluster.address=auto"]
    return shlex.join(args)


def submit(config: str | None, overrides: list[str], address: str, wait: bool = True, python: str | None = None,
           working_dir: str | Path = ".", print_fn=print) -> tuple[str, str]:
    """Submit the run; returns (job id, final status or 'SUBMITTED' with no_wait). Raises ConfigError on a bad config."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    from selfdistill.config import ConfigError, load_config

    working_dir = Path(working_dir).resolve()
    cfg = load_config(config, overrides)  # fails here, naming the field, before anything is uploaded
    if config is not None:
        path = Path(config).resolve()
        if not path.is_relative_to(working_dir):
            raise ConfigError(f"config file {config} is outside the working dir {working_dir}: the job cannot read it")
        config = str(path.relative_to(working_dir))
    if not Path(cfg.run.output_dir).is_absolute():
        print_fn(f"note: run.output_dir {cfg.run.output_dir!r} is relative: the job writes it inside its copy of the "
                 f"working dir on the cluster; set an absolute path on shared storage to keep the run folder")
    client = JobSubmissionClient(address)
    job_id = client.submit_job(entrypoint=entrypoint(config, overrides, python or sys.executable),
                               runtime_env=runtime_env(working_dir))
    print_fn(f"submitted job {job_id}")
    print_fn(f"follow its logs: ray job logs --address {address} --follow {job_id}")
    if not wait:
        return job_id, "SUBMITTED"
    done = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}
    shown = 0
    while (status := client.get_job_status(job_id)) not in done:
        logs = client.get_job_logs(job_id)
        if len(logs) > shown:
            print_fn(logs[shown:].rstrip("\n"))
            shown = len(logs)
        time.sleep(2)
    logs = client.get_job_logs(job_id)
    if len(logs) > shown:
        print_fn(logs[shown:].rstrip("\n"))
    print_fn(f"job {job_id} ended {status.value}")
    return job_id, status.value
