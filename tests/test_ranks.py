"""PPO over several training processes of one machine (ddp_spawn on the CPU with gloo, as a multi-GPU
Batch job runs it with NCCL): with the vLLM engine each process starts its own, on its own share of the
machine, and samples its own prompts with the adapter DDP keeps equal on every rank, which every
iteration proves; a rank whose adapter differs stops the fit on every rank, saying which. The runs over
several nodes (Metaflow's @parallel) are in test_nodes.py."""

from __future__ import annotations

import json
import os

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from rlhf_lightning.config import from_dict
from rlhf_lightning.models import loading
from rlhf_lightning.models.ppo import train_ppo, weight_checksum
from test_engines import needs_vllm, tiny32  # noqa: F401  (tiny32: a fixture)
from test_ppo import prompt_rows

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class RankLog(Callback):
    """Each training process writes rank<N>.json: its prompts, the checksums of its trainable weights
    before each rollout, the engine's adapter id after it and where the engine runs, its kl_coef at the end."""

    def __init__(self, directory):
        self.directory = directory

    def on_train_start(self, trainer, pl_module):
        self.record = {"prompts": [], "checksums": [], "adapter_ids": [], "world": trainer.world_size,
                       "placement": getattr(pl_module.engine, "placement", None)}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.record["prompts"].append(batch["prompt"])
        self.record["checksums"].append([int(weight_checksum(p)) for _, p in sorted(pl_module.named_parameters())
                                         if p.requires_grad])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if pl_module.engine is not None:
            self.record["adapter_ids"].append(pl_module.engine.lora.lora_int_id)

    def on_train_end(self, trainer, pl_module):
        self.record["kl_coef"] = pl_module.kl_ctl.value
        (self.directory / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.record))


def two_process_cfg(model: str, backend: str, iterations: int = 3):
    return from_dict({"policy": {"model": model},
                      "ppo": {"iterations": iterations, "rollout_batch_size": 2, "minibatch_size": 2, "ppo_epochs": 1,
                              "max_new_tokens": 8, "learning_rate": 1e-2},
                      "trainer": {"accelerator": "cpu", "devices": 2},
                      "generation": {"backend": backend, "dtype": "float32"}})


@needs_vllm
def test_every_process_samples_with_its_own_engine_and_the_same_adapter(tmp_path, tiny32, reward_model_dir, capfd,
                                                                        monkeypatch):
    """`trainer.devices: 2` with `generation.backend: vllm`: two processes, each with an engine of its own
    on its own core (a GPU each on a GPU machine), each sampling its own prompts with a freshly handed-
    over adapter every iteration. Before every rollout the trainable weights are bit-for-bit the same on
    both; both end with the same kl_coef; the history and the progress log show each iteration once."""
    # vLLM's CPU platform sets this for good in a process that built an engine in-process (an earlier test
    # in this worker may have): start without it, to see that the ranks' engines leave it unset here.
    monkeypatch.delenv("VLLM_WORKER_MULTIPROC_METHOD", raising=False)
    cfg = two_process_cfg(tiny32, "vllm")
    rows = prompt_rows(loading.load_tokenizer(tiny32))
    result = train_ppo(cfg, rows, reward_model_dir, str(tmp_path / "ppo"), callbacks=[RankLog(tmp_path)])
    logged = capfd.readouterr()
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    # Each engine on its own core, not both on both.
    cores = [set(r["placement"]["cores"]) for r in ranks]
    assert all(len(c) >= 1 for c in cores) and not cores[0] & cores[1], cores
    assert all(r["adapter_ids"] == [1, 2, 3] for r in ranks)  # its own engine, a new adapter every rollout
    assert ranks[0]["prompts"] != ranks[1]["prompts"]  # each process rolls out its own share
    assert ranks[0]["checksums"] == ranks[1]["checksums"]  # the same adapter before every rollout ...
    assert len({tuple(c) for c in ranks[0]["checksums"]}) == 3  # ... which the updates moved
    assert ranks[0]["kl_coef"] == ranks[1]["kl_coef"] != cfg.ppo.kl_coef
    assert [h["iteration"] for h in result.history] == [0, 1, 2]
    lines = [line for line in (logged.out + logged.err).splitlines() if line.startswith("ppo: epoch")]
    assert len(lines) == len(set(lines)) and any("batch 3/3" in line for line in lines), lines
    assert os.environ.get("VLLM_WORKER_MULTIPROC_METHOD") is None  # the engines' settings did not leak here


class _Perturb(Callback):
    """Rank 1 nudges one LoRA weight by one ulp before the first rollout: what a bad hand-over or a
    partial resume would leave."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_rank == 1 and batch_idx == 0:
            name, p = next((n, p) for n, p in pl_module.named_parameters() if "lora_A" in n)
            with torch.no_grad():
                p.view(-1)[0] = torch.nextafter(p.view(-1)[0], torch.tensor(float("inf")))


@needs_vllm
def test_a_rank_whose_adapter_differs_stops_every_rank_and_says_which(tmp_path, tiny32, reward_model_dir):
    """One ulp in one tensor on rank 1: the fit stops before the rollout on both ranks, naming the
    iteration, the rank and the tensor. Nothing waits forever: not a rank in a collective, nor a failed
    rank for its engine's processes (which it stops), so the step fails and can be retried."""
    cfg = two_process_cfg(tiny32, "vllm", iterations=1)
    rows = prompt_rows(loading.load_tokenizer(tiny32))
    with pytest.raises(Exception, match=r"PPO iteration 0: rank 1's trainable weights differ from rank 0's "
                                        r"\(1 tensor\(s\), first policy\..*lora_A"):
        train_ppo(cfg, rows, reward_model_dir, str(tmp_path / "ppo"), callbacks=[_Perturb()])


_NODE = """
import json, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from test_ranks import two_process_cfg
from test_ppo import prompt_rows
from rlhf_lightning.hardware import Node, node_world
from rlhf_lightning.models import loading
from rlhf_lightning.models.ppo import train_ppo

index = int(sys.argv[1])
cfg = two_process_cfg("tiny:llama", "hf")
cfg.trainer.devices, cfg.trainer.num_nodes = 1, 2
with node_world(Node(index, 2, "127.0.0.1", {port})):
    result = train_ppo(cfg, prompt_rows(loading.load_tokenizer("tiny:llama")), {rm!r}, {out!r} + f"/node{{index}}")
Path({out!r} + f"/node{{index}}.json").write_text(json.dumps(None if result is None else result.adapter_dir))
"""


def test_two_nodes_of_one_process_train_as_one_node_of_two(tmp_path, reward_model_dir):
    """HF generate over two nodes of one process each, laid out as a Metaflow @parallel step lays them
    (`hardware.node_world`: node 0 at 127.0.0.1, NODE_RANK; each node a process of its own, as a local
    @parallel run starts them): node 0 returns the policy, node 1 nothing, and the weights are those of
    one node of two processes. (The flow over two nodes, with vLLM, a kill and a retry: test_nodes.py.)"""
    import socket
    import subprocess
    import sys

    from safetensors.torch import load_file

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = _NODE.format(tests=os.path.dirname(__file__), port=port, rm=reward_model_dir, out=str(tmp_path))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen([sys.executable, "-c", script, str(i)], env=env) for i in range(2)]
    assert [n.wait(timeout=600) for n in nodes] == [0, 0]
    adapter = json.loads((tmp_path / "node0.json").read_text())
    assert adapter and json.loads((tmp_path / "node1.json").read_text()) is None

    straight = train_ppo(two_process_cfg("tiny:llama", "hf"), prompt_rows(loading.load_tokenizer("tiny:llama")),
                         reward_model_dir, str(tmp_path / "straight"))
    want = load_file(f"{straight.adapter_dir}/adapter_model.safetensors")
    got = load_file(f"{adapter}/adapter_model.safetensors")
    assert set(want) == set(got)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6, msg=name)
