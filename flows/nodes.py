"""The training steps over several machines (`trainer.num_nodes` > 1): Metaflow `@parallel` steps.

With one node (the default) nothing here changes the flow: its graph is the one flows/rlhf.py spells
out, which every Metaflow scheduler takes (AWS Step Functions included). With several, `over_nodes` (a
flow mutator: Metaflow runs it in every process of the run, the launcher and each task, before it reads
the graph) makes `train_reward_model` and `reinforce` `@parallel` steps and swaps in the steps around
them that a `@parallel` step needs: the step before it starts `num_nodes` tasks of it (`num_parallel`),
and the step after it joins them:

    validate -> train_reward_model x N -> join -> prepare_prompts -> reinforce x N -> evaluate (joins) -> ...

(a join may not also start a `@parallel` step, so `prepare_prompts` follows the join instead of running
beside the reward model). Each of the N tasks is one machine with `trainer.devices` training processes:
on AWS Batch a multi-node parallel job, on Kubernetes a JobSet, under a plain `run` N processes on this
machine (on its CPU: `training_node` refuses local nodes sharing GPUs). Lightning lays its world out
from `current.parallel` (`training_node`): node 0's rank 0 is the run's, and only node 0 records
anything (artifacts, checkpoints, MLflow). A task that dies fails the
step; `@retry` then starts all N again, and they continue from the last checkpoint together.

AWS Step Functions and Airflow cannot run `@parallel` steps: `step-functions create` (and `airflow
create`) with several nodes stop at once, saying what does (`run --with batch`, Argo Workflows).

On AWS Batch, a multi-node job needs Metaflow's metadata service: with local metadata node 0 waits
for the other nodes' tasks in its own container's records, never sees them, and fails after 10
minutes. A launch that would do that stops at once and says so (RLHF_LIGHTNING_ALLOW_LOCAL_METADATA=1
skips the check, for a Batch emulator that runs no multi-node job, as the project's offline test uses).
"""

from __future__ import annotations

import os
import sys
import zlib

from faults import PipelineError  # flows/faults.py
from jobs import RETRY, TRAIN_CPUS, TRAIN_GPUS, TRAIN_MEMORY  # flows/jobs.py
from metaflow import FlowMutator, card, current, parallel, resources, retry, step

# Schedulers that cannot run @parallel steps (Metaflow refuses them only after packaging the flow, and
# with a message that does not say what to do instead).
NO_PARALLEL_SCHEDULERS = ("step-functions", "airflow")


def training_node(cfg):
    """This machine of a training step over several (`hardware.Node`), None for a step on one.

    Metaflow gives node 0's address (`current.parallel.main_ip`) but no port: the port node 0 listens on
    is derived from the run, the step and the attempt, the same on every node and different for another
    run on the same machine (local `@parallel` runs put every node on 127.0.0.1);
    `RLHF_LIGHTNING_MASTER_PORT` sets it instead."""
    if not current.get("is_parallel", False):
        return None
    from rlhf_lightning.hardware import Node

    info = current.parallel
    if int(info.num_nodes) > 1 and info.main_ip in ("127.0.0.1", "localhost"):
        _refuse_local_nodes_on_gpus(cfg, int(info.num_nodes))
    key = f"{current.flow_name}/{current.run_id}/{current.step_name}/{current.retry_count}"
    port = int(os.environ.get("RLHF_LIGHTNING_MASTER_PORT") or 20000 + zlib.crc32(key.encode()) % 20000)
    return Node(index=int(info.node_index), count=int(info.num_nodes), main_ip=info.main_ip, port=port)


def _batch_with_local_metadata(argv: list[str]) -> bool:
    """A launch (`run`, `resume`) of steps on AWS Batch that records its metadata locally."""
    if not {"run", "resume"} & set(argv) or "step" in argv:
        return False
    batch = any(a == "batch" or a.startswith(("batch:", "--with=batch")) for a in argv)
    metadata = next((a.split("=", 1)[1] for a in argv if a.startswith("--metadata=")), None)
    if metadata is None and "--metadata" in argv[:-1]:
        metadata = argv[argv.index("--metadata") + 1]
    if metadata is None:
        from metaflow.metaflow_config import DEFAULT_METADATA

        metadata = DEFAULT_METADATA
    return batch and metadata == "local"


def _refuse_local_nodes_on_gpus(cfg, nodes: int) -> None:
    """A plain `run` puts every node on this machine, each node's processes on GPUs 0.. : on a GPU machine
    they would take the same GPUs (NCCL refuses two ranks on one). Said before anything loads."""
    from rlhf_lightning.hardware import GPU_ACCELERATORS

    if cfg.trainer.accelerator not in GPU_ACCELERATORS:
        return
    import torch

    if torch.cuda.is_available():
        raise PipelineError(
            f"trainer.num_nodes is {nodes} in a run on this one machine: every node's processes would take the "
            "same GPUs. On one GPU machine set trainer.num_nodes: 1 and trainer.devices to its GPUs (the same "
            "processes, one node); to try several nodes here, trainer.accelerator: cpu; on several machines, "
            "`run --with batch:...` or `--with kubernetes`")


def _nodes(flow) -> int:
    return int(flow.cfg.trainer.num_nodes)


# ---------------------------------------------------------------- the steps of a run over several nodes
# Named as the steps they replace; their work is the flow's own (the `_validate`, `_prepare_prompts`,
# `_evaluate` methods of RLHFFlow), only the transitions differ.


@card(type="blank")
@step
def validate(self):
    """Check every row; stop the run here, with a report, on errors. Then the reward model on every node."""
    self._validate()
    self.next(self.train_reward_model, num_parallel=_nodes(self))


@step
def join(self, inputs):
    """Node 0's reward model (the other nodes trained beside it and return nothing)."""
    self.merge_artifacts(inputs, include=["parent_run_id", "data", "validation", "reward_model"])
    self.next(self.prepare_prompts)


@step
def prepare_prompts(self):
    """Hand the RL prompts and the held-out evaluation prompts on; then PPO on every node."""
    self._prepare_prompts()
    self.next(self.reinforce, num_parallel=_nodes(self))


@card(type="blank")
@resources(cpu=TRAIN_CPUS, memory=TRAIN_MEMORY, gpu=TRAIN_GPUS)
@retry(**RETRY)
@step
def evaluate(self, inputs):
    """Node 0's policy (the other nodes trained beside it) vs reference on held-out prompts; decide promotion."""
    self.merge_artifacts(inputs, include=["parent_run_id", "data", "validation", "reward_model", "prompts", "policy"])
    self._evaluate()
    self.next(self.register)


class over_nodes(FlowMutator):
    """Flow decorator: `trainer.num_nodes` > 1 makes the training steps `@parallel` (module docstring)."""

    def pre_mutate(self, mutable_flow) -> None:
        cfg = dict(mutable_flow.configs)["cfg"]
        nodes = int(cfg.trainer.num_nodes)
        if nodes <= 1:
            return
        scheduler = next((name for name in NO_PARALLEL_SCHEDULERS if name in sys.argv[1:]), None)
        if scheduler is not None:
            raise PipelineError(
                f"trainer.num_nodes is {nodes}: the reward model and PPO then run as Metaflow @parallel steps, "
                f"which {'AWS Step Functions' if scheduler == 'step-functions' else 'Airflow'} cannot run. "
                "Launch the run with `python flows/rlhf.py --config cfg <file> run --with batch:...` (AWS Batch "
                "multi-node jobs) or `--with kubernetes`, deploy it with `argo-workflows create`, or set "
                "trainer.num_nodes: 1 (every GPU of one machine: trainer.devices)")
        if _batch_with_local_metadata(sys.argv[1:]) and os.environ.get("RLHF_LIGHTNING_ALLOW_LOCAL_METADATA") != "1":
            raise PipelineError(
                f"trainer.num_nodes is {nodes} on AWS Batch, but Metaflow records this run's metadata locally: "
                "a multi-node job's node 0 then never sees the other nodes' tasks finish (it looks for them in "
                "its own container) and Metaflow 2.19 rewrites every occurrence of the task's small local id "
                "in the other nodes' command. Point Metaflow at its metadata service (`metaflow configure aws` "
                "with a metadata service URL, or METAFLOW_DEFAULT_METADATA=service and METAFLOW_SERVICE_URL), "
                "or set trainer.num_nodes: 1")
        # A local @parallel step starts its other nodes as `python <flow> step ...` from PATH: make that the
        # interpreter running this flow (a venv's, say), whatever PATH the user has.
        here = os.path.dirname(sys.executable)
        if os.environ.get("PATH", "").split(os.pathsep)[0] != here:
            os.environ["PATH"] = os.pathsep.join([here, os.environ.get("PATH", "")])
        flow = mutable_flow._flow_cls  # Metaflow's mutators have no public way to replace a step
        for variant in (validate, join, prepare_prompts, evaluate):
            setattr(flow, variant.__name__, variant)
        for name in ("train_reward_model", "reinforce"):
            getattr(mutable_flow, name).add_decorator(parallel)

