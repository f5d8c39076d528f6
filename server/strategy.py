"""Aggregation strategy and the screening every site reply passes before it may touch the global adapter."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.app.message import make_message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideFixedClipping,
    FedAdam,
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    Krum,
    Strategy,
)
from flwr.supercore.privacy_accounting import NeighboringRelation, PrivacyConfig, SamplingMethod
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

from common import adapters
from common.bounds import FEDADAM_BETAS
from common.config import RunConfig
from server.identity import SiteIdentities
from server.robust import MIN_ROBUST_SITES, centered_clip

log = logging.getLogger("flwr.privet.server")

TRAIN_METRICS = ("num-examples", "steps", "server-round")
# An update more than this many times the round's median update norm is set aside (robust to a minority of rogues).
RELATIVE_NORM_BOUND = 4.0
MAX_TEXT = 300
# The aggregations that average the updates, and so take robust-aggregation's centered clipping in place of the mean.
MEAN_BASED = ("fedavg", "ffa-lora", "fedprox", "fedadam")


def eval_metrics(task) -> tuple[str, ...]:
    """What a site's evaluation reply must carry for this task."""
    return ("num-examples", "server-round", *task.score_keys)


def make_strategy(config: RunConfig, central_state: dict | None = None) -> Aggregator:
    """The aggregator the run asks for, built on Flower's own strategies; FFA-LoRA is FedAvg over B, which is exact.

    Every site weighs the same: its example count is a private claim the server cannot check, so it must buy no
    influence. With `robust-aggregation` the mean-based aggregations (FedAvg, FFA-LoRA, FedProx, FedAdam) take
    the centered-clipping aggregate of a round's updates (server/robust.py) in place of their plain mean.
    With central DP, `central_state` is the saved accountant state of an earlier part of this run.
    """
    n = config.min_sites
    if config.central_dp:
        return _central_dp(config, central_state)
    nodes = {"fraction_train": 1.0, "fraction_evaluate": 1.0, "min_train_nodes": n, "min_evaluate_nodes": n,
             "min_available_nodes": n}
    builders = {
        "fedavg": lambda: FedAvg(**nodes),
        "ffa-lora": lambda: FedAvg(**nodes),
        "fedprox": lambda: FedProx(**nodes, proximal_mu=config.proximal_mu),
        # FedAdam keeps the round's global arrays from configure_train and its moments across rounds;
        # the server saves the moments with each round's adapter so a resumed run keeps them.
        "fedadam": lambda: FedAdam(**nodes, eta=config.server_learning_rate, beta_1=FEDADAM_BETAS[0],
                                   beta_2=FEDADAM_BETAS[1]),
        "trimmed-mean": lambda: FedTrimmedAvg(**nodes, beta=config.trim_fraction),
        "median": lambda: FedMedian(**nodes),
        "krum": lambda: Krum(**nodes, num_malicious_nodes=config.krum_byzantine),
    }
    robust = config.robust_aggregation and config.aggregation in MEAN_BASED
    return Aggregator(builders[config.aggregation](), robust=robust)


def _central_dp(config: RunConfig, state: dict | None) -> Aggregator:
    """Flower's server-side clipping DP wrapper: each round exactly min-sites sites, clipped, averaged with equal
    weights and noised, and accounted for user-level (site-level) ε by Flower's RDP accountant."""
    n = config.min_sites
    accountant = RdpAccountant(
        PrivacyConfig(
            target_delta=config.delta,
            population_size=n,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION,
        )
    )
    if state:
        accountant.load_state_dict(state)
    # A vanishing fraction makes FedAvg sample exactly min_train_nodes, the fixed sample the accountant needs.
    fedavg = FedAvg(fraction_train=1e-9, fraction_evaluate=1.0, min_train_nodes=n, min_evaluate_nodes=n,
                    min_available_nodes=n)
    wrapped = DifferentialPrivacyServerSideFixedClipping(
        fedavg, config.central_noise_multiplier, config.central_clipping_norm, n, accountant=accountant
    )
    # Not robust: the wrapper's sensitivity analysis assumes the plain mean of the clipped updates.
    return Aggregator(wrapped)


class Aggregator(Strategy):
    """A Flower strategy that aggregates private copies of screened replies and returns an fp32 adapter.

    Copies, because FedMedian and FedTrimmedAvg pop the arrays out of the replies they read and
    every Flower strategy aborts the round when sites' metric keys differ; fp32, because FedAdam
    returns float64, which the wire format (and every site) refuses.

    With `robust`, a round with at least three updates is reduced to their centered-clipping aggregate, handed
    to the inner strategy as one reply (FedAvg and FedProx return it as is, FedAdam steps on it); `last_rule`
    says what the latest round used, for the log and the report.
    """

    def __init__(self, inner: Strategy, robust: bool = False):
        self.inner = inner
        self.robust = robust
        self.last_rule = ""
        self.round_start: ArrayRecord | None = None  # the global adapter the round's sites trained from

    def central_privacy(self) -> dict | None:
        """Site-level ε and δ spent so far under central DP, and the accountant state to save; None without it."""
        accountant = getattr(self.inner, "accountant", None)
        if accountant is None:
            return None
        spent = accountant.get_privacy_spent()
        return {"epsilon": spent.epsilon, "delta": spent.delta, "releases": spent.num_releases,
                "state": accountant.state_dict()}

    def optimizer_state(self) -> dict[str, np.ndarray]:
        """FedAdam's first and second moments (``m/<key>``, ``v/<key>``); empty for stateless aggregators."""
        if not isinstance(self.inner, FedAdam) or not self.inner.m_t:
            return {}
        return {f"{name}/{key}": value for name, moments in (("m", self.inner.m_t), ("v", self.inner.v_t))
                for key, value in moments.items()}

    def load_optimizer_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore what ``optimizer_state`` returned, on resume."""
        if not state:
            return
        if not isinstance(self.inner, FedAdam):
            raise ValueError("saved server optimizer moments, but this run's aggregation keeps none")
        self.inner.m_t = {key[2:]: value for key, value in state.items() if key.startswith("m/")}
        self.inner.v_t = {key[2:]: value for key, value in state.items() if key.startswith("v/")}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        self.round_start = arrays
        return self.inner.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        copies = [_aggregation_copy(msg) for msg in replies]
        updates = [msg for msg in copies if not msg.has_error()]
        self.last_rule = self._rule(len(updates))
        if self.robust and len(updates) >= MIN_ROBUST_SITES:
            if self.round_start is None:
                raise RuntimeError("robust aggregation needs the round's global adapter: call configure_train first")
            copies, opposed = _robust_reply(updates, self.round_start)
            if opposed:
                self.last_rule += f" ({opposed} pointing away from most others left out)"
        if len(updates) < MIN_ROBUST_SITES:
            log.warning("round %d: %s", server_round, self.last_rule)
        return self._aggregate(server_round, copies)

    def aggregate_secure(self, server_round: int, aggregate: Message, sites: int):
        """Take a secure round's unmasked mean (one reply, `sites` updates summed in it) as the round's aggregate."""
        self.last_rule = (f"secure aggregation: the mean of {sites} masked update(s), each of weight 1; no robust "
                          "step (the server sees no single update)")
        if sites < MIN_ROBUST_SITES:
            log.warning("round %d: only %d site(s) contributed: telling a rogue site from an honest one needs an "
                        "honest majority of at least %d", server_round, sites, MIN_ROBUST_SITES)
        return self._aggregate(server_round, [aggregate])

    def _aggregate(self, server_round: int, copies: list[Message]):
        if isinstance(self.inner, FedTrimmedAvg) and int(self.inner.beta * len(copies)) == 0:
            log.warning(
                "trimmed-mean: trim-fraction %s of %d site(s) trims none; this round is a plain unweighted mean",
                self.inner.beta, len(copies),
            )
        arrays, metrics = self.inner.aggregate_train(server_round, copies)
        if arrays is not None:
            arrays = ArrayRecord({k: Array(v.numpy().astype(adapters.WIRE_DTYPE)) for k, v in arrays.items()})
        return arrays, metrics

    def _rule(self, sites: int) -> str:
        name = type(self.inner).__name__
        if sites < MIN_ROBUST_SITES:
            return (f"{name} over {sites} update(s), not robust: telling a rogue site from an honest one needs an "
                    f"honest majority of at least {MIN_ROBUST_SITES} sites")
        if self.robust:
            return f"centered clipping around the median of {sites} updates, then {name}"
        return f"{name} over {sites} equally weighted updates"

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]):
        return self.inner.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        self.inner.summary()


def _aggregation_copy(msg: Message) -> Message:
    """A screened training reply reduced to its adapter and the weight 1, sharing the tensors.

    Weight 1 whatever the site claims: its `num-examples` is private (a DP or policy-declared count) and
    unverifiable, so weighing by it would sell influence to whoever claims most.
    """
    if msg.has_error():
        return msg
    # Only the weight: Flower's strategies average every metric and stop at keys that differ between replies.
    content = RecordDict({"arrays": ArrayRecord(dict(msg.content["arrays"].items())),
                          "metrics": MetricRecord({"num-examples": 1})})
    return make_message(msg.metadata, content)


def _robust_reply(updates: list[Message], start: ArrayRecord) -> tuple[list[Message], int]:
    """The updates' centered-clipping aggregate as the one reply (weight 1) to aggregate, and how many opposed it."""
    aggregate = centered_clip([{key: value.numpy() for key, value in msg.content["arrays"].items()}
                               for msg in updates], {key: value.numpy() for key, value in start.items()})
    arrays = ArrayRecord({key: Array(np.ascontiguousarray(value)) for key, value in aggregate.arrays.items()})
    reply = make_message(updates[0].metadata, RecordDict({"arrays": arrays,
                                                          "metrics": MetricRecord({"num-examples": 1})}))
    return [reply], aggregate.opposed


@dataclass
class Screened:
    """Replies sorted into those fit to aggregate and those set aside, with a reason per site."""

    accepted: list[Message] = field(default_factory=list)
    declined: dict[str, str] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)
    sites: dict[int, str] = field(default_factory=dict)
    norms: dict[str, float] = field(default_factory=dict)  # update L2 norm of each accepted training reply

    def median_norm(self) -> float | None:
        return float(np.median(list(self.norms.values()))) if self.norms else None


@dataclass(frozen=True)
class Rules:
    """What a reply must satisfy to count in this round: its round, metrics, weight, scores and update size."""

    server_round: int
    required_metrics: tuple[str, ...]
    max_weight: int
    score_keys: tuple[str, ...] = ()  # each must lie in [0, 1]
    spec: Mapping[str, tuple[int, ...]] | None = None  # the adapter a training reply must carry
    global_arrays: ArrayRecord | None = None
    norm_ceiling: float = math.inf
    reference_norm: float | None = None  # an earlier round's median, for rounds with too few updates of their own


def claimed_site(msg: Message) -> str:
    """The site id a reply names ('' when it names none or an unprintable one)."""
    site = msg.content["site"].get("site-id") if "site" in msg.content.config_records else None
    return site if isinstance(site, str) and 0 < len(site) <= 100 and site.isprintable() else ""


def safe_text(value) -> str:
    """A site-supplied string made safe for one log line and the report."""
    text = "".join(c if c.isprintable() else " " for c in str(value))
    return text if len(text) <= MAX_TEXT else text[:MAX_TEXT] + "..."


def screen(replies: Iterable[Message], rules: Rules, identities: SiteIdentities) -> Screened:
    """Accept only replies from verified sites, for this round, with the expected adapter and sane metrics.

    A training update whose norm is more than ``RELATIVE_NORM_BOUND`` times the round's median is set
    aside: honest DP-SGD updates of one round have similar norms, and a median is robust to a minority.
    """
    result = Screened()
    replies = list(replies)
    claims = {msg.metadata.src_node_id: claimed_site(msg) or f"node-{msg.metadata.src_node_id}"
              for msg in replies if not msg.has_error()}
    verified, refused = identities.judge(claims)
    candidates: list[tuple[str, Message]] = []
    for msg in replies:
        node = msg.metadata.src_node_id
        if msg.has_error():
            result.rejected[identities.name(node)] = f"error reply: {safe_text(msg.error.reason)}"
            continue
        if node in refused:
            result.rejected[identities.name(node)] = refused[node]
            continue
        site = result.sites[node] = verified[node]
        if "decline" in msg.content:
            result.declined[site] = safe_text(msg.content["decline"].get("reason", "no reason given"))
        elif problem := _problem(msg, rules):
            result.rejected[site] = problem
        else:
            candidates.append((site, msg))
    _screen_norms(candidates, rules, result)
    for site, reason in result.declined.items():
        log.warning("%s declined: %s", site, reason)
    for site, reason in result.rejected.items():
        log.warning("%s's reply was rejected: %s", site, reason)
    return result


def _screen_norms(candidates: list[tuple[str, Message]], rules: Rules, result: Screened) -> None:
    if rules.spec is None or rules.global_arrays is None:
        result.accepted.extend(msg for _, msg in candidates)
        return
    norms = {site: update_norm(msg.content["arrays"], rules.global_arrays) for site, msg in candidates}
    reference = float(np.median(list(norms.values()))) if len(norms) >= 3 else rules.reference_norm
    for site, msg in candidates:
        norm = norms[site]
        if norm > rules.norm_ceiling:
            result.rejected[site] = f"update L2 norm {norm:.3g} exceeds the ceiling {rules.norm_ceiling:.3g}"
        elif reference and norm > RELATIVE_NORM_BOUND * reference:
            whose = "round's" if len(norms) >= 3 else "earlier rounds'"
            result.rejected[site] = (f"update L2 norm {norm:.3g} is more than {RELATIVE_NORM_BOUND:g}× the {whose} "
                                     f"median {reference:.3g}")
        else:
            result.accepted.append(msg)
            result.norms[site] = norm


def _problem(msg: Message, rules: Rules) -> str | None:
    content = msg.content
    if len(content.metric_records) != 1 or "metrics" not in content.metric_records:
        return "reply has no single 'metrics' record"
    metrics = content["metrics"]
    missing = [key for key in rules.required_metrics if key not in metrics]
    if missing:
        return f"metrics lack {', '.join(missing)}"
    # All of them, not just the required ones: the report reads optional metrics such as epsilon.
    for key, value in metrics.items():
        if isinstance(value, list) or not math.isfinite(value):
            return f"metric {safe_text(key)} is not a finite number"
    if metrics["server-round"] != rules.server_round:
        return f"the reply is for round {metrics['server-round']:g}, not round {rules.server_round}"
    examples = metrics["num-examples"]
    if not float(examples).is_integer() or examples < 1:
        return "num-examples must be a positive whole number"
    if examples > rules.max_weight:
        return f"num-examples {examples:g} exceeds max-site-weight={rules.max_weight}"
    for key in rules.score_keys:
        if not 0 <= metrics[key] <= 1:
            return f"score {key}={metrics[key]:g} is outside [0, 1]"
    if "epsilon" in metrics and metrics["epsilon"] < 0:
        return "epsilon must not be negative"
    if rules.spec is None:
        return None
    if len(content.array_records) != 1 or "arrays" not in content.array_records:
        return "reply has no single 'arrays' record"
    try:
        adapters.check_record(content["arrays"], rules.spec)
    except adapters.UpdateError as err:
        return str(err)
    return None


def update_norm(new: ArrayRecord, old: ArrayRecord) -> float:
    """L2 norm of the difference between two adapters over all their tensors."""
    total = 0.0
    for key in old:
        diff = new[key].numpy().astype(np.float64) - old[key].numpy().astype(np.float64)
        total += float(np.sum(diff * diff))
    return math.sqrt(total)
