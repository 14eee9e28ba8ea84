from pathlib import Path

import pytest

from rlhf_lightning.config import RLHFConfig, ConfigError, flatten, from_dict, load_config, parse_yaml_config, to_dict

REPO = Path(__file__).resolve().parents[1]


CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def test_configs_are_found():
    assert {p.name for p in CONFIGS} >= {"default.yaml", "tiny.yaml", "hh-harmless.yaml",
                                         "reward-model-policy-backbone.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_says_something(path):
    """Each file in configs/ loads, and each key it sets is a real key (the loader rejects unknown ones) that
    it sets to what it means: a file whose keys all repeat the defaults would mislead its reader, except
    default.yaml, whose point is to show them."""
    cfg = load_config(path)
    if path.name != "default.yaml":
        assert flatten(cfg) != flatten(RLHFConfig()), f"{path.name} only repeats the defaults"


def test_the_dataclass_defaults_are_the_default_run():
    """One set of defaults: what `RLHFConfig()` builds (Python, `validate` without --config) is exactly what
    configs/default.yaml, the file `make run` and the flow use, loads."""
    assert flatten(load_config(REPO / "configs" / "default.yaml")) == flatten(RLHFConfig())
    assert parse_yaml_config("") == to_dict(RLHFConfig())  # an empty file given to the flow: the default run


def test_partial_dict_keeps_defaults_and_coerces():
    cfg = from_dict({"ppo": {"kl_coef": 1}, "serving": {"requests": [{"prompt": "hi"}]}})
    assert cfg.ppo.kl_coef == 1.0 and isinstance(cfg.ppo.kl_coef, float)
    assert cfg.serving.requests[0].prompt == "hi"
    assert cfg.ppo.iterations == 24
    assert flatten(cfg)["ppo.kl_coef"] == 1.0


@pytest.mark.parametrize(
    "tree, message",
    [
        ({"ppo": {"klcoef": 1}}, "ppo: unknown key(s) ['klcoef']"),
        ({"ppo": {"iterations": "many"}}, "ppo.iterations: expected int"),
        ({"ppo": {"rollout_batch_size": 16, "minibatch_size": 5}}, "ppo.minibatch_size: must divide"),
        ({"policy": {"quantization": "8bit"}}, "policy.quantization: got '8bit'"),
        ({"trainer": {"strategy": "ddp"}}, "use ddp_spawn"),
        ({"trainer": {"devices": 4, "strategy": "fsdp"}},
         "trainer.strategy: fsdp over 4 devices starts its ranks by re-running the command line"),
        ({"trainer": {"devices": 2, "strategy": "ddp_find_unused_parameters_true"}}, "use auto or ddp_spawn"),
        ({"trainer": {"devices": -1}}, "trainer.devices: give the number of devices per node"),
        ({"data": {"eval_fraction": 1.5}}, "data.eval_fraction"),
        ({"ppo": {"learning_rate": "fast"}}, "ppo.learning_rate: expected a number, got 'fast'"),
    ],
)
def test_bad_values_name_the_field(tree, message):
    with pytest.raises(ConfigError) as err:
        from_dict(tree)
    assert message in str(err.value)


def test_a_kl_horizon_too_short_for_the_rollout_is_refused():
    """48 prompts x 4 samples = 192 rows per iteration against kl_horizon 32: at a KL far below the target
    the adaptive controller's step 1 - 0.2 x 192 / 32 = -0.2 would turn the KL penalty into a reward. The
    error names the fields and the fix; a long enough horizon, or a fixed kl_coef, is accepted."""
    tree = {"ppo": {"rollout_batch_size": 48, "samples_per_prompt": 4, "kl_horizon": 32}}
    with pytest.raises(ConfigError) as err:
        from_dict(tree)
    message = str(err.value)
    assert "ppo.kl_horizon: 32 is too short for a rollout of 192 rows" in message
    for expected in ("ppo.rollout_batch_size", "ppo.samples_per_prompt", "ppo.kl_coef", "ppo.kl_target",
                     "at least 77", "-0.2"):
        assert expected in message, expected
    assert from_dict({"ppo": {**tree["ppo"], "kl_horizon": 77}}).ppo.kl_horizon == 77  # 1 - 0.2 x 192 / 77 >= 0.5
    with pytest.raises(ConfigError, match="ppo.kl_horizon"):
        from_dict({"ppo": {**tree["ppo"], "kl_horizon": 76}})
    assert from_dict({"ppo": {**tree["ppo"], "kl_target": None}}).ppo.kl_target is None  # no controller


def test_yaml_exponent_without_dot_is_a_number(tmp_path):
    # YAML 1.1 (PyYAML) reads 5e-4 as the string "5e-4"; it must still reach torch as a float.
    path = tmp_path / "c.yaml"
    path.write_text("ppo:\n  learning_rate: 5e-4\n")
    assert load_config(path).ppo.learning_rate == 5e-4


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.yaml")


def test_auto_precision_is_bf16_where_the_hardware_computes_in_bf16():
    import torch

    from rlhf_lightning.models.loading import cpu_has_bf16, resolve_precision

    amx = "processor\t: 0\nflags\t\t: fpu sse avx512f avx512_bf16 amx_bf16 amx_tile\n"
    plain = "processor\t: 0\nflags\t\t: fpu sse avx2\n"
    assert cpu_has_bf16(amx) and not cpu_has_bf16(plain)
    assert resolve_precision("auto", "cpu", amx) == "bf16-mixed"
    assert resolve_precision("auto", "cpu", plain) == "32-true"
    assert resolve_precision("32-true", "cpu", amx) == "32-true"  # an explicit choice is kept
    # GPUs by compute capability: bf16 where it is native (A100 8.0, A10G 8.6, H100 9.0); fp16 with a
    # gradient scaler on T4 (7.5) and V100 (7.0), which only emulate bf16.
    from rlhf_lightning.models.loading import base_dtype

    for capability, expected, dtype in (((8, 0), "bf16-mixed", torch.bfloat16), ((8, 6), "bf16-mixed", torch.bfloat16),
                                        ((9, 0), "bf16-mixed", torch.bfloat16), ((7, 5), "16-mixed", torch.float16),
                                        ((7, 0), "16-mixed", torch.float16)):
        assert resolve_precision("auto", "gpu", cuda_capability=capability) == expected, capability
        assert base_dtype(cuda=True, capability=capability) == dtype  # also the 4-bit compute dtype
    assert resolve_precision("32-true", "gpu", cuda_capability=(7, 5)) == "32-true"


def test_the_scaling_configs_say_what_their_machines_run():
    """configs/8gpu-vllm-nf4-8b.yaml: an 8B nf4 LoRA policy on 8 GPUs of one machine, each training
    process with its own vLLM engine; configs/2-nodes.yaml: the same on two such machines, each process
    with the same share, so twice the prompts per iteration. What their training jobs ask for follows
    (per node)."""
    import sys

    sys.path.insert(0, str(REPO / "flows"))
    from jobs import gpus, train_memory, train_shared_memory  # flows/jobs.py

    one = load_config(REPO / "configs" / "8gpu-vllm-nf4-8b.yaml")
    assert (one.trainer.devices, one.trainer.num_nodes, one.trainer.world_size) == (8, 1, 8)
    assert one.generation.backend == "vllm" and one.policy.quantization == "4bit" and one.policy.lora.r == 16
    assert "8B" in one.policy.model and one.trainer.accelerator == "gpu"
    assert (gpus(one, one.trainer.devices), train_memory(one), train_shared_memory(one)) == (8, 72000, 36000)
    two = load_config(REPO / "configs" / "2-nodes.yaml")
    assert (two.trainer.devices, two.trainer.num_nodes, two.trainer.world_size) == (8, 2, 16)
    assert one.ppo.rollout_batch_size * one.trainer.world_size == 128
    assert two.ppo.rollout_batch_size * two.trainer.world_size == 256
    differ = {k for k, v in flatten(two).items() if flatten(one)[k] != v}
    assert differ == {"trainer.num_nodes"}, differ
    # Per node, as one machine of the 8-GPU config.
    assert (gpus(two, two.trainer.devices), train_memory(two), train_shared_memory(two)) == (8, 72000, 36000)
