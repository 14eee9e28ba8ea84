"""The default policy trained through the vLLM engine as a training step runs it: the engine and its
worker in processes of their own (collected before test_engines.py, whose engines run in the test
process: vLLM caches its settings in a process once an engine started there)."""

from __future__ import annotations

import pytest
import torch

from rlhf_lightning.models import loading
from rlhf_lightning.models.engines import engine_dtype
from test_checkpoints import _adapter
from test_engines import EngineWatch, needs_vllm, vllm_cfg

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@needs_vllm
def test_the_default_policy_trained_with_the_engine_answers_greedily_as_hf(tmp_path, reward_model_dir, capfd):
    """SmolLM2-135M-Instruct, the default policy, in the engine's default dtype: two PPO iterations with
    rollouts from the engine train its adapter; after them the engine's greedy tokens from that adapter
    are HF's (exactly in fp32; in bf16 within a near-tie of HF's argmax)."""
    from rlhf_lightning.config import RLHFConfig
    from rlhf_lightning.models.ppo import train_ppo
    from test_ppo import prompt_rows

    model = RLHFConfig().policy.model
    cfg = vllm_cfg(model, dtype="auto", iterations=2, learning_rate=1e-3)
    rows = prompt_rows(loading.load_tokenizer(model))
    watch = EngineWatch([r["prompt_chat"] for r in rows])
    result = train_ppo(cfg, rows, reward_model_dir, str(tmp_path / "ppo"), callbacks=[watch])
    assert watch.ids == [1, 2]
    # The engine's processes log vLLM's warning for the fp32 checkpoint loaded into bf16 once, not once
    # per tensor (122 lines).
    logged = capfd.readouterr()
    casts = (logged.out + logged.err).count("Attempted to load weight")
    assert casts == (0 if engine_dtype() == "float32" else 1), casts
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in _adapter(result).items())
    got, want = watch.greedy
    if engine_dtype() == "float32":
        assert torch.equal(got, want)
    else:
        # bf16 kernels (this CPU's default) against HF's fp32: every greedy token is HF's argmax or within
        # 0.25 of its logit (a near-tie broken the other way; a stale or missing adapter is far off).
        assert watch.margin <= 0.25, watch.margin


