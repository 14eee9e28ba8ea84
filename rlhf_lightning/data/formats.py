"""Read preference and prompt sources into canonical rows: :mod:`.readers` yields each source's numbered
records, :mod:`.layouts` turns each record into its pairs (or its prompt), and :func:`read` keeps the
count of everything: records, pairs, what each file was read as, ties dropped, problems.

- ``data.format: auto`` detects each record's layout (a file holds one layout: the one of its first
  recognisable record; a record of another is an error); ``vertex``, ``trl``, ``hh`` or ``mapping``
  (``data.field_mapping``) read every record as that one.
- Errors: a problem with one record is an :class:`Issue`; reading goes on, so validation reports every
  bad record at once and no valid record is lost. A problem with a whole source (missing, unreadable,
  empty, not UTF-8, not the kind its name says, required columns absent) is an :class:`Issue` too,
  located at the file (and line where known): the other sources are still read.
- A file whose records match no layout gets, at its first such record, the ``data.field_mapping``
  stanza to write, with the fields guessed to hold the prompt, the responses and the preference.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from rlhf_lightning.config import FieldMapping
from rlhf_lightning.data.issues import DataError, Issue
from rlhf_lightning.data.layouts import (EXPECTED_KEYS, FORMAT_KEYS, NAMES, PARSERS, describe, detect, flatten, hh_preference,
                                         mapping_stanza, misspelt_keys, not_an_object, prompt_fields,
                                         required_columns, split_hh, typo_hint, typo_issues, unread_keys)
from rlhf_lightning.data.readers import _undecodable, csv_delimiter, expand, file_format, iter_records, parse_hf_id

# Names other modules and scripts use from here.
__all__ = ["DataError", "Issue", "ReadResult", "csv_delimiter", "flatten", "hh_preference", "parse_hf_id",
           "prompt_fields", "read", "read_preferences", "read_prompts", "split_hh"]
_expand_one = expand  # its name here before the readers had a module of their own


@dataclass
class ReadResult:
    """What a reader got from a list of sources."""

    rows: list[dict] = field(default_factory=list)
    """Canonical rows of the valid records, in file order (a record may give several pairs)."""
    problems: list[Issue] = field(default_factory=list)
    """Every problem of every invalid record (a record may have several) and of every unusable file."""
    records: int = 0
    """Records seen, valid or not (blank JSONL lines are not records)."""
    invalid: int = 0
    """Records that had problems and gave no row."""
    files: list[str] = field(default_factory=list)
    """The sources read, after glob expansion."""
    labels: Counter = field(default_factory=Counter)
    """Raw `choice` labels of the valid Vertex preference records: label balance."""
    formats: dict[str, dict[str, int]] = field(default_factory=dict)
    """Per file: records read per detected format (``none`` = matched no format)."""
    dropped: Counter = field(default_factory=Counter)
    """Pairs the records' own preference did not make, by reason (ties: a `tie` label, equal scores or
    ranks, a signed preference of 0; conversations that part before their last turn)."""
    changed: Counter = field(default_factory=Counter)
    """Records whose prompt was changed, by reason (a chat conversation cut back to its last user turn)."""
    layouts: dict[str, dict] = field(default_factory=dict)
    """Per file: ``read_as`` (the layout or mapping, in words), ``records``, ``pairs`` (rows made),
    ``pairs_per_record`` ({pairs: valid records that gave that many}), ``dropped`` and ``changed`` (by
    reason)."""


def _columnar_format(path: str, columns: list[str], fmt: str, role: str, mapping: FieldMapping,
                     first: dict | None = None) -> str:
    """The format of a columnar source, from its columns (and its first record); a file-level error if
    columns are missing."""
    if fmt == "auto":
        found = detect(set(columns), role, first)
        if found is None:
            advice = _mapping_advice(first, None, 0) if first else " (or set data.format: mapping and data.field_mapping)"
            raise DataError(f"columns {columns} match no known format{typo_hint(columns)} (expected "
                            f"{EXPECTED_KEYS[role]}){advice}", path, "no_format")
        fmt = found
    missing = [" or ".join(alts) for alts in required_columns(fmt, role, mapping) if not set(alts) & set(columns)]
    if missing:
        raise DataError(f"column(s) {missing} missing for the {NAMES[fmt]} format; found {columns}{typo_hint(columns)} "
                        "(rename the columns, or set data.format / data.field_mapping)", path, "missing_column")
    return fmt


def _mapping_advice(record: dict, first_at: int | None, number: int) -> str:
    """What to write in the config, said once per file (at `first_at`); later records point there."""
    if first_at is not None and first_at != number:
        return f" (record {first_at} shows the data.field_mapping to write)"
    return (f". Map the fields in the config (configs/data/ has the mappings of public sets: SHP, PKU-SafeRLHF, "
            f"HelpSteer, Nectar, Chatbot Arena, Orca, UltraFeedback); the fields guessed here, to check:\n"
            f"{mapping_stanza(record)}")


def _read_file(path: str, role: str, fmt: str, mapping: FieldMapping, result: ReadResult) -> None:
    kind = file_format(path)
    columns, records = iter_records(path, kind)
    first = records[0][1] if columns is not None and records else None
    file_fmt = _columnar_format(path, columns, fmt, role, mapping, first) if columns is not None else \
        (None if fmt == "auto" else fmt)
    first_at = 0  # the record that fixed the format of a JSON/JSONL file in auto mode
    advised: int | None = None  # the record whose error shows the mapping to write
    counts: Counter = Counter()
    per_record: Counter = Counter()
    dropped: Counter = Counter()
    changed: Counter = Counter()
    layout = {"read_as": describe(file_fmt, first, mapping) if file_fmt else "", "records": 0, "pairs": 0}
    n_before, rows_before = result.records, len(result.rows)
    for number, record in records:
        result.records += 1
        loc = f"{path}:{number}"
        if isinstance(record, Issue):
            result.problems.append(record)
            result.invalid += 1
            continue
        bad = _undecodable(record)
        if bad:
            result.problems.append(Issue(loc, bad[0], f"not valid UTF-8 (byte 0x{bad[1]:02x}; re-save the file as "
                                                      "UTF-8)", "not_utf8"))
            result.invalid += 1
            continue
        if not isinstance(record, dict):
            result.problems.append(not_an_object(record, loc))
            result.invalid += 1
            continue
        this = file_fmt
        # A misspelt key (`Prompt`) is the likely cause of whatever goes wrong with its record: say that
        # instead of "no known format", "a HH record in a TRL file" or "prompt missing".
        typos = misspelt_keys(record) if fmt != "mapping" else {}
        if columns is None and fmt == "auto":
            this = detect(set(record), role, record)
            if this is None:
                counts["none"] += 1
                result.invalid += 1
                if not typos:
                    advice = _mapping_advice(record, advised, number)
                    advised = number if advised is None else advised
                result.problems.extend(typo_issues(loc, typos) or [
                    Issue(loc, "record", f"keys {sorted(record)} match no known format (expected "
                                         f"{EXPECTED_KEYS[role]}){advice}", "no_format")])
                continue
            if file_fmt is not None and this != file_fmt:
                counts["none" if typos else this] += 1
                result.invalid += 1
                result.problems.extend(typo_issues(loc, typos) or [
                    Issue(loc, "record", f"a {NAMES[this]} record in a file read as {NAMES[file_fmt]} (from record "
                                         f"{first_at}): one format per file (split the file, or convert this "
                                         "record)", "mixed_formats")])
                continue
        parsed = PARSERS[this, role](record, loc, kind in ("csv",), mapping)
        if role == "prompts":  # the record's other columns (a reference answer) go on, for reward functions
            extra = extra_columns(record, this, mapping)
            for row in parsed.rows:
                row["extra"] = extra
        if parsed.problems and typos:
            counts["none"] += 1
            result.invalid += 1
            result.problems.extend(typo_issues(loc, typos))
            continue  # nor does it decide the file's format
        if file_fmt is None:
            file_fmt, first_at = this, number
            layout["read_as"] = describe(this, record, mapping)
        counts[this] += 1
        if parsed.problems:
            extra = unread_keys(record, this) if fmt == "auto" else []
            if extra:  # the record half matches a layout: its other keys are what the user must map
                first_problem = parsed.problems[0]
                hint = (f"; the record also has {extra}, which the {NAMES[this]} format does not read (do they hold "
                        f"the prompt?){_mapping_advice(record, advised, number)}")
                advised = number if advised is None else advised
                parsed.problems[0] = Issue(first_problem.location, first_problem.field, first_problem.message + hint,
                                           first_problem.kind)
            result.problems.extend(parsed.problems)
            result.invalid += 1
        else:
            per_record[len(parsed.rows)] += 1
        result.rows.extend(parsed.rows)
        dropped.update(parsed.dropped)
        changed.update(parsed.changed)
        if parsed.label is not None:
            result.labels[parsed.label] += 1
    result.formats[path] = dict(counts)
    result.dropped.update(dropped)
    result.changed.update(changed)
    result.layouts[path] = {**layout, "records": result.records - n_before, "pairs": len(result.rows) - rows_before,
                            "pairs_per_record": dict(sorted(per_record.items())), "dropped": dict(dropped),
                            "changed": dict(changed)}
    if result.records == n_before:
        raise DataError("no records (the file is empty; remove it from the configuration or fill it)", path,
                        "empty_file")


def extra_columns(record: dict, fmt: str, mapping: FieldMapping) -> dict:
    """The fields of a prompt record that its layout does not read: what the prompt row carries on as
    `extra` (a dataset's `answer`, `id`, `tests`, ...), by name."""
    if fmt == "mapping":
        read_keys = {mapping.prompt_key, mapping.system_key, mapping.chosen_key, mapping.rejected_key,
                     mapping.response_key, mapping.label_key, mapping.preference_key, mapping.rank_key,
                     mapping.item_score_key, *mapping.responses, *mapping.score_keys}
    else:
        read_keys = FORMAT_KEYS[fmt]
    return {str(k): v for k, v in record.items() if str(k) not in read_keys}


def read(patterns: list[str], key: str, role: str, fmt: str = "auto",
         mapping: FieldMapping | None = None) -> ReadResult:
    """Read every source matched by `patterns` as `role` (``preferences`` or ``prompts``) in format `fmt`
    (one of `config.FORMATS`). Problems of whole sources are collected like those of records:
    one unusable file does not hide the problems of the others."""
    mapping = mapping or FieldMapping()
    result = ReadResult()
    for pattern in patterns:
        try:
            matches = expand(pattern, key)
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
    """Prompt sources (preference files work too: only their prompt is read) -> ``{prompt, source, messages,
    extra}`` (`extra`: the record's fields its layout does not read, by name)."""
    return read(patterns, key, "prompts", fmt, mapping)
