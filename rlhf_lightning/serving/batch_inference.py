"""Batch inference over a JSONL file, with a pyfunc model loaded here or a served endpoint.

  python -m rlhf_lightning infer --model models:/rlhf-policy@champion --input prompts.jsonl --output out.jsonl
  python -m rlhf_lightning infer --endpoint http://127.0.0.1:5001 --input prompts.jsonl --output out.jsonl

Input: one JSON object per line, ``{"prompt": "..."}`` or ``{"messages": [{"role", "content"}, ...]}``,
optionally ``"id"``; other fields are ignored. Output: exactly one JSON line per input line, in input
order: ``{"line": <1-based input line>, "id"?, <the model's answer columns>}`` or ``{"line", "id"?, "error"}``.
A malformed line or a row the model rejects becomes an error row; nothing is skipped.

Resumable: the output's complete lines are the input lines already done; a rerun skips them and appends
(a partial last line from a killed run is cut off first). Each batch is flushed and fsynced, so a kill
loses at most the batch in flight. `--retry-errors` answers the error rows of the output again, from their
input lines as they are now (after fixing them); `--overwrite` starts the output over.
"""

from __future__ import annotations

import fcntl
import http.client
import json
import os
import sys
import urllib.error
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Iterator

from tqdm import tqdm

ERRORS_SHOWN = 5
"""Row errors listed in the summary (all of them are in the output file)."""
_JSON_TYPES = {str: "a string", int: "a number", float: "a number", bool: "a boolean", type(None): "null",
               list: "an array", dict: "an object"}


class UsageError(Exception):
    """Bad arguments, a missing input, an output written by something else, a model that cannot be
    loaded, params the model rejects: nothing to do per row; exit code 2."""


class EndpointUnreachable(Exception):
    """The endpoint did not answer (connection refused, reset, timeout): the run stops; what was
    written stays on disk and a rerun resumes after it."""


class Rejected(Exception):
    """The model (or the server) refused a request; the message is the model's."""


class LocalModel:
    """A pyfunc model loaded in this process: any URI `mlflow.pyfunc.load_model` takes."""

    def __init__(self, uri: str):
        # Imported here: `infer --endpoint` and usage errors should not pay for torch/mlflow imports.
        import mlflow

        self.name = uri
        try:
            self.model = mlflow.pyfunc.load_model(uri)
        except Exception as exc:  # noqa: BLE001 - load can fail in many ways (registry, store, flavor deps)
            raise UsageError(f"cannot load model {uri}: {type(exc).__name__}: {exc}") from None

    def predict(self, records: list[dict], params: dict[str, Any]) -> list[dict]:
        import pandas as pd
        from mlflow.exceptions import MlflowException

        try:
            out = self.model.predict(pd.DataFrame(records), params=params or None)
        except MlflowException as exc:
            raise Rejected(exc.message) from None
        except Exception as exc:  # noqa: BLE001 - a pyfunc's own code may raise anything on a bad row
            raise Rejected(f"{type(exc).__name__}: {exc}") from None
        return _answer_records(out, len(records))


class Endpoint:
    """An MLflow scoring server (`mlflow models serve`): POST /invocations."""

    def __init__(self, url: str, timeout: float = 300.0):
        if not url.startswith(("http://", "https://")):
            raise UsageError(f"--endpoint {url!r}: give a URL such as http://127.0.0.1:5001")
        self.url = url.rstrip("/")
        self.name = self.url
        self.timeout = timeout

    def predict(self, records: list[dict], params: dict[str, Any]) -> list[dict]:
        from rlhf_lightning.serving.server import invoke

        payload: dict[str, Any] = {"dataframe_records": records}
        if params:
            payload["params"] = params
        try:
            result = invoke(self.url, payload, timeout=self.timeout)
        except (urllib.error.URLError, ConnectionError, TimeoutError, http.client.HTTPException) as exc:
            reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
            raise EndpointUnreachable(f"no answer from {self.url}/invocations: {reason}") from None
        if result.status != 200:
            raise Rejected(f"HTTP {result.status}: {result.error_message}")
        if not isinstance(result.body, dict) or "predictions" not in result.body:
            raise Rejected(f"HTTP 200 without 'predictions': {str(result.body)[:200]}")
        return _answer_records(result.body["predictions"], len(records))


def _answer_records(out: Any, n: int) -> list[dict]:
    """The model's output as one JSON-ready dict per input row: a DataFrame's columns, else
    ``{"prediction": value}``."""
    import numpy as np
    import pandas as pd

    if isinstance(out, pd.DataFrame):
        rows = json.loads(out.to_json(orient="records", double_precision=15))  # numpy scalars, NaN -> null
    elif isinstance(out, pd.Series):
        rows = json.loads(out.to_json(orient="values", double_precision=15))
    else:
        rows = out.tolist() if isinstance(out, np.ndarray) else list(out)
    rows = [r if isinstance(r, dict) else {"prediction": r} for r in rows]
    if len(rows) != n:
        raise Rejected(f"the model answered {len(rows)} rows for {n}")
    return rows


@dataclass
class Row:
    """One input line: what the output row starts with, and the request or why there is none."""

    head: dict[str, Any]
    """`line` and, when the input has one, `id`."""
    record: dict[str, Any] | None = None
    """`{"prompt": ...}` or `{"messages": [...]}`, sent to the model."""
    error: str | None = None
    answer: dict[str, Any] | None = None

    def output(self) -> dict[str, Any]:
        if self.error is not None:
            return {**self.head, "error": self.error}
        return {**self.head, **{k: v for k, v in self.answer.items() if k not in self.head}}


def _json_type(value: Any) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def parse_line(line_no: int, raw: bytes) -> Row:
    """An input line as a request, or as an error row saying what is wrong with it."""
    row = Row(head={"line": line_no})
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        row.error = f"not UTF-8 text: {exc}"
        return row
    if not text.strip():
        row.error = "empty line; expected a JSON object with 'prompt' or 'messages'"
        return row
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        row.error = f"not valid JSON: {exc.msg} at column {exc.colno}"
        return row
    if not isinstance(obj, dict):
        row.error = f"expected a JSON object with 'prompt' or 'messages', got {_json_type(obj)}"
        return row
    if "id" in obj:
        row.head["id"] = obj["id"]
    row.error = _check_request(obj)
    if row.error is None:
        row.record = {"prompt": obj["prompt"]} if "prompt" in obj else {"messages": obj["messages"]}
    return row


def _check_request(obj: dict) -> str | None:
    """What is wrong with a row's `prompt`/`messages`, or None. Roles and lengths are the model's to judge."""
    if ("prompt" in obj) == ("messages" in obj):
        if "prompt" in obj:
            return "give either 'prompt' or 'messages', not both"
        return f"needs 'prompt' (a string) or 'messages' (a list of {{role, content}}); got fields {sorted(obj)}"
    if "prompt" in obj:
        prompt = obj["prompt"]
        if not isinstance(prompt, str):
            return f"'prompt' must be a string, got {_json_type(prompt)}"
        return None if prompt.strip() else "'prompt' is empty"
    messages = obj["messages"]
    if not isinstance(messages, list) or not messages:
        return f"'messages' must be a non-empty array of {{role, content}}, got {_json_type(messages)}"
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or set(m) != {"role", "content"}:
            got = sorted(m) if isinstance(m, dict) else _json_type(m)
            return f"messages[{j}] must be an object with exactly 'role' and 'content', got {got}"
        for key in ("role", "content"):
            if not isinstance(m[key], str):
                return f"messages[{j}].{key} must be a string, got {_json_type(m[key])}"
            if not m[key].strip():
                return f"messages[{j}].{key} is empty"
    return None


@dataclass
class Summary:
    """What a run did, for the summary line and the exit code."""

    total: int
    """Input lines (= output lines after a complete run)."""
    skipped: int
    """Lines already in the output before this run."""
    written: int = 0
    """Rows this run appended."""
    errors: int = 0
    """Error rows in the whole output, earlier ones included."""
    earlier_errors: int = 0
    """Error rows among the skipped lines."""
    first_errors: list[str] = field(default_factory=list)
    """`line N: message` of the first few error rows, in line order."""
    truncated_bytes: int = 0
    """Size of the partial last line of an interrupted run, cut off before appending."""
    retried: int = 0
    """Error rows of the output answered again (`--retry-errors`)."""
    fixed: int = 0
    """Of those, the rows answered this time."""

    def note_error(self, line: int, message: str) -> None:
        self.errors += 1
        if len(self.first_errors) < ERRORS_SHOWN:
            self.first_errors.append(f"line {line}: {message}")

    def text(self, output: str | Path) -> str:
        earlier = f" ({self.earlier_errors} in earlier rows)" if self.earlier_errors else ""
        lines = [f"infer: {self.skipped + self.written} of {self.total} rows in {output}: {self.written} written, "
                 f"{self.skipped} skipped as already done; {self.errors} errors{earlier}"]
        if self.retried:
            lines.append(f"  retried {self.retried} error rows: {self.fixed} answered now, "
                         f"{self.retried - self.fixed} still errors")
        if self.truncated_bytes:
            lines.append(f"  (cut off a partial last line of {self.truncated_bytes} bytes left by an interrupted run)")
        if self.errors:
            more = f" (first {ERRORS_SHOWN}; each has an 'error' field)" if self.errors > ERRORS_SHOWN else ""
            lines.append(f"rows with errors{more}:")
            lines += [f"  {e}" for e in self.first_errors]
        return "\n".join(lines)


def _count_lines(path: Path) -> int:
    """Lines in `path`; a last line without a newline counts."""
    n, last = 0, b"\n"
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            n += chunk.count(b"\n")
            last = chunk[-1:]
    return n + (last != b"\n")


def _output_row(raw: bytes, n: int, path: Path, fix: str) -> dict:
    """Line `n` of an `infer` output, which must be its row `n`; else UsageError ending with `fix`."""
    try:
        row = json.loads(raw)
    except ValueError:
        row = None
    if not isinstance(row, dict) or row.get("line") != n:
        raise UsageError(f"{path} line {n} is not row {n} of an `infer` output; {fix}")
    return row


def _resume(out: BinaryIO, path: Path, summary: Summary) -> int:
    """Count the output's complete rows into `summary.skipped` (checking each is row N of an `infer`
    output) and their errors; return where the complete rows end."""
    end = 0
    for raw in out:
        if not raw.endswith(b"\n"):
            break  # a partial line: the batch in flight when an earlier run was killed
        n = summary.skipped + 1
        row = _output_row(raw, n, path, "to resume, pass the output of an earlier run over the same input, else a "
                                        "new --output path")
        summary.skipped = n
        if "error" in row:
            summary.earlier_errors += 1
            summary.note_error(n, row["error"])
        end += len(raw)
    summary.errors = summary.earlier_errors
    return end


def _input_lines(path: Path, skip: int) -> Iterator[tuple[int, bytes]]:
    with open(path, "rb") as fh:
        for n, raw in enumerate(fh, start=1):
            if n > skip:
                yield n, raw.rstrip(b"\r\n")


class _Answerer:
    """Sends requests, retries a failed batch one row at a time, and stops the run at the first request
    when the params alone are what the model rejects."""

    def __init__(self, predictor: LocalModel | Endpoint, params: dict[str, Any]):
        self.predictor = predictor
        self.params = params
        self.first_request = True
        self.warned = False

    def answer(self, rows: list[Row]) -> None:
        results = self._batch([r.record for r in rows])
        first, self.first_request = self.first_request, False
        if first and self.params and all(isinstance(r, str) for r in results) and len(set(results)) == 1:
            # Every row failed alike: if the same row passes without the params, the params are the
            # problem, and every row of the run would get the same error.
            try:
                self.predictor.predict([rows[0].record], {})
            except Rejected:
                pass  # the rows themselves are rejected: per-row errors, the run goes on
            else:
                raise UsageError(f"{self.predictor.name} rejects params {self.params}: {results[0]}")
        for row, result in zip(rows, results):
            if isinstance(result, str):
                row.error = result
            else:
                row.answer = result

    def _batch(self, records: list[dict]) -> list[dict | str]:
        """Answers (dicts) or error messages (str), one per record."""
        try:
            return self.predictor.predict(records, self.params)
        except Rejected as exc:
            if len(records) == 1:
                return [str(exc)]
            batch_error = str(exc)
        results: list[dict | str] = []
        for record in records:
            try:
                results.append(self.predictor.predict([record], self.params)[0])
            except Rejected as exc:
                results.append(str(exc))
        # Every row passes alone: the batch as a whole was refused (e.g. more rows than the model takes).
        if not self.warned and all(isinstance(r, dict) for r in results):
            self.warned = True
            tqdm.write(f"note: a batch of {len(records)} rows was rejected ({batch_error[:300]}) but each row alone "
                       f"was answered; if this repeats, lower --batch-size", file=sys.stderr)
        return results


def _answer_chunk(answerer: _Answerer, chunk: list[Row]) -> None:
    # One request per kind: the model takes prompts or conversations, not both in one request.
    for kind in ("prompt", "messages"):
        group = [r for r in chunk if r.record is not None and kind in r.record]
        if group:
            answerer.answer(group)


def _locked(out: BinaryIO, path: Path) -> None:
    try:
        # Two runs appending to one output would interleave and duplicate rows.
        fcntl.flock(out, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise UsageError(f"{path} is being written by another `infer` run") from None


def _retry_errors(answerer: _Answerer, input_path: Path, output_path: Path, batch_size: int,
                  progress: bool) -> tuple[int, int]:
    """Answer the output's error rows again from their input lines; replace them in a new copy of the
    output that takes the old one's place only once complete. (retried, answered now)."""
    if not output_path.exists():
        return 0, 0
    with open(output_path, "rb") as out:
        _locked(out, output_path)
        rows = [raw for raw in out.read().splitlines(keepends=True) if raw.endswith(b"\n")]
        failed = set()
        for n, raw in enumerate(rows, 1):
            row = _output_row(raw, n, output_path, "--retry-errors needs the output of an earlier run over the same "
                                                   "input")
            if "error" in row:
                failed.add(n)
        todo = [(n, raw) for n, raw in _input_lines(input_path, 0) if n in failed]
        fixed = 0
        with tqdm(total=len(todo), unit="row", desc="retry", disable=not progress, file=sys.stderr) as bar:
            it = iter(todo)
            while chunk := [parse_line(n, raw) for n, raw in _take(it, batch_size)]:
                _answer_chunk(answerer, chunk)
                for row in chunk:
                    rows[row.head["line"] - 1] = _dump(row.output())
                    fixed += row.error is None
                bar.update(len(chunk))
        tmp = output_path.with_name(output_path.name + ".retry")
        with open(tmp, "wb") as new:
            new.write(b"".join(rows))
            new.flush()
            os.fsync(new.fileno())
        os.replace(tmp, output_path)  # a kill before this keeps the old output whole
    return len(todo), fixed


def run(predictor: LocalModel | Endpoint, input_path: str | Path, output_path: str | Path, batch_size: int = 8,
        params: dict[str, Any] | None = None, progress: bool = True, retry_errors: bool = False,
        overwrite: bool = False) -> Summary:
    """Answer every line of `input_path` not yet in `output_path`, `batch_size` input lines at a time;
    append the rows in input order. `params` are sent as given (the model fills in its defaults).
    `retry_errors`: first answer the output's error rows again; `overwrite`: start the output over.

    Raises UsageError (nothing to do per row) and EndpointUnreachable (stop; rows written so far are
    on disk); every other problem is an error row."""
    input_path, output_path = Path(input_path), Path(output_path)
    if batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
    if not input_path.is_file():
        raise UsageError(f"input file {input_path} not found")
    if output_path.exists() and output_path.samefile(input_path):
        raise UsageError(f"--output {output_path} is the input file; give another path")
    if retry_errors and overwrite:
        raise UsageError("--retry-errors keeps the answered rows and --overwrite drops them: give one of them")
    total = _count_lines(input_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    answerer = _Answerer(predictor, params or {})
    retried, fixed = _retry_errors(answerer, input_path, output_path, batch_size, progress) if retry_errors else (0, 0)
    with open(output_path, "a+b") as out:
        _locked(out, output_path)
        if overwrite:
            out.truncate(0)
        out.seek(0)
        summary = Summary(total=total, skipped=0, retried=retried, fixed=fixed)
        end = _resume(out, output_path, summary)
        if summary.skipped > total:
            raise UsageError(f"{output_path} has {summary.skipped} rows but {input_path} only {total} lines; "
                             f"it is the output of another input: give a new --output path")
        summary.truncated_bytes = out.seek(0, os.SEEK_END) - end
        out.truncate(end)  # appends go to the end of the file: now right after the last complete row
        with tqdm(total=total, initial=summary.skipped, unit="row", disable=not progress, file=sys.stderr) as bar:
            lines = _input_lines(input_path, summary.skipped)
            while chunk := [parse_line(n, raw) for n, raw in _take(lines, batch_size)]:
                _answer_chunk(answerer, chunk)
                data = []
                for row in chunk:
                    if row.error is not None:
                        summary.note_error(row.head["line"], row.error)
                    data.append(_dump(row.output()))
                out.write(b"".join(data))
                out.flush()
                os.fsync(out.fileno())  # a kill or power loss now loses at most the next batch
                summary.written += len(chunk)
                bar.update(len(chunk))
    return summary


def _take(it: Iterator, n: int) -> list:
    return [x for _, x in zip(range(n), it)]


def _dump(row: dict) -> bytes:
    try:
        return (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate (valid in JSON input, e.g. in an id) has no UTF-8 form
        return (json.dumps(row) + "\n").encode("ascii")


def main(model: str | None, endpoint: str | None, input_path: str, output_path: str, batch_size: int,
         params: dict[str, Any], retry_errors: bool = False, overwrite: bool = False) -> int:
    """The `infer` command: exit 0 when every row got an answer, 1 when some rows are errors or the
    endpoint stopped answering, 2 on usage errors, 130 on Ctrl-C. The summary goes to stdout, problems to stderr."""
    params = {k: v for k, v in params.items() if v is not None}  # only what the user set
    try:
        if not Path(input_path).is_file():  # before loading a model for nothing
            raise UsageError(f"input file {input_path} not found")
        predictor = LocalModel(model) if model is not None else Endpoint(endpoint)
        summary = run(predictor, input_path, output_path, batch_size, params, retry_errors=retry_errors,
                      overwrite=overwrite)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (EndpointUnreachable, KeyboardInterrupt) as exc:
        what = f"error: {exc}" if isinstance(exc, EndpointUnreachable) else "interrupted"
        print(f"{what}; stopped. The rows in {output_path} are complete and kept: rerun the same command "
              f"to resume after them.", file=sys.stderr)
        return 1 if isinstance(exc, EndpointUnreachable) else 130
    print(summary.text(output_path))
    return 1 if summary.errors else 0
