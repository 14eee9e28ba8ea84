from pathlib import Path

import pytest

from rlhf_lightning.config import ConfigError, flatten, from_dict, load_config

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["default.yaml", "tiny.yaml"])
def test_shipped_configs_load(name):
    cfg = load_config(REPO / "configs" / name)
    assert cfg.ppo.rollout_batch_size % cfg.ppo.minibatch_size == 0


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
        ({"data": {"eval_fraction": 1.5}}, "data.eval_fraction"),
        ({"ppo": {"learning_rate": "fast"}}, "ppo.learning_rate: expected a number, got 'fast'"),
    ],
)
def test_bad_values_name_the_field(tree, message):
    with pytest.raises(ConfigError) as err:
        from_dict(tree)
    assert message in str(err.value)


def test_yaml_exponent_without_dot_is_a_number(tmp_path):
    # YAML 1.1 (PyYAML) reads 5e-4 as the string "5e-4"; it must still reach torch as a float.
    path = tmp_path / "c.yaml"
    path.write_text("ppo:\n  learning_rate: 5e-4\n")
    assert load_config(path).ppo.learning_rate == 5e-4


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.yaml")


def test_auto_precision_is_bf16_where_the_cpu_computes_in_bf16():
    from rlhf_lightning.models.loading import cpu_has_bf16, resolve_precision

    amx = "processor\t: 0\nflags\t\t: fpu sse avx512f avx512_bf16 amx_bf16 amx_tile\n"
    plain = "processor\t: 0\nflags\t\t: fpu sse avx2\n"
    assert cpu_has_bf16(amx) and not cpu_has_bf16(plain)
    assert resolve_precision("auto", "cpu", amx) == "bf16-mixed"
    assert resolve_precision("auto", "cpu", plain) == "32-true"
    assert resolve_precision("32-true", "cpu", amx) == "32-true"  # an explicit choice is kept
