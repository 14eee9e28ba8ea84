"""Writing test records in every file kind the readers support (shared by the data tests)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq


def write_records(path: Path, records: list[dict]) -> Path:
    name = path.name.removesuffix(".gz")
    if name.endswith(".parquet"):
        keys = list(dict.fromkeys(k for r in records for k in r))  # from_pylist takes the first row's keys
        pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in records]), path)
    elif name.endswith(".csv"):
        pd.DataFrame(records).to_csv(path, index=False, compression="infer")
    else:
        text = json.dumps(records) if name.endswith(".json") else "".join(json.dumps(r) + "\n" for r in records)
        path.write_bytes(gzip.compress(text.encode()) if path.name.endswith(".gz") else text.encode())
    return path
