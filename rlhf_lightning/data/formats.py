"""Read preference and prompt sources into canonical rows.

Three layers, so that new sources slot in without touching the others:

1. Sources (:func:`read`, :func:`_open`): local paths and globs, ``s3://bucket/key`` (globs in
   the key; read through boto3, which honours ``AWS_ENDPOINT_URL``) and Hugging Face datasets
   ``hf:ID[@DATA_DIR][:SPLIT]`` (read with ``datasets.load_dataset``; needs hub access).
2. File formats (:func:`iter_records`): JSONL, JSON (one list of objects), Parquet and CSV, the text
   formats optionally gzip-compressed (``.gz``). Each record is numbered: the 1-based line for JSONL,
   the 1-based record number for JSON lists, Parquet, CSV (the header is not counted) and HF datasets.
   A record's location is ``"path:number"`` and travels with the row as ``source``.
3. Schemas (:data:`PARSERS`): one record -> one canonical row, or the list of what is wrong with it.

   - ``vertex``: preferences ``{input_text | messages, candidate_0, candidate_1, choice}``, prompts
     ``{input_text | messages}``; ``messages`` is a list of ``{author: user|model, content}`` or, as
     OpenAI's chat format writes it, ``{role: system|user|assistant, content}``; an optional
     ``context`` becomes a system message.
   - ``trl``: ``{prompt, chosen, rejected}``, each text or (conversational) a list of ``{role, content}``
     (``chosen``/``rejected``: one assistant message); prompts ``{prompt}``.
   - ``hh``: Anthropic HH ``{chosen, rejected}``, whole transcripts of ``"\\n\\nHuman:"`` /
     ``"\\n\\nAssistant:"`` turns. The prompt is the shared part up to the last ``"\\n\\nAssistant:"``
     both share; a response that still holds turn markers means the transcripts part earlier, so the
     two responses answer different conversations: an error. As a prompt source only the prompt is used.
   - ``mapping``: ``trl`` under the field names of ``data.field_mapping``.
   - ``auto``: each record's format is detected from its keys (:func:`detect`); a file holds one format,
     the one of its first recognisable record, and a record of another format is an error.

Canonical rows: preferences ``{prompt, chosen, rejected, source, messages}``, prompts ``{prompt, source,
messages}``. ``messages`` is the prompt conversation (``[{role: system|user|assistant, content}]``, last
turn from the user) when it is more than one user message, else ``None``; ``prompt`` is then the
conversation flattened to readable text (``User: ...\\n\\nAssistant: ...``) for the reward model, while the
policy's chat template renders the turns themselves.

Errors: a problem with one record is an :class:`Issue`; reading goes on, so validation reports every bad
record at once and no valid record is lost. A problem with a whole source (missing, unreadable, empty,
not UTF-8, not the format its name says, required columns absent) is an :class:`Issue` too, located at the
file (and line where known): the other sources are still read.
"""

from __future__ import annotations

import codecs
import csv
import difflib
import fnmatch
import glob
import gzip
import io
import json
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from rlhf_lightning.cache import s3_client, s3_split
from rlhf_lightning.config import FieldMapping

SUFFIXES = ".jsonl, .json, .parquet or .csv (the text formats may end in .gz)"
ROLES = ("system", "user", "assistant")
VERTEX_AUTHORS = {"user": "user", "model": "assistant"}
SPEAKERS = {"system": "System", "user": "User", "assistant": "Assistant"}
HH_ASSISTANT = "\n\nAssistant:"
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


@dataclass(frozen=True)
class Issue:
    """One problem found in the data: where (``file:line``), which field, what is wrong and how to fix it."""

    location: str
    """``path:line`` of the record (see the module docstring for what the number means), a path for
    problems of a whole file, or a split/role name for problems of a whole set."""
    field: str
    """The field concerned: as named in the input file for reading problems, the canonical name
    (``prompt``, ``chosen``, ``rejected``) for checks of prepared rows, ``record`` for a whole record,
    ``""`` for a whole file or set."""
    message: str
    """What is wrong, then how to fix it in parentheses."""
    kind: str = ""
    """A short name of the problem (``malformed_json``, ``missing_field``, ``tie``...) for counting."""

    def __str__(self) -> str:
        return f"{self.location}: {self.field}: {self.message}" if self.field else f"{self.location}: {self.message}"


class DataError(Exception):
    """A whole source cannot be used; the message reads ``file[:line]: what is wrong (how to fix)``."""

    def __init__(self, message: str, location: str = "", kind: str = "file"):
        super().__init__(f"{location}: {message}" if location else message)
        self.issue = Issue(location, "", message, kind)


@dataclass
class ReadResult:
    """What a reader got from a list of sources."""

    rows: list[dict] = field(default_factory=list)
    """Canonical rows of the valid records, in file order."""
    problems: list[Issue] = field(default_factory=list)
    """Every problem of every invalid record (a record may have several) and of every unusable file."""
    records: int = 0
    """Records seen, valid or not (blank JSONL lines are not records)."""
    files: list[str] = field(default_factory=list)
    """The sources read, after glob expansion."""
    labels: Counter = field(default_factory=Counter)
    """Raw `choice` labels of the valid Vertex preference records: label balance."""
    formats: dict[str, dict[str, int]] = field(default_factory=dict)
    """Per file: records read per detected format (``none`` = matched no format)."""

    @property
    def invalid(self) -> int:
        """Records that produced no row."""
        return self.records - len(self.rows)


# -------------------------------------------------------------------------------------------- sources


def _s3_call(url: str, what: str, call: Callable[[], Any]) -> Any:
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return call()
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        if code in ("404", "NoSuchKey", "NoSuchBucket", "NotFound"):
            raise DataError(f"not found on S3 ({code}; check the bucket and key)", url) from None
        raise DataError(f"cannot {what}: {exc} (check the credentials and permissions)", url) from None
    except BotoCoreError as exc:
        raise DataError(f"cannot {what}: {exc} (check AWS_ENDPOINT_URL, the network and the credentials)",
                        url) from None


def _expand_s3(pattern: str, key: str) -> list[str]:
    bucket, path = s3_split(pattern)
    client = s3_client()
    if not any(c in path for c in "*?["):
        _s3_call(pattern, "read", lambda: client.head_object(Bucket=bucket, Key=path))
        return [pattern]
    prefix = re.split(r"[*?\[]", path, maxsplit=1)[0]
    pages = _s3_call(pattern, "list", lambda: list(
        client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)))
    keys = sorted(o["Key"] for page in pages for o in page.get("Contents", []))
    matches = [f"s3://{bucket}/{k}" for k in keys if fnmatch.fnmatchcase(k, path)]
    if not matches:
        raise DataError(f"no object matches this pattern (fix the glob in {key})", pattern)
    return matches


def _expand_one(pattern: str, key: str) -> list[str]:
    if pattern.startswith("hf:"):
        return [pattern]
    if pattern.startswith("s3://"):
        return _expand_s3(pattern, key)
    if any(c in pattern for c in "*?["):
        matches = [m for m in sorted(glob.glob(pattern, recursive=True)) if os.path.isfile(m)]
        if not matches:
            raise DataError(f"no file matches this pattern (fix the glob in {key}; relative paths start at "
                            f"{os.getcwd()})", pattern)
        return matches
    if os.path.isdir(pattern):
        raise DataError(f"is a directory (name files, or a glob such as {pattern.rstrip('/')}/*.jsonl, in {key})",
                        pattern)
    if not os.path.isfile(pattern):
        raise DataError(f"file not found (fix the path in {key}; relative paths start at {os.getcwd()})", pattern)
    return [pattern]


def file_format(path: str) -> str:
    """``jsonl``, ``json``, ``parquet``, ``csv`` from the file name, or ``hf`` for a dataset id."""
    if path.startswith("hf:"):
        return "hf"
    name = path.lower()
    gz = name.endswith(".gz")
    name = name.removesuffix(".gz")
    for suffix, fmt in ((".jsonl", "jsonl"), (".json", "json"), (".parquet", "parquet"), (".csv", "csv")):
        if name.endswith(suffix):
            if gz and fmt == "parquet":
                raise DataError("gzip-compressed Parquet is not supported (Parquet compresses internally: "
                                "decompress the file)", path)
            return fmt
    raise DataError(f"unknown file type (name it {SUFFIXES})", path)


def _open(path: str) -> IO[bytes]:
    """The file's bytes, decompressed when its name ends in .gz; local files stream, S3 objects are
    fetched whole."""
    if path.startswith("s3://"):
        bucket, key = s3_split(path)
        client = s3_client()
        body = _s3_call(path, "read", lambda: client.get_object(Bucket=bucket, Key=key)["Body"].read())
        raw: IO[bytes] = io.BytesIO(body)
    else:
        try:
            raw = open(path, "rb")
        except OSError as exc:
            raise DataError(f"cannot open: {exc.strerror or exc} (check the file's permissions)", path) from None
    return gzip.GzipFile(fileobj=raw, mode="rb") if path.lower().endswith(".gz") else raw


def _read_bytes(path: str) -> bytes:
    with _open(path) as f:
        try:
            return f.read()
        except (OSError, EOFError) as exc:  # gzip.BadGzipFile is an OSError; a cut-off gzip is an EOFError
            raise DataError(f"cannot read: {exc} (is it a complete, valid gzip file?)", path) from None


def _decode(data: bytes) -> str:
    """UTF-8 text; an invalid byte survives as a lone surrogate (``surrogateescape``), so that only the
    record holding it is reported (:func:`_undecodable`) and the file's other records are still read."""
    return data.removeprefix(codecs.BOM_UTF8).decode("utf-8", errors="surrogateescape")  # BOM: not data


_ESCAPED = re.compile("[\udc80-\udcff]")


def _undecodable(record: Any, name: str = "record") -> tuple[str, int] | None:
    """(field, byte) of the first invalid UTF-8 byte kept by :func:`_decode` in a record, or None."""
    if isinstance(record, str):
        m = _ESCAPED.search(record)
        return None if m is None else (name, ord(m.group()) - 0xDC00)
    items = record.items() if isinstance(record, dict) else enumerate(record) if isinstance(record, list) else ()
    for key, value in items:
        where = f"{name}[{key}]" if isinstance(record, list) else key if name == "record" else f"{name}.{key}"
        found = _undecodable(str(key), where) or _undecodable(value, where)
        if found:
            return found
    return None


Record = Any
"""A parsed record: normally a dict; anything else (a list, a number...) is reported by the schema.
JSONL lines that cannot be parsed are yielded as an :class:`Issue` instead, so reading goes on."""


def iter_records(path: str, fmt: str) -> tuple[list[str] | None, Iterator[tuple[int, Record | Issue]]]:
    """(column names of a columnar source or None, iterator of (number, record)) for one source."""
    if fmt == "jsonl":
        return None, _jsonl_records(path)
    if fmt == "json":
        return None, enumerate(_json_list(path), 1)
    if fmt == "parquet":
        return _columns(_parquet_table(path))
    if fmt == "csv":
        return _columns(_csv_frame(path))
    if fmt == "hf":
        return _columns(_hf_dataset(path))
    raise ValueError(f"unknown format {fmt!r}")


def _columns(data: pa.Table | pd.DataFrame) -> tuple[list[str], Iterator[tuple[int, dict]]]:
    if isinstance(data, pa.Table):
        return data.column_names, enumerate(data.to_pylist(), 1)
    return [str(c) for c in data.columns], enumerate(data.to_dict("records"), 1)


def _jsonl_records(path: str) -> Iterator[tuple[int, dict | Issue]]:
    lineno, seen = 0, False  # seen: a non-blank line was read
    with _open(path) as f:
        try:
            # Line by line: a bad line is one Issue, not the end of the file, and big files stream.
            for lineno, raw in enumerate(f, 1):
                if lineno == 1:
                    raw = raw.removeprefix(codecs.BOM_UTF8)
                loc = f"{path}:{lineno}"
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    yield lineno, Issue(loc, "record", f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column "
                                                       f"{exc.start + 1}; re-save the file as UTF-8)", "not_utf8")
                    continue
                text = text.rstrip("\r\n")  # so a column in an error counts on this line
                if not text.strip():
                    continue  # blank lines separate nothing in JSONL and are not records
                if text.lstrip().startswith("[") and not seen:
                    # One error for the file, not one "malformed JSON" per line of a pretty-printed array.
                    raise DataError("starts with '[': one JSON array, not JSON Lines (rename the file to .json, "
                                    "or write one JSON object per line)", loc, "json_array_in_jsonl")
                seen = True
                try:
                    yield lineno, json.loads(text)
                except json.JSONDecodeError as exc:
                    yield lineno, Issue(loc, "record", f"malformed JSON: {exc.msg} at column {exc.colno} of a "
                                                       f"{len(text)}-character line (each line must be one "
                                                       "complete JSON object)", "malformed_json")
        except (OSError, EOFError) as exc:  # corrupt or cut-off gzip stream
            raise DataError(f"cannot read: {exc} (is it a complete, valid gzip file?)", f"{path}:{lineno + 1}") from None


def _json_list(path: str) -> list:
    text = _decode(_read_bytes(path))
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"malformed JSON: {exc.msg} at column {exc.colno} (a .json file holds one JSON list of "
                        "objects; name one-object-per-line files .jsonl)", f"{path}:{exc.lineno}",
                        "malformed_json") from None
    if not isinstance(data, list):
        raise DataError(f"expected a JSON list of objects, got a {type(data).__name__} (put the records in a "
                        "list, or write one object per line in a .jsonl file)", path)
    return data


def _parquet_table(path: str) -> pa.Table:
    try:
        with _open(path) as f:
            return pq.read_table(f)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"not a readable Parquet file: {exc} (check that it is complete and really Parquet)",
                        path) from None


CSV_DELIMITERS = (",", ";", "\t", "|")


def csv_delimiter(header: str) -> str:
    """The delimiter of a CSV file, from its header row: the candidate that splits it into the most
    columns (a comma on ties). Spreadsheets in many locales save with ';', and a ';' file read with ','
    is one column whose name is the whole header."""
    counts = {d: len(next(csv.reader([header], delimiter=d), [])) for d in CSV_DELIMITERS}
    return max(CSV_DELIMITERS, key=lambda d: (counts[d], d == ","))


def _csv_frame(path: str) -> pd.DataFrame:
    data = _read_bytes(path).removeprefix(codecs.BOM_UTF8)
    header = data[:65536].split(b"\n", 1)[0].decode("utf-8", "replace").rstrip("\r")
    try:
        # Every cell as text, no NA guessing: pandas would otherwise turn the text "NA", "null" or
        # "None" into missing values and "007" into 7, silently changing the data. Bad bytes survive
        # as in _decode, so that only their record is reported; dtype=object keeps them plain Python
        # strings (pandas' Arrow-backed strings reject them).
        return pd.read_csv(io.BytesIO(data), sep=csv_delimiter(header), dtype=object, keep_default_na=False,
                           na_filter=False, encoding="utf-8", encoding_errors="surrogateescape")
    except pd.errors.EmptyDataError:
        raise DataError("empty CSV file (expected a header row naming the columns, then one row per record)",
                        path, "empty_file") from None
    except pd.errors.ParserError as exc:
        raise DataError(f"malformed CSV: {exc} (quote fields that contain commas, quotes or newlines)",
                        path, "malformed_csv") from None


def parse_hf_id(source: str) -> tuple[str, str | None, str]:
    """``hf:ID[@DATA_DIR][:SPLIT]`` -> (dataset id, data_dir or None, split; default ``train``)."""
    spec = source.removeprefix("hf:")
    spec, _, split = spec.partition(":")
    name, _, data_dir = spec.partition("@")
    return name, data_dir or None, split or "train"


def _hf_dataset(source: str) -> pa.Table:
    import datasets

    name, data_dir, split = parse_hf_id(source)
    try:
        ds = datasets.load_dataset(name, data_dir=data_dir, split=split)
    except (OSError, ValueError, datasets.exceptions.DatasetNotFoundError) as exc:
        # Offline (HF_HUB_OFFLINE=1), an unknown id or split all land here.
        raise DataError(f"cannot load the Hugging Face dataset: {exc} (check the id, data dir and split, and "
                        "that the hub is reachable: HF_HUB_OFFLINE must not be 1)", source) from None
    return ds.data.table


# -------------------------------------------------------------------------------------------- schemas

Parsed = tuple[dict | None, list[Issue], int | None]
"""(canonical row or None, problems, raw Vertex `choice` label or None)."""


def detect(keys: set[str], role: str) -> str | None:
    """The format a record with these keys is in (``vertex``, ``trl``, ``hh``), or None."""
    if role == "preferences":
        if keys & {"candidate_0", "candidate_1", "choice"}:
            return "vertex"
        if "prompt" in keys and keys & {"chosen", "rejected"}:
            return "trl"
        if {"chosen", "rejected"} <= keys:
            return "hh"
        return None
    if keys & {"input_text", "messages"}:
        return "vertex"
    if "prompt" in keys:
        return "trl"
    if {"chosen", "rejected"} <= keys:
        return "hh"
    return None


EXPECTED_KEYS = {
    "preferences": "Vertex {input_text|messages, candidate_0, candidate_1, choice}, TRL {prompt, chosen, "
                   "rejected} or HH {chosen, rejected}",
    "prompts": "Vertex {input_text|messages}, TRL {prompt} or HH {chosen, rejected}",
}


KNOWN_KEYS = ("prompt", "chosen", "rejected", "input_text", "messages", "candidate_0", "candidate_1", "choice",
              "context")


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


def _typo_issues(loc: str, typos: dict[str, str]) -> list[Issue]:
    return [Issue(loc, key, f"unknown key {key!r}: did you mean {known!r}? (keys are case-sensitive: rename it)",
                  "misspelt_key") for key, known in typos.items()]


def _typo_hint(columns: list[str]) -> str:
    typos = misspelt_keys(columns)
    return "".join(f"; did you mean {known!r} for {key!r}? (names are case-sensitive)" for key, known in typos.items())


def required_columns(fmt: str, role: str, mapping: FieldMapping) -> list[tuple[str, ...]]:
    """Columns a columnar source in `fmt` must have; a tuple lists alternatives."""
    if fmt == "vertex":
        return [("input_text", "messages")] + ([("candidate_0",), ("candidate_1",), ("choice",)]
                                               if role == "preferences" else [])
    if fmt == "hh":
        return [("chosen",), ("rejected",)]
    keys = ("prompt", "chosen", "rejected") if fmt == "trl" else \
        (mapping.prompt_key, mapping.chosen_key, mapping.rejected_key)
    return [(k,) for k in (keys if role == "preferences" else keys[:1])]


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
        if role not in roles:
            problems.append(Issue(loc, f"{where}.{role_key}", f"invalid role {_short(role)} (use one of "
                                                              f"{sorted(roles)})", "invalid_role"))
        if not isinstance(content, str):
            problems.append(Issue(loc, f"{where}.content", f"expected a string, got {_short(content)}", "wrong_type"))
        if len(problems) == n:
            out.append({"role": roles[role], "content": content})
    return out if len(problems) == n else None


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
                  roles: dict[str, str] | None = None) -> list[dict] | None:
    """Text or conversation under `name` -> prompt conversation."""
    value = record.get(name)
    if value is None:
        problems.append(_missing(loc, name, "the prompt, as text or a list of messages"))
        return None
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    messages = _messages(value, name, loc, problems, role_key, roles or {r: r for r in ROLES})
    if messages is not None and _check_conversation(messages, name, loc, problems):
        return messages
    return None


def _response_value(record: dict, name: str, loc: str, problems: list[Issue]) -> str | None:
    """Text, or (TRL conversational) a list of exactly one assistant message."""
    value = record.get(name)
    if not isinstance(value, list):
        return _text(record, name, loc, problems, "the response, as text or [{role: assistant, content}]")
    messages = _messages(value, name, loc, problems, "role", {r: r for r in ROLES})
    if messages is None:
        return None
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        problems.append(Issue(loc, name, f"expected one assistant message, got roles {[m['role'] for m in messages]} "
                                         "(put earlier turns in the prompt)", "invalid_role"))
        return None
    return messages[0]["content"]


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


def _vertex_prompt_messages(record: dict, loc: str, problems: list[Issue]) -> list[dict] | None:
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
                                                                       ("author", VERTEX_AUTHORS)))
    else:
        text = _text(record, "input_text", loc, problems, "input_text (or messages) holds the prompt")
        messages = None if text is None else [{"role": "user", "content": text}]
    context = record.get("context")
    if context is not None and not isinstance(context, str):
        problems.append(Issue(loc, "context", f"expected a string, got {_short(context)}", "wrong_type"))
    if len(problems) > n or messages is None:
        return None
    return ([{"role": "system", "content": context}] if context and context.strip() else []) + messages


def _not_an_object(record: Any, loc: str) -> Parsed:
    return None, [Issue(loc, "record", f"expected an object, got a {type(record).__name__} {_short(record)}",
                        "wrong_type")], None


def vertex_preference(record: dict, loc: str, text_cells: bool, mapping: FieldMapping) -> Parsed:
    """``{input_text | messages, candidate_0, candidate_1, choice}`` -> a preference row.
    `text_cells`: the file stores every value as text (CSV), so ``"0"``/``"1"`` are labels."""
    problems: list[Issue] = []
    messages = _vertex_prompt_messages(record, loc, problems)
    c0 = _text(record, "candidate_0", loc, problems)
    c1 = _text(record, "candidate_1", loc, problems)
    choice = _choice(record, loc, text_cells, problems)
    if problems:
        return None, problems, None
    chosen, rejected = (c0, c1) if choice == 0 else (c1, c0)
    return {**prompt_fields(messages), "chosen": chosen, "rejected": rejected, "source": loc}, [], choice


def vertex_prompt(record: dict, loc: str, text_cells: bool, mapping: FieldMapping) -> Parsed:
    """``{input_text | messages}`` -> a prompt row. Other fields are ignored, so a preference file also
    serves as a prompt file."""
    problems: list[Issue] = []
    messages = _vertex_prompt_messages(record, loc, problems)
    return (None if problems else {**prompt_fields(messages), "source": loc}), problems, None


def _keyed_preference(record: dict, loc: str, keys: tuple[str, str, str]) -> Parsed:
    problems: list[Issue] = []
    messages = _prompt_value(record, keys[0], loc, problems)
    chosen = _response_value(record, keys[1], loc, problems)
    rejected = _response_value(record, keys[2], loc, problems)
    if problems:
        return None, problems, None
    return {**prompt_fields(messages), "chosen": chosen, "rejected": rejected, "source": loc}, [], None


def _keyed_prompt(record: dict, loc: str, key: str) -> Parsed:
    problems: list[Issue] = []
    messages = _prompt_value(record, key, loc, problems)
    return (None if problems else {**prompt_fields(messages), "source": loc}), problems, None


def trl_preference(record: dict, loc: str, text_cells: bool, mapping: FieldMapping) -> Parsed:
    """``{prompt, chosen, rejected}``, text or conversational -> a preference row."""
    return _keyed_preference(record, loc, ("prompt", "chosen", "rejected"))


def trl_prompt(record: dict, loc: str, text_cells: bool, mapping: FieldMapping) -> Parsed:
    """``{prompt}`` -> a prompt row."""
    return _keyed_prompt(record, loc, "prompt")


def mapping_preference(record: dict, loc: str, text_cells: bool, mapping: FieldMapping) -> Parsed:
    """``data.field_mapping``'s fields -> a preference row (values as in TRL)."""
    return _keyed_preference(record, loc, (mapping.prompt_key, mapping.chosen_key, mapping.rejected_key))


def mapping_prompt(record: dict, loc: str, text_cells: bool, mapping: FieldMapping) -> Parsed:
    return _keyed_prompt(record, loc, mapping.prompt_key)


def hh_turns(transcript: str) -> list[dict]:
    """``"\\n\\nHuman: a\\n\\nAssistant: b"`` -> ``[{user, a}, {assistant, b}]`` (text before the first
    marker, if any, is not a turn and is returned as a leading user turn only when not blank)."""
    parts = _HH_TURN.split(transcript)
    turns = [{"role": "user", "content": parts[0].strip()}] if parts[0].strip() else []
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
    if not head.strip():
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
        return None, problems, None
    turns, chosen, rejected = split
    return {**prompt_fields(turns), "chosen": chosen, "rejected": rejected, "source": loc}, [], None


def hh_prompt(record: dict, loc: str, text_cells: bool, mapping: FieldMapping) -> Parsed:
    """``{chosen, rejected}`` transcripts -> the prompt row of their shared conversation."""
    problems: list[Issue] = []
    split = _hh_fields(record, loc, problems)
    return (None if split is None else {**prompt_fields(split[0]), "source": loc}), problems, None


Parser = Callable[[dict, str, bool, FieldMapping], Parsed]
PARSERS: dict[tuple[str, str], Parser] = {
    ("vertex", "preferences"): vertex_preference, ("vertex", "prompts"): vertex_prompt,
    ("trl", "preferences"): trl_preference, ("trl", "prompts"): trl_prompt,
    ("hh", "preferences"): hh_preference, ("hh", "prompts"): hh_prompt,
    ("mapping", "preferences"): mapping_preference, ("mapping", "prompts"): mapping_prompt,
}
NAMES = {"vertex": "Vertex", "trl": "TRL", "hh": "HH", "mapping": "mapping"}


# -------------------------------------------------------------------------------------------- readers


def _columnar_format(path: str, columns: list[str], fmt: str, role: str, mapping: FieldMapping) -> str:
    """The format of a columnar source, from its columns; a file-level error if columns are missing."""
    if fmt == "auto":
        found = detect(set(columns), role)
        if found is None:
            raise DataError(f"columns {columns} match no known format{_typo_hint(columns)} (expected "
                            f"{EXPECTED_KEYS[role]}; or set data.format: mapping and data.field_mapping)", path,
                            "no_format")
        fmt = found
    missing = [" or ".join(alts) for alts in required_columns(fmt, role, mapping) if not set(alts) & set(columns)]
    if missing:
        raise DataError(f"column(s) {missing} missing for the {NAMES[fmt]} format; found {columns}{_typo_hint(columns)} "
                        "(rename the columns, or set data.format / data.field_mapping)", path, "missing_column")
    return fmt


def _read_file(path: str, role: str, fmt: str, mapping: FieldMapping, result: ReadResult) -> None:
    kind = file_format(path)
    columns, records = iter_records(path, kind)
    file_fmt = _columnar_format(path, columns, fmt, role, mapping) if columns is not None else \
        (None if fmt == "auto" else fmt)
    first_at = 0  # the record that fixed the format of a JSON/JSONL file in auto mode
    counts: Counter = Counter()
    n_before = result.records
    for number, record in records:
        result.records += 1
        loc = f"{path}:{number}"
        if isinstance(record, Issue):
            result.problems.append(record)
            continue
        bad = _undecodable(record)
        if bad:
            result.problems.append(Issue(loc, bad[0], f"not valid UTF-8 (byte 0x{bad[1]:02x}; re-save the file as "
                                                      "UTF-8)", "not_utf8"))
            continue
        if not isinstance(record, dict):
            result.problems.extend(_not_an_object(record, loc)[1])
            continue
        this = file_fmt
        # A misspelt key (`Prompt`) is the likely cause of whatever goes wrong with its record: say that
        # instead of "no known format", "a HH record in a TRL file" or "prompt missing".
        typos = misspelt_keys(record) if fmt != "mapping" else {}
        if columns is None and fmt == "auto":
            this = detect(set(record), role)
            if this is None:
                counts["none"] += 1
                result.problems.extend(_typo_issues(loc, typos) or [
                    Issue(loc, "record", f"keys {sorted(record)} match no known format (expected "
                                         f"{EXPECTED_KEYS[role]}; or set data.format: mapping and "
                                         "data.field_mapping)", "no_format")])
                continue
            if file_fmt is not None and this != file_fmt:
                counts["none" if typos else this] += 1
                result.problems.extend(_typo_issues(loc, typos) or [
                    Issue(loc, "record", f"a {NAMES[this]} record in a file read as {NAMES[file_fmt]} (from record "
                                         f"{first_at}): one format per file (split the file, or convert this "
                                         "record)", "mixed_formats")])
                continue
        row, problems, label = PARSERS[this, role](record, loc, kind in ("csv",), mapping)
        if problems and typos:
            counts["none"] += 1
            result.problems.extend(_typo_issues(loc, typos))
            continue  # nor does it decide the file's format
        if file_fmt is None:
            file_fmt, first_at = this, number
        counts[this] += 1
        result.problems.extend(problems)
        if row is not None:
            result.rows.append(row)
        if label is not None:
            result.labels[label] += 1
    result.formats[path] = dict(counts)
    if result.records == n_before:
        raise DataError("no records (the file is empty; remove it from the configuration or fill it)", path,
                        "empty_file")


def read(patterns: list[str], key: str, role: str, fmt: str = "auto",
         mapping: FieldMapping | None = None) -> ReadResult:
    """Read every source matched by `patterns` as `role` (``preferences`` or ``prompts``) in format `fmt`
    (one of `config.FORMATS`). Problems of whole sources are collected like those of records:
    one unusable file does not hide the problems of the others."""
    mapping = mapping or FieldMapping()
    result = ReadResult()
    for pattern in patterns:
        try:
            matches = _expand_one(pattern, key)
        except DataError as exc:
            result.problems.append(exc.issue)
            continue
        result.files.extend(m for m in matches if m not in result.files)
    for path in result.files:
        try:
            _read_file(path, role, fmt, mapping, result)
        except DataError as exc:
            # A file that fails part-way (a cut-off gzip) keeps the rows read before the failure: they
            # are valid, and the error stops the run anyway.
            result.problems.append(exc.issue)
            result.formats.setdefault(path, {})
    return result


def read_preferences(patterns: list[str], key: str = "data.preferences", fmt: str = "auto",
                     mapping: FieldMapping | None = None) -> ReadResult:
    """Preference sources -> rows ``{prompt, chosen, rejected, source, messages}``."""
    return read(patterns, key, "preferences", fmt, mapping)


def read_prompts(patterns: list[str], key: str = "data.prompts", fmt: str = "auto",
                 mapping: FieldMapping | None = None) -> ReadResult:
    """Prompt sources (preference files work too: only their prompt is read) -> ``{prompt, source, messages}``."""
    return read(patterns, key, "prompts", fmt, mapping)
