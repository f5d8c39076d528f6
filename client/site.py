"""One site's view of a run: its data, its privacy terms, and the shared model it trains in this process.

A simulated site (no policy) takes its non-IID share of a bundled or given data set and keeps
its ledger under the run directory; a real site reads everything from its policy file.
Expensive things (model, tokenizer, tokenized data) are built once per process and reused
every round; the ledger is reread from disk each round so a restart never forgets ε.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from client.policy import Declined, SitePolicy
from common import data as site_data
from common import task
from common.config import BUNDLED_DATASETS, RunConfig
from common.model import build_model, pick_device, weights_sha256
from common.train import TensorData

log = logging.getLogger("flwr.privet.site")

VAL_FRACTION = 0.1


@dataclass(frozen=True)
class SiteTerms:
    """Who the site is and the privacy terms it trains under."""

    site_id: str
    ledger_path: Path
    epsilon_cap: float
    delta: float
    max_rounds: int
    policy: SitePolicy | None


def site_terms(config: RunConfig, node_config: dict, run_dir: Path) -> SiteTerms:
    """A policy site's own terms, or a simulated site's terms taken from the run config."""
    if "policy" in node_config:
        policy = SitePolicy.load(str(node_config["policy"]))
        return SiteTerms(
            policy.site_id, policy.ledger_path, policy.epsilon_cap, policy.delta, policy.max_rounds, policy
        )
    partition = int(node_config["partition-id"])
    site_id = f"site-{partition}"
    return SiteTerms(
        site_id=site_id,
        ledger_path=run_dir / "sites" / site_id / "ledger.json",
        epsilon_cap=config.target_epsilon,
        delta=config.delta,
        max_rounds=config.num_server_rounds,
        policy=None,
    )


@functools.lru_cache(maxsize=4)
def shared_model(model: str, num_labels: int, lora_r: int, lora_alpha: int, ffa: bool, seed: int):
    """One model per process; every site simulated in it loads the global adapter into it before use."""
    return build_model(
        model, num_labels, lora_r=lora_r, lora_alpha=lora_alpha, ffa=ffa, seed=seed, device=pick_device()
    )


@functools.lru_cache(maxsize=4)
def model_sha256(model: str) -> str:
    return weights_sha256(model)


@functools.lru_cache(maxsize=256)
def site_tensors(
    terms: SiteTerms, config: RunConfig, partition: tuple[int, int] | None
) -> tuple[TensorData, TensorData]:
    """The site's tokenized training and validation splits, built once per process."""
    names = task.label_names(config)
    if terms.policy is not None:
        policy = terms.policy
        examples = task.read_file(str(policy.data_path), policy.text_column, policy.label_column, names)
        source = str(policy.data_path)
    elif config.dataset in BUNDLED_DATASETS:
        examples = site_data.load_bundled(config.dataset).train
        source = f"bundled data set {config.dataset!r}"
    else:
        examples = task.read_file(config.dataset, config.text_column, config.label_column, names)
        source = config.dataset
    labels = site_data.encode_labels(examples.labels, names, source=source)
    index = np.arange(len(labels))
    if partition is not None:
        site, num_sites = partition
        index = site_data.dirichlet_partition(labels, num_sites, config.dirichlet_alpha, config.seed)[site]
    if config.max_examples_per_site:
        rng = np.random.default_rng(config.seed)
        index = np.sort(rng.permutation(index)[: config.max_examples_per_site])
    train_idx, val_idx = site_data.split_train_val(len(index), VAL_FRACTION, config.seed)
    site_data.check_enough_examples(len(train_idx), config.batch_size, source)
    everything = task.encode([examples.texts[i] for i in index], labels[index], config)
    log.info("%s: %d training and %d validation examples", terms.site_id, len(train_idx), len(val_idx))
    return everything.subset(train_idx), everything.subset(val_idx)


def check_policy(terms: SiteTerms, config: RunConfig, server_round: int) -> None:
    """Raise ``Declined`` when the run breaks the site's policy or the round is past its limit."""
    if terms.policy is not None:
        terms.policy.check_run(config, model_sha256(config.model))
    if server_round > terms.max_rounds:
        raise Declined(f"site {terms.site_id} allows at most {terms.max_rounds} rounds; round {server_round} asked")
