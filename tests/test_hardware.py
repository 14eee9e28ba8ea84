"""A GPU step stops, saying what to change, where it cannot use the GPU it was given: a container
assigned one whose driver is too old for this torch build (torch sees none), `accelerator: gpu` on a
machine without one, a GPU this build has no kernels for. The machine is stated (this one has no GPU)."""

from __future__ import annotations

import pytest

from rlhf_lightning.hardware import HardwareError, available_memory, check_gpu

BUILT = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120", "compute_120"]  # a CUDA 13 build's list


def test_a_gpu_the_container_was_given_but_torch_cannot_use_stops_the_step():
    with pytest.raises(HardwareError) as exc:
        check_gpu("auto", {"NVIDIA_VISIBLE_DEVICES": "GPU-1a2b"}, cuda_available=False)
    message = str(exc.value)
    assert "given GPU(s) (NVIDIA_VISIBLE_DEVICES=GPU-1a2b) but torch cannot use them, so it would run on the CPU" in message
    assert "R580 or newer" in message and "g5, g6" in message and "not V100/p3" in message


def test_accelerator_gpu_without_one_stops_and_auto_runs_on_the_cpu():
    with pytest.raises(HardwareError, match="trainer.accelerator: gpu, but torch sees no GPU on this machine"):
        check_gpu("gpu", {}, cuda_available=False)
    check_gpu("auto", {}, cuda_available=False)  # a laptop: the CPU, as documented
    check_gpu("auto", {"NVIDIA_VISIBLE_DEVICES": "void"}, cuda_available=False)  # the runtime's "no GPU here"
    check_gpu("cpu", {"NVIDIA_VISIBLE_DEVICES": "all"}, cuda_available=False)  # asked for none


@pytest.mark.parametrize("capability, ok", [((7, 0), False), ((7, 5), True), ((8, 0), True), ((8, 6), True),
                                            ((8, 9), True), ((9, 0), True), ((12, 1), True), ((6, 1), False)])
def test_a_gpu_without_kernels_in_this_build_stops_the_step(capability, ok):
    if ok:
        check_gpu("auto", {}, cuda_available=True, capability=capability, arches=BUILT)
    else:
        with pytest.raises(HardwareError, match=rf"compute capability {capability[0]}\.{capability[1]}\) has no kernels"):
            check_gpu("auto", {}, cuda_available=True, capability=capability, arches=BUILT)


def test_available_memory_is_capped_by_the_container_limit(tmp_path):
    meminfo = "MemTotal:       24000000 kB\nMemAvailable:   20000000 kB\n"
    assert available_memory(meminfo, cgroup_dir=str(tmp_path)) == 20000000 * 1024  # no cgroup files
    (tmp_path / "memory.max").write_text("max\n")
    (tmp_path / "memory.current").write_text("1000\n")
    assert available_memory(meminfo, cgroup_dir=str(tmp_path)) == 20000000 * 1024  # no limit
    (tmp_path / "memory.max").write_text(f"{16 * 2**30}\n")  # a Batch job's 16 GB, 4 GiB of it in use
    (tmp_path / "memory.current").write_text(f"{4 * 2**30}\n")
    assert available_memory(meminfo, cgroup_dir=str(tmp_path)) == 12 * 2**30
    assert available_memory() > 0  # this machine's own


def _where(i: int):
    import os

    import torch

    return i, os.getpid(), sorted(os.sched_getaffinity(0)), torch.get_num_threads()


def _fails_first(i: int, pid_file: str):
    import subprocess
    import sys
    import time

    if i == 0:
        time.sleep(3)  # the other has started its child
        raise ValueError("device 0: row 3 has no prompt")
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])  # as an engine's process
    with open(pid_file, "w") as f:
        f.write(str(child.pid))
    time.sleep(120)
    return i


def test_work_over_devices_runs_in_a_process_per_device_on_its_own_cores(tmp_path):
    """`over_devices` on the CPU: a fresh process per job, each on its own share of the cores with as many
    torch threads, the results in the jobs' order; one job runs here. A job that raises stops the others
    (they would sleep two minutes) and the processes they started, and its error is raised here."""
    import os
    import time

    from rlhf_lightning.hardware import local_devices, over_devices

    assert local_devices("cpu", 2) == 2 and local_devices("auto", 1) == 1
    got = over_devices(_where, [(0,), (1,)], "cpu")
    assert [g[0] for g in got] == [0, 1]
    assert len({g[1] for g in got} | {os.getpid()}) == 3
    cores = sorted(os.sched_getaffinity(0))
    assert got[0][2] == cores[: len(cores) // 2] and got[1][2] == cores[len(cores) // 2:]
    assert [g[3] for g in got] == [len(cores) // 2] * 2
    assert over_devices(_where, [(7,)], "cpu")[0][1] == os.getpid()

    start = time.monotonic()
    pid_file = str(tmp_path / "child.pid")
    with pytest.raises(ValueError, match="device 0: row 3 has no prompt"):
        over_devices(_fails_first, [(0, pid_file), (1, pid_file)], "cpu")
    assert time.monotonic() - start < 100  # the sleeping one was stopped, not waited for
    child = int(open(pid_file).read())
    time.sleep(0.5)
    try:  # nor left running what it had started (gone, or dead and not yet reaped)
        state = open(f"/proc/{child}/stat").read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        state = "gone"
    assert state in ("gone", "Z", "X"), state
