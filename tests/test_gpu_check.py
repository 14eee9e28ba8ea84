"""benchmarks/gpu_check.py runs from the repository as it is: on a machine without a GPU it says so and
exits 2; its CPU fallback (tiny models of the same families) reports each check on one line with the
thresholds it was held to, and those thresholds can fail; the carried wheels install themselves offline.
Cheap subsets only: the full CPU run is in the benchmarks README."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def run(*args: str, timeout: int = 300, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the script would use it")
def test_without_a_gpu_it_says_so_and_exits_2():
    done = run()
    assert done.returncode == 2 and "sees no GPU" in done.stderr and "--device cpu" in done.stderr
    assert "Traceback" not in done.stderr


def test_the_cpu_fallback_reports_each_check_with_its_thresholds():
    ran = ["environment", "reward_model", "served_1b"]
    done = run("--device", "cpu", "--only", *ran)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.splitlines()
    for name in ran:
        (line,) = [line for line in lines if re.match(rf"ok   {name} ", line)]
        # Every check is held to a memory bound and at least one more threshold, each shown with its value.
        assert re.search(r"thresholds: peak rss GB [\d.]+ <= [\d.]+ \(flat cpu budget", line), line
        others = line.split("thresholds:")[1].split(";")[1:]
        assert others and all(re.search(r" [\d.e+-]+ (<=|>=) [\d.e+-]+", t) for t in others), line
    assert any("pairs/s" in line for line in lines) and any("tokens/s" in line for line in lines)
    assert sum(line.startswith("skip ") for line in lines) >= 9
    assert lines[-1].startswith("SUMMARY gpu_check device=cpu scale=tiny checks=3 failed=0")


def test_a_memory_bound_can_fail_the_run():
    done = run("--device", "cpu", "--only", "environment", "--memory-budget-scale", "0.0001")
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    line = next(line for line in done.stdout.splitlines() if "environment" in line)
    assert line.startswith("FAIL environment") and "EXCEEDED" in line and "x 0.0001" in line
    assert "failures=environment" in done.stdout.splitlines()[-1]


def fake_wheel(directory: Path, package: str) -> Path:
    """A minimal valid pure-Python wheel of `package` (version 1.0) whose module holds VALUE = 42."""
    wheel = directory / f"{package}-1.0-py3-none-any.whl"
    info = f"{package}-1.0.dist-info"
    files = {f"{package}/__init__.py": "VALUE = 42\n",
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {package}\nVersion: 1.0\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{info}/RECORD"] = "".join(f"{name},,\n" for name in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(wheel, "w") as zf:
        for name, text in files.items():
            zf.writestr(name, text)
    return wheel


def test_carried_wheels_install_offline_and_are_reused(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    fake_wheel(wheels, "gpu_check_fake_pkg")
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import gpu_check; from pathlib import Path; "
            "notes = gpu_check.use_carried_wheels(Path(sys.argv[2])); import gpu_check_fake_pkg, os; "
            "print(notes, gpu_check_fake_pkg.VALUE, os.environ['PYTHONPATH'])")
    # TMPDIR: the install target goes under the test's directory; no index is reachable (--no-index).
    env = {"PATH": "/usr/bin:/bin", "TMPDIR": str(tmp_path), "PIP_NO_INDEX": "1"}
    first, again = (subprocess.run([sys.executable, "-c", code, str(SCRIPT.parent), str(wheels)], capture_output=True,
                                   text=True, timeout=120, env=env) for _ in range(2))
    assert first.returncode == 0, first.stderr[-3000:]
    (target,) = tmp_path.glob("rlhf-gpu-wheels-*")
    assert f"importable from {target}" in first.stdout and " 42 " in first.stdout and str(target) in first.stdout
    assert (target / "gpu_check_fake_pkg-1.0.dist-info" / "METADATA").exists()  # importlib.metadata finds it
    assert again.returncode == 0 and f"importable from {target}" in again.stdout  # the same target, reused
    assert len(list(tmp_path.glob("rlhf-gpu-wheels-*"))) == 1 and not list(tmp_path.glob(".rlhf-gpu-wheels-*"))
