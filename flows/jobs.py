"""What each step's job asks for (`@resources`, `@retry`), from the config: shared by the flow's steps
(flows/rlhf.py) and their variants over several nodes (flows/nodes.py). Metaflow evaluates a
`config_expr` in the module that made it, so the helpers it names live here."""

from metaflow import config_expr

from rlhf_lightning.hardware import GPU_ACCELERATORS

# The heavy steps run again on another machine when theirs dies (a spot reclaim, an OOM kill); the
# training steps continue from their last checkpoint (faults.checkpoint_plan).
RETRY = {"times": config_expr("cfg.faults.retries"),
         "minutes_between_retries": config_expr("cfg.faults.minutes_between_retries")}


def gpus(cfg, count: int) -> int:
    """GPUs a step's job asks for: `count` where the configured accelerator may be a GPU, else none."""
    return int(count) if cfg.trainer.accelerator in GPU_ACCELERATORS else 0


def train_memory(cfg) -> int:
    """MB of host memory a training step's job asks for (on each node): 16 GB for one process, and 8 GB
    more for each further rank, since every rank loads its own copy of the base before it moves to its GPU."""
    return 16000 + 8000 * (int(cfg.trainer.devices) - 1)


def train_shared_memory(cfg):
    """MB of /dev/shm for a training step's job with several ranks, None (the container's default) for one.
    Docker's default is 64 MB: ddp_spawn hands the module to its ranks through shared memory (every
    weight that is not 4-bit) and NCCL's intra-node transport uses it. Half the job's memory; it is
    counted against the job's memory only as it fills."""
    return train_memory(cfg) // 2 if int(cfg.trainer.devices) > 1 else None


def sampling_devices(cfg) -> int:
    """How many devices the built-in task's sampling tasks get: training's, or none when the config names
    its own data (the one task then does nothing)."""
    from rlhf_lightning.config import from_dict

    return int(cfg.trainer.devices) if from_dict(cfg.to_dict()).uses_builtin_task else 0


# The training steps ask for trainer.devices GPUs (on each node, when they run on several): a container
# has only the GPUs its job asked for, and Lightning refuses `devices: 2` where it sees one; with the
# host memory, shared memory and cores their ranks need. The built-in task's sampling and the evaluation
# ask for as many GPUs, memory and cores and spread their work over every one (hardware.over_devices).
TRAIN_GPUS = config_expr("gpus(cfg, cfg.trainer.devices)")
TRAIN_CPUS = config_expr("4 * int(cfg.trainer.devices)")
TRAIN_MEMORY = config_expr("train_memory(cfg)")
TRAIN_SHM = config_expr("train_shared_memory(cfg)")
SAMPLE_GPUS = config_expr("gpus(cfg, sampling_devices(cfg))")
SAMPLE_CPUS = config_expr("4 * max(sampling_devices(cfg), 1)")
SAMPLE_MEMORY = config_expr("train_memory(cfg) if sampling_devices(cfg) else 4000")
