"""One site's view of a run: who it is, its data, its privacy terms, and the shared model it trains in this process.

A real site reads everything from its policy file and never opens a path the server names. A
SuperNode without a policy is refused unless it is explicitly a simulated site: ``privet
simulate`` marks its sites, which then take a non-IID share of a bundled or given data set and
keep their ledgers under the run directory. Expensive things (model, tokenizer, tokenized data)
are built once per process and reused every round; the ledger is reread from disk each round.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from client.policy import Declined, SitePolicy
from common import data as site_data
from common import task as tasks
from common.bounds import global_distance_bound
from common.config import BUNDLED_DATASETS, POLICY_DATA, SIMULATION_ENV, RunConfig
from common import adapters
from common.model import HeadOnly, build_model, pick_device, weights_sha256
from common.train import FeatureData, TensorData, features

log = logging.getLogger("flwr.privet.site")

VAL_FRACTION = 0.1
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


@dataclass(frozen=True)
class SiteTerms:
    """Who the site is and the privacy terms it trains under."""

    site_id: str
    ledger_path: Path
    epsilon_cap: float
    delta: float
    max_rounds: int
    policy: SitePolicy | None
    public_count: int | None = None
    evaluate: bool = True


def is_simulated(node_config: dict) -> bool:
    """Whether this node was explicitly started as a simulated site (by `privet simulate`, or its administrator)."""
    return os.environ.get(SIMULATION_ENV) == "1" or node_config.get("simulated") is True


def checked_run_name(name: str) -> str:
    """The server's run name, refused unless it is safe to use as a ledger key and a directory name."""
    if not RUN_NAME.fullmatch(name):
        raise Declined("the server's run-name is not 1-100 letters, digits, '.', '_' or '-'; refusing to use it")
    return name


def site_terms(config: RunConfig, node_config: dict, run_dir: Path) -> SiteTerms:
    """A policy site's own terms, or a simulated site's terms taken from the run config."""
    if "policy" in node_config:
        policy = SitePolicy.load(str(node_config["policy"]))
        return SiteTerms(
            policy.site_id, policy.ledger_path, policy.epsilon_cap, policy.delta, policy.max_rounds, policy,
            public_count=policy.public_example_count, evaluate=policy.evaluate,
        )
    if not is_simulated(node_config):
        raise Declined(
            "this SuperNode has no site policy, so it will not train or evaluate: start it with "
            "--node-config \"policy='/path/to/policy.toml'\" (only `privet simulate` runs sites without one)"
        )
    if "partition-id" not in node_config:
        raise Declined("a simulated site needs partition-id and num-partitions in its node config")
    site_id = f"site-{int(node_config['partition-id'])}"
    return SiteTerms(
        site_id=site_id,
        ledger_path=run_dir / "sites" / site_id / "ledger.json",
        epsilon_cap=config.target_epsilon,
        delta=config.delta,
        max_rounds=config.num_server_rounds,
        policy=None,
    )


def site_label_names(config: RunConfig, policy: SitePolicy | None) -> tuple[str, ...]:
    """The shared label set. A policy site takes it from its policy or the run; it never reads a server-named file."""
    if policy is None:
        return tasks.label_names(config)
    if config.dataset in BUNDLED_DATASETS:
        run_labels = site_data.load_bundled(config.dataset).label_names
    else:
        run_labels = tasks.parse_labels(config.labels) if config.labels else None
    own = tasks.sort_labels(policy.labels) if policy.labels else None
    if own and run_labels and own != run_labels:
        raise Declined(
            f"site {policy.site_id}'s label set (its policy's labels) differs from the run's; the coordinator and "
            "the site must agree on one label set"
        )
    if not (own or run_labels):
        raise Declined(
            f"site {policy.site_id} has no label set: the run names none (labels) and its policy names none; "
            "set labels in the run config or the site policy"
        )
    return tasks.checked_labels(config, own or run_labels)


@functools.lru_cache(maxsize=4)
def shared_model(model: str, task_name: str, num_labels: int, lora_r: int, lora_alpha: int, ffa: bool, seed: int):
    """One model per process, and its public start (the trainable tensors every party builds from the seed).

    Every site simulated in this process loads the global adapter into the model before use.
    """
    built = build_model(
        model, num_labels, lora_r=lora_r, lora_alpha=lora_alpha, ffa=ffa, seed=seed,
        head=tasks.TASKS[task_name].head, device=pick_device(),
    )
    return built, adapters.trainable_state(built)


def check_global(state: dict[str, torch.Tensor], start: dict[str, torch.Tensor], config: RunConfig,
                 aggregations: int) -> None:
    """Raise ``Declined`` for a global adapter that `aggregations` rounds of honest updates could not have produced.

    Called before any data is read: the bound and the distance depend on the run config and the
    server's own message only, so the decline tells the server nothing it did not send.
    """
    distance = float(sum(torch.sum((state[key].double() - start[key].double()) ** 2) for key in start)) ** 0.5
    bound = global_distance_bound(config, {key: tuple(value.shape) for key, value in start.items()}, aggregations)
    if not distance <= bound:
        raise Declined(
            f"the global adapter is {distance:.4g} from the run's public start, farther than {aggregations} round(s) "
            f"of honest updates can move it ({bound:.4g}); a site does not use a model no honest run produces"
        )


@functools.lru_cache(maxsize=4)
def model_sha256(model: str) -> str:
    return weights_sha256(model)


@functools.lru_cache(maxsize=256)
def site_tensors(
    terms: SiteTerms, config: RunConfig, names: tuple[str, ...], partition: tuple[int, int] | None
) -> tuple[TensorData, TensorData]:
    """The site's tokenized training and validation splits, built once per process."""
    task = tasks.get(config)
    policy = terms.policy
    if policy is not None:
        source = str(policy.data_path)
        own = names if policy.labels else None
        # A file the site cannot read makes it decline ("cannot use its data"). That is outside the record domain:
        # DP covers adding or removing one valid record, which never makes a readable file unreadable. The run's
        # task only picks the reader, and a file in the other task's format fails by its type, header, columns or
        # first record, or (token JSON lines under the sequence task, read as printed lists) has every record left
        # out: never on one record rather than another (README: Privacy).
        examples = tasks.read_file(config.task, source, policy.text_column, policy.label_column, own)
        if own is None:
            # The label set is the run's. Refusing over a record outside it would tell the server, for free, whether
            # the site holds that label; such records are left out instead, and only the site's log says so.
            keep = task.within(examples, names)
            if len(keep) < len(examples):
                log.warning("%s: %d record(s) with a label outside the run's label set are left out; set labels in "
                            "the site policy to refuse such runs instead", terms.site_id, len(examples) - len(keep))
                examples = examples.select(keep)
    elif config.dataset in BUNDLED_DATASETS:
        examples = site_data.load_bundled(config.dataset).train
        source = f"bundled data set {config.dataset!r}"
    elif config.dataset == POLICY_DATA:
        raise Declined(f"dataset={POLICY_DATA!r} needs sites with a policy; {terms.site_id} is simulated")
    else:
        examples = tasks.read_file(config.task, config.dataset, config.text_column, config.label_column, names)
        source = config.dataset
    keys = task.record_keys(examples)
    index = np.arange(len(examples))
    if partition is not None:
        # A simulated share: public, seeded by the run config, so the coordinator may reproduce it.
        site, num_sites = partition
        strata = site_data.encode_labels(task.strata(examples), sorted(set(task.strata(examples))))
        index = site_data.dirichlet_partition(strata, num_sites, config.dirichlet_alpha, config.seed)[site]
        if config.max_examples_per_site:
            index = np.sort(np.random.default_rng(config.seed).permutation(index)[: config.max_examples_per_site])
    elif policy.max_examples:
        # The site's own cap: records chosen by content, so the same ones in every run.
        index = np.array(sorted(index, key=lambda i: site_data.record_bucket("cap:" + keys[i]))[: policy.max_examples])
        index = np.sort(index)
    # No records left (the run's label set, a tiny file) is no reason to refuse: whether any are left depends on
    # the exact records. The site trains on none (its update is noise only) and evaluates none (noise only).
    train_idx, val_idx = site_data.split_train_val([keys[i] for i in index], VAL_FRACTION)
    everything = tasks.encode(examples.select(index), config, names)
    log.info("%s: %d training and %d validation examples from %s", terms.site_id, len(train_idx), len(val_idx), source)
    return everything.subset(train_idx), everything.subset(val_idx)


_FEATURES: dict[tuple, FeatureData] = {}
FEATURE_CACHE_SIZE = 256


def site_features(model, terms: SiteTerms, config: RunConfig, names: tuple[str, ...],
                  partition: tuple[int, int] | None) -> FeatureData:
    """The site's training examples as the model's encoder sees them, computed once per encoder state.

    Head-only rounds leave the encoder as it is, so every such round of a run reuses one forward pass.
    """
    key = (terms, config, names, partition, adapters.encoder_fingerprint(model))
    if key not in _FEATURES:
        if len(_FEATURES) >= FEATURE_CACHE_SIZE:
            _FEATURES.pop(next(iter(_FEATURES)))
        train, _ = site_tensors(terms, config, names, partition)
        _FEATURES[key] = features(model, train, device=pick_device())
    return _FEATURES[key]


def round_inputs(model, config: RunConfig, server_round: int, data: TensorData, head_features):
    """What a round trains and on what: (module, data, learning-rate decay for the round).

    Head-only rounds are DP linear probing: the head on the features `head_features()` returns, its learning rate
    decaying linearly to 0 over those rounds; LoRA rounds train the whole adapter on the tokenized data.
    """
    if config.is_lora_round(server_round):
        return model, data, (1.0, 1.0)
    rounds, done = config.num_server_rounds - config.lora_rounds, server_round - 1
    return HeadOnly(model), head_features(), (1 - done / rounds, 1 - (done + 1) / rounds)


def check_policy(terms: SiteTerms, config: RunConfig, server_round: int) -> None:
    """Raise ``Declined`` when the run breaks the site's policy or the round is past its limit."""
    if terms.policy is not None:
        terms.policy.check_run(config, model_sha256(config.model))
    if not 1 <= server_round <= config.num_server_rounds:
        # The noise was calibrated for the run's rounds: a round outside them is not part of the plan.
        raise Declined(f"round {server_round} is outside this run's num-server-rounds={config.num_server_rounds}")
    if server_round > terms.max_rounds:
        raise Declined(f"site {terms.site_id} allows at most {terms.max_rounds} rounds; round {server_round} asked")
