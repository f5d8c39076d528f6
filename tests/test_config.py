import tomllib
from pathlib import Path

import pytest

from common.config import ConfigError, RunConfig

ROOT = Path(__file__).resolve().parent.parent


def test_pyproject_defaults_equal_the_dataclass_defaults():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["tool"]["flwr"]["app"]["config"] == RunConfig().to_mapping()


def test_defaults_validate():
    assert RunConfig.from_mapping(RunConfig().to_mapping()) == RunConfig()


def test_ints_stand_for_floats_and_are_converted():
    config = RunConfig.from_mapping({"target-epsilon": 3, "learning-rate": 1})
    assert config.target_epsilon == 3.0 and isinstance(config.target_epsilon, float)


@pytest.mark.parametrize(
    "key,value,needle",
    [
        ("target-epsilon", 0, "target-epsilon=0"),
        ("target-epsilon", -1.0, "allowed range"),
        ("delta", 0.5, "delta=0.5"),
        ("lora-r", 0, "lora-r=0"),
        ("learning-rate", 0.0, "learning-rate"),
        ("num-server-rounds", 0, "num-server-rounds"),
        ("num-server-rounds", 2.5, "whole number"),
        ("batch-size", "64", "must be a number"),
        ("dp", "yes", "true or false"),
        ("aggregation", "fedsgd", "allowed values: fedavg"),
        ("accountant", "gdp", "allowed values: prv, rdp"),
        ("run-name", "../escape", "run-name"),
        ("max-grad-norm", float("nan"), "finite"),
    ],
)
def test_bad_values_name_the_key_and_what_is_allowed(key, value, needle):
    with pytest.raises(ConfigError) as err:
        RunConfig.from_mapping({key: value})
    assert key in str(err.value)
    assert needle in str(err.value)


def test_unknown_key_lists_the_allowed_keys():
    with pytest.raises(ConfigError, match="unknown run-config key.*epsilon.*allowed keys:.*target-epsilon"):
        RunConfig.from_mapping({"epsilon": 3.0})


def test_file_dataset_needs_its_columns():
    with pytest.raises(ConfigError, match="text-column and label-column"):
        RunConfig.from_mapping({"dataset": "/data/notes.csv"})
