"""Whether this machine can run what a GPU step asked for, checked before the step loads anything; the
machines of a training step that runs on several (`Node`, `node_world`); and the devices a sampling or
evaluation step spreads its work over (`local_devices`, `over_devices`).

A GPU container whose NVIDIA driver is too old for the installed torch build sees no GPU at all:
`torch.cuda.is_available()` is False and every step would train on the CPU, silently and for hours. A
GPU the build has no kernels for (V100 under a CUDA 13 build) fails at the first operation with "no
kernel image is available". Both are said here, with what to change, as the user's to fix.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

GPU_ACCELERATORS = ("auto", "gpu", "cuda")


def cpu_has_bf16(cpuinfo: str | None = None) -> bool:
    """Does this CPU compute in bf16 natively (Intel AMX or AVX512-BF16; Linux `/proc/cpuinfo` flags)?
    Elsewhere bf16 would be emulated, slower than fp32."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            return False
    flags = {flag for line in cpuinfo.splitlines() if line.startswith("flags") for flag in line.split()}
    return bool(flags & {"amx_bf16", "avx512_bf16"})


class HardwareError(RuntimeError):
    """The machine cannot run what the step asked for; the message says what to change."""


def _needs(torch_version: str, cuda_version: str | None) -> str:
    return (f"torch {torch_version} is a CUDA {cuda_version} build: it needs an NVIDIA driver new enough for "
            f"CUDA {cuda_version} (R580 or newer for CUDA 13; `nvidia-smi` shows the driver) and a GPU of "
            "compute capability 7.5 or newer (T4, A10G, L4, L40S, A100, H100: AWS g4dn, g5, g6, g6e, p4d, p5; "
            "not V100/p3). On AWS Batch, give the GPU queue a compute environment on the ECS GPU-optimised "
            "AMI with such a driver (docs/scaling-out.md, 'GPUs')")


def _runs_on(capability: tuple[int, int], arches: Sequence[str]) -> bool:
    """Whether a build with `arches` (torch.cuda.get_arch_list(): sm_XY cubins, compute_XY PTX) has code for
    a GPU of `capability`: a cubin of the same major version and a minor not above it, or PTX not above it."""
    major, minor = capability
    for arch in arches:
        found = re.fullmatch(r"(sm|compute)_(\d+)(\d)[a-z]?", arch)
        if not found:
            continue
        kind, a_major, a_minor = found.group(1), int(found.group(2)), int(found.group(3))
        if kind == "sm" and a_major == major and a_minor <= minor:
            return True
        if kind == "compute" and (a_major, a_minor) <= (major, minor):
            return True
    return False


def check_gpu(accelerator: str, environ: Mapping[str, str] | None = None, *, cuda_available: bool | None = None,
              capability: tuple[int, int] | None = None, arches: Sequence[str] | None = None) -> None:
    """Raise HardwareError where a GPU step cannot use the GPU it was given: the container was assigned
    one (NVIDIA_VISIBLE_DEVICES, which the ECS and Kubernetes GPU runtimes set) or `trainer.accelerator`
    demands one, and torch sees none; or torch sees one it has no kernels for. Quiet on a CPU machine
    with `auto` (the laptop run) and for `trainer.accelerator: cpu`. The keyword arguments stand in for
    the machine (tests)."""
    if accelerator not in GPU_ACCELERATORS:
        return
    import torch

    env = os.environ if environ is None else environ
    assigned = env.get("NVIDIA_VISIBLE_DEVICES", "").strip()
    available = torch.cuda.is_available() if cuda_available is None else cuda_available
    if not available:
        if assigned and assigned.lower() not in ("void", "none"):
            raise HardwareError(f"this step was given GPU(s) (NVIDIA_VISIBLE_DEVICES={assigned}) but torch cannot "
                                f"use them, so it would run on the CPU: {_needs(torch.__version__, torch.version.cuda)}")
        if accelerator != "auto":
            raise HardwareError(f"trainer.accelerator: {accelerator}, but torch sees no GPU on this machine: run "
                                f"on one, or set trainer.accelerator: auto (the CPU where there is none). "
                                f"{_needs(torch.__version__, torch.version.cuda)}")
        return
    have = capability if capability is not None else torch.cuda.get_device_capability()
    built = torch.cuda.get_arch_list() if arches is None else arches
    if built and not _runs_on(have, built):
        raise HardwareError(f"this GPU (compute capability {have[0]}.{have[1]}) has no kernels in this torch build "
                            f"(it has {', '.join(built)}): {_needs(torch.__version__, torch.version.cuda)}")


def available_memory(meminfo: str | None = None, cgroup_dir: str = "/sys/fs/cgroup") -> int:
    """Bytes this process can still allocate: the kernel's MemAvailable, capped by the container's
    cgroup limit less its usage (a Batch job's `memory` is such a limit, below the host's RAM)."""
    if meminfo is None:
        with open("/proc/meminfo", encoding="ascii") as fh:
            meminfo = fh.read()
    found = re.search(r"^MemAvailable:\s+(\d+) kB", meminfo, re.M)
    available = int(found.group(1)) * 1024 if found else 0
    for limit_file, usage_file in (("memory.max", "memory.current"),  # cgroup v2
                                   ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):  # v1
        try:
            limit = open(os.path.join(cgroup_dir, limit_file), encoding="ascii").read().strip()
            usage = int(open(os.path.join(cgroup_dir, usage_file), encoding="ascii").read().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 1 << 60:  # "max" or v1's huge number: no limit
            available = min(available, max(int(limit) - usage, 0))
        break
    return available


@dataclass(frozen=True)
class Node:
    """One machine of a training step that runs on several (`trainer.num_nodes`): this machine's index,
    how many there are, and where node 0 (the control node) listens for the others' processes."""

    index: int
    count: int
    main_ip: str
    port: int

    @property
    def control(self) -> bool:
        """Node 0: its rank 0 is the run's, and only it records results (files, artifacts, MLflow)."""
        return self.index == 0


@contextlib.contextmanager
def node_world(node: Node | None):
    """Inside the block Lightning lays the world out over the nodes: its processes on this machine are
    ranks `node.index * devices ...`, and rank 0 (on node 0) listens at `main_ip:port`
    (MASTER_ADDR, MASTER_PORT, NODE_RANK, as Lightning's own cluster environment reads them). Nothing
    for one node; the environment is put back afterwards."""
    if node is None or node.count == 1:
        yield
        return
    with environment({"MASTER_ADDR": node.main_ip, "MASTER_PORT": str(node.port), "NODE_RANK": str(node.index)}):
        yield


@contextlib.contextmanager
def environment(values: dict[str, str]):
    """`values` set in os.environ for the block (processes started inside it inherit them), then put back."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def local_devices(accelerator: str, devices: int) -> int:
    """How many devices a sampling or evaluation step spreads its work over: the GPUs it sees, at most
    `devices` (`trainer.devices`: the steps that generate ask for as many as training does); on a CPU
    `devices` processes sharing the cores, as that many training processes would."""
    import torch

    if accelerator in GPU_ACCELERATORS and torch.cuda.is_available():
        return max(1, min(int(devices), torch.cuda.device_count()))
    return max(1, int(devices))


def _place(env: dict[str, str], cores: list[int], threads: int) -> None:
    """A device process's start (`over_devices`): its GPU, or its cores (where the OS lets a process be
    bound: Linux) and `threads` torch threads."""
    os.environ.update(env)
    if threads:
        import torch

        if cores and hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, cores)
        torch.set_num_threads(threads)


def _descendants(pid: int) -> list[int]:
    """The processes under `pid` (Linux's /proc; none found elsewhere)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            children = [int(c) for c in f.read().split()]
    except OSError:
        return []
    return [d for c in children for d in (c, *_descendants(c))]


def _kill_tree(pid: int) -> None:
    """SIGKILL `pid` and what it started (a vLLM engine's processes would otherwise outlive it)."""
    import signal

    for victim in [*_descendants(pid), pid]:
        with contextlib.suppress(OSError):
            os.kill(victim, signal.SIGKILL)


def over_devices(fn, jobs: list[tuple], accelerator: str) -> list:
    """`[fn(*job) for job in jobs]`, job i in a process of its own on device i: on a GPU machine the
    process sees only GPU i (CUDA_VISIBLE_DEVICES narrowed to it, so a vLLM engine it starts sits there
    too); on a CPU it gets its share of this process's cores. The processes start fresh (spawn: CUDA and
    vLLM do not survive a fork) and run at once; the results come back in the jobs' order, and an
    exception in any of them is raised here. One job runs in this process, as before. `fn` and the
    jobs must pickle (a module-level function, plain data)."""
    if len(jobs) <= 1:
        return [fn(*job) for job in jobs]
    import multiprocessing
    from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait

    import torch

    cuda = accelerator in GPU_ACCELERATORS and torch.cuda.is_available()
    visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    share = max(len(cores) // len(jobs), 1)
    pools, futures = [], []
    try:
        for i, job in enumerate(jobs):
            if cuda:
                env, mine, threads = {"CUDA_VISIBLE_DEVICES": visible[i] if i < len(visible) else str(i)}, [], 0
            else:
                env, mine = {}, cores[(i * share) % len(cores):][:share]
                threads = len(mine)
            pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                                       initializer=_place, initargs=(env, mine, threads))
            pools.append(pool)
            futures.append(pool.submit(fn, *job))
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        failed = next((f for f in futures if f in done and f.exception() is not None), None)
        if failed is not None:
            # The others would go on for as long as their share takes, for nothing: stop them (Python 3.11's
            # executor has no public way to).
            for pool in pools:
                for proc in list(getattr(pool, "_processes", {}).values()):
                    _kill_tree(proc.pid)
            raise failed.exception()
        return [f.result() for f in futures]
    finally:
        for pool in pools:
            pool.shutdown(wait=True, cancel_futures=True)
