"""Load benchmark of the served policy: a real `mlflow models serve` under concurrent clients, side by side
with the same requests sent by one client in sequence.

  python benchmarks/serve_load.py [--model-uri URI] [--clients 64] [--requests 20] [--max-new-tokens 8] [--json F]

Without --model-uri, a tiny policy (tiny:llama + a random LoRA adapter) is registered in a temporary MLflow
sqlite store and served, so the benchmark runs anywhere without a trained model. With --model-uri, that
model is served from the current MLFLOW_TRACKING_URI (e.g. models:/rlhf-policy@champion with sqlite:///mlflow.db).

Two runs of the same `clients x requests` requests: `sequential` (one client, one request after the other)
and `concurrent` (`clients` threads, each sending its `requests` in turn, all starting together). During the
concurrent run one more client sends bad requests (malformed JSON, missing column, wrong type, a 1 MB
prompt, out-of-range params, ...); each must get a 4xx. After the load, the server must still answer.

Exit 1 if any request got a 5xx or no answer, a 200 was not a well-formed prediction, a bad request was not
answered with a 4xx, or the server did not answer after the load.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import mlflow

from rlhf_lightning.serving import server as serving

SHA256 = re.compile(r"[0-9a-f]{64}")
PROMPTS = [
    "Write a one-sentence review of a small seaside cafe.",
    "Describe a rainy Sunday afternoon in one sentence.",
    "Give me one tip for learning to cook.",
    "What makes a good neighbour?",
    "Summarise the plot of a heist film in two sentences.",
    "Suggest a name for a friendly robot.",
]
SYSTEM = "You are a helpful, concise assistant."
# What one client sends in a loop during the concurrent run; each must be answered with a 4xx.
BAD_REQUESTS: dict[str, bytes] = {
    "malformed JSON": b'{"dataframe_records": [{"prompt": "Hi"',
    "empty body": b"",
    "unknown input format": json.dumps({"rows": [{"prompt": "Hi"}]}).encode(),
    "missing column": json.dumps({"dataframe_records": [{"text": "Hi"}]}).encode(),
    "wrong type (prompt: 5)": json.dumps({"dataframe_records": [{"prompt": 5}]}).encode(),
    "wrong type (messages: str)": json.dumps({"dataframe_records": [{"messages": "Hi"}]}).encode(),
    "bad role": json.dumps({"dataframe_records": [{"messages": [{"role": "narrator", "content": "Hi"}]}]}).encode(),
    "1 MB prompt": json.dumps({"dataframe_records": [{"prompt": "x" * 1_000_000}]}).encode(),
    "max_new_tokens 1000": json.dumps({"dataframe_records": [{"prompt": "Hi"}],
                                       "params": {"max_new_tokens": 1000}}).encode(),
    "temperature -1": json.dumps({"dataframe_records": [{"prompt": "Hi"}], "params": {"temperature": -1}}).encode(),
    "top_p 0": json.dumps({"dataframe_records": [{"prompt": "Hi"}], "params": {"top_p": 0}}).encode(),
    "max_new_tokens 'many'": json.dumps({"dataframe_records": [{"prompt": "Hi"}],
                                         "params": {"max_new_tokens": "many"}}).encode(),
}


def build_requests(n: int, max_new_tokens: int, seed: int = 0) -> list[dict]:
    """`n` good requests: 1-row prompt and messages requests, every 5th with 4 rows, every 4th with
    sampling params; all with `max_new_tokens`, so each answer's length is bounded."""
    rng = random.Random(seed)
    requests = []
    for i in range(n):
        rows = 4 if i % 5 == 4 else 1
        if i % 2:
            records = [{"messages": [{"role": "system", "content": SYSTEM},
                                     {"role": "user", "content": rng.choice(PROMPTS)}]} for _ in range(rows)]
        else:
            records = [{"prompt": rng.choice(PROMPTS)} for _ in range(rows)]
        params: dict[str, Any] = {"max_new_tokens": max_new_tokens}
        if i % 4 == 3:
            params.update(temperature=0.8, top_p=0.9, seed=i)
        requests.append({"dataframe_records": records, "params": params})
    return requests


def malformed(result: serving.InvocationResult, request: dict, expected_sha: str | None) -> str | None:
    """Why a 200 answer is not a well-formed prediction of `request`, or None."""
    body = result.body
    if not isinstance(body, dict) or not isinstance(body.get("predictions"), list):
        return f"no 'predictions' list: {str(body)[:120]}"
    preds = body["predictions"]
    if len(preds) != len(request["dataframe_records"]):
        return f"{len(preds)} predictions for {len(request['dataframe_records'])} rows"
    limit = request["params"]["max_new_tokens"]
    for p in preds:
        if not isinstance(p, dict) or not isinstance(p.get("response"), str):
            return f"prediction without a string response: {str(p)[:120]}"
        pt, ct = p.get("prompt_tokens"), p.get("completion_tokens")
        if type(pt) is not int or type(ct) is not int or pt < 1 or not 0 <= ct <= limit:
            return f"bad token counts prompt_tokens={pt!r} completion_tokens={ct!r} (max_new_tokens {limit})"
        sha = p.get("weights_sha256")
        if not isinstance(sha, str) or not SHA256.fullmatch(sha) or (expected_sha and sha != expected_sha):
            return f"weights_sha256 {sha!r}" + (f" is not the registered {expected_sha}" if expected_sha else "")
    return None


@dataclass
class RunStats:
    """One run: what came back and how fast."""

    name: str
    clients: int
    requests: int
    statuses: dict[str, int] = field(default_factory=dict)
    """HTTP status (or `no answer: <error>`) -> count."""
    server_errors: int = 0
    """5xx answers and requests that got no answer."""
    malformed: int = 0
    malformed_examples: list[str] = field(default_factory=list)
    latency_ms: dict[str, float] = field(default_factory=dict)
    """p50, p95, p99, max of every request."""
    wall_s: float = 0.0
    throughput_rps: float = 0.0


def percentile(sorted_values: list[float], q: float) -> float:
    # Nearest rank: the q-quantile is a latency some request actually had.
    return sorted_values[min(len(sorted_values) - 1, max(0, round(q * len(sorted_values)) - 1))]


def send(url: str, payload: dict | bytes, timeout: float) -> tuple[str, serving.InvocationResult | None, float]:
    """(status or `no answer: ...`, the result, latency in s); a refused or dropped connection is data here."""
    start = time.perf_counter()
    try:
        result = serving.invoke(url, payload, timeout=timeout)
    except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
        return f"no answer: {type(exc).__name__}", None, time.perf_counter() - start
    return str(result.status), result, result.latency_s


def run_load(name: str, url: str, per_client: list[list[dict]], expected_sha: str | None, timeout: float,
             during=None) -> RunStats:
    """Each client sends its requests one after the other; all clients start together. `during()` runs
    in one more thread until the clients are done (the bad-request client)."""
    stats = RunStats(name=name, clients=len(per_client), requests=sum(map(len, per_client)))
    latencies: list[float] = []
    lock = threading.Lock()
    start_line = threading.Barrier(len(per_client) + 1)
    done = threading.Event()

    def client(requests: list[dict]) -> None:
        start_line.wait()
        for request in requests:
            status, result, latency = send(url, request, timeout)
            why = malformed(result, request, expected_sha) if status == "200" else None
            with lock:
                latencies.append(latency)
                stats.statuses[status] = stats.statuses.get(status, 0) + 1
                stats.server_errors += status.startswith(("5", "no answer"))
                if why:
                    stats.malformed += 1
                    if len(stats.malformed_examples) < 5:
                        stats.malformed_examples.append(why)

    side = threading.Thread(target=during, args=(done,), daemon=True) if during else None
    with ThreadPoolExecutor(max_workers=len(per_client)) as pool:
        futures = [pool.submit(client, reqs) for reqs in per_client]
        if side:
            side.start()
        start_line.wait()
        t0 = time.perf_counter()
        for f in futures:
            f.result()
        stats.wall_s = time.perf_counter() - t0
    done.set()
    if side:
        side.join()
    ordered = sorted(latencies)
    quantiles = (("p50", .50), ("p95", .95), ("p99", .99), ("max", 1.0))
    stats.latency_ms = {k: 1000 * percentile(ordered, q) for k, q in quantiles}
    stats.throughput_rps = stats.requests / stats.wall_s
    return stats


@dataclass
class BadStats:
    """Per kind of bad request: how many were sent and what came back."""

    sent: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    example: str = ""
    """The server's message for the first one."""

    @property
    def not_4xx(self) -> int:
        return sum(n for s, n in self.statuses.items() if not s.startswith("4"))


def bad_client(url: str, timeout: float, results: dict[str, BadStats]):
    """Sends every bad request in turn until the load is done (each at least once)."""
    def loop(done: threading.Event) -> None:
        while True:
            for kind, body in BAD_REQUESTS.items():
                status, result, _ = send(url, body, timeout)
                stats = results.setdefault(kind, BadStats())
                stats.sent += 1
                stats.statuses[status] = stats.statuses.get(status, 0) + 1
                if not stats.example and result is not None:
                    stats.example = result.error_message.replace("\n", " ")[-160:]
            if done.is_set():
                return
    return loop


def still_answers(url: str, expected_sha: str | None, timeout: float) -> str | None:
    """None if /ping and a good request succeed after the load, else what failed."""
    try:
        with urllib.request.urlopen(f"{url}/ping", timeout=10) as resp:
            if resp.status != 200:
                return f"/ping -> HTTP {resp.status}"
    except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
        return f"/ping: {exc}"
    request = build_requests(1, 4)[0]
    status, result, _ = send(url, request, timeout)
    if status != "200":
        return f"a good request after the load -> {status}"
    return malformed(result, request, expected_sha)


def register_tiny_policy(root: Path) -> tuple[str, str]:
    """Register tiny:llama + a LoRA adapter with random (non-zero) B matrices in a fresh sqlite store
    under `root`, as the tests do. Returns (model URI, weights sha256)."""
    import torch

    from rlhf_lightning.serving import registry
    from rlhf_lightning.config import PolicyConfig, from_dict
    from rlhf_lightning.models import loading

    torch.set_num_threads(1)  # a tiny model on a few cores: torch's spinning threads only slow it down
    uri = f"sqlite:///{root}/mlflow.db"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    os.environ.pop("MLFLOW_RUN_ID", None)
    mlflow.set_tracking_uri(uri)
    mlflow.MlflowClient().create_experiment("serve-load", artifact_location=f"{root}/artifacts")
    mlflow.set_experiment("serve-load")
    model = loading.load_policy(PolicyConfig(model="tiny:llama"), trainable=False)
    gen = torch.Generator().manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # fresh B matrices are zero: the adapter would change nothing
            param.data = torch.randn(param.shape, generator=gen) * 0.5
    adapter_dir = root / "adapter"
    model.save_pretrained(adapter_dir)
    cfg = from_dict({"policy": {"model": "tiny:llama"}})
    with mlflow.start_run() as run:
        info = registry.log_and_register(cfg, str(adapter_dir), loading.resolve_model("tiny:llama"), run.info.run_id,
                                         tags={})
    return info.model_uri, info.weights_sha256


def table(seq: RunStats, conc: RunStats) -> str:
    head = f"{'run':<16}{'clients':>8}{'requests':>9}{'2xx':>6}{'4xx':>5}{'5xx/none':>9}{'malformed':>10}" \
           f"{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'max ms':>9}{'req/s':>8}"
    lines = [head, "-" * len(head)]
    for s in (seq, conc):
        ok = sum(n for k, n in s.statuses.items() if k.startswith("2"))
        c4 = sum(n for k, n in s.statuses.items() if k.startswith("4"))
        lat = s.latency_ms
        lines.append(f"{s.name:<16}{s.clients:>8}{s.requests:>9}{ok:>6}{c4:>5}{s.server_errors:>9}{s.malformed:>10}"
                     + "".join(f"{lat[k]:>9.1f}" for k in ("p50", "p95", "p99", "max")) + f"{s.throughput_rps:>8.1f}")
    r = ratios(seq, conc)
    lines.append(f"{'concurrent/seq':<16}{'':>8}{'':>9}{'':>6}{'':>5}{'':>9}{'':>10}"
                 f"{r['p50']:>8.2f}x{r['p95']:>8.2f}x{'':>9}{'':>9}{r['throughput']:>7.2f}x")
    return "\n".join(lines)


def ratios(seq: RunStats, conc: RunStats) -> dict[str, float]:
    return {"p50": conc.latency_ms["p50"] / seq.latency_ms["p50"],
            "p95": conc.latency_ms["p95"] / seq.latency_ms["p95"],
            "throughput": conc.throughput_rps / seq.throughput_rps}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-uri", default=None,
                   help="model to serve from MLFLOW_TRACKING_URI (default: a tiny policy in a temporary store)")
    p.add_argument("--clients", type=int, default=64, help="concurrent clients (default: %(default)s)")
    p.add_argument("--requests", type=int, default=20, help="requests per client (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=8, help="in every request (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=300.0, help="per-request client timeout, s (default: %(default)s)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON here")
    args = p.parse_args(argv)
    if args.clients < 1 or args.requests < 1 or args.max_new_tokens < 1:
        p.error("--clients, --requests and --max-new-tokens must be >= 1")

    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        if args.model_uri:
            model_uri, expected_sha, env = args.model_uri, None, {}
        else:
            print("registering a tiny policy in a temporary MLflow store ...", flush=True)
            model_uri, expected_sha = register_tiny_policy(Path(tmp))
            env = {"OMP_NUM_THREADS": "1"}  # tiny model: one torch thread is fastest
        print(f"starting `mlflow models serve` of {model_uri} ...", flush=True)
        with serving.ModelServer(model_uri, env=env, log_dir=tmp, request_timeout=int(args.timeout)) as server:
            requests = build_requests(args.clients * args.requests, args.max_new_tokens)
            for request in requests[:3]:  # warm-up, not measured
                serving.invoke(server.url, request, timeout=args.timeout)
            print(f"sequential: 1 client x {len(requests)} requests ...", flush=True)
            seq = run_load("sequential", server.url, [requests], expected_sha, args.timeout)
            print(f"concurrent: {args.clients} clients x {args.requests} requests + 1 bad-request client ...",
                  flush=True)
            bad: dict[str, BadStats] = {}
            per_client = [requests[i::args.clients] for i in range(args.clients)]
            conc = run_load("concurrent", server.url, per_client, expected_sha, args.timeout,
                            during=bad_client(server.url, args.timeout, bad))
            after = still_answers(server.url, expected_sha, args.timeout)

    print(f"\nserve_load: {model_uri}, {len(requests)} requests per run, max_new_tokens {args.max_new_tokens}, "
          f"{os.cpu_count()} CPU cores\n")
    print(table(seq, conc))
    print("\nbad requests during the concurrent run (each must get a 4xx):")
    for kind, b in bad.items():
        print(f"  {kind:<28} sent {b.sent:>4}  statuses {b.statuses}  {'' if b.not_4xx == 0 else 'NOT 4xx  '}"
              f"e.g. {b.example[-90:]!r}")
    print(f"after the load: {'server still answers' if after is None else 'FAILED: ' + after}")

    problems = []
    for s in (seq, conc):
        if s.server_errors:
            problems.append(f"{s.name}: {s.server_errors} requests got a 5xx or no answer ({s.statuses})")
        if s.malformed:
            problems.append(f"{s.name}: {s.malformed} malformed 200 answers, e.g. {s.malformed_examples[0]}")
    problems += [f"bad request {k!r} answered {b.statuses}" for k, b in bad.items() if b.not_4xx]
    if after is not None:
        problems.append(f"after the load: {after}")
    print("\nRESULT: " + ("PASS" if not problems else "FAIL\n  " + "\n  ".join(problems)))

    if args.json:
        report = {"model_uri": model_uri, "requests_per_run": len(requests), "max_new_tokens": args.max_new_tokens,
                  "cpu_cores": os.cpu_count(), "runs": [asdict(seq), asdict(conc)], "ratios": ratios(seq, conc),
                  "bad_requests": {k: {**asdict(b), "not_4xx": b.not_4xx} for k, b in bad.items()},
                  "server_answers_after_load": after is None, "problems": problems, "ok": not problems}
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
