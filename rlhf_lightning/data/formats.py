"""Read preference and prompt files into canonical rows.

Two layers, so that new sources slot in without touching the other:

1. File formats (:func:`iter_records`): JSONL, JSON (one list of objects), Parquet and CSV, the text
   formats optionally gzip-compressed (``.gz``). Each record is numbered: the 1-based line for JSONL,
   the 1-based record number for JSON lists, Parquet and CSV (the CSV header is not counted). A record's
   location is ``"path:number"`` and travels with the row as ``source``.
2. Schemas (:func:`vertex_preference`, :func:`vertex_prompt`): one record -> one canonical row, or the
   list of what is wrong with it. Vertex AI RLHF formats: preferences ``{input_text, candidate_0,
   candidate_1, choice}`` and prompts ``{input_text}``; other fields are ignored.
   (Other schemas such as TRL or HH, field mappings and ``s3://`` paths are later additions: a schema is
   one more parse function, a remote store one more branch in :func:`expand_paths` / :func:`_open`.)

Errors: a problem with one record is an :class:`Issue`; reading goes on, so validation can report every
bad record at once and no valid record is lost. A problem with a whole file (missing, unreadable, not
UTF-8, not the format its name says, a required column absent) raises :class:`DataError`.
"""

from __future__ import annotations

import codecs
import glob
import gzip
import io
import json
import os
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

PREFERENCE_FIELDS = ("input_text", "candidate_0", "candidate_1", "choice")
PROMPT_FIELDS = ("input_text",)
SUFFIXES = ".jsonl, .json, .parquet or .csv (the text formats may end in .gz)"


@dataclass(frozen=True)
class Issue:
    """One problem found in the data: where (``file:line``), which field, what is wrong and how to fix it."""

    location: str
    """``path:line`` of the record (see the module docstring for what the number means), or a split/role
    name for problems of a whole set."""
    field: str
    """The field concerned: as named in the input file for reading problems, the canonical name
    (``prompt``, ``chosen``, ``rejected``) for checks of prepared rows, ``record`` for a whole record,
    ``""`` for a whole set."""
    message: str
    """What is wrong, then how to fix it in parentheses."""

    def __str__(self) -> str:
        return f"{self.location}: {self.field}: {self.message}" if self.field else f"{self.location}: {self.message}"


class DataError(Exception):
    """Input data cannot be used; the message reads ``file:line: field: what is wrong (how to fix)``."""


@dataclass
class ReadResult:
    """What a reader got from a list of paths/globs."""

    rows: list[dict] = field(default_factory=list)
    """Canonical rows of the valid records, in file order."""
    problems: list[Issue] = field(default_factory=list)
    """Every problem of every invalid record (a record may have several)."""
    records: int = 0
    """Records seen, valid or not (blank JSONL lines are not records)."""
    files: list[str] = field(default_factory=list)
    """The files read, after glob expansion."""
    labels: Counter = field(default_factory=Counter)
    """Raw `choice` labels of the valid preference records (empty for prompts): label balance."""

    @property
    def invalid(self) -> int:
        """Records that produced no row."""
        return self.records - len(self.rows)


# ---------------------------------------------------------------------------------------------- files


def expand_paths(patterns: list[str], key: str) -> list[str]:
    """Paths and globs (``**`` recurses) -> existing files, in the given order, each once (a glob that
    also matches an explicitly listed file must not read it twice). `key` names the config field for
    the error messages."""
    files: list[str] = []
    for pattern in patterns:
        if any(c in pattern for c in "*?["):
            matches = [m for m in sorted(glob.glob(pattern, recursive=True)) if os.path.isfile(m)]
            if not matches:
                raise DataError(f"{pattern}: no file matches this pattern (fix the glob in {key}; "
                                f"relative paths start at {os.getcwd()})")
        elif os.path.isdir(pattern):
            raise DataError(f"{pattern}: is a directory (name files, or a glob such as {pattern.rstrip('/')}/*.jsonl, in {key})")
        elif not os.path.isfile(pattern):
            raise DataError(f"{pattern}: file not found (fix the path in {key}; relative paths start at {os.getcwd()})")
        else:
            matches = [pattern]
        files.extend(m for m in matches if m not in files)
    return files


def file_format(path: str) -> str:
    """``jsonl``, ``json``, ``parquet`` or ``csv`` from the file name."""
    name = path.lower()
    gz = name.endswith(".gz")
    name = name.removesuffix(".gz")
    for suffix, fmt in ((".jsonl", "jsonl"), (".json", "json"), (".parquet", "parquet"), (".csv", "csv")):
        if name.endswith(suffix):
            if gz and fmt == "parquet":
                raise DataError(f"{path}: gzip-compressed Parquet is not supported (Parquet compresses "
                                "internally: decompress the file)")
            return fmt
    raise DataError(f"{path}: unknown file type (name it {SUFFIXES})")


def _open(path: str) -> IO[bytes]:
    try:
        return gzip.open(path, "rb") if path.lower().endswith(".gz") else open(path, "rb")
    except OSError as exc:
        raise DataError(f"{path}: cannot open: {exc.strerror or exc} (check the file's permissions)") from None


def _read_bytes(path: str) -> bytes:
    with _open(path) as f:
        try:
            return f.read()
        except (OSError, EOFError) as exc:  # gzip.BadGzipFile is an OSError; a cut-off gzip is an EOFError
            raise DataError(f"{path}: cannot read: {exc} (is it a complete, valid gzip file?)") from None


def _decode(data: bytes, path: str) -> str:
    data = data.removeprefix(codecs.BOM_UTF8)  # some editors write one; it is not part of the data
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 (byte 0x{data[exc.start]:02x}; re-save the file "
                        "as UTF-8)") from None


Record = Any
"""A parsed record: normally a dict; anything else (a list, a number...) is reported by the schema.
JSONL lines that cannot be parsed are yielded as an :class:`Issue` instead, so reading goes on."""


def iter_records(path: str, fmt: str, columns: tuple[str, ...]) -> Iterator[tuple[int, Record | Issue]]:
    """(number, record) for every record of one file. `columns` are the fields the schema needs: a
    columnar file (Parquet, CSV) without one of them is a file-level error, and only they are loaded."""
    if fmt == "jsonl":
        yield from _jsonl_records(path)
    elif fmt == "json":
        yield from enumerate(_json_list(path), 1)
    elif fmt == "parquet":
        yield from enumerate(_parquet_records(path, columns), 1)
    elif fmt == "csv":
        yield from enumerate(_csv_records(path, columns), 1)
    else:
        raise ValueError(f"unknown format {fmt!r}")


def _jsonl_records(path: str) -> Iterator[tuple[int, dict | Issue]]:
    lineno = 0
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
                                                       f"{exc.start + 1}; re-save the file as UTF-8)")
                    continue
                if not text.strip():
                    continue  # blank lines separate nothing in JSONL and are not records
                try:
                    yield lineno, json.loads(text)
                except json.JSONDecodeError as exc:
                    yield lineno, Issue(loc, "record", f"malformed JSON: {exc.msg} at column {exc.colno} "
                                                       "(each line must be one complete JSON object)")
        except (OSError, EOFError) as exc:  # corrupt or cut-off gzip stream
            raise DataError(f"{path}:{lineno + 1}: cannot read: {exc} (is it a complete, valid gzip file?)") from None


def _json_list(path: str) -> list:
    text = _decode(_read_bytes(path), path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: malformed JSON: {exc.msg} at column {exc.colno} (a .json file "
                        "holds one JSON list of objects; name one-object-per-line files .jsonl)") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of objects, got a {type(data).__name__} (put the "
                        "records in a list, or write one object per line in a .jsonl file)")
    return data


def _require_columns(path: str, found: list[str], columns: tuple[str, ...]) -> None:
    missing = [c for c in columns if c not in found]
    if missing:
        raise DataError(f"{path}: column(s) {missing} missing; found {found} (rename the columns to "
                        f"{list(columns)})")


def _parquet_records(path: str, columns: tuple[str, ...]) -> list[dict]:
    try:
        schema = pq.read_schema(path)
        _require_columns(path, schema.names, columns)
        table = pq.read_table(path, columns=list(columns))
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: not a readable Parquet file: {exc} (check that it is complete and "
                        "really Parquet)") from None
    return table.to_pylist()


def _csv_records(path: str, columns: tuple[str, ...]) -> list[dict]:
    # Decoded here rather than by pandas: our decoder reports the exact line of a bad byte.
    text = _decode(_read_bytes(path), path)
    try:
        # Every cell as text, no NA guessing: pandas would otherwise turn the text "NA", "null" or
        # "None" into missing values and "007" into 7, silently changing the data.
        df = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False, na_filter=False)
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: empty CSV file (expected a header row naming the columns {list(columns)})") from None
    except pd.errors.ParserError as exc:
        raise DataError(f"{path}: malformed CSV: {exc} (quote fields that contain commas, quotes or "
                        "newlines)") from None
    _require_columns(path, list(df.columns), columns)
    return df[list(columns)].to_dict("records")


# -------------------------------------------------------------------------------------------- schemas

Parsed = tuple[dict | None, list[Issue], int | None]
"""(canonical row or None, problems, raw preference label or None)."""


def _text(record: dict, name: str, loc: str, problems: list[Issue]) -> str | None:
    value = record.get(name)
    if value is None:
        problems.append(Issue(loc, name, "missing (every record needs it; null counts as missing)"))
        return None
    if not isinstance(value, str):
        problems.append(Issue(loc, name, f"expected a string, got {type(value).__name__} {_short(value)} "
                                         "(write the text as a string)"))
        return None
    return value


def _choice(record: dict, loc: str, text_cells: bool, problems: list[Issue]) -> int | None:
    value = record.get("choice")
    if value is None:
        problems.append(Issue(loc, "choice", "missing (0 if candidate_0 is preferred, 1 if candidate_1)"))
        return None
    if text_cells and isinstance(value, str) and value.strip() in ("0", "1"):
        return int(value)  # CSV cells are text
    # `type(...) is int`: bool is a subclass of int, and True is not a label.
    if type(value) is int and value in (0, 1):
        return value
    problems.append(Issue(loc, "choice", f"expected the integer 0 or 1, got {_short(value)} (0 if candidate_0 "
                                         "is preferred, 1 if candidate_1)"))
    return None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _not_an_object(record: Any, loc: str, fields: tuple[str, ...]) -> list[Issue]:
    return [Issue(loc, "record", f"expected an object with fields {list(fields)}, got a {type(record).__name__}")]


def vertex_preference(record: Record, loc: str, text_cells: bool) -> Parsed:
    """``{input_text, candidate_0, candidate_1, choice}`` -> ``{prompt, chosen, rejected, source}``.
    `text_cells`: the file stores every value as text (CSV), so ``"0"``/``"1"`` are labels."""
    if not isinstance(record, dict):
        return None, _not_an_object(record, loc, PREFERENCE_FIELDS), None
    problems: list[Issue] = []
    prompt = _text(record, "input_text", loc, problems)
    c0 = _text(record, "candidate_0", loc, problems)
    c1 = _text(record, "candidate_1", loc, problems)
    choice = _choice(record, loc, text_cells, problems)
    if problems:
        return None, problems, None
    chosen, rejected = (c0, c1) if choice == 0 else (c1, c0)
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "source": loc}, [], choice


def vertex_prompt(record: Record, loc: str, text_cells: bool) -> Parsed:
    """``{input_text}`` -> ``{prompt, source}``. Other fields are ignored, so a preference file also
    serves as a prompt file."""
    if not isinstance(record, dict):
        return None, _not_an_object(record, loc, PROMPT_FIELDS), None
    problems: list[Issue] = []
    prompt = _text(record, "input_text", loc, problems)
    if problems:
        return None, problems, None
    return {"prompt": prompt, "source": loc}, [], None


# -------------------------------------------------------------------------------------------- readers


def read(patterns: list[str], key: str, columns: tuple[str, ...],
         parse: Callable[[Record, str, bool], Parsed]) -> ReadResult:
    """Read every file matched by `patterns` with the schema `parse`; collect rows and problems."""
    result = ReadResult(files=expand_paths(patterns, key))
    for path in result.files:
        fmt = file_format(path)
        for number, record in iter_records(path, fmt, columns):
            result.records += 1
            if isinstance(record, Issue):
                result.problems.append(record)
                continue
            row, problems, label = parse(record, f"{path}:{number}", fmt == "csv")
            result.problems.extend(problems)
            if row is not None:
                result.rows.append(row)
            if label is not None:
                result.labels[label] += 1
    return result


def read_preferences(patterns: list[str], key: str = "data.preferences") -> ReadResult:
    """Vertex preference files -> preference rows ``{prompt, chosen, rejected, source}``."""
    return read(patterns, key, PREFERENCE_FIELDS, vertex_preference)


def read_prompts(patterns: list[str], key: str = "data.prompts") -> ReadResult:
    """Vertex prompt files (or preference files: only ``input_text`` is read) -> ``{prompt, source}``."""
    return read(patterns, key, PROMPT_FIELDS, vertex_prompt)
