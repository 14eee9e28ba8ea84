"""Layouts: one record -> its preference pairs or its prompt, in the canonical schema, or what is wrong.

- ``vertex``: preferences ``{input_text | messages, candidate_0, candidate_1, choice}``, prompts
  ``{input_text | messages}``; ``messages`` is a list of ``{author: user|model, content}`` or, as OpenAI's
  chat format writes it, ``{role: system|user|assistant, content}``; an optional ``context`` becomes a
  system message.
- ``trl``: ``{prompt, chosen, rejected}``, each text or (conversational) a list of ``{role, content}``;
  ``chosen``/``rejected`` are one assistant message, or whole conversations that end in it. Whole
  conversations without a ``prompt`` are TRL's implicit-prompt form (trl-lib's UltraFeedback, Skywork):
  the part they share is the prompt, system messages included, and the last assistant turn is the
  response. A ``prompt`` text beside whole conversations (HuggingFaceH4's and argilla's UltraFeedback)
  must be one of the user turns they share: a mismatch is an error at its record. Prompts ``{prompt}``.
  It is an entry of the declarative mapping below (:data:`TRL`, the mapping's defaults), not a parser
  of its own.
- ``hh``: Anthropic HH ``{chosen, rejected}``, whole transcripts of ``"\\n\\nHuman:"`` /
  ``"\\n\\nAssistant:"`` turns. The prompt is the shared part up to the last ``"\\n\\nAssistant:"``
  both share; a response that still holds turn markers means the transcripts part earlier, so the two
  responses answer different conversations: an error. As a prompt source only the prompt is used.
- ``mapping``: the declarative ``data.field_mapping`` (:class:`~rlhf_lightning.config.FieldMapping`):
  which fields hold the prompt and the responses, and how the preference is given (chosen/rejected
  fields, a label, a score per response, one signed score, a ranking of K responses -> its pairs). The
  mappings of public sets are YAML in ``configs/data/``, not code.
- ``auto``: each record's layout is detected (:func:`detect`) from its keys, and for ``{chosen,
  rejected}`` from whether they hold text (HH) or conversations (TRL).

Canonical rows: preferences ``{prompt, chosen, rejected, source, messages}``, prompts ``{prompt, source,
messages}``. ``messages`` is the prompt conversation (``[{role: system|user|assistant, content}]``, last
turn from the user) when it is more than one user message, else ``None``; ``prompt`` is then the
conversation flattened to readable text (``User: ...\\n\\nAssistant: ...``) for the reward model, while the
policy's chat template renders the turns themselves.

A record gives any number of pairs (a ranking of 7 answers gives up to 21). Pairs a record's preference
does not decide (ties) are counted in :attr:`Parsed.dropped` by reason; read as prompts, a conversation
that ends in the assistant's answers (a chat set such as UltraChat) is cut back to its last user turn,
counted in :attr:`Parsed.changed`.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from rlhf_lightning.config import TIE, FieldMapping
from rlhf_lightning.data.issues import Issue
from rlhf_lightning.data.text import is_blank

ROLES = ("system", "user", "assistant")
VERTEX_AUTHORS = {"user": "user", "model": "assistant"}
SPEAKERS = {"system": "System", "user": "User", "assistant": "Assistant"}
HH_ASSISTANT = "\n\nAssistant:"
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")

# Reasons a record's pair is not made (never errors: the data says "no preference").
TIE_LABEL, EQUAL_SCORES, ZERO_PREFERENCE, EQUAL_RANKS = "tie_label", "equal_scores", "zero_preference", "equal_ranks"
CONVERSATIONS_PART = "conversations_part_early"
TOO_FEW, SAME_TEXT = "fewer_than_two_responses", "same_response_text"
DROP_REASONS = (TIE_LABEL, EQUAL_SCORES, ZERO_PREFERENCE, EQUAL_RANKS, CONVERSATIONS_PART, TOO_FEW, SAME_TEXT)
ANSWER_REMOVED = "answer_turns_removed"
"""Change reason: a prompt conversation ended in assistant turns, cut back to its last user turn."""


@dataclass
class Parsed:
    """What a layout made of one record."""

    rows: list[dict] = field(default_factory=list)
    """Canonical rows: the record's pairs (preferences) or its one prompt row."""
    problems: list[Issue] = field(default_factory=list)
    """What is wrong with the record (then `rows` is empty)."""
    label: int | None = None
    """The raw Vertex ``choice`` (for the label-balance check)."""
    dropped: Counter = field(default_factory=Counter)
    """Pairs not made, by reason (ties)."""
    changed: Counter = field(default_factory=Counter)
    """Changes made to the record's prompt, by reason."""


# -------------------------------------------------------------------------------------------- values


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _missing(loc: str, name: str, hint: str) -> Issue:
    return Issue(loc, name, f"missing ({hint}; null counts as missing)", "missing_field")


def _text(record: dict, name: str, loc: str, problems: list[Issue], hint: str = "every record needs it") -> str | None:
    value = record.get(name)
    if value is None:
        problems.append(_missing(loc, name, hint))
        return None
    if not isinstance(value, str):
        problems.append(Issue(loc, name, f"expected a string, got {type(value).__name__} {_short(value)} "
                                         "(write the text as a string)", "wrong_type"))
        return None
    return value


def _messages(value: Any, name: str, loc: str, problems: list[Issue], role_key: str,
              roles: dict[str, str]) -> list[dict] | None:
    """A list of ``{role_key, content}`` -> canonical ``[{role, content}]`` (roles mapped by `roles`)."""
    if not isinstance(value, list) or not value:
        problems.append(Issue(loc, name, f"expected a non-empty list of {{{role_key}, content}} messages, got "
                                         f"{_short(value)}", "wrong_type"))
        return None
    n, out = len(problems), []
    for i, msg in enumerate(value):
        where = f"{name}[{i}]"
        if not isinstance(msg, dict):
            problems.append(Issue(loc, where, f"expected an object {{{role_key}, content}}, got {_short(msg)}",
                                  "wrong_type"))
            continue
        role, content = msg.get(role_key), msg.get("content")
        if not isinstance(role, str) or role not in roles:
            problems.append(Issue(loc, f"{where}.{role_key}", f"invalid role {_short(role)} (use one of "
                                                              f"{sorted(roles)})", "invalid_role"))
        if not isinstance(content, str):
            problems.append(Issue(loc, f"{where}.content", f"expected a string, got {_short(content)}", "wrong_type"))
        if len(problems) == n:
            out.append({"role": roles[role], "content": content})
    return out if len(problems) == n else None


def _chat(value: Any, name: str, loc: str, problems: list[Issue]) -> list[dict] | None:
    return _messages(value, name, loc, problems, "role", {r: r for r in ROLES})


def _check_conversation(messages: list[dict], name: str, loc: str, problems: list[Issue]) -> bool:
    """A prompt conversation: system only first, last turn from the user (the response answers it)."""
    ok = True
    for i, msg in enumerate(messages):
        if msg["role"] == "system" and i > 0:
            problems.append(Issue(loc, f"{name}[{i}]", "a system message may only come first (move it to the "
                                                       "start or make it a user turn)", "invalid_role"))
            ok = False
    if messages[-1]["role"] != "user":
        problems.append(Issue(loc, f"{name}[{len(messages) - 1}]", f"the last turn of a prompt must be the user's, "
                                                                   f"got {messages[-1]['role']!r} (end the "
                                                                   "conversation with the message the response "
                                                                   "answers)", "invalid_role"))
        ok = False
    return ok


def _as_prompt(messages: list[dict], name: str, loc: str, problems: list[Issue], changed: Counter | None) -> list[dict] | None:
    """A conversation as a prompt. With `changed` (read as a prompt source), trailing assistant turns are
    cut off and counted: a chat set's conversation prompts for its last user turn; a preference's prompt
    must end with the user's turn as it is."""
    if changed is not None and messages[-1]["role"] == "assistant":
        kept = list(messages)
        while kept and kept[-1]["role"] == "assistant":
            kept.pop()
        if kept:  # nothing but answers: not a prompt, said by the check below
            messages = kept
            changed[ANSWER_REMOVED] += 1
    return messages if _check_conversation(messages, name, loc, problems) else None


def flatten(messages: list[dict]) -> str:
    """A conversation as readable text, ``User: ...\\n\\nAssistant: ...``; one user message stays as is."""
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    return "\n\n".join(f"{SPEAKERS[m['role']]}: {m['content']}" for m in messages)


def prompt_fields(messages: list[dict]) -> dict:
    """Canonical ``{prompt, messages}`` of a prompt conversation (``messages`` None for one user turn)."""
    single = len(messages) == 1 and messages[0]["role"] == "user"
    return {"prompt": flatten(messages), "messages": None if single else messages}


def _prompt_value(record: dict, name: str, loc: str, problems: list[Issue], role_key: str = "role",
                  roles: dict[str, str] | None = None, fmt: str = "auto",
                  changed: Counter | None = None) -> list[dict] | None:
    """Text, conversation or (`fmt` ``hh``) HH transcript under `name` -> prompt conversation."""
    value = record.get(name)
    if value is None:
        problems.append(_missing(loc, name, "the prompt, as text or a list of messages"))
        return None
    if isinstance(value, str) and fmt in ("auto", "text"):
        return [{"role": "user", "content": value}]
    if fmt == "hh":
        if not isinstance(value, str):
            problems.append(Issue(loc, name, f"expected an HH transcript (a string), got {_short(value)}", "wrong_type"))
            return None
        turns = hh_turns(value)
        if turns and turns[-1]["role"] == "assistant" and is_blank(turns[-1]["content"]):
            turns = turns[:-1]  # "...\n\nAssistant:" invites the response: not a turn
        if not turns:
            problems.append(Issue(loc, name, "an empty transcript (expected '\\n\\nHuman: ...' turns)", "empty_text"))
            return None
        return _as_prompt(turns, name, loc, problems, changed)
    if fmt == "text":
        problems.append(Issue(loc, name, f"expected a string, got {type(value).__name__} {_short(value)} (the "
                                         "mapping says text: set prompt_format: messages for conversations)",
                              "wrong_type"))
        return None
    messages = _messages(value, name, loc, problems, role_key, roles or {r: r for r in ROLES})
    return None if messages is None else _as_prompt(messages, name, loc, problems, changed)


def _with_system(messages: list[dict] | None, record: dict, key: str, loc: str, problems: list[Issue]) -> list[dict] | None:
    """Put the system message of field `key` (if set and not empty) before the prompt conversation."""
    if not key or messages is None:
        return messages
    value = record.get(key)
    if value is None or value == "":
        return messages
    if not isinstance(value, str):
        problems.append(Issue(loc, key, f"expected a string, got {_short(value)} (the system message)", "wrong_type"))
        return None
    if is_blank(value):  # zero-width or format characters only: no more a system message than spaces
        return messages
    if messages[0]["role"] == "system":
        problems.append(Issue(loc, key, "the prompt already starts with a system message (keep one: clear "
                                        "data.field_mapping.system_key or the prompt's)", "ambiguous"))
        return None
    return [{"role": "system", "content": value}] + messages


# ----------------------------------------------------------------------------- responses and prompts


def _response(value: Any, name: str, loc: str, problems: list[Issue]) -> str | list[dict] | None:
    """A response: text, ``[{role: assistant, content}]`` (-> its text), or a whole conversation ending in
    the assistant's answer (kept as messages: :func:`split_conversations` finds the prompt in it)."""
    if value is None:
        problems.append(_missing(loc, name, "the response, as text or [{role: assistant, content}]"))
        return None
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        problems.append(Issue(loc, name, f"expected a string, got {type(value).__name__} {_short(value)} "
                                         "(write the text as a string)", "wrong_type"))
        return None
    messages = _chat(value, name, loc, problems)
    if messages is None:
        return None
    if messages[-1]["role"] != "assistant":
        problems.append(Issue(loc, name, f"expected one assistant message, or a conversation ending in the "
                                         f"assistant's response; got roles {[m['role'] for m in messages]} "
                                         "(put earlier turns in the prompt)", "invalid_role"))
        return None
    return messages[0]["content"] if len(messages) == 1 else messages


def split_conversations(convs: dict[str, list[dict]], loc: str, problems: list[Issue]) -> tuple[list[dict], dict[str, str]] | None:
    """Conversations that share everything but their last (assistant) turn -> (the shared prompt turns,
    {name: last assistant turn}); None with the problem recorded when they part earlier (the responses
    then answer different conversations) or share nothing."""
    seqs = list(convs.values())
    n, shortest = 0, min(len(s) for s in seqs)
    while n < shortest - 1 and all(s[n] == seqs[0][n] for s in seqs):
        n += 1
    if not any(m["role"] == "user" for m in seqs[0][:n]):
        problems.append(Issue(loc, "record", f"{' and '.join(convs)} share no prompt: they differ "
                                             f"{'from their first message' if n == 0 else 'after the system message'} "
                                             "(each must repeat the same conversation and differ only in the last "
                                             "assistant turn)", "no_shared_prompt"))
        return None
    for name, seq in convs.items():
        if len(seq) - n > 1:
            problems.append(Issue(loc, name, f"the conversations part at message {n} ({seq[n]['role']}), and {name} "
                                             f"then goes on for {len(seq) - n - 1} more turn(s), so its last "
                                             "response answers another conversation (keep one final assistant "
                                             "turn in each, after the same conversation)", "no_shared_prompt"))
            return None
    return seqs[0][:n], {name: seq[n]["content"] for name, seq in convs.items()}


def _match_prompt(given: Any, shared: list[dict], name: str, loc: str, problems: list[Issue]) -> bool:
    """A prompt field beside whole conversations must agree with the part they share: its text is one of
    the shared user turns (UltraFeedback's `prompt` is the first), its messages are the shared turns."""
    if isinstance(given, str):
        users = [m["content"].strip() for m in shared if m["role"] == "user"]
        if given.strip() in users:
            return True
        problems.append(Issue(loc, name, f"{_short(given)} is none of the user turns the responses' conversations "
                                         f"share (the last reads {_short(users[-1] if users else '')}; fix the "
                                         "prompt or the conversations)", "prompt_mismatch"))
        return False
    if isinstance(given, list):
        messages = _chat(given, name, loc, problems)
        if messages is None:
            return False
        if messages == shared:
            return True
        problems.append(Issue(loc, name, f"differs from the {len(shared)} turn(s) the responses' conversations share "
                                         "(fix the prompt or the conversations)", "prompt_mismatch"))
        return False
    problems.append(Issue(loc, name, f"expected a string or a list of messages, got {_short(given)}", "wrong_type"))
    return False


def _prompt_and_texts(record: dict, loc: str, problems: list[Issue], responses: dict[str, Any],
                      response_problems: list[Issue], prompt_key: str, system_key: str = "",
                      prompt_format: str = "auto", changed: Counter | None = None,
                      diverged: Counter | None = None) -> tuple[list[dict], dict[str, str]] | None:
    """The prompt conversation and each response's text. Responses that are whole conversations carry
    the prompt themselves (`prompt_key` then optional, and checked against it); else `prompt_key` holds
    it. The prompt's problems come first, then the responses' (`response_problems`). `diverged`: count
    conversations that part before their last turn there, instead of an error."""
    conversational = any(isinstance(v, list) for v in responses.values())
    prompt = None
    if not conversational:
        if prompt_key:
            prompt = _prompt_value(record, prompt_key, loc, problems, fmt=prompt_format, changed=changed)
        elif not response_problems:
            problems.append(Issue(loc, "record", "the responses are texts, so the prompt must come from a field "
                                                 "(set data.field_mapping.prompt_key)", "missing_field"))
    problems.extend(response_problems)
    if problems:
        return None
    if conversational:
        texts_only = [k for k, v in responses.items() if not isinstance(v, list)]
        if texts_only:
            problems.append(Issue(loc, texts_only[0], "a text beside whole conversations (write every response the "
                                                      "same way: as text after a prompt, or as the whole "
                                                      "conversation)", "mixed_responses"))
            return None
        parted: list[Issue] = []
        found = split_conversations(responses, loc, parted)
        if found is None:
            if diverged is not None and parted[0].field != "record":  # they share a start, then part
                diverged[CONVERSATIONS_PART] += 1
            else:
                problems.extend(parted)
            return None
        shared, texts = found
        if prompt_key and record.get(prompt_key) is not None and \
                not _match_prompt(record[prompt_key], shared, prompt_key, loc, problems):
            return None
        prompt = _as_prompt(shared, "prompt", loc, problems, changed)
    else:
        texts = dict(responses)
    prompt = _with_system(prompt, record, system_key, loc, problems)
    return None if prompt is None or problems else (prompt, texts)


def _pair_row(prompt: list[dict], chosen: str, rejected: str, loc: str) -> dict:
    return {**prompt_fields(prompt), "chosen": chosen, "rejected": rejected, "source": loc}


# ------------------------------------------------------------------------------- built-in layouts


def _choice(record: dict, loc: str, text_cells: bool, problems: list[Issue]) -> int | None:
    value = record.get("choice")
    if value is None:
        problems.append(_missing(loc, "choice", "0 if candidate_0 is preferred, 1 if candidate_1"))
        return None
    if text_cells and isinstance(value, str) and value.strip() in ("0", "1"):
        return int(value)  # CSV cells are text
    # `type(...) is int`: bool is a subclass of int, and True is not a label.
    if type(value) is int and value in (0, 1):
        return value
    problems.append(Issue(loc, "choice", f"expected the integer 0 or 1, got {_short(value)} (0 if candidate_0 "
                                         "is preferred, 1 if candidate_1)", "bad_choice"))
    return None


def _vertex_prompt_messages(record: dict, loc: str, problems: list[Issue], changed: Counter | None) -> list[dict] | None:
    has_text, has_messages = record.get("input_text") is not None, record.get("messages") is not None
    if has_text and has_messages:
        problems.append(Issue(loc, "messages", "both input_text and messages are set (keep one: input_text for one "
                                               "user message, messages for a conversation)", "ambiguous"))
        return None
    n = len(problems)
    if has_messages:
        # Vertex's {author: user|model} turns, or the {role: system|user|assistant} turns of OpenAI's and
        # TRL's chat format (what `serve` and `infer` take): a file holds whichever its exporter wrote.
        value = record["messages"]
        openai = isinstance(value, list) and any(isinstance(m, dict) and "role" in m and "author" not in m
                                                 for m in value)
        messages = _prompt_value(record, "messages", loc, problems, *(("role", None) if openai else
                                                                       ("author", VERTEX_AUTHORS)), changed=changed)
    else:
        text = _text(record, "input_text", loc, problems, "input_text (or messages) holds the prompt")
        messages = None if text is None else [{"role": "user", "content": text}]
    context = record.get("context")
    if context is not None and not isinstance(context, str):
        problems.append(Issue(loc, "context", f"expected a string, got {_short(context)}", "wrong_type"))
    if len(problems) > n or messages is None:
        return None
    return ([{"role": "system", "content": context}] if context and not is_blank(context) else []) + messages


def not_an_object(record: Any, loc: str) -> Issue:
    return Issue(loc, "record", f"expected an object, got a {type(record).__name__} {_short(record)}", "wrong_type")


def vertex_preference(record: dict, loc: str, text_cells: bool, mapping: FieldMapping) -> Parsed:
    """``{input_text | messages, candidate_0, candidate_1, choice}`` -> a preference row.
    `text_cells`: the file stores every value as text (CSV), so ``"0"``/``"1"`` are labels."""
    problems: list[Issue] = []
    messages = _vertex_prompt_messages(record, loc, problems, None)
    c0 = _text(record, "candidate_0", loc, problems)
    c1 = _text(record, "candidate_1", loc, problems)
    choice = _choice(record, loc, text_cells, problems)
    if problems:
        return Parsed(problems=problems)
    chosen, rejected = (c0, c1) if choice == 0 else (c1, c0)
    return Parsed([_pair_row(messages, chosen, rejected, loc)], label=choice)


def vertex_prompt(record: dict, loc: str, text_cells: bool, mapping: FieldMapping) -> Parsed:
    """``{input_text | messages}`` -> a prompt row. Other fields are ignored, so a preference file also
    serves as a prompt file."""
    out = Parsed()
    messages = _vertex_prompt_messages(record, loc, out.problems, out.changed)
    if not out.problems:
        out.rows.append({**prompt_fields(messages), "source": loc})
    return out


def _keyed_pair(record: dict, loc: str, prompt_key: str, chosen_key: str, rejected_key: str, system_key: str = "",
                prompt_format: str = "auto") -> Parsed:
    problems: list[Issue] = []
    responses = {k: _response(record.get(k), k, loc, problems) for k in (chosen_key, rejected_key)}
    out = Parsed()
    found = _prompt_and_texts(record, loc, out.problems, responses, problems, prompt_key, system_key, prompt_format)
    if found is not None:
        prompt, texts = found
        out.rows.append(_pair_row(prompt, texts[chosen_key], texts[rejected_key], loc))
    return out


def _keyed_prompt(record: dict, loc: str, prompt_key: str, response_keys: tuple[str, ...], system_key: str = "",
                  prompt_format: str = "auto") -> Parsed:
    """The prompt of `prompt_key`; when it is absent (or not mapped) and the fields `response_keys` hold
    whole conversations, the turns they share, up to the last user turn among them (conversations that
    part early, as Chatbot Arena's multi-turn battles, still share their first question)."""
    out = Parsed()
    if not prompt_key and not response_keys:
        out.problems.append(Issue(loc, "record", "no field holds the prompt (set data.field_mapping.prompt_key)",
                                  "missing_field"))
        return out
    if not prompt_key or record.get(prompt_key) is None and any(isinstance(record.get(k), list) for k in response_keys):
        convs = [_chat(record.get(k), k, loc, out.problems) for k in response_keys]
        if out.problems:
            return out
        n = 0
        while n < min(map(len, convs)) and all(c[n] == convs[0][n] for c in convs):
            n += 1
        if not any(m["role"] == "user" for m in convs[0][:n]):
            out.problems.append(Issue(loc, "record", f"{' and '.join(response_keys)} share no user turn (each must "
                                                     "repeat the same conversation before its answer)",
                                      "no_shared_prompt"))
            return out
        prompt = _as_prompt(convs[0][:n], "prompt", loc, out.problems, out.changed)
    else:
        prompt = _prompt_value(record, prompt_key, loc, out.problems, fmt=prompt_format, changed=out.changed)
    prompt = _with_system(prompt, record, system_key, loc, out.problems)
    if prompt is not None and not out.problems:
        out.rows.append({**prompt_fields(prompt), "source": loc})
    return out


TRL = FieldMapping()
"""TRL's layout is an entry of the declarative mapping (its defaults): ``{prompt, chosen, rejected}``."""


def trl_preference(record: dict, loc: str, text_cells: bool, mapping: FieldMapping) -> Parsed:
    """``{prompt, chosen, rejected}`` text or conversational, or ``{chosen, rejected}`` conversations
    (implicit prompt) -> a preference row."""
    return mapping_preference(record, loc, text_cells, TRL)


def trl_prompt(record: dict, loc: str, text_cells: bool, mapping: FieldMapping) -> Parsed:
    """``{prompt}``, or the shared part of ``{chosen, rejected}`` conversations -> a prompt row."""
    return mapping_prompt(record, loc, text_cells, TRL)


def hh_turns(transcript: str) -> list[dict]:
    """``"\\n\\nHuman: a\\n\\nAssistant: b"`` -> ``[{user, a}, {assistant, b}]`` (text before the first
    marker, if any, is not a turn and is returned as a leading user turn only when not blank)."""
    parts = _HH_TURN.split(transcript)
    # Blank includes invisible characters: a byte-order mark before the first marker is not a turn.
    turns = [{"role": "user", "content": parts[0].strip()}] if not is_blank(parts[0]) else []
    for speaker, text in zip(parts[1::2], parts[2::2]):
        turns.append({"role": "user" if speaker == "Human" else "assistant", "content": text.strip()})
    return turns


def split_hh(chosen: str, rejected: str, loc: str, problems: list[Issue]) -> tuple[list[dict], str, str] | None:
    """Split two HH transcripts at the last ``"\\n\\nAssistant:"`` they share: (prompt turns, chosen
    response, rejected response), or None with the problem recorded."""
    shared = os.path.commonprefix([chosen, rejected])
    # The marker may end inside the shared part or exactly at its end (an empty response).
    cut = shared.rfind(HH_ASSISTANT)
    if cut < 0:
        problems.append(Issue(loc, "record", "chosen and rejected do not share a prompt: they differ before their "
                                             f"first {HH_ASSISTANT.strip()!r} turn, at character {len(shared)} "
                                             "(both transcripts must repeat the same conversation and differ only "
                                             "in the last Assistant turn)", "no_shared_prompt"))
        return None
    head, start = chosen[:cut], cut + len(HH_ASSISTANT)
    responses = {"chosen": chosen[start:], "rejected": rejected[start:]}
    bad = False
    for name, text in responses.items():
        extra = len(_HH_TURN.findall(text))
        if extra:
            problems.append(Issue(loc, name, f"chosen and rejected do not share a prompt: they part at character "
                                             f"{len(shared)}, inside the Assistant turn that starts at character "
                                             f"{cut}, and the {name} transcript then goes on for {extra} more turn(s), "
                                             "so the two responses answer different conversations (keep one final "
                                             "Assistant turn in each, after the same conversation)",
                                  "no_shared_prompt"))
            bad = True
    if is_blank(head):  # judged as hh_turns judges it, so that the turns below are never empty
        problems.append(Issue(loc, "record", f"no Human turn before the last shared {HH_ASSISTANT.strip()!r} (each "
                                             "transcript needs the user's message before the response)",
                              "invalid_role"))
        bad = True
    if bad:
        return None
    turns = hh_turns(head)
    if turns[-1]["role"] != "user":
        problems.append(Issue(loc, "record", "the prompt's last turn is the Assistant's, not the Human's (two "
                                             "Assistant turns in a row before the response; merge them or add the "
                                             "Human turn between)", "invalid_role"))
        return None
    return turns, responses["chosen"].strip(), responses["rejected"].strip()


def _hh_fields(record: dict, loc: str, problems: list[Issue]) -> tuple[list[dict], str, str] | None:
    chosen = _text(record, "chosen", loc, problems, "the whole transcript ending in the preferred response")
    rejected = _text(record, "rejected", loc, problems, "the whole transcript ending in the other response")
    return None if problems else split_hh(chosen, rejected, loc, problems)


def hh_preference(record: dict, loc: str, text_cells: bool, mapping: FieldMapping) -> Parsed:
    """``{chosen, rejected}`` transcripts -> a preference row (shared prompt split off)."""
    problems: list[Issue] = []
    split = _hh_fields(record, loc, problems)
    if split is None:
        return Parsed(problems=problems)
    turns, chosen, rejected = split
    return Parsed([_pair_row(turns, chosen, rejected, loc)])


def hh_prompt(record: dict, loc: str, text_cells: bool, mapping: FieldMapping) -> Parsed:
    """``{chosen, rejected}`` transcripts -> the prompt row of their shared conversation."""
    problems: list[Issue] = []
    split = _hh_fields(record, loc, problems)
    return Parsed([] if split is None else [{**prompt_fields(split[0]), "source": loc}], problems)


# ------------------------------------------------------------------------------ the declarative mapping


def _number(value: Any, name: str, loc: str, problems: list[Issue], text_cells: bool) -> float | None:
    if value is None:
        problems.append(_missing(loc, name, "a number"))
        return None
    if text_cells and isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        problems.append(Issue(loc, name, f"expected a number, got {_short(value)}", "wrong_type"))
        return None
    return float(value)


def label_text(value: Any) -> str:
    """A label value as `label_values` keys write it (YAML keys become text; 1.0 is the label 1)."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def ranked_pairs(scores: list[float], which: str, tie: str) -> tuple[list[tuple[int, int]], Counter]:
    """(preferred index, other index) pairs of responses ranked by `scores` (higher is better) and the
    ties not made into pairs: `which` is ``all`` (every pair), ``best_vs_rest`` or ``best_vs_worst``."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])  # stable: equal scores keep their order
    if which == "all":
        candidates = [(order[a], order[b]) for a in range(len(order)) for b in range(a + 1, len(order))]
    elif which == "best_vs_rest":
        candidates = [(order[0], other) for other in order[1:]]
    else:
        candidates = [(order[0], order[-1])]
    pairs, ties = [], Counter()
    for better, worse in candidates:
        if scores[better] == scores[worse]:
            ties[tie] += 1
        else:
            pairs.append((better, worse))
    return pairs, ties


def _listed_responses(record: dict, m: FieldMapping, loc: str, problems: list[Issue], text_cells: bool
                      ) -> tuple[dict[str, Any], list[float]] | None:
    """The one list field of `m.responses` -> ({`field[i]`: response}, scores, higher is better)."""
    name = m.responses[0]
    items = record.get(name)
    if not isinstance(items, list):
        problems.append(Issue(loc, name, f"expected a list of responses, got {_short(items)}",
                              "wrong_type" if items is not None else "missing_field"))
        return None
    key = m.rank_key or m.item_score_key
    responses, scores = {}, []
    for i, item in enumerate(items):
        where = f"{name}[{i}]"
        if not isinstance(item, dict):
            problems.append(Issue(loc, where, f"expected an object with {key!r}, got {_short(item)}", "wrong_type"))
            continue
        responses[where] = _response(item.get(m.response_key), f"{where}.{m.response_key}", loc, problems)
        score = _number(item.get(key), f"{where}.{key}", loc, problems, text_cells)
        if score is not None:
            scores.append(-score if m.rank_key else score)
    return None if problems else (responses, scores)


def _preference(record: dict, m: FieldMapping, names: list[str], loc: str, problems: list[Issue],
                text_cells: bool, scores: list[float] | None) -> tuple[list[tuple[int, int]], Counter] | None:
    """Which response of `names` is preferred to which, by the mapping's one way of saying it."""
    if scores is not None:  # a ranked or scored list
        return ranked_pairs(scores, m.pairs, EQUAL_RANKS if m.rank_key else EQUAL_SCORES)
    if m.label_key:
        value = record.get(m.label_key)
        if value is None:
            problems.append(_missing(loc, m.label_key, f"the label, one of {sorted(m.label_values)}"))
            return None
        target = m.label_values.get(label_text(value))
        if target is None:
            problems.append(Issue(loc, m.label_key, f"label {_short(value)} means nothing in the mapping (its values: "
                                                    f"{sorted(m.label_values)}; add it to data.field_mapping."
                                                    "label_values, with the response it prefers or tie)", "bad_label"))
            return None
        if target == TIE:
            return [], Counter({TIE_LABEL: 1})
        best = m.responses.index(target)
        return [(best, other) for other in range(len(names)) if other != best], Counter()
    if m.score_keys:
        values = [_number(record.get(k), k, loc, problems, text_cells) for k in m.score_keys]
        return None if problems else ranked_pairs(values, m.pairs, EQUAL_SCORES)
    value = _number(record.get(m.preference_key), m.preference_key, loc, problems, text_cells)
    if value is None:
        return None
    if value == 0:
        return [], Counter({ZERO_PREFERENCE: 1})
    negative = m.responses.index(m.negative_prefers)
    return [(negative, 1 - negative) if value < 0 else (1 - negative, negative)], Counter()


def mapping_preference(record: dict, loc: str, text_cells: bool, mapping: FieldMapping) -> Parsed:
    """``data.field_mapping`` -> the record's preference pairs."""
    m = mapping
    if not m.declarative:
        return _keyed_pair(record, loc, m.prompt_key, m.chosen_key, m.rejected_key, m.system_key, m.prompt_format)
    out, problems = Parsed(), []
    if len(m.responses) == 1:
        listed = _listed_responses(record, m, loc, problems, text_cells)
        responses, scores = listed if listed else ({}, None)
        if listed and len(responses) < 2:  # a ranking of one answer (some sets hold a few) has no pair
            prompt_problems: list[Issue] = []
            _prompt_and_texts(record, loc, prompt_problems, responses, [], m.prompt_key, m.system_key, m.prompt_format)
            out.problems, out.dropped = prompt_problems, Counter() if prompt_problems else Counter({TOO_FEW: 1})
            return out
    else:
        responses, scores = {k: _response(record.get(k), k, loc, problems) for k in m.responses}, None
    preference = _preference(record, m, list(responses), loc, problems, text_cells, scores) if responses else None
    tie = preference is not None and not preference[0]
    # A tie still has its prompt and responses checked: a broken record is an error, not a tie.
    found = _prompt_and_texts(record, loc, out.problems, responses, problems, m.prompt_key, m.system_key,
                              m.prompt_format, diverged=Counter() if tie else out.dropped)
    if tie and not out.problems:
        out.dropped = Counter(preference[1])
    if found is None or preference is None or tie:
        return out
    prompt, texts = found
    pairs, ties = preference
    out.dropped.update(ties)  # the ties of a ranking: its other pairs are made
    names = list(responses)
    for a, b in pairs:
        if texts[names[a]] == texts[names[b]]:  # two answers with one text carry no preference
            out.dropped[SAME_TEXT] += 1
        else:
            out.rows.append(_pair_row(prompt, texts[names[a]], texts[names[b]], loc))
    return out


def mapping_prompt(record: dict, loc: str, text_cells: bool, mapping: FieldMapping) -> Parsed:
    """``data.field_mapping``'s prompt (or the part its response conversations share) -> a prompt row."""
    m = mapping
    # Response fields that may be whole conversations (not a ranked list of answer objects).
    names = tuple(m.responses) if len(m.responses) > 1 else () if m.responses else (m.chosen_key, m.rejected_key)
    return _keyed_prompt(record, loc, m.prompt_key, names, m.system_key, m.prompt_format)


Parser = Callable[[dict, str, bool, FieldMapping], Parsed]
PARSERS: dict[tuple[str, str], Parser] = {
    ("vertex", "preferences"): vertex_preference, ("vertex", "prompts"): vertex_prompt,
    ("trl", "preferences"): trl_preference, ("trl", "prompts"): trl_prompt,
    ("hh", "preferences"): hh_preference, ("hh", "prompts"): hh_prompt,
    ("mapping", "preferences"): mapping_preference, ("mapping", "prompts"): mapping_prompt,
}
NAMES = {"vertex": "Vertex", "trl": "TRL", "hh": "HH", "mapping": "mapping"}


# ------------------------------------------------------------------------------ detection and advice


def _conversational(record: dict | None) -> bool:
    return isinstance(record, dict) and isinstance(record.get("chosen"), list)


def detect(keys: set[str], role: str, record: dict | None = None) -> str | None:
    """The layout a record with these keys is in (``vertex``, ``trl``, ``hh``), or None. `record` (a
    record, or a columnar source's first one) tells HH transcripts from TRL's implicit-prompt
    conversations, which have the same keys."""
    if role == "preferences":
        if keys & {"candidate_0", "candidate_1", "choice"}:
            return "vertex"
        if "prompt" in keys and keys & {"chosen", "rejected"}:
            return "trl"
        if {"chosen", "rejected"} <= keys:
            return "trl" if _conversational(record) else "hh"
        return None
    if keys & {"input_text", "messages"}:
        return "vertex"
    if "prompt" in keys:
        return "trl"
    if {"chosen", "rejected"} <= keys:
        return "trl" if _conversational(record) else "hh"
    return None


def describe(fmt: str, record: dict | None, mapping: FieldMapping) -> str:
    """What a file was read as, in words, from its layout and its first record."""
    if fmt == "mapping":
        m = mapping
        parts = [f"prompt {m.prompt_key!r}" if m.prompt_key else "prompt = the shared conversation"]
        if m.system_key:
            parts.append(f"system {m.system_key!r}")
        if not m.declarative:
            return f"mapping: {', '.join(parts)}, chosen {m.chosen_key!r}, rejected {m.rejected_key!r}"
        parts.append(f"responses {m.responses}" + (f" ({m.response_key!r} of each)" if len(m.responses) == 1 else ""))
        how = (f"label {m.label_key!r}" if m.label_key else f"scores {m.score_keys}" if m.score_keys else
               f"signed {m.preference_key!r} (< 0: {m.negative_prefers})" if m.preference_key else
               f"rank {m.rank_key!r}, {m.pairs} pairs" if m.rank_key else f"score {m.item_score_key!r}, {m.pairs} pairs")
        return f"mapping: {', '.join(parts)}, {how}"
    if fmt == "trl" and isinstance(record, dict):
        if _conversational(record) and len(record["chosen"]) > 1:
            return ("TRL conversations, prompt checked against their shared turns" if "prompt" in record
                    else "TRL conversations, implicit prompt (their shared turns)")
        if isinstance(record.get("prompt"), list):
            return "TRL conversational"
    if fmt == "vertex" and isinstance(record, dict) and isinstance(record.get("messages"), list) and \
            any(isinstance(m, dict) and "role" in m for m in record["messages"]):
        return "chat messages {role, content}"
    return {"vertex": "Vertex", "trl": "TRL", "hh": "Anthropic HH transcripts"}[fmt]


EXPECTED_KEYS = {
    "preferences": "Vertex {input_text|messages, candidate_0, candidate_1, choice}, TRL {prompt, chosen, "
                   "rejected} or {chosen, rejected} conversations, or HH {chosen, rejected}",
    "prompts": "Vertex {input_text|messages}, TRL {prompt} or HH {chosen, rejected}",
}
KNOWN_KEYS = ("prompt", "chosen", "rejected", "input_text", "messages", "candidate_0", "candidate_1", "choice",
              "context")
FORMAT_KEYS = {"vertex": {"input_text", "messages", "candidate_0", "candidate_1", "choice", "context"},
               "trl": {"prompt", "chosen", "rejected"}, "hh": {"chosen", "rejected"}}


def misspelt_keys(keys: Iterable[str]) -> dict[str, str]:
    """{key: the known key it most likely misspells} for each key that is not a known one but differs from
    one only in case or by a letter or two, while that known key is absent (`Prompt`, `promt`, `candidate0`)."""
    keys = [str(k) for k in keys]
    out = {}
    for key in keys:
        if key in KNOWN_KEYS:
            continue
        lower = key.strip().lower()
        match = [k for k in KNOWN_KEYS if k == lower] or difflib.get_close_matches(lower, KNOWN_KEYS, n=1, cutoff=0.8)
        if match and match[0] not in keys:
            out[key] = match[0]
    return out


def typo_issues(loc: str, typos: dict[str, str]) -> list[Issue]:
    return [Issue(loc, key, f"unknown key {key!r}: did you mean {known!r}? (keys are case-sensitive: rename it)",
                  "misspelt_key") for key, known in typos.items()]


def typo_hint(columns: list[str]) -> str:
    typos = misspelt_keys(columns)
    return "".join(f"; did you mean {known!r} for {key!r}? (names are case-sensitive)" for key, known in typos.items())


def required_columns(fmt: str, role: str, mapping: FieldMapping) -> list[tuple[str, ...]]:
    """Columns a columnar source in `fmt` must have; a tuple lists alternatives."""
    if fmt == "vertex":
        return [("input_text", "messages")] + ([("candidate_0",), ("candidate_1",), ("choice",)]
                                               if role == "preferences" else [])
    if fmt == "hh":
        return [("chosen",), ("rejected",)]
    if fmt == "trl":  # the prompt may be implicit in conversations
        return [("chosen",), ("rejected",)] if role == "preferences" else [("prompt", "chosen")]
    m = mapping
    responses = list(m.responses) or [m.chosen_key, m.rejected_key]
    prompt = [m.prompt_key] if m.prompt_key else []
    if role == "prompts":
        return [tuple(prompt or responses[:1])]
    ways = [m.label_key, m.preference_key, *m.score_keys]
    return [(k,) for k in prompt + responses + [w for w in ways if w]]


# Field names that public sets use, for the mapping a file with unknown keys is shown.
_PROMPTS = ("prompt", "question", "instruction", "history", "context", "input", "query", "conversation", "text")
_SYSTEMS = ("system", "system_prompt")
_TEXTS = ("answer", "response", "text", "completion", "content", "output")
_LABELS = ("label", "labels", "winner", "choice", "preference", "better", "preferred")
_SIGNED = ("overall_preference", "preference_strength")
_PAIR_SUFFIX = re.compile(r"^(.*?)[_\-]?([ab]|[0-9])$", re.IGNORECASE)


def _field_pairs(keys: list[str]) -> list[list[str]]:
    """Fields that differ only in a trailing A/B or number: `human_ref_A`/`human_ref_B`, `response_0`/`response_1`."""
    groups: dict[str, list[str]] = {}
    for key in keys:
        m = _PAIR_SUFFIX.match(key)
        if m and m.group(1):
            groups.setdefault(m.group(1).lower(), []).append(key)
    return [sorted(v) for v in groups.values() if len(v) >= 2]


def mapping_stanza(record: dict) -> str:
    """The `data.field_mapping` to write for a record in a layout no format knows: the fields it guesses
    hold the prompt, the responses and the preference, to check and complete."""
    keys = [str(k) for k in record]
    lower = {k.lower(): k for k in keys}
    lines = ["data:", "  format: mapping", "  field_mapping:"]
    prompt = next((lower[p] for p in _PROMPTS if p in lower), None)
    system = next((lower[s] for s in _SYSTEMS if s in lower), None)
    pairs = _field_pairs(keys)
    texts = [p for p in pairs if all(isinstance(record[k], (str, list)) for k in p)
             and not any(w in p[0].lower() for w in ("score", "_id", "model", "safe", "source", "sha"))]
    responses = next((p for p in texts if any(w in p[0].lower() for w in ("response", "answer", "ref", "completion",
                                                                           "conversation", "output"))),
                     texts[0] if texts else None)
    listed = next((k for k in keys if isinstance(record[k], list) and record[k] and isinstance(record[k][0], dict)
                   and not {"role", "content"} <= set(record[k][0])), None)
    conversations = next((p for p in pairs if all(isinstance(record.get(k), list) for k in p)), None)
    if conversations and not prompt:
        lines.append('    prompt_key: ""               # the conversations share the prompt')
    else:
        lines.append(f"    prompt_key: {prompt or 'FIELD_WITH_THE_PROMPT'}")
    if system:
        lines.append(f"    system_key: {system}")
    if "chosen" in lower and "rejected" in lower and not responses:
        lines += [f"    chosen_key: {lower['chosen']}", f"    rejected_key: {lower['rejected']}"]
        return "\n".join(lines)
    if listed and not responses:
        item = record[listed][0]
        text = next((k for k in item if str(k).lower() in _TEXTS), "TEXT_KEY")
        rank = next((k for k in item if "rank" in str(k).lower()), None)
        score = next((k for k in item if "score" in str(k).lower()), None)
        lines += [f"    responses: [{listed}]", f"    response_key: {text}"]
        lines.append(f"    rank_key: {rank}                 # 1 = best" if rank else
                     f"    item_score_key: {score or 'SCORE_KEY'}   # higher = better")
        return "\n".join(lines)
    names = responses or ["RESPONSE_A", "RESPONSE_B"]
    lines.append(f"    responses: [{', '.join(names)}]")
    signed = next((lower[s] for s in _SIGNED if s in lower), None)
    label = next((k for k in keys if k.lower() in _LABELS or k.lower().endswith("_id") and "response" in k.lower()),
                 None)
    scores = next((p for p in pairs if "score" in p[0].lower() and len(p) == len(names)), None)
    if signed:
        lines += [f"    preference_key: {signed}", f"    negative_prefers: {names[0]}   # check: which one < 0 prefers"]
    elif label:
        lines += [f"    label_key: {label}",
                  f"    label_values: {{VALUE: {names[0]}, VALUE: {names[1]}}}   # what each value means; "
                  f"e.g. {_short(record[label])}; or tie"]
    elif scores:
        lines.append(f"    score_keys: [{', '.join(scores)}]   # higher = better")
    else:
        lines.append("    label_key: FIELD_WITH_THE_LABEL")
    return "\n".join(lines)


def unread_keys(record: dict, fmt: str) -> list[str]:
    """Keys of a record read as `fmt` that look like a prompt or system field the layout does not read
    (Orca's `question` and `system` beside HH-looking `chosen`/`rejected`)."""
    known = FORMAT_KEYS.get(fmt, set())
    return [str(k) for k in record if str(k) not in known and str(k).lower() in _PROMPTS + _SYSTEMS]
