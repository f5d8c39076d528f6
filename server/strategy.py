"""Aggregation strategy and the screening every site reply passes before it may touch the global adapter."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, Message
from flwr.serverapp.strategy import FedAvg, Strategy

from common import adapters
from common.config import RunConfig

log = logging.getLogger("privet.server")

TRAIN_METRICS = ("num-examples", "loss", "steps")
EVAL_METRICS = ("num-examples", "loss", "accuracy", "macro_f1")


def make_strategy(config: RunConfig) -> Strategy:
    """The aggregator the run asks for; FFA-LoRA is plain FedAvg over B alone, which makes it exact."""
    n = config.min_sites
    return FedAvg(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=n, min_evaluate_nodes=n, min_available_nodes=n)


@dataclass
class Screened:
    """Replies sorted into those fit to aggregate and those set aside, with a reason per site."""

    accepted: list[Message] = field(default_factory=list)
    declined: dict[str, str] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)
    sites: dict[int, str] = field(default_factory=dict)


def site_of(msg: Message) -> str:
    """The site id a reply names, or its node id when it names none."""
    if not msg.has_error() and "site" in msg.content:
        return str(msg.content["site"]["site-id"])
    return f"node-{msg.metadata.src_node_id}"


def screen(
    replies: Iterable[Message],
    *,
    spec: Mapping[str, tuple[int, ...]] | None,
    required_metrics: tuple[str, ...],
    global_arrays: ArrayRecord | None = None,
    max_update_norm: float = 0.0,
) -> Screened:
    """Accept only replies with the expected adapter tensors (when `spec` is given) and sane metrics."""
    result = Screened()
    for msg in replies:
        site = site_of(msg)
        result.sites[msg.metadata.src_node_id] = site
        if msg.has_error():
            result.rejected[site] = f"error reply: {msg.error.reason}"
        elif "decline" in msg.content:
            result.declined[site] = str(msg.content["decline"]["reason"])
        else:
            problem = _problem(msg, spec, required_metrics, global_arrays, max_update_norm)
            if problem:
                result.rejected[site] = problem
            else:
                result.accepted.append(msg)
    for site, reason in result.declined.items():
        log.warning("%s declined: %s", site, reason)
    for site, reason in result.rejected.items():
        log.warning("%s's reply was rejected: %s", site, reason)
    return result


def _problem(msg, spec, required_metrics, global_arrays, max_update_norm) -> str | None:
    content = msg.content
    if len(content.metric_records) != 1 or "metrics" not in content:
        return "reply has no single 'metrics' record"
    metrics = content["metrics"]
    missing = [key for key in required_metrics if key not in metrics]
    if missing:
        return f"metrics lack {', '.join(missing)}"
    for key in required_metrics:
        value = metrics[key]
        if isinstance(value, list) or not math.isfinite(float(value)):
            return f"metric {key} is not a finite number"
    examples = metrics["num-examples"]
    if not float(examples).is_integer() or examples < 1:
        return "num-examples must be a positive whole number"
    if spec is None:
        return None
    if len(content.array_records) != 1 or "arrays" not in content:
        return "reply has no single 'arrays' record"
    try:
        adapters.check_record(content["arrays"], spec)
    except adapters.UpdateError as err:
        return str(err)
    if max_update_norm > 0 and global_arrays is not None:
        norm = update_norm(content["arrays"], global_arrays)
        if norm > max_update_norm:
            return f"update L2 norm {norm:.3g} exceeds the bound {max_update_norm}"
    return None


def update_norm(new: ArrayRecord, old: ArrayRecord) -> float:
    """L2 norm of the difference between two adapters over all their tensors."""
    total = 0.0
    for key in old:
        diff = new[key].numpy().astype(np.float64) - old[key].numpy().astype(np.float64)
        total += float(np.sum(diff * diff))
    return math.sqrt(total)
