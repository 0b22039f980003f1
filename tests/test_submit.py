"""What `selfdistill submit` ships: the working dir Ray would upload, env vars, the entrypoint; progress lines."""

from __future__ import annotations

import shlex
import zipfile

import pytest

from selfdistill.launch.console import plain_line
from selfdistill.launch.submit import entrypoint, job_env, runtime_env


def test_uploaded_working_dir_holds_code_but_no_credentials_or_environments(tmp_path):
    from ray._private.runtime_env.packaging import create_package

    work = tmp_path / "work"
    keep = ["selfdistill/models/tokenizer.py", "configs/gpu/a.yaml", "README.md"]
    drop = [".venv/bin/python", "runs/x/metrics.jsonl", ".git/config", ".env", ".env.local", "deploy/key.pem",
            ".netrc", ".ssh/id_ed25519", "home/.aws/credentials", "a/__pycache__/m.pyc", ".cache/selfdistill/w.json",
            "id_rsa", ".git-credentials", "model/model.safetensors"]
    for name in keep + drop:
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        (work / name).write_text("x")
    env = runtime_env(work, environ={})
    create_package(str(work), tmp_path / "pkg.zip", include_gitignore=True, excludes=env["excludes"])
    shipped = {n for n in zipfile.ZipFile(tmp_path / "pkg.zip").namelist() if not n.endswith("/")}
    assert set(keep) <= shipped
    assert not shipped & set(drop), shipped & set(drop)


def test_job_env_keeps_what_the_user_set_drops_secrets_and_fills_nccl_defaults():
    env = job_env({"NCCL_CUMEM_ENABLE": "1", "NCCL_DEBUG": "INFO", "HF_TOKEN": "hf_secret", "HF_HOME": "/shared/hf",
                   "WANDB_API_KEY": "k", "HOME": "/root", "AWS_SECRET_ACCESS_KEY": "s"})
    assert env["NCCL_CUMEM_ENABLE"] == "1" and env["NCCL_DEBUG"] == "INFO" and env["HF_HOME"] == "/shared/hf"
    assert "HF_TOKEN" not in env and "WANDB_API_KEY" not in env and "HOME" not in env
    assert "AWS_SECRET_ACCESS_KEY" not in env
    assert job_env({})["NCCL_CUMEM_ENABLE"] == "0"


def test_entrypoint_joins_the_cluster():
    args = shlex.split(entrypoint("configs/gpu/qwen3-8b/opsd.yaml", ["run.steps=3"], "/opt/venv/bin/python"))
    assert args[:5] == ["/opt/venv/bin/python", "-m", "selfdistill.launch.cli", "train", "configs/gpu/qwen3-8b/opsd.yaml"]
    assert args[-1] == "cluster.address=auto" and "run.steps=3" in args


def test_submit_refuses_a_bad_config_before_contacting_a_cluster():
    from selfdistill.config import ConfigError
    from selfdistill.launch.submit import submit

    with pytest.raises(ConfigError, match="learner.lr"):
        submit(None, ["learner.lr=-1"], "http://127.0.0.1:1")


def test_plain_progress_line():
    assert plain_line(20, 200, "loss 0.100  reward 0.500", 2.0) == "step 20/200  loss 0.100  reward 0.500  ETA 0:06:00"
