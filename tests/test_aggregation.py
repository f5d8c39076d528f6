"""Each aggregator on known inputs against an independent numpy computation, plus FedProx's client-side pull."""

import numpy as np
import pytest
import torch
from torch.nn.functional import cross_entropy
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, FedProx, FedTrimmedAvg, Krum
from flwr.supercore.task_identity import TaskIdentity

from common import adapters
from common.config import ConfigError, RunConfig
from common.train import DPSettings, train_round
from server.checkpoint import RunDir
from server.strategy import make_strategy
from tests.test_model_train import make_data, tiny

SHAPES = {"lora_B": (2, 3), "head": (4,)}


@pytest.fixture(autouse=True)
def task_identity():
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


class Grid:
    """Just enough of a Flower Grid for configure_train to sample nodes."""

    def get_node_ids(self):
        return [1, 2, 3, 4, 5]


def record(arrays):
    return ArrayRecord({key: Array(np.asarray(value, dtype=np.float32)) for key, value in arrays.items()})


def reply(node, arrays, examples, **extra_metrics):
    request = Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
    metrics = MetricRecord({"num-examples": examples, "loss": 1.0, "steps": 3, **extra_metrics})
    return Message(RecordDict({"arrays": record(arrays), "metrics": metrics}), reply_to=request)


def sites(n, seed=0):
    rng = np.random.default_rng(seed)
    return [{key: rng.normal(0, 1, shape).astype(np.float32) for key, shape in SHAPES.items()} for _ in range(n)]


def config(**overrides):
    """A run config with plain (not robust) aggregation unless asked: these tests check each rule's own arithmetic."""
    overrides = {"robust_aggregation": False, **overrides}
    return RunConfig.from_mapping({key.replace("_", "-"): value for key, value in overrides.items()})


def aggregate(strategy, updates, examples, server_round=1):
    replies = [reply(node, update, n) for node, (update, n) in enumerate(zip(updates, examples), start=1)]
    arrays, _ = strategy.aggregate_train(server_round, replies)
    assert all(arrays[key].dtype == "float32" for key in arrays)
    return {key: arrays[key].numpy() for key in arrays}


def mean(updates):
    return {key: sum(u[key].astype(np.float64) for u in updates) / len(updates) for key in SHAPES}


@pytest.mark.parametrize("kind,flower_class", [
    ("fedavg", FedAvg), ("ffa-lora", FedAvg), ("fedprox", FedProx), ("fedadam", FedAdam),
    ("trimmed-mean", FedTrimmedAvg), ("median", FedMedian), ("krum", Krum),
])
def test_each_aggregation_is_built_on_flowers_strategy(kind, flower_class):
    strategy = make_strategy(config(aggregation=kind, min_sites=5))
    assert type(strategy.inner) is flower_class
    assert strategy.inner.min_train_nodes == 5


@pytest.mark.parametrize("kind", ["fedavg", "ffa-lora", "fedprox"])
def test_fedavg_family_weighs_every_site_equally_whatever_count_it_claims(kind):
    """A count is a private, unverifiable claim: 10,000 (the max-site-weight) must buy no more than 5."""
    updates, examples = sites(4), [5, 10, 20, 10_000]
    got = aggregate(make_strategy(config(aggregation=kind)), updates, examples)
    for key, value in mean(updates).items():
        np.testing.assert_allclose(got[key], value, rtol=1e-5, atol=1e-6)


def test_fedprox_sends_its_mu_to_the_sites():
    strategy = make_strategy(config(aggregation="fedprox", proximal_mu=0.3))
    messages = list(strategy.configure_train(1, record(sites(1)[0]), ConfigRecord({}), Grid()))
    assert {m.content["config"]["proximal-mu"] for m in messages} == {0.3}


def test_trimmed_mean_drops_the_extremes_of_each_coordinate_unweighted():
    updates = sites(5)
    updates[4] = {key: value + 100.0 for key, value in updates[4].items()}  # an outlier site
    got = aggregate(make_strategy(config(aggregation="trimmed-mean", trim_fraction=0.2)), updates, [1, 1, 1, 1, 1000])
    for key in SHAPES:
        stacked = np.sort(np.stack([u[key] for u in updates]).astype(np.float64), axis=0)
        np.testing.assert_allclose(got[key], stacked[1:4].mean(axis=0), rtol=1e-5, atol=1e-6)


def test_median_is_per_coordinate_and_ignores_weights():
    updates = sites(4)
    updates[0] = {key: value - 1e6 for key, value in updates[0].items()}
    got = aggregate(make_strategy(config(aggregation="median")), updates, [1000, 1, 1, 1])
    for key in SHAPES:
        stacked = np.sort(np.stack([u[key] for u in updates]).astype(np.float64), axis=0)
        np.testing.assert_allclose(got[key], (stacked[1] + stacked[2]) / 2, rtol=1e-5, atol=1e-6)


def test_krum_picks_the_update_closest_to_its_neighbours_not_the_outlier():
    rng = np.random.default_rng(1)
    centre = {key: rng.normal(0, 1, shape) for key, shape in SHAPES.items()}
    spreads = [0.3, 0.05, 0.2, 0.4]
    updates = [{k: (v + rng.normal(0, s, v.shape)).astype(np.float32) for k, v in centre.items()} for s in spreads]
    updates.append({k: (v + 50.0).astype(np.float32) for k, v in centre.items()})  # outlier
    flat = [np.concatenate([u[k].astype(np.float64).ravel() for k in SHAPES]) for u in updates]
    f = 1
    neighbours = len(updates) - f - 2
    # Krum's score: the summed squared distances to a site's n - f - 2 nearest other sites.
    scores = [sum(sorted(np.sum((x - y) ** 2) for j, y in enumerate(flat) if j != i)[:neighbours])
              for i, x in enumerate(flat)]
    best = int(np.argmin(scores))
    assert best != 4
    strategy = make_strategy(config(aggregation="krum", krum_byzantine=f, min_sites=5))
    got = aggregate(strategy, updates, [1, 1, 1, 1, 1000])
    for key in SHAPES:
        np.testing.assert_array_equal(got[key], updates[best][key])


def test_fedadam_two_rounds_follow_the_adam_update_with_its_state():
    eta, beta_1, beta_2, tau = 0.05, 0.9, 0.99, 1e-3
    strategy = make_strategy(config(aggregation="fedadam", server_learning_rate=eta))
    inner = strategy.inner
    assert (inner.eta, inner.beta_1, inner.beta_2, inner.tau) == (eta, beta_1, beta_2, tau)
    current = sites(1, seed=7)[0]
    m = {key: 0.0 for key in SHAPES}
    v = {key: 0.0 for key in SHAPES}
    for server_round, seed in ((1, 1), (2, 2)):
        updates, examples = sites(3, seed=seed), [10, 30, 60]
        # The server loop hands configure_train the round's global arrays; FedAdam steps from those.
        list(strategy.configure_train(server_round, record(current), ConfigRecord({}), Grid()))
        got = aggregate(strategy, updates, examples, server_round)
        average = mean(updates)
        # Flower counts Adam's bias-correction step as server_round + 1.
        step = eta * np.sqrt(1 - beta_2 ** (server_round + 1)) / (1 - beta_1 ** (server_round + 1))
        expected = {}
        for key in SHAPES:
            delta = average[key] - current[key].astype(np.float64)
            m[key] = beta_1 * m[key] + (1 - beta_1) * delta
            v[key] = beta_2 * v[key] + (1 - beta_2) * delta**2
            expected[key] = current[key] + step * m[key] / (np.sqrt(v[key]) + tau)
            np.testing.assert_allclose(got[key], expected[key], rtol=1e-5, atol=1e-6)
        current = got


def test_fedadam_moments_saved_with_a_round_carry_over_to_a_resumed_run(tmp_path, tiny_model_dir):
    current = sites(1, seed=7)[0]
    rounds = [(sites(3, seed=1), [10, 30, 60]), (sites(3, seed=2), [50, 20, 30])]

    def step(strategy, server_round, arrays):
        list(strategy.configure_train(server_round, record(arrays), ConfigRecord({}), Grid()))
        return aggregate(strategy, *rounds[server_round - 1], server_round)

    unbroken = make_strategy(config(aggregation="fedadam"))
    expected = step(unbroken, 2, step(unbroken, 1, current))

    first = make_strategy(config(aggregation="fedadam"))
    after_one = step(first, 1, current)
    run = RunDir(tmp_path, "adam")
    run.save_adapter(tiny(tiny_model_dir), 1, {}, first.optimizer_state())
    resumed = make_strategy(config(aggregation="fedadam"))
    resumed.load_optimizer_state(run.load_optimizer(1))
    got = step(resumed, 2, after_one)
    for key in SHAPES:
        np.testing.assert_array_equal(got[key], expected[key])
    assert make_strategy(config()).optimizer_state() == {}
    with pytest.raises(ValueError, match="keeps none"):
        make_strategy(config()).load_optimizer_state(run.load_optimizer(1))


def test_robust_aggregators_leave_the_screened_replies_intact():
    """FedMedian and FedTrimmedAvg pop arrays out of the replies they read; the server's replies must survive."""
    for kind in ("median", "trimmed-mean", "krum", "fedadam"):
        strategy = make_strategy(config(aggregation=kind, min_sites=5))
        replies = [reply(i + 1, u, 1) for i, u in enumerate(sites(5))]
        list(strategy.configure_train(1, record(sites(1)[0]), ConfigRecord({}), Grid()))
        strategy.aggregate_train(1, replies)
        assert all(set(r.content["arrays"]) == set(SHAPES) for r in replies), kind


def test_a_site_with_an_extra_metric_does_not_abort_the_round():
    """Flower raises when sites' metric keys differ; the aggregate must not depend on optional metrics."""
    updates = sites(3)
    replies = [reply(1, updates[0], 1, epsilon=0.5), reply(2, updates[1], 2), reply(3, updates[2], 3, extra=9.0)]
    arrays, _ = make_strategy(config()).aggregate_train(1, replies)
    for key, value in mean(updates).items():
        np.testing.assert_allclose(arrays[key].numpy(), value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["trimmed-mean", "median", "krum"])
def test_robust_aggregation_with_secure_aggregation_is_a_config_error(kind):
    with pytest.raises(ConfigError, match=f"aggregation='{kind}' cannot run with secure-aggregation=true"):
        config(aggregation=kind, secure_aggregation=True, min_sites=5)


def test_secure_aggregation_is_allowed_with_the_averaging_aggregators():
    for kind in ("fedavg", "ffa-lora", "fedprox", "fedadam"):
        assert config(aggregation=kind, secure_aggregation=True, min_sites=3).secure_aggregation
    with pytest.raises(ConfigError, match="max-update-norm cannot be enforced with secure-aggregation"):
        config(secure_aggregation=True, max_update_norm=1.0, min_sites=3)
    with pytest.raises(ConfigError, match="secure-aggregation=true needs min-sites >= 3"):
        config(secure_aggregation=True, min_sites=2)


@pytest.mark.parametrize("overrides,needle", [
    ({"trim_fraction": 0.5}, r"trim-fraction=0.5 is out of range; allowed range: \[0, 0.5\)"),
    ({"krum_byzantine": -1}, "krum-byzantine=-1 is out of range"),
    ({"proximal_mu": -0.1}, "proximal-mu=-0.1 is out of range"),
    ({"server_learning_rate": 0}, r"server-learning-rate=0.0 is out of range; allowed range: \(0, 10\]"),
    ({"aggregation": "krum", "krum_byzantine": 1, "min_sites": 4}, "krum-byzantine=1 needs min-sites >= 5"),
    ({"aggregation": "fedprox", "proximal_mu": 200.0}, "learning-rate × proximal-mu must be below 1"),
])
def test_aggregation_settings_are_validated(overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        config(**overrides)


def _distance(model, anchor):
    state = adapters.trainable_state(model)
    return float(torch.sqrt(sum(torch.sum((state[k] - anchor[k]) ** 2) for k in anchor)))


def test_proximal_step_is_an_exact_pull_toward_the_round_start(tiny_model_dir_no_dropout):
    """One full-batch step: FedProx's result is the plain result moved lr·mu of the way back to the start."""
    data, lr, mu = make_data(n=16), 0.05, 4.0
    plain, prox = tiny(tiny_model_dir_no_dropout), tiny(tiny_model_dir_no_dropout)
    start = adapters.trainable_state(plain)
    train_round(plain, data, loss_fn=cross_entropy, epochs=1, batch_size=16, learning_rate=lr, dp=None)
    train_round(prox, data, loss_fn=cross_entropy, epochs=1, batch_size=16, learning_rate=lr, dp=None,
                proximal_mu=mu)
    after_plain, after_prox = adapters.trainable_state(plain), adapters.trainable_state(prox)
    for key, value in after_plain.items():
        torch.testing.assert_close(after_prox[key], value - lr * mu * (value - start[key]), atol=1e-6, rtol=1e-5)


def test_proximal_step_keeps_dp_training_closer_to_the_global_weights(tiny_model_dir):
    data, dp = make_data(n=48), DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=1 / 6)
    distances = {}
    for mu in (0.0, 10.0):
        model = tiny(tiny_model_dir)
        anchor = adapters.trainable_state(model)
        torch.manual_seed(0)
        train_round(model, data, loss_fn=cross_entropy, epochs=2, batch_size=8, learning_rate=0.02, dp=dp,
                    proximal_mu=mu)
        distances[mu] = _distance(model, anchor)
    assert 0 < distances[10.0] < 0.7 * distances[0.0]
