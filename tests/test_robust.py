"""Rogue sites that know the rules, against the default screening and aggregation (server.strategy, server.robust).

Honest updates here are a shared signal plus DP-like noise as large as the signal, on a small adapter; each rogue
stays inside every screen (norm under 4× the median, finite, the right keys) and claims what it likes as its
example count. The server's real path (screen, then the default strategy) must keep the global adapter within one
honest site's own spread of the honest sites' mean, and on the honest side of their direction. The randomness is
the test's own (seeded), so no bound depends on the luck of a draw.
"""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from common.config import RunConfig
from server.identity import SiteIdentities
from server.robust import MIN_ROBUST_SITES, centered_clip
from server.strategy import TRAIN_METRICS, Rules, make_strategy, screen

SPEC = {"lora_B": (16, 8), "classifier.weight": (6, 16), "classifier.bias": (6,)}
GLOBAL = {key: np.zeros(shape, np.float32) for key, shape in SPEC.items()}
REVERSE = 3.5  # under the screen's 4× median bound
DRIFT = 0.3  # per round, in units of the rogue's own update norm: ten rounds stay under the 4× bound
ATTACKS = ("scaled", "reversed", "targeted", "drifting", "inflated")


class Grid:
    """Just enough of a Flower Grid for configure_train."""

    def get_node_ids(self):
        return [1, 2, 3, 4, 5]


@pytest.fixture(autouse=True)
def task_identity():
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


def flat(arrays):
    return np.concatenate([np.asarray(arrays[key], np.float64).ravel() for key in SPEC])


def honest_updates(count, seed, signal_scale=1.0):
    """Deltas sharing one signal, each with its own noise of the signal's size per coordinate."""
    rng = np.random.default_rng(seed)
    signal = {key: rng.normal(0, signal_scale, shape) for key, shape in SPEC.items()}
    return [{key: signal[key] + rng.normal(0, signal_scale, shape) for key, shape in SPEC.items()}
            for _ in range(count)]


def rogue_update(kind, own, server_round=1):
    """What a rogue sends, built from its own honest update `own` so that it passes every screen."""
    size = np.linalg.norm(flat(own))
    if kind == "scaled":
        return {key: 1000 * value for key, value in own.items()}
    if kind in ("reversed", "inflated"):
        return {key: -REVERSE * value for key, value in own.items()}
    if kind in ("targeted", "drifting"):  # all of its allowance on one class's bias
        push = REVERSE * size if kind == "targeted" else DRIFT * server_round * size
        bias = own["classifier.bias"].copy()
        bias[0] += push
        return {**own, "classifier.bias": bias}
    raise ValueError(kind)


def message(node, delta, examples=900, server_round=1):
    arrays = ArrayRecord({key: Array((GLOBAL[key] + delta[key]).astype(np.float32)) for key in SPEC})
    metrics = MetricRecord({"num-examples": examples, "steps": 40, "server-round": server_round})
    request = Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
    return Message(RecordDict({"arrays": arrays, "metrics": metrics,
                               "site": ConfigRecord({"site-id": f"site-{node}"})}), reply_to=request)


def server_aggregate(deltas, examples, config=None, server_round=1):
    """The server's real path over these replies: screening, then the run's strategy; the aggregate delta."""
    replies = [message(node, d, n, server_round) for node, (d, n) in enumerate(zip(deltas, examples), start=1)]
    rules = Rules(server_round=server_round, required_metrics=TRAIN_METRICS, max_weight=10_000, spec=SPEC,
                  global_arrays=ArrayRecord({k: Array(v) for k, v in GLOBAL.items()}))
    screened = screen(replies, rules, SiteIdentities())
    # Every rogue here stays inside the screens, but the crude 1000× one, which they set aside.
    assert all("more than 4×" in reason for reason in screened.rejected.values()), screened.rejected
    strategy = make_strategy(config or RunConfig())
    list(strategy.configure_train(server_round, rules.global_arrays, ConfigRecord({}), Grid()))
    arrays, _ = strategy.aggregate_train(server_round, screened.accepted)
    return flat({key: arrays[key].numpy() for key in SPEC})


def honest_figures(honest):
    mean = np.mean([flat(h) for h in honest], axis=0)
    spread = float(np.median([np.linalg.norm(flat(h) - mean) for h in honest]))
    return mean, spread


def with_rogues(kind, sites, rogues, seed):
    updates = honest_updates(sites, seed)
    honest = updates[rogues:]
    if rogues == 1:
        sent = [rogue_update(kind, updates[0])]
    else:  # colluders send one update between them: the reversal of their own updates' mean
        own = {key: np.mean([u[key] for u in updates[:rogues]], axis=0) for key in SPEC}
        sent = [rogue_update(kind, own)] * rogues
    examples = [10_000 if kind == "inflated" else 900] * rogues + [900] * len(honest)
    return honest, sent + honest, examples


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("kind", ATTACKS)
def test_one_rogue_among_four_moves_the_aggregate_no_more_than_an_honest_sites_spread(kind, seed):
    honest, deltas, examples = with_rogues(kind, 4, 1, seed)
    mean, spread = honest_figures(honest)
    got = server_aggregate(deltas, examples)
    assert np.linalg.norm(got - mean) <= 0.75 * spread
    # It keeps the honest direction: the rogue cannot cancel, let alone reverse, what the honest sites agree on.
    assert got @ mean >= 0.5 * (mean @ mean)
    # Per coordinate too: the targeted bias moves by at most what the honest sites' own spread there allows.
    bias = slice(-SPEC["classifier.bias"][0], None)
    honest_bias = np.stack([flat(h)[bias] for h in honest])
    assert np.all(np.abs(got[bias] - mean[bias]) <= np.ptp(honest_bias, axis=0) + 1e-9)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("kind", ["reversed", "scaled", "targeted"])
def test_two_colluding_rogues_among_five_stay_within_the_honest_spread(kind, seed):
    honest, deltas, examples = with_rogues(kind, 5, 2, seed)
    mean, spread = honest_figures(honest)
    got = server_aggregate(deltas, examples)
    assert np.linalg.norm(got - mean) <= 1.5 * spread
    assert got @ mean >= 0.25 * (mean @ mean)


@pytest.mark.parametrize("kind,sites,rogues", [("reversed", 4, 1), ("inflated", 4, 1), ("reversed", 5, 2)])
def test_updates_pointing_away_from_the_majority_are_left_out(kind, sites, rogues):
    for seed in range(5):
        _, deltas, _ = with_rogues(kind, sites, rogues, seed)
        assert centered_clip(deltas, GLOBAL).opposed == rogues
        assert centered_clip(honest_updates(sites, seed), GLOBAL).opposed == 0


def test_without_robust_aggregation_the_same_rogues_steer_the_mean():
    """The contrast: the plain (equally weighted) mean lets each attack above past its bounds."""
    plain = RunConfig(robust_aggregation=False)
    for kind in ("reversed", "targeted"):
        honest, deltas, examples = with_rogues(kind, 4, 1, seed=0)
        mean, spread = honest_figures(honest)
        got = server_aggregate(deltas, examples, plain)
        assert np.linalg.norm(got - mean) > 0.75 * spread, kind


def test_a_slow_drift_over_rounds_stays_bounded():
    """A rogue that pushes one class a little more every round: the robust global drifts no farther than a round's
    honest spread, while the plain mean accumulates the push."""
    robust_global, plain_global = np.zeros_like(flat(GLOBAL)), np.zeros_like(flat(GLOBAL))
    honest_global = np.zeros_like(flat(GLOBAL))
    spreads = []
    for server_round in range(1, 11):
        honest, deltas, examples = with_rogues("drifting", 4, 1, seed=100 + server_round)
        deltas[0] = rogue_update("drifting", honest_updates(4, 100 + server_round)[0], server_round)
        assert np.linalg.norm(flat(deltas[0])) < 4 * np.median([np.linalg.norm(flat(h)) for h in honest])
        mean, spread = honest_figures(honest)
        spreads.append(spread)
        honest_global += mean
        robust_global += server_aggregate(deltas, examples, server_round=server_round)
        plain_global += server_aggregate(deltas, examples, RunConfig(robust_aggregation=False), server_round)
    bias = slice(-SPEC["classifier.bias"][0], None)
    robust_push = (robust_global - honest_global)[bias][0]
    plain_push = (plain_global - honest_global)[bias][0]
    assert abs(robust_push) <= np.median(spreads)
    assert plain_push > 3 * abs(robust_push)


def test_a_claimed_count_buys_no_influence():
    """num-examples=10,000 against 900: with the plain mean as with the robust one, the aggregate is the same."""
    honest, deltas, _ = with_rogues("reversed", 4, 1, seed=3)
    for config in (RunConfig(), RunConfig(robust_aggregation=False)):
        claimed = server_aggregate(deltas, [10_000, 900, 900, 900], config)
        modest = server_aggregate(deltas, [1, 900, 900, 900], config)
        np.testing.assert_allclose(claimed, modest, rtol=1e-6, atol=1e-6)


def test_an_honest_federation_keeps_nearly_its_mean():
    """No rogue: the robust aggregate stays close to the plain mean (DP noise, not an attack, sets the spread)."""
    for seed in range(5):
        honest = honest_updates(4, seed)
        mean, spread = honest_figures(honest)
        got = server_aggregate(honest, [900] * 4)
        assert np.linalg.norm(got - mean) <= 0.35 * spread


def test_robust_aggregation_is_the_default_and_needs_three_sites():
    assert RunConfig().robust_aggregation and RunConfig().min_sites == MIN_ROBUST_SITES == 3
    with pytest.raises(ValueError, match="at least 3 updates"):
        centered_clip(honest_updates(2, seed=0), GLOBAL)
    strategy = make_strategy(RunConfig())
    list(strategy.configure_train(1, ArrayRecord({k: Array(v) for k, v in GLOBAL.items()}), ConfigRecord({}), Grid()))
    two = [message(node, d) for node, d in enumerate(honest_updates(2, seed=0), start=1)]
    arrays, _ = strategy.aggregate_train(1, two)  # two sites: the plain mean, said so
    assert "not robust" in strategy.last_rule and "honest majority of at least 3" in strategy.last_rule
    np.testing.assert_allclose(flat({k: arrays[k].numpy() for k in SPEC}),
                               np.mean([flat(d) for d in honest_updates(2, seed=0)], axis=0), rtol=1e-5, atol=1e-6)
    for kind in ("trimmed-mean", "median", "krum"):  # robust rules of their own: nothing is stacked on them
        assert not make_strategy(RunConfig(aggregation=kind, min_sites=5)).robust
