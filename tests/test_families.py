"""The model-facing stages on tiny random models in the shapes users bring from the hub (Llama 3, Qwen2,
Gemma 2, Mistral, Phi-3, Pythia: tests/families.py), and DeBERTa-v2 and Llama-architecture reward
backbones: preprocess renders each family's own template (system text folded where it refuses one),
sampling, PPO's masks and the served model stop at the family's end-of-turn token, one PPO iteration
trains the adapter on the family's own layers, and the reward model trains and scores independently of
padding on backbones with and without a pad token."""

from __future__ import annotations

from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from datafiles import write_records
from families import FAMILIES, build_family, deberta_v2_reward_dir, zero_logits
from rlhf_lightning.chat import PLAIN_TEMPLATE, render
from rlhf_lightning.config import PolicyConfig, from_dict
from rlhf_lightning.data.preprocess import preprocess
from rlhf_lightning.models.generation import sample
from rlhf_lightning.models.loading import load_policy, policy_tokenizer, stop_token_ids, stop_token_ids_from_files
from rlhf_lightning.models.logprobs import ended_with_eos
from rlhf_lightning.models.ppo import train_ppo
from rlhf_lightning.models.reward_model import RewardScorer, train_reward_model
from rlhf_lightning.serving.pyfunc_model import RLHFPolicyModel
from rlhf_lightning.serving.registry import policy_chat_template

pytestmark = pytest.mark.usefixtures("one_torch_thread")
NAMES = sorted(FAMILIES)
SYSTEM_CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Describe a rainy day."}]
PROMPTS = ["Write a one-sentence review of a small cafe.", "Describe a museum to a friend in one sentence."]


@pytest.fixture(scope="module")
def family_dir(tmp_path_factory):
    """family name -> its model directory, built once per module."""
    built: dict[str, str] = {}

    def get(name: str) -> str:
        if name not in built:
            built[name] = build_family(name, tmp_path_factory.mktemp(name))
        return built[name]

    return get


@pytest.fixture(scope="module")
def trained(family_dir, reward_model_dir, tmp_path_factory):
    """family name -> the adapter dir one PPO iteration wrote (and its history), run once per module."""
    done: dict[str, tuple[str, list]] = {}

    def get(name: str) -> tuple[str, list]:
        if name not in done:
            cfg = from_dict({"policy": {"model": family_dir(name)},
                             "ppo": {"iterations": 1, "rollout_batch_size": 2, "samples_per_prompt": 2,
                                     "minibatch_size": 4, "ppo_epochs": 1, "max_new_tokens": 6,
                                     "learning_rate": 1e-2},
                             "trainer": {"accelerator": "cpu"}})
            tok = policy_tokenizer(cfg.policy)
            rows = [{"prompt": p, "prompt_chat": render(tok, [{"role": "user", "content": p}]), "source": f"t:{i}"}
                    for i, p in enumerate(PROMPTS)]
            out = tmp_path_factory.mktemp(f"ppo-{name}")
            result = train_ppo(cfg, rows, reward_model_dir, str(out))
            done[name] = (str(out / "adapter"), result.history)
        return done[name]

    return get


def expected_render(name: str, chat: list[dict]) -> str:
    """The family's published template on `chat`, with the system text put into the first user turn
    by hand where the template refuses a system message; the plain format for a base model."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    family = FAMILIES[name]
    if family.refuses_system and chat[0]["role"] == "system":
        chat = [{"role": "user", "content": f"{chat[0]['content']}\n\n{chat[1]['content']}"}, *chat[2:]]
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(family.template or PLAIN_TEMPLATE).render(
        messages=chat, add_generation_prompt=True, bos_token=family.bos or "", eos_token=family.eos)


@pytest.mark.parametrize("name", NAMES)
def test_preprocess_renders_prompts_with_the_family_template(name, family_dir, tmp_path):
    rows = [{"messages": SYSTEM_CHAT, "candidate_0": "Rain all day.", "candidate_1": "No.", "choice": 0},
            {"input_text": "Review a cafe.", "candidate_0": "Lovely.", "candidate_1": "Bad.", "choice": 0},
            {"messages": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}],
             "candidate_0": "Hello!", "candidate_1": "Go.", "choice": 0}]
    path = write_records(tmp_path / "p.jsonl", rows)
    cfg = from_dict({"policy": {"model": family_dir(name)},
                     "data": {"preferences": [str(path)], "prompts": [str(path)], "eval_fraction": 0.34}})
    data = preprocess(cfg, str(tmp_path / "out"))

    family = FAMILIES[name]
    assert data.counts.get("prompts.changed.system_folded", 0) == (2 if family.refuses_system else 0)
    rendered = {r["prompt_chat"] for r in data.rl_prompts + data.eval_prompts}
    assert expected_render(name, SYSTEM_CHAT) in rendered
    assert expected_render(name, [{"role": "user", "content": "Review a cafe."}]) in rendered
    assert all(family.turn_marker in text for text in rendered)
    tok = policy_tokenizer(cfg.policy)
    if family.bos and family.template and "bos_token" in family.template:  # BOS once, from the template
        for text in rendered:
            ids = tok(text, add_special_tokens=False)["input_ids"]
            assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id


@pytest.mark.parametrize("name", NAMES)
def test_one_ppo_iteration_trains_the_adapter_on_the_family_layers(name, trained):
    adapter, history = trained(name)
    assert len(history) == 1 and all(torch.isfinite(torch.tensor(v)) for v in history[0].values())
    weights = load_file(f"{adapter}/adapter_model.safetensors")
    b = [v for k, v in weights.items() if "lora_B" in k]
    assert b and all(v.abs().sum() > 0 for v in b)  # peft starts every B at 0: the update moved them
    layers = {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in weights}
    expected = {"phi3": {"qkv_proj", "o_proj"}, "pythia": {"query_key_value"}}.get(name, {"q_proj", "k_proj",
                                                                                          "v_proj", "o_proj"})
    assert expected <= layers


@pytest.mark.parametrize("name", NAMES)
def test_sampling_masks_and_the_served_model_stop_at_the_family_end_of_turn(name, family_dir, trained, tmp_path):
    """With every logit 0, greedy decoding emits token 0, the family's end-of-turn token (for Llama 3,
    Gemma 2 and Phi-3 not the tokenizer's eos): sampling stops there with the token counted in the mask,
    PPO sees the response as ended, and the served model answers "" with finish_reason stop."""
    family = FAMILIES[name]
    zero = zero_logits(family_dir(name), tmp_path / "zero")
    adapter, _ = trained(name)
    policy = PolicyConfig(model=zero)
    model = load_policy(policy, adapter, trainable=False)
    tok = policy_tokenizer(policy)
    eot = tok.convert_tokens_to_ids(family.end_of_turn)
    assert eot in stop_token_ids(model, tok)
    assert stop_token_ids_from_files(zero, tok) == stop_token_ids(model, tok)  # what a vLLM engine stops on
    chats = [render(tok, SYSTEM_CHAT), render(tok, [{"role": "user", "content": PROMPTS[0]}])]
    sampled = sample(model, tok, chats, max_new_tokens=6, temperature=0.0)
    assert sampled.response_ids.tolist() == [[eot], [eot]] and sampled.response_mask.tolist() == [[1], [1]]
    assert sampled.texts == ["", ""]
    assert ended_with_eos(sampled, stop_token_ids(model, tok)).tolist() == [True, True]

    template, _ = policy_chat_template(from_dict({"policy": {"model": zero}}), zero)
    served = RLHFPolicyModel()
    served.load_context(SimpleNamespace(artifacts={"base": zero, "adapter": adapter},
                                        model_config={"chat_template": template}))
    out = served.predict(None, pd.DataFrame({"messages": [SYSTEM_CHAT]}), params={"max_new_tokens": 5})
    assert out[["response", "completion_tokens", "finish_reason"]].values.tolist() == [["", 1, "stop"]]
    # The trained policy itself (random weights, not zeroed) answers a system conversation through the
    # same template: the served model takes what training took.
    served.load_context(SimpleNamespace(artifacts={"base": family_dir(name), "adapter": adapter},
                                        model_config={"chat_template": template}))
    answer = served.predict(None, pd.DataFrame({"messages": [SYSTEM_CHAT]}), params={"max_new_tokens": 4})
    assert answer["finish_reason"].iloc[0] in ("stop", "length") and 1 <= answer["completion_tokens"].iloc[0] <= 4


def _pairs(n: int, seed: int) -> list[dict]:
    import random

    rng = random.Random(seed)
    good, bad = ["great", "friendly", "clean", "lovely"], ["rude", "cold", "dirty", "terrible"]
    return [{"prompt": f"Write a one-sentence review of a small {rng.choice(['cafe', 'park', 'hotel'])}.",
             "chosen": f"It was {rng.choice(good)} and {rng.choice(good)}.",
             "rejected": f"It was {rng.choice(bad)} and {rng.choice(bad)} indeed.", "source": f"s:{i}"}
            for i in range(n)]


@pytest.mark.parametrize("backbone", ["deberta_v2", "llama3"])
def test_reward_backbones_train_and_score_independently_of_padding(backbone, family_dir, tmp_path):
    """DeBERTa-v2 (relative positions, no token types) and a Llama-architecture backbone without a pad
    token (pad = eos, right padding, last-token pooling): the fit moves the weights, and a row scores
    the same alone as beside a longer one."""
    from transformers import AutoModelForSequenceClassification

    path = deberta_v2_reward_dir(tmp_path / "deberta") if backbone == "deberta_v2" else family_dir("llama3")
    cfg = from_dict({"policy": {"model": "tiny:llama"},
                     "reward_model": {"backbone": path, "max_length": 48, "learning_rate": 3e-3, "batch_size": 8,
                                      "epochs": 1},
                     "trainer": {"accelerator": "cpu"}})
    result = train_reward_model(cfg, _pairs(16, 0), _pairs(8, 1), str(tmp_path / "rm"))
    scorer = RewardScorer.load(result.model_dir)
    initial = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1).state_dict()
    trained = scorer.model.state_dict()
    moved = [k for k, v in initial.items() if k in trained and not torch.equal(v, trained[k])]
    assert len(moved) > len(initial) // 2, f"{len(moved)} of {len(initial)} tensors moved"

    prompts = ["Review a cafe.", "Write a one-sentence review of a small quiet park in the old town near the river."]
    responses = ["Nice.", "It was lovely and green, with friendly people and clean paths everywhere."]
    together = scorer.score(prompts, responses)
    alone = torch.cat([scorer.score([p], [r]) for p, r in zip(prompts, responses)])
    torch.testing.assert_close(together, alone, atol=1e-4, rtol=1e-4)
