#!/usr/bin/env bash
# Fetch, on a machine with PyPI, the wheels benchmarks/gpu_check.py needs on a lent GPU machine that lacks
# them: that machine has no network, cannot run `make setup`, and receives only the working tree plus a few
# named ignored paths (64 MiB in all). gpu_check.py installs what it finds here itself, so the one command
# there stays `python3 benchmarks/gpu_check.py`.
#
#   scripts/gpu_wheels.sh [DIR]      (default .gpu_wheels, ignored by git; carry it to the GPU machine)
#
# What is fetched, at the project's pins (pyproject.toml):
#   bitsandbytes  the nf4 checks (its manylinux wheel holds the CUDA 13.0 kernels torch cu130 needs)
#   vaderSentiment  the built-in task's gold judge, which the reward model's fit scores with
# Not fetched, by size: mlflow (mlflow-skinny alone is 4 MB and pulls ~20 packages that machine lacks:
# fastapi, opentelemetry, databricks-sdk, gitpython, ...): gpu_check runs the served model's
# load_context + predict itself there; gguf is not needed (no GGUF weights travel either).
set -euo pipefail
cd "$(dirname "$0")/.."
DIR="${1:-.gpu_wheels}"
pin() {  # the version pyproject.toml pins for $1
  local v
  v=$(sed -n "s/^ *\"$1==\([^\"]*\)\".*/\1/p" pyproject.toml | head -1)
  [[ -n "$v" ]] || { echo "gpu_wheels: no pin for $1 in pyproject.toml" >&2; exit 1; }
  echo "$1==$v"
}
PY="${PYTHON:-python3}"
mkdir -p "$DIR"
# The GPU machine runs CPython 3.12 on x86-64 Linux; both wheels are Python-version independent.
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
  --platform manylinux2014_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_28_x86_64 \
  --platform any -d "$DIR" "$(pin bitsandbytes)" "$(pin vaderSentiment)"
# Only this fetch's wheels: an earlier pin's would be installed beside them.
keep=$(ls "$DIR" | grep -E "^(bitsandbytes-$(pin bitsandbytes | cut -d= -f3)|vaderSentiment-$(pin vaderSentiment | cut -d= -f3))-" || true)
for f in "$DIR"/*.whl; do
  grep -qxF "$(basename "$f")" <<<"$keep" || { echo "removing stale $(basename "$f")"; rm -f "$f"; }
done
ls -l "$DIR"
total=$(du -cb "$DIR"/*.whl | tail -1 | cut -f1)
"$PY" -c "import sys; b=int(sys.argv[1]); print(f'total {b/1e6:.1f} MB ({b/2**20:.1f} MiB of the 64 MiB a run carries)')" "$total"
