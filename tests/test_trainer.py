"""The Trainer both training stages run under: which strategy a config becomes, and the ones refused.

Inside a Metaflow step a strategy whose ranks are started by re-running the command line (Lightning's
`ddp`, and what `auto` picks for several devices) would run the whole step twice."""

from __future__ import annotations

import pytest
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher

from rlhf_lightning.config import ConfigError, TrainerConfig
from rlhf_lightning.models.trainer import build_trainer, resolve_strategy


def test_auto_over_several_devices_becomes_ddp_spawn():
    assert resolve_strategy("auto", 1) == "auto"
    assert resolve_strategy("auto", 2) == "ddp_spawn"
    assert resolve_strategy("auto", -1) == "ddp_spawn"  # every device there is
    assert resolve_strategy("ddp_spawn", 4) == "ddp_spawn"


def test_auto_with_two_devices_spawns_its_ranks_from_this_process():
    """What Lightning itself picks for `auto` and 2 devices is `ddp` with the launcher that re-runs the
    command line; the project's Trainer gets `ddp_spawn`, whose ranks are functions of this process."""
    trainer = build_trainer(TrainerConfig(accelerator="cpu", devices=2, precision="32-true"), "test", logger=False)
    assert isinstance(trainer.strategy, DDPStrategy)
    assert isinstance(trainer.strategy.launcher, _MultiProcessingLauncher)
    assert trainer.strategy.launcher._start_method == "spawn"
    one = build_trainer(TrainerConfig(accelerator="cpu", devices=1, precision="32-true"), "test", logger=False)
    assert isinstance(one.strategy, SingleDeviceStrategy)


@pytest.mark.parametrize("strategy, unused", [("auto", False), ("ddp_spawn_find_unused_parameters_true", True)])
def test_several_processes_wait_for_each_other_as_long_as_the_config_says(strategy, unused):
    """A process or node that dies leaves the others in a collective: they give up after
    trainer.collective_timeout_s (Lightning's own default is 30 minutes), over one node or several."""
    from datetime import timedelta

    cfg = TrainerConfig(accelerator="cpu", devices=2, num_nodes=3, precision="32-true", strategy=strategy,
                        collective_timeout_s=45)
    trainer = build_trainer(cfg, "test", logger=False)
    assert trainer.strategy._timeout == timedelta(seconds=45) and trainer.num_nodes == 3
    assert trainer.strategy._ddp_kwargs.get("find_unused_parameters", False) is unused
    assert trainer.strategy.launcher._start_method == "spawn"
    with pytest.raises(ConfigError, match="trainer.collective_timeout_s"):
        TrainerConfig(collective_timeout_s=0)


@pytest.mark.parametrize("strategy", ["ddp_find_unused_parameters_true", "ddp_find_unused_parameters_false"])
def test_a_strategy_that_re_runs_the_command_line_is_refused_whatever_its_name(strategy):
    """The config says so before any step runs; the Trainer, by the launcher Lightning resolved, for what
    the config's names miss."""
    with pytest.raises(ConfigError, match=f"trainer.strategy: {strategy} over 2 devices starts its ranks"):
        TrainerConfig(accelerator="cpu", devices=2, precision="32-true", strategy=strategy)
    unchecked = TrainerConfig(accelerator="cpu", precision="32-true")
    unchecked.devices, unchecked.strategy = 2, strategy  # past the config's own check
    with pytest.raises(ConfigError, match=f"trainer.strategy: {strategy} starts its ranks by re-running"):
        build_trainer(unchecked, "test", logger=False)
    # One device starts no second process, whatever the strategy's launcher.
    build_trainer(TrainerConfig(accelerator="cpu", devices=1, precision="32-true", strategy=strategy), "test",
                  logger=False)
