"""Preprocess Inputs: every source -> clean, templated, truncated, split canonical datasets.

Per role (``preferences``, ``prompts`` = RL prompts, ``eval_prompts``), in this order:

1. read (:mod:`.formats`, in ``data.format``): invalid records are dropped (``dropped.invalid``); their
   problems are kept in :attr:`PreparedData.problems` so that validation reports every one of them;
   pairs a record's own preference leaves undecided (ties of a label, a score or a rank) are dropped
   by reason (``dropped.tie_label``, ``dropped.equal_scores``, ...), and a prompt conversation that
   ends in assistant turns is cut back to its last user turn (``changed.answer_turns_removed``);
2. clean the text, every message of a conversation included (:func:`clean_text`): each row counts once
   per reason that changed it (``changed.<reason>``);
   with ``data.drop_invalid_rows``, rows with empty text or ties are dropped here (``dropped.empty_text``,
   ``dropped.tie``), their problems kept like reading problems; otherwise validation reports them as errors;
3. drop exact duplicates (``dropped.duplicate``), then rows equal to an earlier one once case, Unicode
   compatibility forms and whitespace are normalised (:func:`normalise`, ``dropped.duplicate_normalised``),
   keeping the first; each drop is also a note with both locations (:attr:`PreparedData.notes`);
4. cut to the token limits of the policy tokenizer (``changed.truncated_prompt``/``changed.truncated_response``):
   prompts keep their END, responses their START (see :func:`fit_conversations`, :func:`fit_responses`).
   Pairs the cut turns into ties are dropped (``dropped.tie_after_truncation``: a tie teaches nothing),
   rows it makes identical too (``dropped.duplicate_after_truncation``);
5. split train/eval by prompt (:func:`split_by_prompt`).

``PreparedData.counts`` is flat (MLflow metrics take it as is): ``<role>.records`` (records read),
``<role>.read`` (candidate pairs: a record that gives K pairs counts K), ``<role>.kept``,
``<role>.dropped.<reason>``, ``<role>.changed.<reason>``, ``preferences.choice_0/1`` (raw labels of the
valid pairs) and ``<split>.rows``. For every role ``read == kept + sum(dropped.*)``: nothing is lost silently.
Ties and empty texts present in the input are kept: validation reports them as errors with their location.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import unicodedata
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from rlhf_lightning.chat import ChatTemplateError, folds_system, render
from rlhf_lightning.config import ConfigError, RLHFConfig
from rlhf_lightning.data import formats
from rlhf_lightning.data.issues import Issue
from rlhf_lightning.data.layouts import ANSWER_REMOVED
from rlhf_lightning.data.layouts import DROP_REASONS as LAYOUT_DROPS
from rlhf_lightning.data.text import CLEAN_STEPS, clean_text, invisible_chars, is_blank

MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
PREFERENCE_SCHEMA = pa.schema([("prompt", pa.string()), ("chosen", pa.string()), ("rejected", pa.string()),
                               ("source", pa.string()), ("messages", MESSAGES)])
PROMPT_SCHEMA = pa.schema([("prompt", pa.string()), ("prompt_chat", pa.string()), ("source", pa.string()),
                           ("messages", MESSAGES), ("extra", pa.string())])
"""`extra` (the prompt record's other columns, a dict in the rows) is stored as JSON: its values may be of
any type, a reference answer's as much as a list of unit tests."""

SPLITS = ("pref_train", "pref_eval", "rl_prompts", "eval_prompts")
"""The canonical datasets of a run (`PreparedData`'s fields, one Parquet file each)."""
DROP_REASONS = ("invalid", "empty_text", "tie", "duplicate", "duplicate_normalised", "duplicate_after_truncation")


@dataclass
class PreparedData:
    """The canonical datasets of one run (a Metaflow artifact; rows are plain dicts)."""

    pref_train: list[dict]
    """Preference rows ``{prompt, chosen, rejected, source, messages}`` for training the reward model
    (``messages``: the prompt conversation, None for a single user message; see :mod:`.formats`)."""
    pref_eval: list[dict]
    """Held-out preference rows (no prompt shared with `pref_train`)."""
    rl_prompts: list[dict]
    """Prompt rows ``{prompt, prompt_chat, source, messages, extra}`` for PPO rollouts (``extra``: the
    prompt record's other columns by name, for reward functions)."""
    eval_prompts: list[dict]
    """Held-out prompt rows for the policy-vs-reference evaluation."""
    counts: dict[str, int]
    """Rows read/kept/dropped/changed per role and reason (see the module docstring)."""
    files: dict[str, str]
    """Parquet file per split: pref_train, pref_eval, rl_prompts, eval_prompts."""
    sources: dict[str, list[str]]
    """Input files read per role: preferences, prompts, eval_prompts."""
    problems: list[Issue] = field(default_factory=list)
    """Problems of the records and files that could not be read (their rows are counted as dropped.invalid)."""
    notes: list[Issue] = field(default_factory=list)
    """Rows dropped as duplicates, each with the location of the row kept (validation warns)."""
    formats: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)
    """Per role and input file: records read per detected format."""
    layouts: dict[str, dict[str, dict]] = field(default_factory=dict)
    """Per role and input file: what it was read as and the pairs its records gave
    (:attr:`.formats.ReadResult.layouts`)."""
    token_lengths: dict[str, list[int]] = field(default_factory=dict)
    """Policy-token lengths before truncation, per `<role>.<field>` (prompts counted with the chat
    template): for length statistics and histograms."""
    where: dict[str, list[str]] = field(default_factory=dict)
    """The sources (``path:number``) of the rows behind the truncation counts, per `<role>.<count>`
    (``preferences.changed.truncated_response``, ...): validation names them."""

    def digests(self) -> dict[str, str]:
        """sha256 of each canonical split (its rows as sorted-key JSON lines): the data identity recorded
        in the lineage of every model trained on it. Same rows, same order → same digest."""
        out = {}
        for name in SPLITS:
            digest = hashlib.sha256()
            for row in getattr(self, name):
                digest.update(json.dumps(row, sort_keys=True, ensure_ascii=False, default=str).encode())
                digest.update(b"\n")
            out[name] = digest.hexdigest()
        return out


def _count_tokens(tok, texts: list[str]) -> list[int]:
    # No special tokens: chat prompts carry theirs in the template, as generation.sample encodes them.
    return [len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]] if texts else []


def render_chat(tok, messages: list[dict]) -> str:
    """A prompt conversation in the policy's chat template, ready for generation (for one user message
    the same text as `generation.chat_prompt`); a refusal is a :class:`~rlhf_lightning.chat.ChatTemplateError`."""
    return render(tok, messages)


def fit_conversations(tok, conversations: list[list[dict]], max_tokens: int, *,
                      counts: Counter | None = None) -> tuple[list[list[dict]], list[str], list[int]]:
    """Fit each prompt conversation so that its chat-templated form has at most `max_tokens` tokens.

    Policy: a long prompt keeps its END — the last user turn is the one the response answers, and in a
    single message the question or instruction usually comes last. Whole leading turns go first (then
    any assistant turn left leading the conversation); if the one remaining message is still too long,
    its start is cut on a token boundary (the tokenizer's character offsets), so no character is split.
    Returns (conversations, chat prompts, chat token counts before cutting). `counts` gets
    ``system_folded``: the conversations whose system message the policy's template puts into the
    first user turn (:func:`rlhf_lightning.chat.template_for`). A conversation the template refuses
    raises :class:`~rlhf_lightning.chat.ChatTemplateError` with its ``index``."""
    chats = []
    folding = folds_system(tok.chat_template or "")
    for i, messages in enumerate(conversations):
        try:
            chats.append(render_chat(tok, messages))
        except ChatTemplateError as exc:
            exc.index = i
            raise
        if counts is not None and folding and messages[0]["role"] == "system":
            counts["system_folded"] += 1
    lengths = _count_tokens(tok, chats)
    out, out_chats = [list(m) for m in conversations], list(chats)
    for i, n in enumerate(lengths):
        if n <= max_tokens:
            continue
        msgs = out[i]
        while n > max_tokens and len(msgs) > 1:
            msgs = msgs[1:]
            while len(msgs) > 1 and msgs[0]["role"] == "assistant":
                msgs = msgs[1:]
            out_chats[i] = render_chat(tok, msgs)
            n = _count_tokens(tok, [out_chats[i]])[0]
        if n > max_tokens:
            msgs, out_chats[i] = _keep_end(tok, msgs[0], n, max_tokens)
        out[i] = msgs
    return out, out_chats, lengths


def _keep_end(tok, message: dict, chat_len: int, max_tokens: int) -> tuple[list[dict], str]:
    text = message["content"]
    offsets = tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    overhead = chat_len - len(offsets)  # the template's own tokens stay; the message's text gives way
    keep = min(max_tokens - overhead, len(offsets) - 1)
    # Tokens can merge differently across the new start, so check the result and give up one more
    # token until it fits (almost always the first try).
    while keep > 0:
        msgs = [{"role": message["role"], "content": text[offsets[-keep][0]:].lstrip()}]
        chat = render_chat(tok, msgs)
        if _count_tokens(tok, [chat])[0] <= max_tokens:
            return msgs, chat
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
    """Input patterns per role; generates the built-in task when no preference file is configured (and
    the run trains a reward model, or names no prompts of its own: `RLHFConfig.uses_builtin_task`)."""
    d = cfg.data
    if not cfg.uses_builtin_task:
        if d.preferences and not d.prompts:
            raise ConfigError("config: data.prompts: empty while data.preferences is set (name the RL prompt "
                              "files; a preference file works too: only its prompt is used)")
        return {"preferences": list(d.preferences), "prompts": list(d.prompts), "eval_prompts": list(d.eval_prompts)}
    from rlhf_lightning.data.builtin import generate_builtin_task

    paths = generate_builtin_task(d.builtin, cfg.policy, cfg.generation, cfg.trainer.devices)
    return {
        "preferences": [paths["preferences"]],
        "prompts": list(d.prompts) or [paths["prompts"]],
        "eval_prompts": list(d.eval_prompts) or [paths["eval_prompts"]],
    }


class _Counts:
    """Counters of one role, with every known reason present (zeros included: stable MLflow metrics)."""

    def __init__(self, counts: Counter, role: str, drop_reasons: tuple[str, ...], change_reasons: tuple[str, ...],
                 where: dict[str, list[str]] | None = None):
        self.counts, self.role = counts, role
        self.where = where if where is not None else {}
        for reason in drop_reasons:
            counts[f"{role}.dropped.{reason}"] += 0
        for reason in change_reasons:
            counts[f"{role}.changed.{reason}"] += 0

    def add(self, kind: str, n: int = 1, source: str | None = None) -> None:
        """Count `n` rows; with `source`, also note where the row came from (validation names the rows)."""
        self.counts[f"{self.role}.{kind}"] += n
        if source is not None and n:
            self.where.setdefault(f"{self.role}.{kind}", []).append(source)


def _clean_rows(rows: list[dict], fields: tuple[str, ...], c: _Counts) -> list[dict]:
    out = []
    for row in rows:
        new, reasons = dict(row), set()
        for name in fields:
            new[name], why = clean_text(row[name])
            reasons.update(why)
        if row.get("messages"):
            # The conversation is the prompt's truth; its flattened text is rebuilt from the cleaned turns.
            new["messages"] = []
            for msg in row["messages"]:
                content, why = clean_text(msg["content"])
                reasons.update(why)
                new["messages"].append({"role": msg["role"], "content": content})
            new["prompt"] = formats.flatten(new["messages"])
        for reason in reasons:
            c.add(f"changed.{reason}")
        out.append(new)
    return out


def row_problems(row: dict) -> list[Issue]:
    """Errors of one cleaned row: empty or whitespace-only text (invisible characters such as zero-width
    spaces or byte-order marks count as whitespace: see :func:`~.text.is_blank`), a tie (preference rows)."""
    out = []
    for name in ("prompt", "chosen", "rejected"):
        if name in row and is_blank(row[name]):
            # The characters are named: in an editor such a text looks written, or looks like nothing at all.
            hidden = invisible_chars(row[name])
            what = f": only invisible characters ({', '.join(hidden)})" if hidden else ""
            out.append(Issue(row["source"], name, f"empty or whitespace-only text{what} (write the text or remove "
                                                  "the record)", "empty_text"))
    if "chosen" in row and row["chosen"] == row["rejected"] and not is_blank(row["chosen"]):
        out.append(Issue(row["source"], "chosen", "same text as rejected (after cleaning): a tie carries no "
                                                  "preference (drop the pair or fix one candidate)", "tie"))
    return out


def _drop_invalid(rows: list[dict], c: _Counts, problems: list[Issue]) -> list[dict]:
    out = []
    for row in rows:
        found = row_problems(row)
        if found:
            c.add(f"dropped.{found[0].kind}")  # one reason per row: the counts add up to the rows read
            problems.extend(found)
        else:
            out.append(row)
    return out


_SPEAKER = re.compile(r"(?:^|\s)(Human|User|Assistant):")


def row_notes(rows: list[dict]) -> list[Issue]:
    """Warnings about cleaned rows, before cutting (which may remove what they point at): conversations
    with two turns in a row from one role, responses containing a speaker label."""
    out = []
    for row in rows:
        for name in ("chosen", "rejected"):
            m = _SPEAKER.search(row.get(name, ""))
            if m:
                out.append(Issue(row["source"], name, f"contains {m.group(1) + ':'!r} at character {m.start(1)}: the "
                                                      "response seems to write another turn of the conversation "
                                                      "itself (cut it there, or drop the pair)", "speaker_in_response"))
        roles = [m["role"] for m in row.get("messages") or []]
        i = next((i for i in range(1, len(roles)) if roles[i] == roles[i - 1]), None)
        if i is not None:
            out.append(Issue(row["source"], "prompt", f"turns {i} and {i + 1} are both {roles[i]!r}: a turn was "
                                                      "probably split in two or the other speaker's turn lost "
                                                      "(merge them or restore it)", "same_role_twice"))
    return out


def normalise(text: str) -> str:
    """The key of normalised duplicates: NFKC (compatibility forms such as ligatures and full-width
    letters), case folded, every whitespace run one space."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def _dedupe(rows: list[dict], fields: tuple[str, ...], c: _Counts, reason: str, notes: list[Issue] | None,
            key: Callable[[str], str] = lambda t: t) -> list[dict]:
    seen: dict[tuple, str] = {}
    out = []
    for row in rows:
        k = tuple(key(row[f]) for f in fields)
        if k in seen:
            c.add(f"dropped.{reason}")
            if notes is not None:
                how = "same text" if reason == "duplicate" else "same text once case and whitespace are normalised"
                notes.append(Issue(row["source"], "record", f"duplicate ({how}) of {seen[k]}: dropped, the first kept "
                                                            "(remove one of them)", reason))
        else:
            seen[k] = row["source"]
            out.append(row)
    return out


def _dedupe_all(rows: list[dict], fields: tuple[str, ...], c: _Counts, notes: list[Issue]) -> list[dict]:
    rows = _dedupe(rows, fields, c, "duplicate", notes)
    return _dedupe(rows, fields, c, "duplicate_normalised", notes, normalise)


def _count_read(c: _Counts, result: formats.ReadResult) -> None:
    """`read` counts candidate pairs: a record that gives K pairs counts K, so that `read` is what is
    kept plus what is dropped (invalid records, ties the layout dropped, and what preprocessing drops);
    `records` counts the records themselves. Layout drops and prompt changes are counted only where
    they happen, so the built-in formats' metrics stay what they were."""
    c.add("records", result.records)
    c.add("read", len(result.rows) + result.invalid + sum(result.dropped.values()))
    c.add("dropped.invalid", result.invalid)
    for reason in LAYOUT_DROPS:
        if result.dropped[reason]:
            c.add(f"dropped.{reason}", result.dropped[reason])
    if result.changed[ANSWER_REMOVED]:
        c.add(f"changed.{ANSWER_REMOVED}", result.changed[ANSWER_REMOVED])


def _conversation(row: dict) -> list[dict]:
    return row["messages"] or [{"role": "user", "content": row["prompt"]}]


def _fit(tok, rows: list[dict], cfg: RLHFConfig, c: _Counts) -> tuple[list[list[dict]], list[str], list[int]]:
    """`fit_conversations` of the rows' prompts; a conversation the chat template refuses stops the run
    with the row's location and what to set."""
    folded: Counter = Counter()
    try:
        out = fit_conversations(tok, [_conversation(r) for r in rows], cfg.data.prompt_length, counts=folded)
    except ChatTemplateError as exc:
        raise ConfigError(f"config: policy.chat_template: {rows[exc.index]['source']}: {exc}") from None
    if folded["system_folded"]:
        c.add("changed.system_folded", folded["system_folded"])
    return out


def prepare_preferences(result: formats.ReadResult, tok, cfg: RLHFConfig, counts: Counter,
                        lengths: dict[str, list[int]], notes: list[Issue],
                        where: dict[str, list[str]] | None = None) -> list[dict]:
    """Read preference rows -> clean, deduplicated, cut rows (steps 2-4 of the module docstring). `where`
    gets the sources of the rows cut or dropped by the cut, per `preferences.<count>`."""
    fields = ("prompt", "chosen", "rejected")
    c = _Counts(counts, "preferences", DROP_REASONS + ("tie_after_truncation",),
                tuple(r for r, _ in CLEAN_STEPS) + ("truncated_prompt", "truncated_response"), where)
    _count_read(c, result)
    for label in (0, 1):
        c.add(f"choice_{label}", result.labels[label])
    rows = _clean_rows(result.rows, fields, c)
    if cfg.data.drop_invalid_rows:
        rows = _drop_invalid(rows, c, result.problems)
    notes.extend(row_notes(rows))
    rows = _dedupe_all(rows, fields, c, notes)

    convs, _, lengths["preferences.prompt_chat"] = _fit(tok, rows, cfg, c)
    chosen, lengths["preferences.chosen"] = fit_responses(tok, [r["chosen"] for r in rows], cfg.data.target_length)
    rejected, lengths["preferences.rejected"] = fit_responses(tok, [r["rejected"] for r in rows], cfg.data.target_length)
    out = []
    for row, conv, ch, rj in zip(rows, convs, chosen, rejected):
        prompt = formats.prompt_fields(conv)
        c.add("changed.truncated_prompt", int(prompt["prompt"] != row["prompt"]), row["source"])
        c.add("changed.truncated_response", int(ch != row["chosen"] or rj != row["rejected"]), row["source"])
        if ch == rj and row["chosen"] != row["rejected"]:
            c.add("dropped.tie_after_truncation", 1, row["source"])
            continue
        out.append({**row, **prompt, "chosen": ch, "rejected": rj})
    out = _dedupe(out, fields, c, "duplicate_after_truncation", None)
    c.add("kept", len(out))
    return out


def prepare_prompts(role: str, result: formats.ReadResult, tok, cfg: RLHFConfig, counts: Counter,
                    lengths: dict[str, list[int]], notes: list[Issue],
                    where: dict[str, list[str]] | None = None) -> list[dict]:
    """Read prompt rows -> clean, deduplicated rows with `prompt_chat` (steps 2-4 of the module docstring);
    `where` as in `prepare_preferences`."""
    c = _Counts(counts, role, DROP_REASONS, tuple(r for r, _ in CLEAN_STEPS) + ("truncated_prompt",), where)
    _count_read(c, result)
    rows = _clean_rows(result.rows, ("prompt",), c)
    if cfg.data.drop_invalid_rows:
        rows = _drop_invalid(rows, c, result.problems)
    notes.extend(row_notes(rows))
    rows = _dedupe_all(rows, ("prompt",), c, notes)
    convs, chats, lengths[f"{role}.prompt_chat"] = _fit(tok, rows, cfg, c)
    out = []
    for row, conv, chat in zip(rows, convs, chats):
        prompt = formats.prompt_fields(conv)
        c.add("changed.truncated_prompt", int(prompt["prompt"] != row["prompt"]), row["source"])
        out.append({"prompt": prompt["prompt"], "prompt_chat": chat, "source": row["source"],
                    "messages": prompt["messages"], "extra": row.get("extra") or {}})
    out = _dedupe(out, ("prompt",), c, "duplicate_after_truncation", None)
    c.add("kept", len(out))
    return out


def write_parquet(rows: list[dict], schema: pa.Schema, path: Path) -> str:
    # An explicit schema: an empty split still gets its columns, and a non-string value fails loudly.
    if "extra" in schema.names:
        rows = [{**row, "extra": json.dumps(row.get("extra") or {}, ensure_ascii=False, default=str)} for row in rows]
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return str(path)


def preprocess(cfg: RLHFConfig, out_dir: str) -> PreparedData:
    """Read every source, clean, cut and split it, and write one Parquet file per split into `out_dir`.

    Problems of records and of whole files (missing, unreadable, empty) are returned in `problems` for
    validation to report, all of them: one bad file does not hide the others' problems."""
    from rlhf_lightning.models.loading import policy_tokenizer

    d = cfg.data
    sources = resolve_sources(cfg)
    tok = policy_tokenizer(cfg.policy)
    if not tok.is_fast:
        raise ConfigError(f"config: policy.model: {cfg.policy.model!r} has no fast (Rust) tokenizer; cutting "
                          "prompts on token boundaries needs its character offsets (use a model with tokenizer.json)")
    counts: Counter = Counter()
    lengths: dict[str, list[int]] = {}

    mapping, fmt = d.field_mapping, d.prompts_format or d.format
    read_prefs = formats.read_preferences(sources["preferences"], "data.preferences", d.format, mapping)
    read_rl = formats.read_prompts(sources["prompts"], "data.prompts", fmt, mapping)
    read_eval = formats.read_prompts(sources["eval_prompts"], "data.eval_prompts", fmt, mapping) \
        if sources["eval_prompts"] else None
    notes: list[Issue] = []
    where: dict[str, list[str]] = {}

    pref_train, pref_eval = split_by_prompt(prepare_preferences(read_prefs, tok, cfg, counts, lengths, notes, where),
                                            d.eval_fraction, d.seed)
    rl_prompts = prepare_prompts("prompts", read_rl, tok, cfg, counts, lengths, notes, where)
    if read_eval is not None:
        eval_prompts = prepare_prompts("eval_prompts", read_eval, tok, cfg, counts, lengths, notes, where)
    else:  # no held-out prompt file: hold out a fraction of the RL prompts
        rl_prompts, eval_prompts = split_by_prompt(rl_prompts, d.eval_fraction, d.seed)

    # After preparing: with data.drop_invalid_rows it adds the problems of the rows it dropped.
    problems = read_prefs.problems + read_rl.problems + (read_eval.problems if read_eval else [])
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
        problems=problems, token_lengths=lengths, notes=notes, where=where,
        formats={"preferences": read_prefs.formats, "prompts": read_rl.formats,
                 "eval_prompts": read_eval.formats if read_eval else {}},
        layouts={"preferences": read_prefs.layouts, "prompts": read_rl.layouts,
                 "eval_prompts": read_eval.layouts if read_eval else {}},
    )
