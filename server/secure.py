"""Secure aggregation with Flower's SecAgg+: the server learns the weighted mean of the sites' updates, not one of them.

In flwr 1.42 SecAgg+ exists only as a legacy workflow (``SecAggPlusWorkflow`` driven with a
``LegacyContext`` and a legacy strategy) plus the client mod ``secaggplus_mod``. This module runs
that workflow for one training round inside Privet's message-API ServerApp::

    secure = SecureAggregation(timeout=config.round_timeout)
    outcome = secure.exchange(grid, strategy.configure_train(server_round, arrays, ConfigRecord(cfg), grid))
    trained = outcome.screened(known)                 # per-site metrics, declines, dropouts (for the report)
    if outcome.arrays is not None and len(trained.accepted) >= config.min_sites:
        arrays, _ = strategy.aggregate_train(server_round, [outcome.reply()])

`exchange` takes the very messages the strategy would have sent in a plain round (so node
sampling, ``server-round``, FedProx's ``proximal-mu`` and FedAdam's bookkeeping are unchanged),
runs the four SecAgg+ stages over them and returns the new global adapter
(global + weighted mean of the sites' clipped deltas, float32). `reply()` wraps that adapter as
one reply with the total example count, so FedAvg/FedProx return it as is and FedAdam takes its
server-optimizer step on the mean delta.

How SecAgg+ computes the mean (flwr 1.42): each site ``i`` scales its clipped delta ``x_i`` by
``d_i = round(n_i/W·Q)/Q`` (``n_i`` its weight, ``W`` the max weight; in Privet both are
``SITE_WEIGHT`` = 1, so ``d_i`` = 1: equal weights), maps it to integers
in ``[0, Q]`` by stochastic rounding, prepends ``round(n_i/W·Q)`` and adds random masks modulo
``2^32``: its own mask plus pairwise masks that cancel in the sum. The server sums the masked
vectors, asks the surviving sites for Shamir shares to remove the masks of survivors (their own
masks) and of sites that dropped after sharing keys (their pairwise masks), and divides the
dequantized sum by ``Σ d_i``. Result: ``Σ d_i x_i / Σ d_i + e`` with
``|e| ≤ (2c/Q)·m / Σ d_i`` per coordinate (``m`` summed sites, ``c`` the clipping range).

A rogue site runs its own code, so the weight it puts in its masked vector is its choice: the server
records the unmasked ``Σ round(n_i/W·Q)`` and refuses the aggregate unless it is exactly ``Q`` per
site that trained, so no site can weigh more than another.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.app.message import make_message
from flwr.common import FitIns, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import ServerConfig
from flwr.server.client_manager import SimpleClientManager
from flwr.server.compat import LegacyContext
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey

from common import secure_wire as wire
from common import adapters
from server.identity import SiteIdentities
from server.secagg_workflow import OneRound, PatchedSecAggPlus, WatchedGrid, run_id_of
from server.strategy import safe_text

log = logging.getLogger("flwr.privet.server")

DEFAULT_CLIPPING_RANGE = wire.DEFAULT_CLIPPING_RANGE
MODULUS_RANGE = 2**32


class SecureAggregationError(ValueError):
    """Secure aggregation cannot run with these sites or settings."""


def majority_threshold(num_sites: int) -> int:
    """Shares needed to rebuild a site's secret: a strict majority (at least 2), so tolerating ``n - t`` dropouts.

    More than half, because Flower's SecAgg+ has no consistency check: a server that told some
    sites "X dropped" and others "X is alive" could otherwise collect enough shares of both of
    X's secrets to unmask X's update.
    """
    return max(2, num_sites // 2 + 1)


def quantization_range_for(num_sites: int, modulus_range: int = MODULUS_RANGE) -> int:
    """A power of two Q with ``num_sites · Q < modulus_range``, so the sum cannot wrap: modulus / 2^bits(n), ≤ 2^30.

    Flower's default 2^22 leaves room for 1,023 sites; four sites can afford 2^29, 128 times
    finer, at no cost: the masked values travel as int64 whatever Q is. (2^30 keeps Flower's
    int32 stochastic rounding safe.)
    """
    q = modulus_range >> max(1, num_sites.bit_length())
    return int(min(q, 2**30))


@dataclass
class SecureRound:
    """What one secure round produced, and what the server could see of each site."""

    server_round: int
    arrays: ArrayRecord | None = None  # the new global adapter (float32); None when nothing was aggregated
    mean_delta: dict[str, np.ndarray] | None = None  # the weighted mean of the clipped deltas (float64)
    examples: int = 0  # the sites' plain-text weights: one per site that trained
    trained: dict[int, dict] = field(default_factory=dict)  # node -> plain-text metrics; its update is in the sum
    declined: dict[int, str] = field(default_factory=dict)  # node -> reason; took part with weight 0
    dropped: dict[int, str] = field(default_factory=dict)  # node -> protocol stage and reason
    site_ids: dict[int, str] = field(default_factory=dict)
    failure: str | None = None  # why the round produced no aggregate
    protocol: dict = field(default_factory=dict)  # sites, threshold, clipping range, quantization, weights
    seconds: float = 0.0
    _replies: dict[int, Message] = field(default_factory=dict, repr=False)

    def reply(self) -> Message:
        """The aggregate as one train reply: the new adapter, weighted by the number of sites in it.

        Hand it to the message-API strategy's ``aggregate_train``: FedAvg and FedProx return the
        adapter unchanged; FedAdam (after its own ``configure_train``) steps on the mean delta.
        """
        if self.arrays is None:
            raise SecureAggregationError(f"round {self.server_round} has no aggregate: {self.failure}")
        metrics = {"num-examples": self.examples}
        for key in ("steps",):
            values = [(m[key], m.get("num-examples", 1)) for m in self.trained.values() if key in m]
            if values:
                metrics[key] = float(sum(v * w for v, w in values) / sum(w for _, w in values))
        content = RecordDict({"arrays": self.arrays, "metrics": MetricRecord(metrics)})
        return Message(content=content, dst_node_id=0, message_type=MessageType.TRAIN)

    def screened(self, known: Mapping[int, str] | None = None):
        """A ``server.strategy.Screened``: one metrics-only reply per summed site, declines, dropouts."""
        from server.strategy import Screened  # noqa: PLC0415 (the strategy module imports nothing from here)

        names = {**dict(known or {}), **self.site_ids}
        result = Screened()
        for node, metrics in self.trained.items():
            site = names.get(node, f"node-{node}")
            result.sites[node] = site
            content = RecordDict(
                {
                    "metrics": MetricRecord({k: v for k, v in metrics.items() if isinstance(v, (int, float))}),
                    "site": ConfigRecord({"site-id": site}),
                }
            )
            result.accepted.append(make_message(self._replies[node].metadata, content))
        for node, reason in self.declined.items():
            site = names.get(node, f"node-{node}")
            result.sites[node] = site
            result.declined[site] = reason
        for node, reason in self.dropped.items():
            if node not in self.trained and node not in self.declined:  # a site lost at unmask is still summed
                result.rejected[names.get(node, f"node-{node}")] = reason
        return result


class SecureAggregation:
    """Runs SecAgg+ training rounds with settings fixed by the server's config, never learnt from a site's claim.

    clipping_range: each delta coordinate is clipped to ±this at the site before quantization.
        Adam moves a coordinate by about the learning rate per step, so the default 8.0 is far
        above any sane round (lr 0.02 would need ~400 steps); a site logs what it clipped, but
        does not send it: that would describe its update.
    reconstruction_threshold: Shamir threshold; default a strict majority of the round's sites.
    quantization_range: default the largest safe power of two for the round's number of sites.
    max_update_norm: when > 0, each site scales its delta to at most this L2 norm (enforced by
        the site: the server cannot check it).
    timeout: seconds to wait for replies in each of the four stages (None: forever).
    min_sites: fewer sampled sites and the round is refused (with two, each site could subtract
        its own update from the mean and read the other's).
    identities: binds nodes to sites; a node whose masked vector names another site's id is
        dropped from the protocol, so its update never enters the sum.
    """

    def __init__(
        self,
        *,
        clipping_range: float = DEFAULT_CLIPPING_RANGE,
        reconstruction_threshold: int | None = None,
        quantization_range: int | None = None,
        modulus_range: int = MODULUS_RANGE,
        max_update_norm: float = 0.0,
        timeout: float | None = None,
        min_sites: int = 3,
        identities: SiteIdentities | None = None,
    ):
        if not clipping_range > 0:
            raise SecureAggregationError(f"clipping range {clipping_range} must be positive")
        if min_sites < 2:
            raise SecureAggregationError("secure aggregation needs at least 2 sites")
        self.clipping_range = float(clipping_range)
        self.reconstruction_threshold = reconstruction_threshold
        self.quantization_range = quantization_range
        self.modulus_range = int(modulus_range)
        self.max_update_norm = float(max_update_norm)
        self.timeout = timeout
        self.min_sites = int(min_sites)
        self.identities = identities if identities is not None else SiteIdentities()

    def exchange(self, grid, messages: Iterable[Message]) -> SecureRound:
        """Run one SecAgg+ training round over the train messages a strategy's ``configure_train`` built."""
        started = time.time()
        messages = list(messages)
        if not messages:
            return SecureRound(server_round=0, failure="no sites were sampled")
        first = messages[0].content
        server_round = int(first["config"]["server-round"])
        outcome = SecureRound(server_round=server_round)
        keys = list(first["arrays"].keys())
        nodes = [msg.metadata.dst_node_id for msg in messages]
        if len(set(nodes)) != len(nodes):
            raise SecureAggregationError("a node was sampled twice")
        if len(nodes) < self.min_sites:
            outcome.failure = (
                f"secure aggregation needs at least {self.min_sites} sites in a round; {len(nodes)} were sampled"
            )
            log.warning("round %d: %s", server_round, outcome.failure)
            return outcome
        shapes = {key: tuple(first["arrays"][key].shape) for key in keys}
        m = len(nodes)
        threshold = self.reconstruction_threshold or majority_threshold(m)
        if not 2 <= threshold <= m:
            raise SecureAggregationError(f"reconstruction threshold {threshold} must be between 2 and {m} sites")
        q_range = self.quantization_range or quantization_range_for(m, self.modulus_range)
        if m * q_range >= self.modulus_range:
            raise SecureAggregationError(
                f"{m} sites × quantization range {q_range} could wrap around the modulus {self.modulus_range}"
            )
        max_weight = wire.SITE_WEIGHT
        outcome.protocol = {
            "sites": m, "threshold": threshold, "tolerated_dropouts": m - threshold,
            "clipping_range": self.clipping_range, "quantization_range": q_range,
            "modulus_range": self.modulus_range, "max_weight": max_weight,
        }
        fitins = {}
        for msg in messages:
            arrays, config = msg.content["arrays"], msg.content["config"]
            if list(arrays.keys()) != keys:
                raise SecureAggregationError("every site must be sent the same adapter keys")
            extra = {
                wire.KEYS: keys,
                wire.CLIPPING_RANGE: self.clipping_range,
                wire.MAX_WEIGHT: float(max_weight),
                wire.MAX_NORM: self.max_update_norm,
            }
            ndarrays = [arrays[key].numpy() for key in keys]
            fitins[msg.metadata.dst_node_id] = FitIns(ndarrays_to_parameters(ndarrays), {**dict(config), **extra})
        global_arrays = {key: first["arrays"][key].numpy() for key in keys}

        watched = WatchedGrid(grid, set(nodes), shapes=[(1,), *shapes.values()],
                               modulus_range=self.modulus_range, max_weight=max_weight, identities=self.identities)
        strategy = OneRound(fitins, watched)
        client_manager = SimpleClientManager()
        for proxy in strategy.proxies.values():
            client_manager.register(proxy)
        # A fresh context: the workflow writes its bookkeeping into context.state, which must not touch the caller's.
        context = LegacyContext(
            Context(run_id=run_id_of(grid), node_id=0, node_config={}, state=RecordDict(), run_config={}),
            config=ServerConfig(num_rounds=1),
            strategy=strategy,
            client_manager=client_manager,
        )
        context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: server_round})
        context.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()
        workflow = PatchedSecAggPlus(
            num_shares=1.0,  # every site holds a share of every other site's secrets (fine for tens of sites)
            reconstruction_threshold=threshold,
            max_weight=float(max_weight),
            clipping_range=self.clipping_range,
            quantization_range=q_range,
            modulus_range=self.modulus_range,
            timeout=self.timeout,
        )
        log.info("round %d: secure aggregation over %d sites (threshold %d, clip ±%g, Q=2^%d, equal weights)",
                 server_round, m, threshold, self.clipping_range, q_range.bit_length() - 1)
        with np.errstate(divide="ignore", invalid="ignore"):  # all sites declining divides 0 by 0; caught below
            workflow(watched, context)

        outcome.dropped = dict(watched.dropped)
        outcome._replies = dict(watched.collected)
        for proxy, fitres in strategy.results:
            node = proxy.node_id
            metrics = dict(fitres.metrics)
            metrics.pop(wire.SITE_ID, None)
            outcome.site_ids[node] = self.identities.name(node)  # verified when its masked vector arrived
            if wire.DECLINE in metrics:
                outcome.declined[node] = safe_text(metrics[wire.DECLINE])
            else:
                outcome.trained[node] = metrics
        outcome.examples = int(sum(fitres.num_examples for _, fitres in strategy.results))
        if strategy.parameters is None:
            outcome.failure = f"secure aggregation halted at stage {watched.stage!r}"
            if outcome.dropped:
                outcome.failure += f": fewer than {threshold} sites left ({len(outcome.dropped)} dropped)"
        elif outcome.examples == 0:
            outcome.failure = "no site contributed an update (all declined)"
        elif workflow.total_weight != q_range * len(outcome.trained):
            outcome.failure = (f"the masked weights sum to {workflow.total_weight / q_range:g} sites' worth, but "
                               f"{len(outcome.trained)} site(s) trained: a site sent a weight other than "
                               f"{wire.SITE_WEIGHT}; the round's aggregate is refused")
        else:
            delta = parameters_to_ndarrays(strategy.parameters)
            if len(delta) != len(keys) or any(d.shape != shapes[k] for k, d in zip(keys, delta)):
                outcome.failure = "the unmasked aggregate does not match the adapter's shapes"
            elif not all(np.all(np.isfinite(d)) for d in delta):
                outcome.failure = "the unmasked aggregate holds non-finite values"
            elif max(float(np.abs(d).max(initial=0.0)) for d in delta) > self.clipping_range + error_bound(
                    [wire.SITE_WEIGHT] * len(outcome.trained), self.clipping_range, q_range, wire.SITE_WEIGHT):
                # A mean of deltas clipped to ±c lies within ±c: only a site that skipped the clip leaves it.
                outcome.failure = (f"the unmasked mean leaves the clipping range ±{self.clipping_range:g}: a site "
                                   "sent values outside it; the round's aggregate is refused")
            else:
                outcome.mean_delta = dict(zip(keys, delta))
                outcome.arrays = ArrayRecord(
                    {
                        k: Array((global_arrays[k].astype(np.float64) + d).astype(adapters.WIRE_DTYPE))
                        for k, d in outcome.mean_delta.items()
                    }
                )
        for node, reason in outcome.dropped.items():
            log.warning("round %d: node %d dropped out of secure aggregation: %s", server_round, node, reason)
        if outcome.failure:
            log.warning("round %d: %s; the global adapter is unchanged", server_round, outcome.failure)
        outcome.seconds = time.time() - started
        return outcome


def error_bound(weights: Iterable[float], clipping_range: float, quantization_range: int, max_weight: float) -> float:
    """Per-coordinate bound on |secure mean − exact FedAvg mean| for clipped deltas with these example counts.

    Stochastic rounding moves each site's quantized value by less than one step 2c/Q; the sum is
    divided by Σd_i (d_i = q_i/Q, q_i = round(n_i/W·Q)): at most (2c/Q)·m/Σd_i. Using the
    rounded weights q_i instead of n_i·Q/W (each off by ≤ 1/2, so the normalized weights move by
    ≤ m/Σq_i in total) moves a weighted mean of values in [−c, c] by at most c·m/Σq_i more.
    Together: 3·c·m / Σq_i.
    """
    q = [round(n / max_weight * quantization_range) for n in weights if n > 0]
    return 3 * clipping_range * len(q) / sum(q)
