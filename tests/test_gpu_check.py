"""benchmarks/gpu_check.py runs from the repository as it is: on a machine without a GPU it says so
and exits 2; its CPU fallback runs checks and reports one line each (the full CPU run is in the
benchmarks README; here two cheap checks keep the suite short)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the script would use it")
def test_without_a_gpu_it_says_so_and_exits_2():
    done = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "sees no GPU" in done.stderr and "--device cpu" in done.stderr
    assert "Traceback" not in done.stderr


def test_the_cpu_fallback_reports_each_check_on_a_line():
    skip = ["reward_model", "ppo_bf16_resume", "ppo_nf4_checkpoint", "grad_norms_16_mixed", "evaluation",
            "evaluation_nf4_served",
            "served_here_and_cpu", "smollm2", "vllm_engine"]
    done = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--skip", *skip], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert any(line.startswith("ok   environment") and "precision auto -> " in line for line in lines)
    assert any(line.startswith("ok   builtin_sampling") and "pairs from 16 prompts" in line for line in lines)
    assert sum(line.startswith("skip ") for line in lines) == len(skip)
    assert lines[-1].startswith("SUMMARY gpu_check device=cpu checks=2 failed=0")
