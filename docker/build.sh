#!/usr/bin/env bash
# Build the selfdistill images; `cpu --run` then runs the CPU image's default job on a volume.
# Usage: docker/build.sh cpu|gpu [--run] [-- DOCKER_RUN_ARGS...]
#   TAG (default selfdistill:cpu / selfdistill:gpu), VOLUME (default selfdistill-data, mounted at /data),
#   DOCKER (default docker; podman works too). A second --run on the same volume resumes and reuses the caches.
set -euo pipefail
cd "$(dirname "$0")/.."
target=${1:-}
[[ $target == cpu || $target == gpu ]] || { echo "usage: docker/build.sh cpu|gpu [--run]" >&2; exit 2; }
shift
run=0
if [[ ${1:-} == --run ]]; then run=1; shift; fi
[[ ${1:-} == -- ]] && shift
DOCKER=${DOCKER:-docker}
TAG=${TAG:-selfdistill:$target}
VOLUME=${VOLUME:-selfdistill-data}
if ! command -v "$DOCKER" >/dev/null; then
  echo "docker/build.sh: no Docker client: '$DOCKER' is not on PATH (install docker, or set DOCKER=podman)" >&2
  exit 3
fi
if ! "$DOCKER" info >/dev/null 2>&1; then
  echo "docker/build.sh: no Docker engine reachable at ${DOCKER_HOST:-the default socket}: start dockerd (or set DOCKER_HOST)" >&2
  exit 3
fi
"$DOCKER" build -f "docker/Dockerfile.$target" -t "$TAG" .
if [[ $run == 1 ]]; then
  [[ $target == cpu ]] || { echo "docker/build.sh: --run is for the CPU image (the GPU image needs --gpus all)" >&2; exit 2; }
  "$DOCKER" run --rm --shm-size=2g -v "$VOLUME:/data" "$TAG" "$@"
fi
