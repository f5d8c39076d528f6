"""Update screening: every kind of rogue reply is set aside with a reason, and the honest sites alone are averaged."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from common.config import ConfigError, RunConfig
from server.strategy import TRAIN_METRICS, make_strategy, screen

SPEC = {"layer.lora_A.weight": (2, 3), "layer.lora_B.weight": (3, 2), "classifier.weight": (3,)}
GLOBAL = {key: np.full(shape, 0.5, dtype=np.float32) for key, shape in SPEC.items()}
HONEST = [(1, 10), (2, 20), (3, 30)]  # (node id, examples)
ROGUE_NODE = 9


@pytest.fixture(autouse=True)
def task_identity():
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


def record(arrays):
    return ArrayRecord({key: Array(np.asarray(value)) for key, value in arrays.items()})


def request(node):
    return Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)


def reply(node, arrays=None, metrics=None, site=None):
    """A training reply as the ClientApp sends it; `None` leaves a record out."""
    content = RecordDict({"site": ConfigRecord({"site-id": site or f"site-{node}"})})
    if arrays is not None:
        content["arrays"] = record(arrays)
    if metrics is not None:
        content["metrics"] = MetricRecord(metrics)
    return Message(content, reply_to=request(node))


def site_update(node):
    rng = np.random.default_rng(node)
    return {key: value + rng.normal(0, 0.1, value.shape).astype(np.float32) for key, value in GLOBAL.items()}


def honest_replies():
    return [reply(node, site_update(node), {"num-examples": n, "loss": 1.0, "steps": 2}) for node, n in HONEST]


def honest_fedavg():
    """Weighted FedAvg of the honest sites, computed independently in float64."""
    total = sum(n for _, n in HONEST)
    return {key: sum(site_update(node)[key].astype(np.float64) * n for node, n in HONEST) / total for key in SPEC}


def rogue_arrays():
    """A rogue update far from the honest ones, so any leak into the aggregate shows."""
    return {key: value + 1000.0 for key, value in GLOBAL.items()}


def _poison(value):
    def mutate(arrays, metrics):
        arrays["layer.lora_B.weight"][1, 0] = value
    return mutate


def _set(key, value):
    def mutate(arrays, metrics):
        if value is None:
            metrics.pop(key)
        else:
            metrics[key] = value
    return mutate


def _arrays(fn):
    def mutate(arrays, metrics):
        fn(arrays)
    return mutate


ROGUES = {
    "nan": (_poison(np.nan), "NaN or infinite"),
    "inf": (_poison(np.inf), "NaN or infinite"),
    "extra key": (_arrays(lambda a: a.update({"layer.lora_C.weight": np.zeros(2, np.float32)})), "unexpected key"),
    "missing key": (_arrays(lambda a: a.pop("classifier.weight")), "missing key(s), first 'classifier.weight'"),
    "wrong shape": (
        _arrays(lambda a: a.update({"layer.lora_B.weight": np.zeros((2, 3), np.float32)})), "has shape (2, 3)"
    ),
    "wrong dtype": (_arrays(lambda a: a.update({k: v.astype(np.float64) for k, v in a.items()})), "dtype float64"),
    "huge norm": (lambda arrays, metrics: None, "exceeds the bound 5.0"),
    "zero examples": (_set("num-examples", 0), "num-examples must be a positive whole number"),
    "negative examples": (_set("num-examples", -40), "num-examples must be a positive whole number"),
    "fractional examples": (_set("num-examples", 2.5), "num-examples must be a positive whole number"),
    "missing num-examples": (_set("num-examples", None), "metrics lack num-examples"),
    "nan loss": (_set("loss", float("nan")), "metric loss is not a finite number"),
    "list epsilon": (_set("epsilon", [1.0, 2.0]), "metric epsilon is not a finite number"),
}


def rogue_reply(case):
    arrays, metrics = rogue_arrays(), {"num-examples": 1_000, "loss": 0.1, "steps": 2}
    mutate, _ = ROGUES[case]
    mutate(arrays, metrics)
    return reply(ROGUE_NODE, arrays, metrics)


def assert_honest_fedavg(accepted):
    arrays, _ = make_strategy(RunConfig()).aggregate_train(1, accepted)
    expected = honest_fedavg()
    assert set(arrays) == set(SPEC)
    for key in SPEC:
        np.testing.assert_allclose(arrays[key].numpy(), expected[key], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("case", sorted(ROGUES))
def test_rogue_reply_is_rejected_and_the_honest_sites_are_averaged(case):
    replies = [*honest_replies(), rogue_reply(case)]
    result = screen(
        replies, spec=SPEC, required_metrics=TRAIN_METRICS, global_arrays=record(GLOBAL), max_update_norm=5.0
    )
    assert set(result.rejected) == {f"site-{ROGUE_NODE}"}
    assert ROGUES[case][1] in result.rejected[f"site-{ROGUE_NODE}"]
    assert [m.metadata.src_node_id for m in result.accepted] == [node for node, _ in HONEST]
    assert_honest_fedavg(result.accepted)


GOOD_METRICS = {"num-examples": 5, "loss": 1.0, "steps": 1}


@pytest.mark.parametrize("content,needle", [
    (RecordDict({"arrays": record(GLOBAL)}), "no single 'metrics' record"),
    (RecordDict({"arrays": record(GLOBAL), "metrics": ConfigRecord({"num-examples": "many"})}), "no single 'metrics'"),
    (RecordDict({"metrics": MetricRecord(GOOD_METRICS)}), "no single 'arrays' record"),
    (RecordDict({"arrays": ConfigRecord({"x": 1}), "metrics": MetricRecord(GOOD_METRICS)}), "no single 'arrays'"),
])
def test_replies_missing_a_record_are_rejected(content, needle):
    rogue = Message(content, reply_to=request(ROGUE_NODE))
    result = screen([*honest_replies(), rogue], spec=SPEC, required_metrics=TRAIN_METRICS, global_arrays=record(GLOBAL))
    assert needle in result.rejected[f"node-{ROGUE_NODE}"]
    assert_honest_fedavg(result.accepted)


def test_declined_and_error_replies_are_not_aggregated():
    declined = Message(
        RecordDict({"decline": ConfigRecord({"reason": "over its cap", "site-id": "site-7"}),
                    "site": ConfigRecord({"site-id": "site-7"})}),
        reply_to=request(7),
    )
    failed = Message(Error(code=0, reason="node lost"), reply_to=request(8))
    result = screen([*honest_replies(), declined, failed], spec=SPEC, required_metrics=TRAIN_METRICS,
                    global_arrays=record(GLOBAL), max_update_norm=5.0)
    assert result.declined == {"site-7": "over its cap"}
    assert result.rejected == {"node-8": "error reply: node lost"}
    assert len(result.accepted) == len(HONEST)
    assert_honest_fedavg(result.accepted)


def test_a_site_claiming_more_examples_than_any_site_may_hold_is_rejected():
    inflated = reply(ROGUE_NODE, rogue_arrays(), {"num-examples": 10**9, "loss": 0.1, "steps": 2})
    result = screen([*honest_replies(), inflated], spec=SPEC, required_metrics=TRAIN_METRICS, max_examples=1000)
    assert "num-examples 1e+09 exceeds max-examples-per-site=1000" in result.rejected[f"site-{ROGUE_NODE}"]
    assert_honest_fedavg(result.accepted)


def test_two_nodes_claiming_one_site_id_are_both_set_aside():
    impostor = reply(ROGUE_NODE, rogue_arrays(), {"num-examples": 10, "loss": 0.1, "steps": 2}, site="site-1")
    result = screen([*honest_replies(), impostor], spec=SPEC, required_metrics=TRAIN_METRICS)
    assert "claimed by 2 nodes" in result.rejected["site-1"]
    assert [m.metadata.src_node_id for m in result.accepted] == [2, 3]


def test_the_norm_bound_is_off_by_default():
    replies = [*honest_replies(), rogue_reply("huge norm")]
    result = screen(replies, spec=SPEC, required_metrics=TRAIN_METRICS, global_arrays=record(GLOBAL))
    assert not result.rejected and len(result.accepted) == len(HONEST) + 1


def test_malformed_site_and_decline_records_do_not_crash_the_server():
    nameless = reply(4, site_update(4), {"num-examples": 3, "loss": 1.0, "steps": 1})
    nameless.content["site"] = ConfigRecord({"name": "x"})
    shouting = reply(5, site_update(5), {"num-examples": 3, "loss": 1.0, "steps": 1}, site="a\nforged log line")
    bare_decline = Message(RecordDict({"decline": ConfigRecord({})}), reply_to=request(6))
    long_decline = Message(RecordDict({"decline": ConfigRecord({"reason": "x" * 10_000})}), reply_to=request(7))
    result = screen([nameless, shouting, bare_decline, long_decline], spec=SPEC, required_metrics=TRAIN_METRICS)
    assert sorted(result.sites.values()) == ["node-4", "node-5", "node-6", "node-7"]
    assert result.declined["node-6"] == "no reason given"
    assert len(result.declined["node-7"]) < 400
    assert len(result.accepted) == 2


def test_max_update_norm_is_validated_and_mirrored_in_the_run_config():
    assert RunConfig().max_update_norm == 0.0
    assert RunConfig.from_mapping({"max-update-norm": 2}).max_update_norm == 2.0
    with pytest.raises(ConfigError, match=r"max-update-norm=-1.0 is out of range; allowed range: \[0, inf\]"):
        RunConfig.from_mapping({"max-update-norm": -1.0})
