"""vLLM engine settings, decided from the machine and the config: its dtype, the cores its CPU worker
may use, the LoRA rank it is sized for, whether it takes an adapter as a LoRA module or merged. Shared
by the generation engine (models/engines) and the rlhf-vllm deployment target (serving/), so training
and serving decide alike; nothing here imports vLLM.
"""

from __future__ import annotations

import torch

from rlhf_lightning.hardware import cpu_has_bf16

LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
"""The adapter ranks a vLLM engine can be sized for (`max_lora_rank`)."""
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
"""Attention head sizes vLLM's CPU backend has kernels for."""


class EngineError(RuntimeError):
    """The engine cannot run what the config asks; the message says what to change."""


def engine_dtype(name: str = "auto", *, cuda: bool | None = None, capability: tuple[int, int] | None = None,
                 cpu_bf16: bool | None = None) -> str:
    """`generation.dtype` as vLLM's dtype name: auto = bfloat16 on a GPU with it natively (8.0+), float16
    on older GPUs; on a CPU bfloat16 where it computes in bf16 natively (AMX or AVX512-BF16: 2.6x the
    tokens/s of fp32 here), else float32."""
    if name != "auto":
        return name
    if not (torch.cuda.is_available() if cuda is None else cuda):
        return "bfloat16" if (cpu_has_bf16() if cpu_bf16 is None else cpu_bf16) else "float32"
    major = (capability or torch.cuda.get_device_capability())[0]
    return "bfloat16" if major >= 8 else "float16"


def cpu_binding(environ, cores) -> dict[str, str]:
    """The VLLM_CPU_* settings that give vLLM's CPU worker every one of `cores` (those this process may
    use); {} where the user chose the worker's cores (VLLM_CPU_OMP_THREADS_BIND) themselves.

    By default the worker leaves one core to its scheduler process, which on a 2-core machine halves its
    compute (230 against 397 tokens/s, 512 prompts, SmolLM2 in bf16). The scheduler waits while the
    worker computes, and an idle engine takes 0.06 of a core, so there is nothing to keep one for."""
    if "VLLM_CPU_OMP_THREADS_BIND" in environ:
        return {}
    out = {"VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, sorted(cores)))}
    if "VLLM_CPU_NUM_OF_RESERVED_CPU" not in environ:
        out["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"
    return out


def max_lora_rank(r: int, configured: int = 0) -> int:
    """The engine's `max_lora_rank` for an adapter of rank `r`: `configured`, or the smallest of vLLM's
    sizes that holds `r`."""
    rank = configured or next((size for size in LORA_RANKS if size >= r), 0)
    if rank not in LORA_RANKS or rank < r:
        raise EngineError(f"generation.max_lora_rank: vLLM takes adapters up to one of {list(LORA_RANKS)}; "
                          f"policy.lora.r is {r} (max_lora_rank {configured or 'auto'}): lower policy.lora.r "
                          "or set max_lora_rank to one of those sizes")
    return rank


def check_model(config, cuda: bool) -> None:
    """Refuse, before the engine starts, a model shape the engine's kernels do not take."""
    heads = getattr(config, "num_attention_heads", 0) or 1
    head = getattr(config, "head_dim", None) or config.hidden_size // heads
    if not cuda and head not in CPU_HEAD_SIZES:
        raise EngineError(f"generation.backend vllm: this model's attention heads are {head} wide; vLLM's CPU "
                          f"backend has kernels for {list(CPU_HEAD_SIZES)}. Use backend hf for this model")


def adapter_sync_mode(name: str = "auto", *, cuda: bool | None = None) -> str:
    """`generation.adapter_sync`: auto = lora on a GPU, merge on a CPU."""
    if name != "auto":
        return name
    return "lora" if (torch.cuda.is_available() if cuda is None else cuda) else "merge"


