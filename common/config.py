"""The typed run configuration, validated once at the edge.

Flower hands apps a flat ``{kebab-key: value}`` dict; ``RunConfig.from_mapping`` turns
it into a frozen dataclass or raises ``ConfigError`` naming the key and what it allows.
The defaults below are the only ones; ``pyproject.toml`` mirrors them because Flower
requires every run-config key there (a test keeps both equal).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

AGGREGATIONS = ("fedavg", "ffa-lora", "fedprox", "fedadam", "trimmed-mean", "median", "krum")
# These need every site's individual update, which secure aggregation hides from the server.
NEEDS_INDIVIDUAL_UPDATES = ("trimmed-mean", "median", "krum")
ACCOUNTANTS = ("prv", "rdp")
TASKS = ("sequence-classification", "token-classification")
# Bundled demo data sets, by the task they serve.
BUNDLED_DATASETS = {"bank": TASKS[0], "hospital": TASKS[0], "ner-demo": TASKS[1]}
# dataset='policy': every site trains on the data its own policy names (a deployment); the run names the labels.
POLICY_DATA = "policy"
# `privet simulate` sets this in the simulation's environment, so its sites run without a policy; a real SuperNode
# never has it unless its administrator sets it. The server cannot: it controls neither a site's environment nor
# its node config.
SIMULATION_ENV = "PRIVET_SIMULATED_SITES"
# A positive eval-noise-multiplier below this buys nothing (one evaluation alone would cost ε ≈ 90 at δ=1e-5) and
# sends a site's accountant into huge allocations.
MIN_EVAL_NOISE = 0.1


class ConfigError(ValueError):
    """A run-config key has a value outside what it allows."""


def _range(lo: float | None = None, hi: float | None = None, *, lo_open=False, hi_open=False):
    """Describe a numeric range for `_check_number`."""
    return {"lo": lo, "hi": hi, "lo_open": lo_open, "hi_open": hi_open}


@dataclass(frozen=True)
class RunConfig:
    """Everything a run needs, with the defaults every run starts from.

    Every number has a finite range: the server sets them all, and each reaches a site's planning, its bounds or
    its allocations (a max-site-weight of 1e300 would make the global adapter's bound infinite).
    """

    run_name: str = ""
    runs_dir: str = "runs"
    resume: bool = False
    task: str = TASKS[0]
    dataset: str = "bank"
    test_dataset: str = ""
    text_column: str = ""
    label_column: str = ""
    labels: str = ""
    model: str = "default"
    num_server_rounds: int = field(default=3, metadata=_range(1, 10_000))
    # The first rounds train only the head, on features the frozen encoder computes once (DP linear probing); the
    # last `lora-rounds` rounds train LoRA and the head. Chosen by bench/dp_recipe.py (README: Performance).
    lora_rounds: int = field(default=0, metadata=_range(0, 10_000))
    head_epochs: int = field(default=10, metadata=_range(1, 10_000))
    head_batch_size: int = field(default=256, metadata=_range(1, 65_536))
    head_learning_rate: float = field(default=0.03, metadata=_range(0, 10, lo_open=True))
    local_epochs: int = field(default=1, metadata=_range(1, 1_000))
    max_examples_per_site: int = field(default=1000, metadata=_range(0, 10_000_000))
    max_length: int = field(default=64, metadata=_range(8, 8192))
    batch_size: int = field(default=128, metadata=_range(1, 65_536))
    learning_rate: float = field(default=0.02, metadata=_range(0, 10, lo_open=True))
    dp: bool = True
    target_epsilon: float = field(default=8.0, metadata=_range(0, 100, lo_open=True))
    delta: float = field(default=1e-5, metadata=_range(0, 0.1, lo_open=True))
    # 0: each site picks the noise at which its planned evaluations alone cost at most an eighth of its target ε.
    eval_noise_multiplier: float = field(default=0.0, metadata=_range(0, 1_000))
    max_grad_norm: float = field(default=1.0, metadata=_range(0, 1_000, lo_open=True))
    accountant: str = "prv"
    lora_r: int = field(default=8, metadata=_range(1, 1024))
    lora_alpha: int = field(default=16, metadata=_range(1, 65_536))
    aggregation: str = "ffa-lora"
    proximal_mu: float = field(default=0.01, metadata=_range(0, 1_000))
    server_learning_rate: float = field(default=0.01, metadata=_range(0, 10, lo_open=True))
    trim_fraction: float = field(default=0.2, metadata=_range(0, 0.5, hi_open=True))
    krum_byzantine: int = field(default=1, metadata=_range(0, 1_000))
    # Centered clipping (server/robust.py) in place of the plain mean of fedavg, ffa-lora, fedprox and fedadam.
    robust_aggregation: bool = True
    max_update_norm: float = field(default=0.0, metadata=_range(0, 1_000_000))
    max_site_weight: int = field(default=10_000, metadata=_range(1, 1_000_000))
    site_registry: str = ""
    secure_aggregation: bool = False
    central_dp: bool = False
    central_noise_multiplier: float = field(default=1.0, metadata=_range(0, 1_000, lo_open=True))
    central_clipping_norm: float = field(default=1.0, metadata=_range(0, 1_000_000, lo_open=True))
    dirichlet_alpha: float = field(default=1.0, metadata=_range(0, 1_000_000, lo_open=True))
    # Three: with two sites nobody can tell a rogue from an honest one (robustness needs an honest majority).
    min_sites: int = field(default=3, metadata=_range(1, 10_000))
    round_timeout: float = field(default=3600, metadata=_range(0, 604_800, lo_open=True))  # a week
    eval_examples: int = field(default=600, metadata=_range(0, 10_000_000))
    seed: int = field(default=42, metadata=_range(0, 2**31 - 1))

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any]) -> RunConfig:
        """Validate a Flower run config (kebab-case keys) and build the dataclass."""
        fields = {f.name.replace("_", "-"): f for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - set(fields))
        if unknown:
            raise ConfigError(
                f"unknown run-config key(s) {', '.join(unknown)}; allowed keys: {', '.join(sorted(fields))}"
            )
        values = {}
        for key, value in raw.items():
            f = fields[key]
            values[f.name] = _coerce(key, value, f)
        config = cls(**values)
        config._check_choices()
        return config

    def is_lora_round(self, server_round: int) -> bool:
        """Whether LoRA trains in this round (else only the head, on cached features)."""
        return server_round > self.num_server_rounds - self.lora_rounds

    def to_mapping(self) -> dict[str, Any]:
        """The kebab-case dict Flower uses, e.g. for a run's saved configuration."""
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in dataclasses.fields(self)}

    def _check_choices(self) -> None:
        _check_choice("aggregation", self.aggregation, AGGREGATIONS)
        _check_choice("accountant", self.accountant, ACCOUNTANTS)
        self._check_aggregation()
        if self.run_name and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", self.run_name):
            raise ConfigError(
                f"run-name={self.run_name!r} is not allowed: use 1-100 letters, digits, '.', '_' or '-', "
                "starting with a letter or digit"
            )
        _check_choice("task", self.task, TASKS)
        if 0 < self.eval_noise_multiplier < MIN_EVAL_NOISE:
            raise ConfigError(
                f"eval-noise-multiplier={self.eval_noise_multiplier!r} is out of range; allowed: 0 (each site picks "
                f"its own) or [{MIN_EVAL_NOISE}, 1000]"
            )
        if not self.dataset:
            raise ConfigError(
                f"dataset is empty: use one of {', '.join(BUNDLED_DATASETS)}, {POLICY_DATA!r} or a file path"
            )
        bundled_task = BUNDLED_DATASETS.get(self.dataset)
        if bundled_task is not None and bundled_task != self.task:
            raise ConfigError(
                f"dataset={self.dataset!r} is a {bundled_task} data set but task={self.task!r}; "
                f"use task={bundled_task!r} or one of "
                + ", ".join(name for name, task in BUNDLED_DATASETS.items() if task == self.task)
            )
        needs_columns = self.task == "sequence-classification" and bundled_task is None
        if needs_columns and self.dataset != POLICY_DATA and not (self.text_column and self.label_column):
            raise ConfigError(f"dataset={self.dataset!r} is a file, so text-column and label-column must be set")
        if needs_columns and self.test_dataset and not (self.text_column and self.label_column):
            raise ConfigError("test-dataset is a file, so text-column and label-column must be set")
        if self.dataset == POLICY_DATA and not self.labels:
            raise ConfigError(
                f"dataset={POLICY_DATA!r} trains each site on its own policy's data, so the run must name the "
                "shared label set: set labels (comma-separated)"
            )

    def _check_aggregation(self) -> None:
        if self.secure_aggregation and self.aggregation in NEEDS_INDIVIDUAL_UPDATES:
            raise ConfigError(
                f"aggregation={self.aggregation!r} cannot run with secure-aggregation=true: it needs each site's "
                "update, and secure aggregation shows the server only their sum; use one of "
                + ", ".join(a for a in AGGREGATIONS if a not in NEEDS_INDIVIDUAL_UPDATES)
            )
        if self.secure_aggregation and self.min_sites < 3:
            raise ConfigError(
                f"secure-aggregation=true needs min-sites >= 3 (with 2 sites each could read the other's update "
                f"from the mean, and Flower's masks are weak), but min-sites={self.min_sites}"
            )
        if self.secure_aggregation and self.max_update_norm > 0:
            raise ConfigError(
                "max-update-norm cannot be enforced with secure-aggregation=true: the server never sees a single "
                "site's update; set max-update-norm=0"
            )
        if self.central_dp and (self.secure_aggregation or self.aggregation not in ("fedavg", "ffa-lora")):
            raise ConfigError(
                "central-dp=true clips each site's update at the server and averages them uniformly: it needs "
                "aggregation fedavg or ffa-lora and secure-aggregation=false"
            )
        if self.aggregation == "fedprox" and self.learning_rate * self.proximal_mu >= 1:
            # The proximal step moves weights by learning-rate × proximal-mu of their distance to the anchor.
            raise ConfigError(
                f"proximal-mu={self.proximal_mu} with learning-rate={self.learning_rate} overshoots the global "
                "weights: learning-rate × proximal-mu must be below 1"
            )
        if self.aggregation == "krum" and self.min_sites < 2 * self.krum_byzantine + 3:
            raise ConfigError(
                f"krum-byzantine={self.krum_byzantine} needs min-sites >= {2 * self.krum_byzantine + 3} "
                f"(Krum tolerates f bad sites only among at least 2f+3), but min-sites={self.min_sites}"
            )


# Flower's own split of a --run-config string into key=value pairs (flwr.common.config.parse_config_args).
_PAIR = re.compile(r"(\S+?)=('[^']*'|\"[^\"]*\"|\S+)")


def parse_overrides(text: str, option: str = "--run-config") -> dict[str, Any]:
    """Flower's --run-config format (``key=value`` pairs, strings in quotes) as a dict, with a bad pair named.

    Flower's parser only says that the whole string is malformed; this one says which key and what it expects.
    """
    import tomllib

    overrides: dict[str, Any] = {}
    fields = {f.name.replace("_", "-"): f for f in dataclasses.fields(RunConfig)}
    leftover = _PAIR.sub(" ", text).split()
    if leftover:
        raise ConfigError(f"{option}: cannot read {leftover[0]!r}; write key=value pairs separated by spaces, "
                          "strings in quotes, e.g. \"num-server-rounds=5 run-name='trial'\"")
    for key, raw in _PAIR.findall(text):
        try:
            overrides.update(tomllib.loads(f"{key} = {raw}"))
        except tomllib.TOMLDecodeError:
            kind = fields[key].type if key in fields else None
            kind = kind if isinstance(kind, str) or kind is None else kind.__name__
            expected = {"str": f"a string in quotes, e.g. {key}='{raw}'", "bool": "true or false",
                        "int": "a whole number", "float": "a number"}.get(kind, "a quoted string, a number, or "
                                                                           "true/false")
            raise ConfigError(f"{option}: cannot read {key}={raw}: {key} must be {expected}") from None
    return overrides


def _check_choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not allowed; allowed values: {', '.join(allowed)}")


def _coerce(key: str, value: Any, f: dataclasses.Field) -> Any:
    """Check one value's type (ints may stand for floats) and numeric range."""
    kind = f.type if isinstance(f.type, type) else {"int": int, "float": float, "str": str, "bool": bool}[f.type]
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} must be true or false")
        return value
    if kind is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}={value!r} must be a string")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key}={value!r} must be a number ({kind.__name__})")
    if kind is int:
        if isinstance(value, float) and not value.is_integer():
            raise ConfigError(f"{key}={value!r} must be a whole number")
        value = int(value)
    else:
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(f"{key}={value!r} must be a finite number")
    _check_number(key, value, **f.metadata)
    return value


def _check_number(key, value, lo, hi, lo_open, hi_open) -> None:
    too_low = lo is not None and (value <= lo if lo_open else value < lo)
    too_high = hi is not None and (value >= hi if hi_open else value > hi)
    if too_low or too_high:
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        span = f"{left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{right}"
        raise ConfigError(f"{key}={value!r} is out of range; allowed range: {span}")
