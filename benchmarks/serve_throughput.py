"""Serving throughput of the two deployment targets, side by side in one sitting: completion tokens/s and
request latency (p50/p95) at 1, 16 and 64 concurrent clients, each client sending one-prompt requests for
`--max-new-tokens` tokens one after the other.

  python benchmarks/serve_throughput.py [--model-uri models:/rlhf-policy@champion] [--clients 1,16,64]
                                        [--requests 2] [--max-new-tokens 8] [--json F]

Servers, each started, warmed up with one request, measured and stopped in turn:
- `rlhf-local, one at a time`: `mlflow models serve` of the version with RLHF_SERVE_BATCHING=0, i.e. one
  request per `generate`, as it served before concurrent requests were batched;
- `rlhf-local, batched`: the same server as shipped (concurrent requests share a `generate`);
- `rlhf-vllm`: vLLM's OpenAI server of the version (the CPU build here: the adapter merged, bf16 where the
  CPU computes in it), requests to /v1/chat/completions.

Without --model-uri the default run's policy is registered in a temporary MLflow store: the default config's
base (SmolLM2-135M-Instruct) and LoRA adapter shape, untrained (an untrained adapter is merged and served at
the cost of a trained one). Greedy decoding; every request must be answered (exit 1 otherwise).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlflow
import serve_load

from rlhf_lightning.serving import server as serving

# serve_load's prompts and two more (this script is run from benchmarks/, beside serve_load.py).
PROMPTS = serve_load.PROMPTS + ["Tell me about your weekend.", "Why is the sky blue?"]
BEFORE = 12.5
"""Completion tokens/s of `mlflow models serve` at 64 clients before batching, as measured when the serving
issue was filed (median request 39 s)."""


def register_default_policy() -> str:
    from rlhf_lightning.config import RLHFConfig
    from rlhf_lightning.models import loading
    from rlhf_lightning.serving import registry

    cfg = RLHFConfig()
    model = loading.load_policy(cfg.policy, trainable=False)
    adapter = Path(tempfile.mkdtemp(prefix="adapter-"))
    model.save_pretrained(adapter)
    base = loading.base_model_dir(cfg.policy.model, tempfile.mkdtemp(prefix="base-"))
    with mlflow.start_run() as run:
        info = registry.log_and_register(cfg, str(adapter), base, run.info.run_id, tags={})
    return info.model_uri


def one_local(url: str, prompt: str, max_new_tokens: int) -> int:
    result = serving.invoke(url, {"dataframe_records": [{"prompt": prompt}], "params": {"max_new_tokens": max_new_tokens}})
    if result.status != 200:
        raise RuntimeError(f"HTTP {result.status}: {result.error_message}")
    return result.body["predictions"][0]["completion_tokens"]


def one_vllm(url: str, model: str, prompt: str, max_new_tokens: int) -> int:
    from rlhf_lightning.serving.vllm_server import chat_completions

    out = chat_completions(url, {"model": model, "messages": [{"role": "user", "content": prompt}],
                                 "max_tokens": max_new_tokens, "temperature": 0})
    return out["usage"]["completion_tokens"]


def load(call, clients: int, per_client: int) -> dict:
    """`clients` threads, all starting together, each sending `per_client` requests in turn."""
    latencies, tokens, lock = [], [], threading.Lock()
    start_line = threading.Barrier(clients + 1)

    def client(c: int) -> None:
        start_line.wait()
        for r in range(per_client):
            t0 = time.perf_counter()
            n = call(PROMPTS[(c + r) % len(PROMPTS)])
            with lock:
                latencies.append(time.perf_counter() - t0)
                tokens.append(n)

    with ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(client, c) for c in range(clients)]
        start_line.wait()
        t0 = time.perf_counter()
        for f in futures:
            f.result()
        wall = time.perf_counter() - t0
    ordered = sorted(latencies)
    return {"clients": clients, "requests": len(latencies), "completion_tokens": sum(tokens), "wall_s": wall,
            "tokens_per_s": sum(tokens) / wall, "p50_s": statistics.median(ordered),
            "p95_s": ordered[min(len(ordered) - 1, round(0.95 * len(ordered)) - 1)]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-uri", default=None)
    ap.add_argument("--clients", default="1,16,64")
    ap.add_argument("--requests", type=int, default=2, help="requests per client (1 client: 4x as many)")
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--servers", default="local-one,local,vllm")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.model_uri is None:
        mlflow.set_tracking_uri(f"sqlite:///{tempfile.mkdtemp(prefix='bench-mlflow-')}/mlflow.db")
        args.model_uri = register_default_policy()
    print(f"model {args.model_uri}; {os.cpu_count()} CPUs; greedy, {args.max_new_tokens} new tokens a request", flush=True)
    clients = [int(c) for c in args.clients.split(",")]
    rows = []
    for name in args.servers.split(","):
        if name.startswith("local"):
            env = {"RLHF_SERVE_BATCHING": "0"} if name == "local-one" else {}
            label = "rlhf-local, one at a time" if name == "local-one" else "rlhf-local, batched"
            server = serving.ModelServer(args.model_uri, env=env, startup_timeout=600, request_timeout=600)
            call = lambda p, s=server: one_local(s.url, p, args.max_new_tokens)  # noqa: E731
        else:
            from rlhf_lightning.serving.registry import resolve_model_uri
            from rlhf_lightning.serving.vllm_server import VLLMServer

            ref = resolve_model_uri(args.model_uri)
            server = VLLMServer(ref.name, ref.version, startup_timeout=900)
            label = f"rlhf-vllm ({server.dtype}, {server.mode})"
            call = lambda p, s=server: one_vllm(s.url, s.served_name, p, args.max_new_tokens)  # noqa: E731
        t0 = time.perf_counter()
        with server:
            start = time.perf_counter() - t0
            call(PROMPTS[0])  # warm-up
            for c in clients:
                r = load(call, c, args.requests * (4 if c == 1 else 1))
                r.update(server=label, start_s=start)
                rows.append(r)
                print(f"{label:34s} {c:3d} clients: {r['tokens_per_s']:7.1f} tok/s  p50 {r['p50_s']:6.2f} s  "
                      f"p95 {r['p95_s']:6.2f} s  ({r['requests']} requests, {r['completion_tokens']} tokens, "
                      f"{r['wall_s']:.1f} s)", flush=True)
    print("\n| server | clients | completion tok/s | p50 latency | p95 latency | vs one at a time | vs 12.5 tok/s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    base = {r["clients"]: r["tokens_per_s"] for r in rows if r["server"].startswith("rlhf-local, one")}
    for r in rows:
        vs = f"{r['tokens_per_s'] / base[r['clients']]:.1f}x" if r["clients"] in base else "-"
        print(f"| {r['server']} | {r['clients']} | {r['tokens_per_s']:.1f} | {r['p50_s']:.2f} s | {r['p95_s']:.2f} s "
              f"| {vs} | {r['tokens_per_s'] / BEFORE:.1f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
