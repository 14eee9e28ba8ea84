"""Chat templates as models ship them: one that refuses a system message (Gemma 2's, Mistral's) gets it
folded into the first user turn, counted, in training and serving alike, or says what refused what;
a model without a template (a base model) gets the plain format; the user's own template wins."""

from __future__ import annotations

from types import SimpleNamespace

import pandas as pd
import pytest
from mlflow.exceptions import MlflowException

from chat_templates import GEMMA
from datafiles import write_records
from rlhf_lightning.chat import PLAIN_TEMPLATE, ChatTemplateError, folds_system, render, template_for
from rlhf_lightning.config import ConfigError, from_dict
from rlhf_lightning.data.preprocess import preprocess
from rlhf_lightning.models.generation import chat_prompt
from rlhf_lightning.models.loading import load_tokenizer

SYSTEM_CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]


def test_a_template_that_refuses_system_messages_gets_them_folded_into_the_first_user_turn():
    tok = load_tokenizer("tiny:llama", chat_template=GEMMA)
    assert folds_system(tok.chat_template)
    assert render(tok, SYSTEM_CHAT).endswith("<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n")
    assert render(tok, SYSTEM_CHAT[1:]).endswith("<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n")
    strict = load_tokenizer("tiny:llama", chat_template=GEMMA, fold_system=False)
    with pytest.raises(ChatTemplateError) as exc:
        render(strict, SYSTEM_CHAT)
    assert "refuses a conversation with roles ['system', 'user']: System role not supported" in str(exc.value)
    assert "policy.fold_system: true" in str(exc.value)
    # A template that takes system messages is left as it is.
    plain = load_tokenizer("tiny:llama")
    assert not folds_system(plain.chat_template) and "Be brief." in render(plain, SYSTEM_CHAT)


def test_a_model_without_a_template_gets_the_plain_format(tmp_path):
    tok = load_tokenizer("tiny:llama")
    tok.chat_template = None  # a base model as published (Pythia, GPT-2)
    tok.save_pretrained(tmp_path)
    base = load_tokenizer(str(tmp_path))
    assert base.chat_template == PLAIN_TEMPLATE == template_for(base)  # accepts system messages: no fold
    assert chat_prompt(base, "Hi") == "User: Hi\n\nAssistant:"
    assert render(base, SYSTEM_CHAT) == "System: Be brief.\n\nUser: Hi\n\nAssistant:"


def test_preprocess_folds_and_counts_or_stops_with_the_row(tmp_path):
    rows = [{"messages": SYSTEM_CHAT, "candidate_0": "Hello.", "candidate_1": "Go away.", "choice": 0},
            {"input_text": "Hey", "candidate_0": "Hi!", "candidate_1": "No.", "choice": 0},
            {"messages": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Yo"}],
             "candidate_0": "Hey!", "candidate_1": "Bye.", "choice": 0}]
    path = write_records(tmp_path / "p.jsonl", rows)
    cfg = from_dict({"policy": {"model": "tiny:llama", "chat_template": GEMMA},
                     "data": {"preferences": [str(path)], "prompts": [str(path)], "eval_fraction": 0.34}})
    data = preprocess(cfg, str(tmp_path / "out"))
    assert data.counts["preferences.changed.system_folded"] == 2 and data.counts["prompts.changed.system_folded"] == 2
    folded = [r for r in data.rl_prompts + data.eval_prompts if r["prompt"].startswith("System: Be brief.")]
    assert folded[0]["prompt_chat"].endswith("<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n")
    strict = from_dict({"policy": {"model": "tiny:llama", "chat_template": GEMMA, "fold_system": False},
                        "data": {"preferences": [str(path)], "prompts": [str(path)]}})
    with pytest.raises(ConfigError, match=f"policy.chat_template: {path}:1: the model's chat template refuses"):
        preprocess(strict, str(tmp_path / "out2"))


def test_the_served_model_renders_with_the_template_it_was_trained_with(tiny_policy):
    from rlhf_lightning.serving.pyfunc_model import RLHFPolicyModel
    from rlhf_lightning.serving.registry import policy_chat_template

    _, adapter_dir, base_dir = tiny_policy
    cfg = from_dict({"policy": {"model": "tiny:llama", "chat_template": GEMMA}})
    template, takes_system = policy_chat_template(cfg, base_dir)
    assert folds_system(template) and template.endswith(GEMMA) and takes_system
    strict = from_dict({"policy": {"model": "tiny:llama", "chat_template": GEMMA, "fold_system": False}})
    assert policy_chat_template(strict, base_dir) == (GEMMA, False)  # registered with a user-only example
    request = pd.DataFrame({"messages": [SYSTEM_CHAT]})
    params = {"max_new_tokens": 3, "temperature": 0.0}
    served = RLHFPolicyModel()
    served.load_context(SimpleNamespace(artifacts={"base": base_dir, "adapter": adapter_dir},
                                        model_config={"chat_template": template}))
    assert served.tokenizer.chat_template == template
    assert served.predict(None, request, params=params)["finish_reason"].iloc[0] in ("stop", "length")
    # The template alone, unfolded: the system message is the client's error (HTTP 400), said as such.
    served.load_context(SimpleNamespace(artifacts={"base": base_dir, "adapter": adapter_dir},
                                        model_config={"chat_template": GEMMA}))
    with pytest.raises(MlflowException, match=r"input row 0: the model's chat template refuses roles \['system', 'user'\]"):
        served.predict(None, request, params=params)
