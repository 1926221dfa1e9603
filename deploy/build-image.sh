#!/usr/bin/env bash
# build-image.sh [DOCKER BUILD ARGS...]: builds the specserve image (SPECSERVE_IMAGE, default
# specserve:latest) from the Dockerfile on SPECSERVE_BASE_IMAGE (default specserve-base:bookworm, made
# from Debian packages by deploy/base-image.sh when missing; python:3.11-slim where Docker Hub is
# reachable). When this machine's pip has the CPU build of torch on disk (pip's own find-links),
# that wheel is staged in deploy/wheels/ and the build installs it instead of reaching the
# PyTorch index.
set -euo pipefail
cd "$(dirname "$0")/.."

BASE_IMAGE=${SPECSERVE_BASE_IMAGE:-specserve-base:bookworm}
IMAGE=${SPECSERVE_IMAGE:-specserve:latest}
TORCH_VERSION=2.13.0
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}

if [[ $BASE_IMAGE == specserve-base:* ]] && ! docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
  bash deploy/base-image.sh
fi

if ! ls deploy/wheels/torch-"$TORCH_VERSION"+cpu-*.whl >/dev/null 2>&1; then
  # --no-index: only what pip finds on this machine's disk; nothing is downloaded here.
  if "$PYTHON" -m pip download --quiet --no-deps --no-index --only-binary=:all: --python-version 3.11 \
       --dest deploy/wheels "torch==$TORCH_VERSION+cpu" 2>/dev/null; then
    echo "build-image: torch from this machine's disk: $(ls deploy/wheels/torch-*.whl)"
  else
    echo "build-image: no torch $TORCH_VERSION+cpu wheel on this machine's disk: the build takes it from the PyTorch index"
  fi
fi

# BuildKit needs the buildx plugin with a recent docker CLI; without it, the classic builder.
if ! docker buildx version >/dev/null 2>&1; then
  export DOCKER_BUILDKIT=0
fi
echo "build-image: $IMAGE on $BASE_IMAGE ..."
docker build --build-arg BASE_IMAGE="$BASE_IMAGE" --tag "$IMAGE" "$@" .
