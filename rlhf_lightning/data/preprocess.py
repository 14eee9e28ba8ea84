"""Preprocess Inputs: every source -> clean, templated, truncated, split canonical datasets.

Per role (``preferences``, ``prompts`` = RL prompts, ``eval_prompts``), in this order:

1. read (:mod:`.formats`): invalid records are dropped (``dropped.invalid``); their problems are kept in
   :attr:`PreparedData.problems` so that validation reports every one of them;
2. clean the text (:func:`clean_text`): each row counts once per reason that changed it (``changed.<reason>``);
3. drop exact duplicates, keeping the first (``dropped.duplicate``);
4. cut to the token limits of the policy tokenizer (``changed.truncated_prompt``/``changed.truncated_response``):
   prompts keep their END, responses their START (see :func:`fit_prompts`, :func:`fit_responses`).
   Pairs the cut turns into ties are dropped (``dropped.tie_after_truncation``: a tie teaches nothing),
   rows it makes identical too (``dropped.duplicate_after_truncation``);
5. split train/eval by prompt (:func:`split_by_prompt`).

``PreparedData.counts`` is flat (MLflow metrics take it as is): ``<role>.read``, ``<role>.kept``,
``<role>.dropped.<reason>``, ``<role>.changed.<reason>``, ``preferences.choice_0/1`` (raw labels of the
valid pairs) and ``<split>.rows``. For every role ``read == kept + sum(dropped.*)``: nothing is lost silently.
Ties and empty texts present in the input are kept: validation reports them as errors with their location.
"""

from __future__ import annotations

import random
import re
import unicodedata
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from rlhf_lightning.config import ConfigError, RLHFConfig
from rlhf_lightning.data import formats
from rlhf_lightning.data.formats import Issue

PREFERENCE_SCHEMA = pa.schema([("prompt", pa.string()), ("chosen", pa.string()), ("rejected", pa.string()),
                               ("source", pa.string())])
PROMPT_SCHEMA = pa.schema([("prompt", pa.string()), ("prompt_chat", pa.string()), ("source", pa.string())])

# Unicode category Cc is exactly U+0000-U+001F and U+007F-U+009F; \t and \n carry layout and stay.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
# Runs of spaces between visible characters. Leading indentation is left alone: code in responses needs it.
_SPACE_RUN = re.compile(r"(?<=\S) {2,}(?=\S)")
CLEAN_STEPS: tuple[tuple[str, Callable[[str], str]], ...] = (
    ("unicode_nfc", lambda t: unicodedata.normalize("NFC", t)),  # one code point sequence per glyph
    ("line_endings", lambda t: t.replace("\r\n", "\n").replace("\r", "\n")),  # before \r counts as control
    ("control_chars", lambda t: _CONTROL.sub("", t)),
    ("spaces", lambda t: _SPACE_RUN.sub(" ", t)),
    ("ends", str.strip),
)
DROP_REASONS = ("invalid", "duplicate", "duplicate_after_truncation")


@dataclass
class PreparedData:
    """The canonical datasets of one run (a Metaflow artifact; rows are plain dicts)."""

    pref_train: list[dict]
    """Preference rows ``{prompt, chosen, rejected, source}`` for training the reward model."""
    pref_eval: list[dict]
    """Held-out preference rows (no prompt shared with `pref_train`)."""
    rl_prompts: list[dict]
    """Prompt rows ``{prompt, prompt_chat, source}`` for PPO rollouts."""
    eval_prompts: list[dict]
    """Held-out prompt rows for the policy-vs-reference evaluation."""
    counts: dict[str, int]
    """Rows read/kept/dropped/changed per role and reason (see the module docstring)."""
    files: dict[str, str]
    """Parquet file per split: pref_train, pref_eval, rl_prompts, eval_prompts."""
    sources: dict[str, list[str]]
    """Input files read per role: preferences, prompts, eval_prompts."""
    problems: list[Issue] = field(default_factory=list)
    """Problems of the records that could not be read (their rows are counted as dropped.invalid)."""
    token_lengths: dict[str, list[int]] = field(default_factory=dict)
    """Policy-token lengths before truncation, per `<role>.<field>` (prompts counted with the chat
    template): for length statistics and histograms."""


def clean_text(text: str) -> tuple[str, list[str]]:
    """Unicode NFC, ``\\r\\n``/``\\r`` -> ``\\n``, control characters removed (except ``\\n``, ``\\t``),
    runs of spaces between words collapsed, ends stripped. Returns the text and the reasons it changed."""
    reasons = []
    for reason, step in CLEAN_STEPS:
        new = step(text)
        if new != text:
            reasons.append(reason)
            text = new
    return text, reasons


def _count_tokens(tok, texts: list[str]) -> list[int]:
    # No special tokens: chat prompts carry theirs in the template, as generation.sample encodes them.
    return [len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]] if texts else []


def fit_prompts(tok, texts: list[str], max_tokens: int) -> tuple[list[str], list[str], list[int]]:
    """Fit each user message so that its chat-templated form has at most `max_tokens` tokens.

    Policy: a long message keeps its END — the question or instruction usually comes last, and in a
    multi-turn transcript the last turn is the one the response answers. The cut falls on a token
    boundary (the tokenizer's character offsets), so no character is split.
    Returns (user texts, chat prompts, chat token counts before cutting)."""
    from rlhf_lightning.models.generation import chat_prompt

    chats = [chat_prompt(tok, t) for t in texts]
    lengths = _count_tokens(tok, chats)
    out_texts, out_chats = list(texts), list(chats)
    for i, n in enumerate(lengths):
        if n > max_tokens:
            out_texts[i], out_chats[i] = _keep_end(tok, texts[i], n, max_tokens)
    return out_texts, out_chats, lengths


def _keep_end(tok, text: str, chat_len: int, max_tokens: int) -> tuple[str, str]:
    from rlhf_lightning.models.generation import chat_prompt

    offsets = tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    overhead = chat_len - len(offsets)  # the template's own tokens stay; the user's text gives way
    keep = min(max_tokens - overhead, len(offsets) - 1)
    # Tokens can merge differently across the new start, so check the result and give up one more
    # token until it fits (almost always the first try).
    while keep > 0:
        cut = text[offsets[-keep][0]:].lstrip()
        chat = chat_prompt(tok, cut)
        if _count_tokens(tok, [chat])[0] <= max_tokens:
            return cut, chat
        keep -= 1
    raise ConfigError(f"config: data.prompt_length: {max_tokens} tokens leave no room for the user's text; "
                      f"the chat template alone takes about {overhead} (raise data.prompt_length)")


def fit_responses(tok, texts: list[str], max_tokens: int) -> tuple[list[str], list[int]]:
    """Cut each text to at most `max_tokens` tokens, keeping its START (what the policy generates
    first, and all a policy limited to that many new tokens can produce). Returns (texts, token counts
    before cutting)."""
    if not texts:
        return [], []
    enc = tok(texts, add_special_tokens=False, return_offsets_mapping=True)
    out, lengths = list(texts), []
    for i, offsets in enumerate(enc["offset_mapping"]):
        lengths.append(len(offsets))
        if len(offsets) <= max_tokens:
            continue
        out[i] = ""  # only if no prefix fits (a 1-token limit and a multi-token first character)
        for keep in range(max_tokens, 0, -1):
            cut = texts[i][: offsets[keep - 1][1]].rstrip()
            # A character split over several byte tokens re-encodes longer: then give up one more token.
            if _count_tokens(tok, [cut])[0] <= max_tokens:
                out[i] = cut
                break
    return out, lengths


def split_by_prompt(rows: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, eval): a seeded `fraction` of the distinct prompts, with all their rows, goes to eval, so
    no prompt is in both. Prompts are sorted before shuffling: the split does not depend on file order.
    With two or more distinct prompts each side gets at least one; with one, everything is train."""
    prompts = sorted({r["prompt"] for r in rows})
    random.Random(seed).shuffle(prompts)
    n_eval = round(fraction * len(prompts))
    if len(prompts) >= 2:
        n_eval = min(max(n_eval, 1), len(prompts) - 1)
    held_out = set(prompts[:n_eval])
    return [r for r in rows if r["prompt"] not in held_out], [r for r in rows if r["prompt"] in held_out]


def resolve_sources(cfg: RLHFConfig) -> dict[str, list[str]]:
    """Input patterns per role; generates the built-in task when no preference file is configured."""
    d = cfg.data
    if d.preferences:
        if not d.prompts:
            raise ConfigError("config: data.prompts: empty while data.preferences is set (name the RL prompt "
                              "files; a preference file works too: its input_text is used)")
        return {"preferences": list(d.preferences), "prompts": list(d.prompts), "eval_prompts": list(d.eval_prompts)}
    from rlhf_lightning.data.builtin import generate_builtin_task

    paths = generate_builtin_task(d.builtin, cfg.policy)
    return {
        "preferences": [paths["preferences"]],
        "prompts": list(d.prompts) or [paths["prompts"]],
        "eval_prompts": list(d.eval_prompts) or [paths["eval_prompts"]],
    }


class _Counts:
    """Counters of one role, with every known reason present (zeros included: stable MLflow metrics)."""

    def __init__(self, counts: Counter, role: str, drop_reasons: tuple[str, ...], change_reasons: tuple[str, ...]):
        self.counts, self.role = counts, role
        for reason in drop_reasons:
            counts[f"{role}.dropped.{reason}"] += 0
        for reason in change_reasons:
            counts[f"{role}.changed.{reason}"] += 0

    def add(self, kind: str, n: int = 1) -> None:
        self.counts[f"{self.role}.{kind}"] += n


def _clean_rows(rows: list[dict], fields: tuple[str, ...], c: _Counts) -> list[dict]:
    out = []
    for row in rows:
        new, reasons = dict(row), set()
        for name in fields:
            new[name], why = clean_text(row[name])
            reasons.update(why)
        for reason in reasons:
            c.add(f"changed.{reason}")
        out.append(new)
    return out


def _dedupe(rows: list[dict], fields: tuple[str, ...], c: _Counts, reason: str) -> list[dict]:
    seen, out = set(), []
    for row in rows:
        key = tuple(row[f] for f in fields)
        if key in seen:
            c.add(f"dropped.{reason}")
        else:
            seen.add(key)
            out.append(row)
    return out


def prepare_preferences(result: formats.ReadResult, tok, cfg: RLHFConfig, counts: Counter,
                        lengths: dict[str, list[int]]) -> list[dict]:
    """Read preference rows -> clean, deduplicated, cut rows (steps 2-4 of the module docstring)."""
    fields = ("prompt", "chosen", "rejected")
    c = _Counts(counts, "preferences", DROP_REASONS + ("tie_after_truncation",),
                tuple(r for r, _ in CLEAN_STEPS) + ("truncated_prompt", "truncated_response"))
    c.add("read", result.records)
    c.add("dropped.invalid", result.invalid)
    for label in (0, 1):
        c.add(f"choice_{label}", result.labels[label])
    rows = _dedupe(_clean_rows(result.rows, fields, c), fields, c, "duplicate")

    prompts, _, lengths["preferences.prompt_chat"] = fit_prompts(tok, [r["prompt"] for r in rows], cfg.data.prompt_length)
    chosen, lengths["preferences.chosen"] = fit_responses(tok, [r["chosen"] for r in rows], cfg.data.target_length)
    rejected, lengths["preferences.rejected"] = fit_responses(tok, [r["rejected"] for r in rows], cfg.data.target_length)
    out = []
    for row, p, ch, rj in zip(rows, prompts, chosen, rejected):
        c.add("changed.truncated_prompt", int(p != row["prompt"]))
        c.add("changed.truncated_response", int(ch != row["chosen"] or rj != row["rejected"]))
        if ch == rj and row["chosen"] != row["rejected"]:
            c.add("dropped.tie_after_truncation")
            continue
        out.append({**row, "prompt": p, "chosen": ch, "rejected": rj})
    out = _dedupe(out, fields, c, "duplicate_after_truncation")
    c.add("kept", len(out))
    return out


def prepare_prompts(role: str, result: formats.ReadResult, tok, cfg: RLHFConfig, counts: Counter,
                    lengths: dict[str, list[int]]) -> list[dict]:
    """Read prompt rows -> clean, deduplicated rows with `prompt_chat` (steps 2-4 of the module docstring)."""
    c = _Counts(counts, role, DROP_REASONS, tuple(r for r, _ in CLEAN_STEPS) + ("truncated_prompt",))
    c.add("read", result.records)
    c.add("dropped.invalid", result.invalid)
    rows = _dedupe(_clean_rows(result.rows, ("prompt",), c), ("prompt",), c, "duplicate")
    prompts, chats, lengths[f"{role}.prompt_chat"] = fit_prompts(tok, [r["prompt"] for r in rows], cfg.data.prompt_length)
    out = []
    for row, p, chat in zip(rows, prompts, chats):
        c.add("changed.truncated_prompt", int(p != row["prompt"]))
        out.append({"prompt": p, "prompt_chat": chat, "source": row["source"]})
    out = _dedupe(out, ("prompt",), c, "duplicate_after_truncation")
    c.add("kept", len(out))
    return out


def write_parquet(rows: list[dict], schema: pa.Schema, path: Path) -> str:
    # An explicit schema: an empty split still gets its columns, and a non-string value fails loudly.
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return str(path)


def preprocess(cfg: RLHFConfig, out_dir: str) -> PreparedData:
    """Read every source, clean, cut and split it, and write one Parquet file per split into `out_dir`.

    Raises :class:`~rlhf_lightning.data.formats.DataError` for files that cannot be read at all; problems
    of single records are returned in `problems` for validation to report (all of them)."""
    from rlhf_lightning.models.loading import load_tokenizer

    d = cfg.data
    sources = resolve_sources(cfg)
    tok = load_tokenizer(cfg.policy.model)
    if not tok.is_fast:
        raise ConfigError(f"config: policy.model: {cfg.policy.model!r} has no fast (Rust) tokenizer; cutting "
                          "prompts on token boundaries needs its character offsets (use a model with tokenizer.json)")
    counts: Counter = Counter()
    lengths: dict[str, list[int]] = {}

    read_prefs = formats.read_preferences(sources["preferences"], "data.preferences")
    read_rl = formats.read_prompts(sources["prompts"], "data.prompts")
    read_eval = formats.read_prompts(sources["eval_prompts"], "data.eval_prompts") if sources["eval_prompts"] else None
    problems = read_prefs.problems + read_rl.problems + (read_eval.problems if read_eval else [])

    pref_train, pref_eval = split_by_prompt(prepare_preferences(read_prefs, tok, cfg, counts, lengths),
                                            d.eval_fraction, d.seed)
    rl_prompts = prepare_prompts("prompts", read_rl, tok, cfg, counts, lengths)
    if read_eval is not None:
        eval_prompts = prepare_prompts("eval_prompts", read_eval, tok, cfg, counts, lengths)
    else:  # no held-out prompt file: hold out a fraction of the RL prompts
        rl_prompts, eval_prompts = split_by_prompt(rl_prompts, d.eval_fraction, d.seed)

    splits = {"pref_train": pref_train, "pref_eval": pref_eval, "rl_prompts": rl_prompts, "eval_prompts": eval_prompts}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, rows in splits.items():
        counts[f"{name}.rows"] = len(rows)
        files[name] = write_parquet(rows, PREFERENCE_SCHEMA if name.startswith("pref") else PROMPT_SCHEMA,
                                    out / f"{name}.parquet")
    return PreparedData(
        pref_train=pref_train, pref_eval=pref_eval, rl_prompts=rl_prompts, eval_prompts=eval_prompts,
        counts=dict(sorted(counts.items())), files=files,
        sources={"preferences": read_prefs.files, "prompts": read_rl.files,
                 "eval_prompts": read_eval.files if read_eval else []},
        problems=problems, token_lengths=lengths,
    )
