"""The flow over two nodes (`trainer.num_nodes: 2`): the reward model and PPO as Metaflow `@parallel`
steps, run in Metaflow's local mode (each node a task process of its own on this machine, node 0 at
127.0.0.1), one training process per node, PPO's rollouts from a vLLM engine on each.

One run, killed twice on its way: node 1's task dies by SIGKILL (with its training process and its
engine, as a machine dies) after PPO's first checkpoint; the step fails, `@retry` starts both nodes again
and they continue from that checkpoint; then the whole run dies after the retry's first checkpoint, and
`resume` continues both nodes from that one. The run must end as one node of two processes ends
uninterrupted, with only node 0's records. With one node the graph is the plain one; with two `step-functions create` is
refused with what works instead."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import psutil
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from test_engines import build_tiny32, needs_vllm
from test_flow import _checkpoints, _wait

REPO = Path(__file__).resolve().parents[1]
ITERATIONS = 10  # configs/tiny.yaml checkpoints PPO every 2 iterations; the kill during the retry needs
# iterations left after its first new checkpoint (at 6 the retry, at ~1 s an iteration, could finish first)


def nodes_config(work: Path, **extra) -> Path:
    """configs/tiny.yaml over two nodes, PPO, sampling and the evaluation on vLLM (a tiny policy whose
    heads the engine's CPU kernels take)."""
    path = work / "nodes.yaml"
    model = build_tiny32(work / "tiny32")
    path.write_text(yaml.safe_dump({"include": str(REPO / "configs" / "tiny.yaml"), "policy": {"model": model},
                                    # node 0 gives up on a dead node 1 after 30 s (default: 10 minutes)
                                    "trainer": {"accelerator": "cpu", "num_nodes": 2, "collective_timeout_s": 30},
                                    "generation": {"backend": "vllm", "dtype": "float32"}, **extra}))
    return path


def _flow_env(work: Path) -> dict:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{work}/mlflow.db", "USERNAME": "tester",
           "METAFLOW_DATASTORE_SYSROOT_LOCAL": str(work), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("MLFLOW_RUN_ID", None)
    return env


def _node_task(root: int, step: str) -> psutil.Process | None:
    """The task process of node 1 of `step` under the flow process `root`."""
    for proc in psutil.Process(root).children(recursive=True):
        try:
            cmd = " ".join(proc.cmdline())
        except psutil.Error:
            continue
        if " step " in cmd and f" {step} " in cmd and "_node_1" in cmd:
            return proc
    return None


@pytest.fixture(scope="module")
def nodes_run(tmp_path_factory):
    from metaflow import Run, get_metadata, metadata, namespace

    work = tmp_path_factory.mktemp("nodes")
    env = _flow_env(work)
    flow = [sys.executable, str(REPO / "flows" / "rlhf.py"), "--config", "cfg", str(nodes_config(work))]
    log = open(work / "flow.log", "w")
    proc = subprocess.Popen([*flow, "run", "--max-workers", "2", "--ppo_iterations", str(ITERATIONS),
                             "--run-id-file", str(work / "run_id")],
                            cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    faults = {}
    try:
        run_id = _wait("the run id", lambda: (work / "run_id").exists() and (work / "run_id").read_text().strip(), proc)
        _wait("PPO's first checkpoint", lambda: _checkpoints(work, run_id), proc, timeout=600)
        node = _wait("node 1's PPO task", lambda: _node_task(proc.pid, "reinforce"), proc)
        # The machine dies: the task, its training process and its engine.
        victims = [node, *node.children(recursive=True)]
        faults["killed_processes"] = len(victims)
        for victim in victims:
            victim.send_signal(signal.SIGKILL)
        faults["killed_after"] = k = _checkpoints(work, run_id)[-1]
        # Then the whole run dies (runtime, both nodes' tasks) during the retry, after its first new checkpoint.
        _wait("the retry's first new checkpoint", lambda: _checkpoints(work, run_id)[-1] > k, proc, timeout=600)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(60)
        faults["run_killed_after"] = _checkpoints(work, run_id)[-1]
        # `resume` finishes it (with the origin run's config: Metaflow refuses --config with `resume`).
        resume = subprocess.run([*flow[:2], "resume", "--origin-run-id", run_id, "--max-workers", "2",
                                 "--run-id-file", str(work / "resumed_id")],
                                cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=900)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
    output = (work / "flow.log").read_text()
    print(output[-20000:])
    assert resume.returncode == 0, "the resume failed; see the output above"
    origin, run_id = run_id, (work / "resumed_id").read_text().strip()
    with pytest.MonkeyPatch.context() as mp:
        for key in ("MLFLOW_TRACKING_URI", "USERNAME", "METAFLOW_DATASTORE_SYSROOT_LOCAL"):
            mp.setenv(key, env[key])
        mp.delenv("MLFLOW_RUN_ID", raising=False)
        mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
        previous = get_metadata()
        metadata(f"local@{work}")
        namespace(None)
        yield Run(f"RLHFFlow/{run_id}"), work, {"output": output, "origin_run_id": origin, **faults}
        mlflow.set_tracking_uri(None)
        if "@<" not in previous:
            metadata(previous)


@needs_vllm
def test_two_nodes_train_as_one_node_of_two_processes_through_a_dead_node(nodes_run, tmp_path):
    """Both training steps ran as two tasks, one per node; node 1's death failed the PPO step and the
    retry continued on both nodes from the checkpoint, the resumed run from the retry's; the adapter,
    value head, kl_coef and history equal one node of two processes running the same PPO without a fault."""
    from safetensors.torch import load_file

    from rlhf_lightning.config import load_config
    from rlhf_lightning.judge import has_gold_judge
    from rlhf_lightning.models.ppo import train_ppo

    run, work, faults = nodes_run
    assert run.successful
    for step in ("train_reward_model", "reinforce"):
        assert sorted(t.id.endswith("_node_1") for t in run[step].tasks()) == [False, True], step
    out = faults["output"]
    k, k1 = faults["killed_after"], faults["run_killed_after"]
    assert 0 < k < k1 < ITERATIONS and faults["killed_processes"] >= 2  # the task and at least its training process
    assert "Task is starting (retry)" in out
    origin = f"RLHFFlow/{faults['origin_run_id']}/reinforce"
    assert f"{origin}/batch-{k:08d}.ckpt ({k} batches done)" in out  # node 0's attempt 1
    assert f"{origin}/batch-{k1:08d}.ckpt ({k1} batches done)" in out  # node 0 in the resumed run
    for done in (k, k1):  # node 1 in the retry, then in the resumed run
        assert f"PPO: node 1 of 2 takes part in the fit node 0 leads, resuming from batch-{done:08d}.ckpt" in out
    progress = [line.split("] ", 1)[-1] for line in out.splitlines() if "ppo: epoch 1/1 batch" in line]
    assert len(progress) == len(set(progress))  # each line from rank 0 alone

    policy = run["evaluate"].task.data.policy  # node 0's, through the join
    task_policy = next(t for t in run["reinforce"].tasks() if not t.id.endswith("_node_1")).data.policy
    assert policy.tar == task_policy.tar
    assert [h["iteration"] for h in policy.history] == list(range(ITERATIONS))

    cfg = load_config(work / "nodes.yaml")
    cfg.ppo.iterations, cfg.trainer.num_nodes, cfg.trainer.devices = ITERATIONS, 1, 2
    rm_dir = run["join"].task.data.reward_model.extract(str(tmp_path / "rm"))
    straight = train_ppo(cfg, run["prepare_prompts"].task.data.prompts.rl, rm_dir, str(tmp_path / "ppo"),
                         gold_judge=has_gold_judge(cfg))
    resumed = policy.extract(str(tmp_path / "resumed"))
    want = load_file(f"{straight.adapter_dir}/adapter_model.safetensors") | torch.load(f"{straight.adapter_dir}/value_head.pt")
    got = load_file(f"{resumed}/adapter_model.safetensors") | torch.load(f"{resumed}/value_head.pt")
    assert set(want) == set(got)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-5, msg=name)
    for a, b in zip(straight.history, policy.history, strict=True):
        assert a == pytest.approx(b, abs=1e-5)


@needs_vllm
def test_only_node_0_records_in_mlflow(nodes_run):
    """One `reinforce` stage run per attempt of node 0's task (in the first Metaflow run the attempt whose
    node 1 died FAILED and the killed retry KILLED; the resumed run's FINISHED); no record names node 1's."""
    run, work, faults = nodes_run
    client = MlflowClient(f"sqlite:///{work}/mlflow.db")
    experiment = client.get_experiment_by_name("rlhf-lightning").experiment_id
    runs = client.search_runs([experiment])
    pathspecs = [r.data.tags.get("metaflow.pathspec", "") for r in runs]
    assert not [p for p in pathspecs if "_node_" in p], pathspecs
    reinforce = sorted((r for r in runs if r.data.tags.get("mlflow.runName") == "reinforce"),
                       key=lambda r: r.info.start_time)
    # Attempt 0 failed on node 0 itself (its collective timed out on the dead node 1); the retry was killed
    # with the whole run, and the resumed run's attempt finished.
    assert [r.info.status for r in reinforce] == ["FAILED", "KILLED", "FINISHED"], [r.info.status for r in reinforce]
    assert [r.data.tags["metaflow.attempt"] for r in reinforce] == ["0", "1", "0"]
    assert f"run {run.id} resumed it" in reinforce[1].data.tags["ended_because"]
    (parent,) = [r for r in runs if "metaflow.run_ids" in r.data.tags]  # the flow's own, not the base's
    assert parent.info.status == "FINISHED" and "mlflow.parentRunId" not in parent.data.tags
    assert parent.data.tags["metaflow.run_ids"] == f"{faults['origin_run_id']},{run.id}"
    history = client.get_metric_history(next(r.info.run_id for r in runs if r.data.tags.get("mlflow.runName") == "reinforce"
                                             and r.info.status == "FINISHED"), "ppo/kl_coef")
    assert sorted(m.step for m in history) == list(range(ITERATIONS))  # each iteration once


def test_one_node_keeps_the_plain_graph_and_two_refuse_step_functions(tmp_path):
    """`show` gives the plain graph for one node and the @parallel one for two; `step-functions create`
    with two nodes stops before anything is packaged or deployed, saying what runs them."""
    env = _flow_env(tmp_path)
    flow = [sys.executable, str(REPO / "flows" / "rlhf.py"), "--config", "cfg"]
    (tmp_path / "two.yaml").write_text(f"include: {REPO}/configs/tiny.yaml\ntrainer: {{num_nodes: 2}}\n")

    def graph(config: str) -> dict[str, str]:
        """{"Step <name>": "=> <next steps>"} as `show` prints them."""
        done = subprocess.run([*flow, config, "show"], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        lines = [line.strip() for line in done.stdout.splitlines() if line.startswith("Step") or "=>" in line]
        return dict(zip(lines[::2], lines[1::2]))

    one = graph(str(REPO / "configs" / "tiny.yaml"))
    assert one["Step validate"] == "=> train_reward_model, prepare_prompts"
    assert one["Step join"] == "=> reinforce" and one["Step reinforce"] == "=> evaluate"
    two = graph(str(tmp_path / "two.yaml"))
    assert two["Step validate"] == "=> train_reward_model" and two["Step join"] == "=> prepare_prompts"
    assert two["Step prepare_prompts"] == "=> reinforce" and two["Step reinforce"] == "=> evaluate"

    done = subprocess.run([*flow, str(tmp_path / "two.yaml"), "step-functions", "create", "--only-json"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    out = done.stdout + done.stderr
    assert done.returncode != 0 and "trainer.num_nodes is 2" in out, out[-3000:]
    assert "AWS Step Functions cannot run" in out and "run --with batch" in out and "argo-workflows create" in out
    assert "Traceback" not in out
