"""Readers: sources and file kinds -> numbered records, each with its location.

- Sources (:func:`expand`): local paths and globs, ``s3://bucket/key`` (globs in the key; read through
  boto3, which honours ``AWS_ENDPOINT_URL``) and Hugging Face datasets: ``hf:ID[@DATA_DIR][[:CONFIG]:SPLIT]``
  (a hub id through ``datasets.load_dataset``, which reads its local cache when offline) or
  ``hf:DIR[:SPLIT]`` (a directory written by ``save_to_disk``).
- File kinds (:func:`iter_records`): JSONL, JSON (one list of objects), Parquet and CSV, the text kinds
  optionally gzip-compressed (``.gz``). Each record is numbered: the 1-based line for JSONL, the 1-based
  record number for JSON lists, Parquet, CSV (the header is not counted) and HF datasets. A record's
  location is ``"path:number"``.

What a record means (which layout it is in) is :mod:`.layouts`' business; nothing here looks inside one.
"""

from __future__ import annotations

import codecs
import csv
import fnmatch
import glob
import gzip
import io
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator
from typing import IO, Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from rlhf_lightning.cache import s3_client, s3_split
from rlhf_lightning.data.issues import DataError, Issue

SUFFIXES = ".jsonl, .json, .parquet or .csv (the text formats may end in .gz)"


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


def expand(pattern: str, key: str) -> list[str]:
    """The sources one configured pattern names (globs expanded, sorted), or a :class:`DataError`."""
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


def iter_records(path: str, fmt: str) -> tuple[list[str] | None, Iterable[tuple[int, Record | Issue]]]:
    """(column names of a columnar source or None, (number, record) pairs) for one source. A columnar
    source is read whole anyway, so its records come as a list: its first record shows what its
    columns hold (a text or a conversation) before any record is read."""
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


def _columns(data: pa.Table | pd.DataFrame) -> tuple[list[str], list[tuple[int, dict]]]:
    if isinstance(data, pa.Table):
        return data.column_names, list(enumerate(data.to_pylist(), 1))
    return [str(c) for c in data.columns], list(enumerate(data.to_dict("records"), 1))


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
    """``hf:ID[@DATA_DIR][[:CONFIG]:SPLIT]`` -> (dataset id or directory, data_dir or None, split;
    default ``train``; a slice such as ``train[:100]`` included). The config, if any, is
    :func:`hf_config`'s. A directory that ``save_to_disk`` wrote loads with ``load_from_disk``; any
    other (a folder of data files, a cloned hub repository) with ``load_dataset``."""
    name, _, data_dir, split = _hf_parts(source)
    return name, data_dir, split


def hf_config(source: str) -> str | None:
    """The config name of ``hf:ID[@DATA_DIR]:CONFIG:SPLIT`` (two parts after the id), else None."""
    return _hf_parts(source)[1]


_CONFIG_SPLIT = re.compile(r"^([^:\[\]]+):(.+)$")  # CONFIG:SPLIT; a split slice (train[:100]) holds colons


def _hf_parts(source: str) -> tuple[str, str | None, str | None, str]:
    spec, _, after = source.removeprefix("hf:").partition(":")
    m = _CONFIG_SPLIT.match(after)
    config, split = (m.group(1), m.group(2)) if m else (None, after)
    name, _, data_dir = spec.partition("@")
    return name, config or None, data_dir or None, split or "train"


def _saved_to_disk(path: str) -> bool:
    """A directory `save_to_disk` wrote (a Dataset or a DatasetDict), not a folder of data files."""
    return os.path.isfile(os.path.join(path, "dataset_dict.json")) or \
        os.path.isfile(os.path.join(path, "state.json")) and os.path.isfile(os.path.join(path, "dataset_info.json"))


def _hf_dataset(source: str) -> pa.Table:
    import datasets

    name, config, data_dir, split = _hf_parts(source)
    if os.path.isdir(name) and _saved_to_disk(name):  # a Dataset, or a DatasetDict of splits
        try:
            ds = datasets.load_from_disk(name)
        except (OSError, ValueError, FileNotFoundError) as exc:
            raise DataError(f"not a dataset saved with save_to_disk: {exc} (name the directory that "
                            "save_to_disk wrote, or a hub id)", source) from None
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataError(f"no split {split!r} in this saved dataset; it has {sorted(ds)} (name one: "
                                f"hf:{name}:SPLIT)", source) from None
            ds = ds[split]
        return ds.data.table
    try:
        ds = datasets.load_dataset(name, config, data_dir=data_dir, split=split)
    except (OSError, ValueError, datasets.exceptions.DatasetNotFoundError) as exc:
        # Offline (HF_HUB_OFFLINE=1) a dataset that is not in the local cache, an unknown id or split.
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False") or \
            os.environ.get("HF_DATASETS_OFFLINE", "0") not in ("0", "", "false", "False")
        how = ("offline, only datasets in the local datasets cache load: load it once where the hub is reachable, "
               "or save_to_disk it and name the directory, hf:DIR[:SPLIT]") if offline else \
            "check the id, the data dir (after @), the config and the split (after :)"
        raise DataError(f"cannot load the Hugging Face dataset: {_first_line(exc)} ({how})", source) from None
    return ds.data.table


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
