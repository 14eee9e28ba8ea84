"""The built-in task: "say something about X" prompts, completions from the base policy, simulated labels.

1. Prompts are generated from templates and subjects (seeded), split into three disjoint sets: preference
   prompts, RL prompts and held-out evaluation prompts.
2. For every preference prompt the base policy samples `responses_per_prompt` (K) completions.
3. A simulated annotator labels them: the gold judge (`rlhf_lightning.judge`) scores each and the annotator
   draws a ranking from a Plackett-Luce model with rationality `annotator_beta` (for K = 2 the
   Bradley-Terry label AlpacaFarm's simulated annotators give) — so labels are noisy like human ones. Each
   of the ranking's K(K-1)/2 pairs is one preference row.
4. Everything is written in Vertex RLHF formats (preferences `{input_text, candidate_0, candidate_1,
   choice}`, prompts `{input_text}`) and read back by the pipeline like any user's files.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict
from pathlib import Path

from rlhf_lightning import cache, judge
from rlhf_lightning.data.text import clean_text, is_blank
from rlhf_lightning.task_prompts import all_prompts
from rlhf_lightning.config import SOURCE_ROLES, BuiltinTaskConfig, GenerationConfig, PolicyConfig

def split_prompts(task: BuiltinTaskConfig) -> tuple[list[str], list[str], list[str]]:
    """Three disjoint prompt sets: preference, RL, evaluation."""
    prompts = all_prompts(task.seed)
    a, b, c = task.n_preference_prompts, task.n_rl_prompts, task.n_eval_prompts
    if a + b + c > len(prompts):
        raise ValueError(f"the built-in task has {len(prompts)} distinct prompts; asked for {a + b + c}")
    return prompts[:a], prompts[a : a + b], prompts[a + b : a + b + c]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.rename(path)


def cache_key(task: BuiltinTaskConfig, policy: PolicyConfig, generation: GenerationConfig | None = None,
              devices: int = 1) -> str:
    """What the files depend on: the task settings and the policy that wrote the responses — not where
    they are stored (`output_dir`), nor, with HF `generate`, how many tasks sampled them
    (`sampling_workers`): a relative and an absolute path share one cache, and so do runs fanned out
    differently. With vLLM the fan-out is part of the key (below): the tasks, and the `devices` each
    spreads its share over (`trainer.devices`)."""
    settings = {k: v for k, v in asdict(task).items() if k not in ("output_dir", "sampling_workers")}
    if settings["responses_per_prompt"] == 2:  # files written before the option existed are the same: keep their key
        del settings["responses_per_prompt"]
    # The last entry is the sampling code's version: 2 since the inverse-CDF sampler and length-sorted
    # batches, which draw other texts from the same settings than version 1 did.
    version = 2
    # A template of the user's own words the prompts otherwise: part of the key only when set, so that
    # the files of runs without one keep their key.
    template = [policy.chat_template] if policy.chat_template else []
    # A 4-bit policy's responses come from its nf4 base (sample_shard): another key, only then.
    quantized = [policy.quantization] if policy.quantization != "none" else []
    # vLLM draws other texts from the same seeds than HF generate: another key, only then. And the fan-out:
    # a shard's requests are batched together by the engine, and on a GPU its kernels are not
    # batch-invariant (a row's logits move in the last bits with the rows beside it), so shards of another
    # size may write other texts. (HF batches are fixed jobs, the same whatever the shard.)
    fan_out = task.sampling_workers if devices == 1 else [task.sampling_workers, devices]  # one device: the old key
    engine = ([["vllm", generation.dtype, fan_out]]
              if generation is not None and generation.backend == "vllm" else [])
    return hashlib.sha256(json.dumps([settings, policy.model, version, *template, *quantized, *engine],
                                     sort_keys=True).encode()).hexdigest()[:12]


def _task_dir(task: BuiltinTaskConfig, policy: PolicyConfig, generation: GenerationConfig | None = None,
              devices: int = 1) -> Path:
    return Path(task.output_dir) / f"builtin-{cache_key(task, policy, generation, devices)}"


def _paths(out: Path) -> dict[str, str]:
    paths = {name: str(out / f"{name}.jsonl") for name in SOURCE_ROLES}
    paths["stats"] = str(out / "stats.json")
    return paths


def cached_task(task: BuiltinTaskConfig, policy: PolicyConfig,
                generation: GenerationConfig | None = None, devices: int = 1) -> dict[str, str] | None:
    """The paths of the task's files when they were written with these settings, here or (downloaded
    now) in the shared cache; None when they must be sampled. `devices`: as `cache_key`."""
    out = _task_dir(task, policy, generation, devices)
    paths = _paths(out)
    if Path(paths["stats"]).exists():  # written last: its presence marks the files complete
        return paths
    out.parent.mkdir(parents=True, exist_ok=True)
    if cache.fetch(f"builtin/{out.name}", out):  # sampled by another container or run
        return paths
    return None


# One job: the responses of candidate index k for one length-sorted batch of prompts, keyed (k, the
# batch's first position in the sorted order). Responses are {job: texts, in the batch's row order}.
Job = tuple[int, int]


def sample_shard(task: BuiltinTaskConfig, policy: PolicyConfig, shard: int = 0, shards: int = 1,
                 generation: GenerationConfig | None = None) -> dict[Job, list[str]]:
    """Sample the jobs of shard `shard` of `shards` (every shards-th of the task's jobs), with HF
    `generate` or (`generation.backend: vllm`) a vLLM engine over the base.

    Each batch is seeded by its own job (each row, with vLLM), not by the order the jobs ran in, so the
    responses are the same texts however many shards (Metaflow foreach workers) they are split into:
    with HF on any device, with vLLM on a CPU. vLLM on a GPU batches a shard's rows together with kernels
    whose results depend in the last bits on the batch, so there the texts may differ with the fan-out
    (which its cache key therefore names)."""
    from rlhf_lightning.models.generation import chat_prompt, length_sorted_batches, sample_texts
    from rlhf_lightning.models.loading import load_base_causal_lm, policy_tokenizer, to_compute_device

    if not 0 <= shard < shards:
        raise ValueError(f"shard {shard} of {shards}: give 0 <= shard < shards")
    pref_prompts = split_prompts(task)[0]
    tok = policy_tokenizer(policy)
    chats = [chat_prompt(tok, p) for p in pref_prompts]
    batches = dict(length_sorted_batches(tok, chats, task.batch_size))
    # K independent samples per prompt, the ones the annotator ranks (one seed per sample index, so the
    # first K samples of a larger K are the same texts).
    jobs = [(k, first) for k in range(task.responses_per_prompt) for first in batches][shard::shards]
    if not jobs:
        return {}
    if generation is not None and generation.backend == "vllm":
        return _sample_with_vllm(task, policy, generation, tok, chats, batches, jobs)
    # Sample from the base as the policy loads it (nf4 under `quantization: 4bit`: the reference policy's
    # responses, and an 8B base in 5 GB instead of 32), on the GPU when there is one (thousands of responses).
    quantized = policy.quantization == "4bit"
    model = to_compute_device(load_base_causal_lm(PolicyConfig(model=policy.model, quantization=policy.quantization)),
                              quantized=quantized)
    model.eval()
    out = {}
    for k in range(task.responses_per_prompt):
        mine = [(first, batches[first]) for kk, first in jobs if kk == k]
        if not mine:
            continue
        texts = sample_texts(model, tok, chats, max_new_tokens=task.max_new_tokens, temperature=task.temperature,
                             batch_size=task.batch_size, seed=task.seed * 1000 + k, batches=mine,
                             desc=f"builtin candidates {k}, shard {shard + 1}/{shards}")
        out |= {(k, first): [texts[r] for r in rows] for first, rows in mine}
    return out


def _sample_with_vllm(task: BuiltinTaskConfig, policy: PolicyConfig, generation: GenerationConfig, tok,
                      chats: list[str], batches: dict[int, list[int]], jobs: list[Job]) -> dict[Job, list[str]]:
    """`sample_shard`'s jobs through one vLLM engine: every job of a candidate index in one request list
    (the engine batches them itself), each row seeded by (candidate, row). The engine holds the base
    unquantised in its dtype, also under `quantization: 4bit`."""
    from rlhf_lightning.models.engines import VLLMEngine
    from rlhf_lightning.models.loading import resolve_model, stop_token_ids_from_files

    base = resolve_model(policy.model)
    stops = stop_token_ids_from_files(base, tok)
    engine = VLLMEngine(base, generation, lora_rank=0, seed=task.seed)
    out: dict[Job, list[str]] = {}
    try:
        for k in range(task.responses_per_prompt):
            mine = [(first, batches[first]) for kk, first in jobs if kk == k]
            rows = [r for _, rs in mine for r in rs]
            if not rows:
                continue
            seeds = [(task.seed * 1000 + k) * 1_000_003 + r for r in rows]
            sampled = engine.sample(tok, [chats[r] for r in rows], max_new_tokens=task.max_new_tokens,
                                    temperature=task.temperature, seed=seeds, stop_ids=stops, adapter=False)
            texts = dict(zip(rows, sampled.texts))
            out |= {(k, first): [texts[r] for r in rs] for first, rs in mine}
            print(f"builtin candidates {k}: {len(rows)} responses from the vLLM engine", flush=True)
    finally:
        engine.close()
    return out


def write_task(task: BuiltinTaskConfig, policy: PolicyConfig, responses: dict[Job, list[str]],
               generation: GenerationConfig | None = None, devices: int = 1) -> dict[str, str]:
    """Label the sampled responses (every job of the task, from any number of shards) with the simulated
    annotator, write the task's files, share them, and return their paths (as `generate_builtin_task`)."""
    from rlhf_lightning.models.generation import chat_prompt, length_sorted_batches
    from rlhf_lightning.models.loading import policy_tokenizer

    out = _task_dir(task, policy, generation, devices)
    paths = _paths(out)
    pref_prompts, rl_prompts, eval_prompts = split_prompts(task)
    tok = policy_tokenizer(policy)
    batches = length_sorted_batches(tok, [chat_prompt(tok, p) for p in pref_prompts], task.batch_size)
    missing = [(k, first) for k in range(task.responses_per_prompt) for first, _ in batches if (k, first) not in responses]
    if missing:
        raise ValueError(f"built-in task: {len(missing)} of {task.responses_per_prompt * len(batches)} sampling "
                         f"jobs have no responses (first: candidate {missing[0][0]}, batch at {missing[0][1]})")
    cand = [[""] * len(pref_prompts) for _ in range(task.responses_per_prompt)]
    for k in range(task.responses_per_prompt):
        for first, rows in batches:
            for r, text in zip(rows, responses[(k, first)]):
                cand[k][r] = text
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(task.seed)
    rows, golds, agree, dropped = [], [], 0, {"empty_response": 0, "same_text": 0}
    for prompt, texts in zip(pref_prompts, zip(*cand)):
        g = [judge.gold_score(t) for t in texts]
        golds += g
        for i, j, choice in judge.ranking_pairs(judge.rank(g, task.annotator_beta, rng)):
            # A pair validation would reject is not written: a model that answers with its end token at
            # once (empty text) or twice the same text gives no preference. Counted in stats.json.
            # Judged on the cleaned texts, as validation judges them: a response of control characters
            # only (a random tiny model writes such) is empty once cleaned, one of zero-width characters blank.
            a, b = clean_text(texts[i])[0], clean_text(texts[j])[0]
            if is_blank(a) or is_blank(b):
                dropped["empty_response"] += 1
                continue
            if a == b:
                dropped["same_text"] += 1
                continue
            agree += int((choice == 0) == (g[i] >= g[j]))
            rows.append({"input_text": prompt, "candidate_0": texts[i], "candidate_1": texts[j], "choice": choice})
    _write_jsonl(Path(paths["preferences"]), rows)
    _write_jsonl(Path(paths["prompts"]), [{"input_text": p} for p in rl_prompts])
    _write_jsonl(Path(paths["eval_prompts"]), [{"input_text": p} for p in eval_prompts])
    stats = {
        "pairs": len(rows),
        "pairs_dropped": dropped,
        "prompts": len(pref_prompts),
        "label_agreement_with_gold": agree / max(len(rows), 1),
        "mean_gold_score": sum(golds) / max(len(golds), 1),
        "config": asdict(task),
        "policy": policy.model,
        "engine": generation.backend if generation is not None else "hf",
    }
    Path(paths["stats"]).write_text(json.dumps(stats, indent=2))  # last: its presence marks the files complete
    cache.publish(f"builtin/{out.name}", out)
    return paths


def generate_builtin_task(task: BuiltinTaskConfig, policy: PolicyConfig,
                          generation: GenerationConfig | None = None, devices: int = 1) -> dict[str, str]:
    """Write the task's files (or reuse them when generated with the same settings) and return their
    paths: {"preferences", "prompts", "eval_prompts", "stats"}. Sampled here in one shard; the flow fans
    the sampling out over `data.builtin.sampling_workers` tasks (`sample_shard`, then `write_task`)."""
    return (cached_task(task, policy, generation, devices)
            or write_task(task, policy, sample_shard(task, policy, generation=generation), generation, devices))
