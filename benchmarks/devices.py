"""The device a project benchmark runs on (`--device cpu|cuda`) and the peak memory it reports."""

from __future__ import annotations

import resource
import sys


def add_device_flag(ap) -> None:
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="where to run (default cpu: the figures in benchmarks/README.md); cuda: the first GPU, "
                         "reported with its peak allocated memory")


def accelerator(device: str) -> str:
    """trainer.accelerator for `device`; stops with a message when CUDA was asked for and is not there."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        sys.exit(f"--device cuda: torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU; "
                 "check the driver (nvidia-smi) or run with --device cpu")
    return "gpu" if device == "cuda" else "cpu"


def peak_fields(device: str) -> str:
    """`peak_rss_gb=...` (the process's peak resident memory), and on a GPU `peak_cuda_gb=...` (the peak of
    torch.cuda.max_memory_allocated: what the tensors took, not the allocator's cache)."""
    out = f"peak_rss_gb={resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2:.2f}"
    if device == "cuda":
        import torch

        out += f" peak_cuda_gb={torch.cuda.max_memory_allocated() / 2 ** 30:.2f}"
    return out
