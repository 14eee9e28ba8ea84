"""LoRA targets fit the model: `auto` finds the attention projections of Llama-like models, peft's
default for other architectures, else every linear layer; a name that matches nothing is an error
listing what the model has. Tiny random models in the published configs' shapes."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPTNeoXConfig, Phi3Config

from rlhf_lightning.config import ConfigError, LoraConfig, PolicyConfig
from rlhf_lightning.models.loading import load_policy, load_tokenizer

SMALL = dict(hidden_size=32, num_attention_heads=2, intermediate_size=64, max_position_embeddings=128)


def family_dir(tmp_path, config) -> str:
    """A local model directory of `config`'s architecture with random weights and the tiny tokenizer."""
    tok = load_tokenizer("tiny:llama")
    config.vocab_size, config.pad_token_id, config.eos_token_id = len(tok), tok.pad_token_id, tok.eos_token_id
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    return str(tmp_path)


FAMILIES = {
    "phi3": (lambda: Phi3Config(num_hidden_layers=1, num_key_value_heads=2, **SMALL), {"qkv_proj", "o_proj",
                                                                                        "gate_up_proj", "down_proj"}),
    "gpt_neox": (lambda: GPTNeoXConfig(num_hidden_layers=1, **SMALL), {"query_key_value"}),
    "gpt2": (lambda: GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=128), {"c_attn"}),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_auto_targets_fit_each_architecture_and_train(tmp_path, family):
    make, expected = FAMILIES[family]
    model = load_policy(PolicyConfig(model=family_dir(tmp_path, make())))
    adapted = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if hasattr(m, "lora_A")}
    assert adapted == expected
    # The adapter trains: a backward pass reaches every LoRA B matrix.
    ids = torch.tensor([[5, 6, 7, 8]])
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_llama_models_keep_the_four_attention_projections():
    model = load_policy(PolicyConfig(model="tiny:llama"))
    assert set(model.peft_config["default"].target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj"}


def test_a_target_the_model_does_not_have_lists_the_ones_it_has(tmp_path):
    path = family_dir(tmp_path, FAMILIES["phi3"][0]())
    with pytest.raises(ConfigError) as exc:
        load_policy(PolicyConfig(model=path, lora=LoraConfig(target_modules=["q_proj", "v_proj"])))
    assert "policy.lora.target_modules: ['q_proj', 'v_proj'] match no linear layer of this phi3 model" in str(exc.value)
    assert "'qkv_proj'" in str(exc.value) and "use auto or all-linear" in str(exc.value)
