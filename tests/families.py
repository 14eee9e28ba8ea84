"""Tiny random models in the shapes hub models ship: their config classes, their special tokens, their
chat templates (in substance: the same markers, the same refusals), generation configs whose
`eos_token_id` lists several end tokens, and no pad token where the published tokenizer has none.

Every family's token 0 is the token its chat turns end with (Gemma's <end_of_turn>, Llama 3's
<|eot_id|>, Phi-3's <|end|>, ...): a copy whose output layer is zeroed (`zero_logits`) has all logits 0,
so greedy decoding emits exactly that token, which shows whether sampling and serving stop there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (AutoModelForCausalLM, DebertaV2Config, DebertaV2ForSequenceClassification, Gemma2Config,
                          GPTNeoXConfig, LlamaConfig, MistralConfig, Phi3Config, PretrainedConfig,
                          PreTrainedTokenizerFast, Qwen2Config)

from rlhf_lightning.task_prompts import tokenizer_corpus

DIMS = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=512)

LLAMA3 = ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
          "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
QWEN2 = ("{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\n' + messages[0]['content'] + "
         "'<|im_end|>\n' }}{%- else %}{{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a "
         "helpful assistant.<|im_end|>\n' }}{%- endif %}{%- for message in messages %}{%- if not (message.role == "
         "'system' and loop.first) %}{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}"
         "{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}")
GEMMA2 = ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
          "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
          "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
          "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
          "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")
MISTRAL = ("{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
           "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
           "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
           "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
           "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}")
PHI3 = ("{% for message in messages %}{% if message['role'] == 'system' %}{{ '<|system|>\n' + message['content'] + "
        "'<|end|>\n' }}{% elif message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + '<|end|>\n' }}"
        "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\n' + message['content'] + '<|end|>\n' }}"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}"
        "{% endif %}")


@dataclass(frozen=True)
class Family:
    """A published model family's shape."""

    config: Callable[..., PretrainedConfig]
    tokens: list[str]
    """Special tokens, end-of-turn first (token 0)."""
    bos: str | None
    eos: str
    """The tokenizer's eos_token."""
    pad: str | None
    """None: the published tokenizer has no pad token."""
    stops: list[str] | str
    """generation_config.eos_token_id, by token (a list, or one token as published)."""
    template: str | None
    """None: a base model without a chat template."""
    turn_marker: str
    """Text the family's template puts before an answer: shows which template rendered a prompt."""
    refuses_system: bool = False
    add_bos: bool = False
    """The tokenizer's post-processor adds BOS to every encoding (as Llama's and Gemma's do)."""
    config_kwargs: dict = field(default_factory=dict)

    @property
    def end_of_turn(self) -> str:
        return self.tokens[0]


FAMILIES: dict[str, Family] = {
    # Llama 3 Instruct as first published: the tokenizer's eos is <|end_of_text|>, a turn ends with
    # <|eot_id|>, which only the generation config lists. No pad token.
    "llama3": Family(LlamaConfig, ["<|eot_id|>", "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                                   "<|end_header_id|>"], bos="<|begin_of_text|>", eos="<|end_of_text|>", pad=None,
                     stops=["<|end_of_text|>", "<|eot_id|>"], template=LLAMA3,
                     turn_marker="<|start_header_id|>assistant<|end_header_id|>", add_bos=True,
                     config_kwargs=dict(num_key_value_heads=2, tie_word_embeddings=False)),
    # Qwen 2.5 Instruct: ChatML with a default system prompt; pad <|endoftext|> is also an end token.
    "qwen2": Family(Qwen2Config, ["<|im_end|>", "<|endoftext|>", "<|im_start|>"], bos=None, eos="<|im_end|>",
                    pad="<|endoftext|>", stops=["<|im_end|>", "<|endoftext|>"], template=QWEN2,
                    turn_marker="<|im_start|>assistant", config_kwargs=dict(num_key_value_heads=2)),
    # Gemma 2: no system role, alternating turns, <end_of_turn> besides the tokenizer's <eos>.
    "gemma2": Family(Gemma2Config, ["<end_of_turn>", "<pad>", "<eos>", "<bos>", "<start_of_turn>", "<unk>"],
                     bos="<bos>", eos="<eos>", pad="<pad>", stops=["<eos>", "<end_of_turn>"], template=GEMMA2,
                     turn_marker="<start_of_turn>model", refuses_system=True, add_bos=True,
                     config_kwargs=dict(num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
                                        sliding_window=64)),
    # Mistral Instruct v0.2: [INST] turns, no system role, one end token </s>, no pad.
    "mistral": Family(MistralConfig, ["</s>", "<s>", "<unk>"], bos="<s>", eos="</s>", pad=None, stops="</s>",
                      template=MISTRAL, turn_marker="[/INST]", refuses_system=True, add_bos=True,
                      config_kwargs=dict(num_key_value_heads=2, sliding_window=None)),
    # Phi-3 mini instruct: pad == eos (<|endoftext|>); a turn ends with <|end|>; fused qkv_proj.
    "phi3": Family(Phi3Config, ["<|end|>", "<|endoftext|>", "<s>", "<unk>", "<|user|>", "<|assistant|>",
                                "<|system|>"], bos="<s>", eos="<|endoftext|>", pad="<|endoftext|>",
                   stops=["<|endoftext|>", "<|assistant|>", "<|end|>"], template=PHI3, turn_marker="<|assistant|>",
                   config_kwargs=dict(num_key_value_heads=4)),
    # Pythia: a base model (GPT-NeoX), no chat template, no pad, <|endoftext|> for everything.
    "pythia": Family(GPTNeoXConfig, ["<|endoftext|>", "<|padding|>"], bos="<|endoftext|>", eos="<|endoftext|>",
                     pad=None, stops="<|endoftext|>", template=None, turn_marker="Assistant:",
                     config_kwargs=dict(rotary_pct=0.25, use_parallel_residual=True)),
}


def family_tokenizer(family: Family) -> PreTrainedTokenizerFast:
    """A byte-level BPE over the project's corpus with the family's special tokens (end-of-turn = id 0)."""
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(tokenizer_corpus(), trainer=trainers.BpeTrainer(
        vocab_size=512, special_tokens=family.tokens, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if family.add_bos:
        bos = (family.bos, tk.token_to_id(family.bos))
        tk.post_processor = processors.TemplateProcessing(single=f"{bos[0]} $A", pair=f"{bos[0]} $A {bos[0]}:1 $B:1",
                                                          special_tokens=[bos])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=family.bos, eos_token=family.eos,
                                  pad_token=family.pad, unk_token=family.tokens[-1] if "<unk>" in family.tokens else None)
    tok.chat_template = family.template
    return tok


def build_family(name: str, out: Path) -> str:
    """A local model directory of family `name`: random weights (seeded), its tokenizer and template, and
    a generation config listing its end tokens as published."""
    family = FAMILIES[name]
    tok = family_tokenizer(family)
    ids = {t: tok.convert_tokens_to_ids(t) for t in family.tokens}
    stops = [ids[t] for t in family.stops] if isinstance(family.stops, list) else ids[family.stops]
    config = family.config(vocab_size=len(tok), bos_token_id=ids.get(family.bos), eos_token_id=ids[family.eos],
                           pad_token_id=ids.get(family.pad) if family.pad else None, **DIMS, **family.config_kwargs)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.eos_token_id = stops
    model.generation_config.bos_token_id = config.bos_token_id
    model.generation_config.pad_token_id = config.pad_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def zero_logits(model_dir: str, out: Path) -> str:
    """A copy of `model_dir` whose output layer is zero: every logit is 0 and greedy decoding picks
    token 0, the family's end-of-turn token."""
    from transformers import AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        model.get_output_embeddings().weight.zero_()
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    return str(out)


def deberta_v2_reward_dir(out: Path) -> str:
    """A DeBERTa-v2/v3-shaped sequence classifier (relative attention, no absolute positions, no token
    types) with a BERT-style pair template: [CLS] prompt [SEP] response [SEP]."""
    tk = Tokenizer(models.BPE(unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    specials = ["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"]
    tk.train_from_iterator(tokenizer_corpus(), trainer=trainers.BpeTrainer(
        vocab_size=512, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    cls, sep = ("[CLS]", tk.token_to_id("[CLS]")), ("[SEP]", tk.token_to_id("[SEP]"))
    tk.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                      special_tokens=[cls, sep])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
                                  unk_token="[UNK]", mask_token="[MASK]")
    config = DebertaV2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, max_position_embeddings=512, relative_attention=True,
                             position_buckets=64, pos_att_type=["p2c", "c2p"], position_biased_input=False,
                             type_vocab_size=0, norm_rel_ebd="layer_norm", share_att_key=True,
                             pad_token_id=tok.pad_token_id, num_labels=1)
    torch.manual_seed(0)
    DebertaV2ForSequenceClassification(config).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def llama3_reward_dir(out: Path, dtype: torch.dtype = torch.bfloat16) -> str:
    """A Llama-3-based reward model as such models are published (the Skywork-Reward kind): a
    LlamaForSequenceClassification with one output, Llama 3's tokenizer and chat template, no pad token
    (none in the tokenizer, none in the config), weights saved in bf16."""
    from transformers import LlamaForSequenceClassification

    family = FAMILIES["llama3"]
    tok = family_tokenizer(family)
    config = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.convert_tokens_to_ids(
        "<|eot_id|>"), pad_token_id=None, num_labels=1, **DIMS, **family.config_kwargs)
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).to(dtype).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)
