"""`python -m rlhf_lightning infer`: a registered tiny policy, loaded here and behind a real model server,
answers a JSONL file with good and bad rows; resume; the CLI's exit codes."""

from __future__ import annotations

import fcntl
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlhf_lightning.serving import batch_inference as bi
from rlhf_lightning.serving import server as serving

pytestmark = pytest.mark.usefixtures("one_torch_thread")
PARAMS = {"max_new_tokens": 4}  # the model's default temperature: greedy, so answers are comparable

# (input line, why it is bad or None). Lines 10 and 11 pass the client's checks; the model rejects them.
LINES: list[tuple[bytes, str | None]] = [
    (json.dumps({"id": "a", "prompt": "Write a one-sentence review of a small seaside cafe."}).encode(), None),
    (json.dumps({"messages": [{"role": "system", "content": "Be brief."},
                              {"role": "user", "content": "Describe a rainy Sunday."}]}).encode(), None),
    (b'{"prompt": "unterminated', "not valid JSON"),
    (json.dumps({"id": 4, "text": "neither prompt nor messages"}).encode(), "needs 'prompt'"),
    (json.dumps({"prompt": 42}).encode(), "'prompt' must be a string, got a number"),
    (json.dumps({"prompt": "   "}).encode(), "'prompt' is empty"),
    (b"", "empty line"),
    (json.dumps(["a", "list"]).encode(), "expected a JSON object"),
    (json.dumps({"messages": [{"role": "user", "content": ""}]}).encode(), "messages[0].content is empty"),
    (json.dumps({"messages": [{"role": "narrator", "content": "Hi"}]}).encode(), "role must be one of"),
    (json.dumps({"id": "long", "prompt": "Hi " * 600}).encode(), "positions"),  # > the tiny model's 512
    (json.dumps({"id": "z", "prompt": "Hi"}).encode(), None),
    (b"\xff\xfe not utf-8", "not UTF-8"),
    (json.dumps({"prompt": "The last line has no newline."}).encode(), None),
]
BAD_LINES = {i for i, (_, why) in enumerate(LINES, start=1) if why}


def write_input(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"\n".join(lines))  # no newline after the last line: it still counts
    return path


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


class Recording:
    """A predictor that remembers every record it was asked to answer."""

    def __init__(self, inner):
        self.inner, self.name, self.asked = inner, inner.name, []

    def predict(self, records, params):
        self.asked.extend(records)
        return self.inner.predict(records, params)


@pytest.fixture(scope="module")
def registered(registered_policy):
    return registered_policy


@pytest.fixture(scope="module")
def local_model(registered):
    return bi.LocalModel(registered.model_uri)


@pytest.fixture(scope="module")
def server(registered, tmp_path_factory):
    with serving.ModelServer(registered.model_uri, startup_timeout=120, log_dir=tmp_path_factory.mktemp("serve"),
                             env={"OMP_NUM_THREADS": "1"}) as srv:
        yield srv


@pytest.fixture(scope="module")
def local_rows(local_model, tmp_path_factory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("local")
    summary = bi.run(local_model, write_input(tmp / "in.jsonl", [line for line, _ in LINES]), tmp / "out.jsonl",
                     batch_size=4, params=PARAMS, progress=False)
    assert (summary.total, summary.written, summary.skipped, summary.errors) == (14, 14, 0, len(BAD_LINES))
    return read_rows(tmp / "out.jsonl")


def check_rows(rows: list[dict], sha: str) -> None:
    assert [r["line"] for r in rows] == list(range(1, len(LINES) + 1))
    assert {r["line"] for r in rows if "error" in r} == BAD_LINES
    for row, (_, why) in zip(rows, LINES):
        if why:
            assert why in row["error"], row
        else:
            assert set(row) - {"id"} == {"line", "response", "prompt_tokens", "completion_tokens", "finish_reason",
                                          "weights_sha256"}
            assert isinstance(row["response"], str) and row["weights_sha256"] == sha
            assert 1 <= row["completion_tokens"] <= 4 and row["finish_reason"] in ("stop", "length")
    assert [r.get("id") for r in rows[:4]] == ["a", None, None, 4]  # ids pass through, error rows too
    assert "id" not in rows[1]


def test_local_model_answers_good_rows_and_reports_every_bad_one(local_rows, registered):
    check_rows(local_rows, registered.weights_sha256)


def test_resume_skips_done_rows_keeps_them_and_cuts_a_half_written_line(local_model, tmp_path):
    prompts = [f"Tell me about item {i}." for i in range(1, 7)]
    inp = write_input(tmp_path / "in.jsonl", [json.dumps({"id": i, "prompt": p}).encode()
                                              for i, p in enumerate(prompts, start=1)])
    earlier = b'{"line": 1, "id": 1, "response": "EARLIER"}\n{"line": 2, "id": 2, "error": "earlier error"}\n'
    out = tmp_path / "out.jsonl"
    out.write_bytes(earlier + b'{"line": 3, "id": 3, "resp')  # killed mid-write
    model = Recording(local_model)

    summary = bi.run(model, inp, out, batch_size=3, params=PARAMS, progress=False)
    assert (summary.skipped, summary.written, summary.errors, summary.earlier_errors) == (2, 4, 1, 1)
    assert summary.truncated_bytes == len(b'{"line": 3, "id": 3, "resp')
    assert [r["prompt"] for r in model.asked] == prompts[2:]  # the done rows were not asked again
    assert out.read_bytes().startswith(earlier)
    rows = read_rows(out)
    assert [r["line"] for r in rows] == [r["id"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all("response" in r for r in rows[2:])
    assert "4 written, 2 skipped as already done; 1 errors (1 in earlier rows)" in summary.text(out)
    assert "line 2: earlier error" in summary.text(out)

    model.asked.clear()
    again = bi.run(model, inp, out, params=PARAMS, progress=False)
    assert (again.skipped, again.written, model.asked) == (6, 0, [])
    assert read_rows(out) == rows


def test_retry_errors_answers_fixed_lines_in_place_and_overwrite_starts_over(local_model, tmp_path):
    lines = [b'{"id": 1, "prompt": "Tell me about item 1."}', b'{"id": 2, "prompt": ',
             b'{"id": 3, "prompt": "Tell me about item 3."}', b'{"id": 4, "text": "no prompt"}']
    inp = write_input(tmp_path / "in.jsonl", lines)
    out = tmp_path / "out.jsonl"
    model = Recording(local_model)
    first = bi.run(model, inp, out, batch_size=2, params=PARAMS, progress=False)
    assert (first.written, first.errors) == (4, 2)
    before = read_rows(out)

    # The user fixes line 2 (line 4 stays bad) and reruns: a plain rerun has nothing to do...
    lines[1] = b'{"id": 2, "prompt": "Tell me about item 2."}'
    write_input(inp, lines)
    model.asked.clear()
    assert bi.run(model, inp, out, params=PARAMS, progress=False).written == 0 and model.asked == []
    # ...--retry-errors asks again for exactly the error rows, from the input as it is now.
    again = bi.run(model, inp, out, batch_size=2, params=PARAMS, progress=False, retry_errors=True)
    assert [r["prompt"] for r in model.asked] == ["Tell me about item 2."]  # line 4 fails the client's checks again
    assert (again.retried, again.fixed, again.errors, again.written) == (2, 1, 1, 0)
    assert "retried 2 error rows: 1 answered now, 1 still errors" in again.text(out)
    rows = read_rows(out)
    assert [r["line"] for r in rows] == [1, 2, 3, 4]
    assert rows[0] == before[0] and rows[2] == before[2]  # answered rows untouched
    assert "response" in rows[1] and "needs 'prompt'" in rows[3]["error"]
    assert not list(tmp_path.glob("*.retry"))

    model.asked.clear()
    fresh = bi.run(model, inp, out, batch_size=4, params=PARAMS, progress=False, overwrite=True)
    assert (fresh.skipped, fresh.written, fresh.errors) == (0, 4, 1) and len(model.asked) == 3
    assert [r["line"] for r in read_rows(out)] == [1, 2, 3, 4]
    with pytest.raises(bi.UsageError, match="give one of them"):
        bi.run(model, inp, out, progress=False, retry_errors=True, overwrite=True)


def test_resume_refuses_an_output_it_did_not_write(local_model, tmp_path):
    inp = write_input(tmp_path / "in.jsonl", [b'{"prompt": "Hi"}'] * 2)
    out = tmp_path / "out.jsonl"
    for content, message in [
        (b'{"line": 1}\n{"line": 5}\n', "line 2 is not row 2"),
        (b"some notes\n", "line 1 is not row 1"),
        (b'{"line": 1}\n{"line": 2}\n{"line": 3}\n{"line": 4, "res', "has 3 rows but"),
    ]:
        out.write_bytes(content)
        with pytest.raises(bi.UsageError, match=message):
            bi.run(local_model, inp, out, progress=False)
        assert out.read_bytes() == content
    with pytest.raises(bi.UsageError, match="is the input file"):
        bi.run(local_model, inp, inp, progress=False)
    out.write_bytes(b"")
    with open(out, "ab") as other_run:
        fcntl.flock(other_run, fcntl.LOCK_EX)  # what a concurrent `infer` on the same output holds
        with pytest.raises(bi.UsageError, match="being written by another `infer` run"):
            bi.run(local_model, inp, out, progress=False)


def test_params_the_model_rejects_stop_the_run_once(local_model, tmp_path):
    inp = write_input(tmp_path / "in.jsonl", [b'{"prompt": "Hi"}', b'{"prompt": "Hello"}', b"not json"])
    out = tmp_path / "out.jsonl"
    with pytest.raises(bi.UsageError, match=r"rejects params .*params.temperature must be a number in \[0.0, 2.0\]"):
        bi.run(local_model, inp, out, params={"temperature": 5.0}, progress=False)
    assert out.read_bytes() == b""  # nothing written: a rerun with good params starts at line 1

    # Rows that fail alike with good params are per-row errors, not a params problem.
    bad_role = json.dumps({"messages": [{"role": "narrator", "content": "Hi"}]}).encode()
    write_input(inp, [bad_role, bad_role])
    summary = bi.run(local_model, inp, tmp_path / "out2.jsonl", params=PARAMS, progress=False)
    assert summary.errors == 2


def test_endpoint_gives_the_same_rows_and_a_dead_endpoint_stops_resumably(server, local_rows, registered, tmp_path):
    inp = write_input(tmp_path / "in.jsonl", [line for line, _ in LINES])
    out = tmp_path / "out.jsonl"

    class DiesAfterOneRequest(bi.Endpoint):
        def predict(self, records, params):
            answer = super().predict(records, params)
            self.url = f"http://127.0.0.1:{serving.free_port()}"  # nothing listens there
            return answer

    with pytest.raises(bi.EndpointUnreachable, match="no answer from"):
        bi.run(DiesAfterOneRequest(server.url), inp, out, batch_size=4, params=PARAMS, progress=False)
    assert out.read_bytes() == b""  # the first chunk (2 requests) did not complete
    with pytest.raises(bi.EndpointUnreachable):
        bi.run(DiesAfterOneRequest(server.url), inp, out, batch_size=1, params=PARAMS, progress=False)
    assert [r["line"] for r in read_rows(out)] == [1]  # the answered chunk is on disk

    summary = bi.run(bi.Endpoint(server.url), inp, out, batch_size=4, params=PARAMS, progress=False)
    assert (summary.skipped, summary.written) == (1, 13)
    rows = read_rows(out)
    check_rows(rows, registered.weights_sha256)
    good = [i for i, (_, why) in enumerate(LINES) if not why]
    assert [rows[i]["response"] for i in good] == [local_rows[i]["response"] for i in good]


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rlhf_lightning", "infer", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


def test_cli_exit_codes_and_messages(server, registered, tmp_path):
    inp = write_input(tmp_path / "in.jsonl", [line for line, _ in LINES])
    good = write_input(tmp_path / "good.jsonl", [line for line, why in LINES if not why])

    usage = [
        (["--input", str(inp), "--output", "o.jsonl"], "one of the arguments --model --endpoint is required"),
        (["--model", "m", "--endpoint", server.url, "--input", str(inp), "--output", "o.jsonl"], "not allowed with"),
        (["--endpoint", server.url, "--input", "missing.jsonl", "--output", "o.jsonl"], "missing.jsonl not found"),
        (["--endpoint", "localhost:5001", "--input", str(inp), "--output", "o.jsonl"], "give a URL such as http://"),
        (["--model", "models:/no-such-model@champion", "--input", str(inp), "--output", "o.jsonl"],
         "cannot load model models:/no-such-model@champion"),
    ]
    for args, message in usage:
        proc = cli(*args, cwd=tmp_path)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, (args, proc.stderr)

    proc = cli("--model", registered.model_uri, "--input", str(inp), "--output", "local.jsonl",
               "--max-new-tokens", "4", "--batch-size", "4", cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"14 written, 0 skipped as already done; {len(BAD_LINES)} errors" in proc.stdout
    assert "line 3: not valid JSON" in proc.stdout
    assert len(read_rows(tmp_path / "local.jsonl")) == 14

    proc = cli("--endpoint", server.url, "--input", str(good), "--output", "good.out.jsonl", "--max-new-tokens", "4",
               "--temperature", "0.7", "--top-p", "0.9", "--seed", "1", cwd=tmp_path)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "4 written, 0 skipped as already done; 0 errors" in proc.stdout
    assert all(r["completion_tokens"] <= 4 for r in read_rows(tmp_path / "good.out.jsonl"))

    dead = f"http://127.0.0.1:{serving.free_port()}"
    proc = cli("--endpoint", dead, "--input", str(good), "--output", "dead.jsonl", cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"no answer from {dead}/invocations" in proc.stderr and "rerun the same command" in proc.stderr



def test_cli_killed_mid_run_resumes_without_loss_or_duplicates(server, tmp_path):
    n = 300
    inp = write_input(tmp_path / "in.jsonl", [json.dumps({"id": i, "prompt": f"Item {i}?"}).encode()
                                              for i in range(1, n + 1)])
    out = tmp_path / "out.jsonl"
    args = ["--endpoint", server.url, "--input", str(inp), "--output", str(out), "--batch-size", "2",
            "--max-new-tokens", "2"]
    proc = subprocess.Popen([sys.executable, "-m", "rlhf_lightning", "infer", *args], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        if out.exists() and out.stat().st_size > 3000:  # some batches are on disk
            break
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    killed_at = out.read_bytes().count(b"\n")
    assert 0 < killed_at < n, "the run was not killed mid-way; make the input longer"

    done = cli(*args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    rows = read_rows(out)
    assert [r["line"] for r in rows] == [r["id"] for r in rows] == list(range(1, n + 1))
    skipped = int(re.search(r"(\d+) skipped as already done", done.stdout).group(1))
    assert killed_at <= skipped <= killed_at + 1  # + a partial line cut off, if the kill hit a write
