"""Update screening: every kind of rogue reply is set aside with a reason, and the honest sites alone are averaged."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from common.config import ConfigError, RunConfig
from server.identity import SiteIdentities
from server.strategy import TRAIN_METRICS, Rules, make_strategy, screen

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


def honest_replies(server_round=1):
    return [reply(node, site_update(node), {"num-examples": n, "steps": 2, "server-round": server_round})
            for node, n in HONEST]


def rules(**changes):
    """The training-reply rules a round of a default run applies, here over the small SPEC adapter."""
    base = {"server_round": 1, "required_metrics": TRAIN_METRICS, "max_weight": 10_000, "spec": SPEC,
            "global_arrays": record(GLOBAL)}
    return Rules(**{**base, **changes})


def run_screen(replies, identities=None, **changes):
    return screen(replies, rules(**changes), identities or SiteIdentities())


def honest_fedavg():
    """The equally weighted mean of the honest sites (their claimed counts buy nothing), independently in float64."""
    return {key: sum(site_update(node)[key].astype(np.float64) for node, _ in HONEST) / len(HONEST) for key in SPEC}


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
    "huge norm": (lambda arrays, metrics: None, "more than 4× the round's median"),
    "zero examples": (_set("num-examples", 0), "num-examples must be a positive whole number"),
    "negative examples": (_set("num-examples", -40), "num-examples must be a positive whole number"),
    "fractional examples": (_set("num-examples", 2.5), "num-examples must be a positive whole number"),
    "missing num-examples": (_set("num-examples", None), "metrics lack num-examples"),
    "nan epsilon": (_set("epsilon", float("nan")), "metric epsilon is not a finite number"),
    "list epsilon": (_set("epsilon", [1.0, 2.0]), "metric epsilon is not a finite number"),
    "negative epsilon": (_set("epsilon", -1.0), "epsilon must not be negative"),
    "inflated examples": (_set("num-examples", 10**9), "num-examples 1e+09 exceeds max-site-weight=10000"),
    "replayed round": (_set("server-round", 0), "the reply is for round 0, not round 1"),
    "missing round": (_set("server-round", None), "metrics lack server-round"),
}


def rogue_reply(case):
    arrays, metrics = rogue_arrays(), {"num-examples": 1_000, "steps": 2, "server-round": 1}
    mutate, _ = ROGUES[case]
    mutate(arrays, metrics)
    return reply(ROGUE_NODE, arrays, metrics)


def assert_honest_fedavg(accepted):
    # The plain mean, to see exactly which replies went in (tests/test_robust.py covers the robust default).
    arrays, _ = make_strategy(RunConfig(robust_aggregation=False)).aggregate_train(1, accepted)
    expected = honest_fedavg()
    assert set(arrays) == set(SPEC)
    for key in SPEC:
        np.testing.assert_allclose(arrays[key].numpy(), expected[key], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("case", sorted(ROGUES))
def test_rogue_reply_is_rejected_and_the_honest_sites_are_averaged(case):
    result = run_screen([*honest_replies(), rogue_reply(case)])
    assert set(result.rejected) == {f"site-{ROGUE_NODE}"}
    assert ROGUES[case][1] in result.rejected[f"site-{ROGUE_NODE}"]
    assert [m.metadata.src_node_id for m in result.accepted] == [node for node, _ in HONEST]
    assert_honest_fedavg(result.accepted)


GOOD_METRICS = {"num-examples": 5, "steps": 1, "server-round": 1}


@pytest.mark.parametrize("content,needle", [
    (RecordDict({"arrays": record(GLOBAL)}), "no single 'metrics' record"),
    (RecordDict({"arrays": record(GLOBAL), "metrics": ConfigRecord({"num-examples": "many"})}), "no single 'metrics'"),
    (RecordDict({"metrics": MetricRecord(GOOD_METRICS)}), "no single 'arrays' record"),
    (RecordDict({"arrays": ConfigRecord({"x": 1}), "metrics": MetricRecord(GOOD_METRICS)}), "no single 'arrays'"),
])
def test_replies_missing_a_record_are_rejected(content, needle):
    rogue = Message(content, reply_to=request(ROGUE_NODE))
    result = run_screen([*honest_replies(), rogue])
    assert needle in result.rejected[f"node-{ROGUE_NODE}"]
    assert_honest_fedavg(result.accepted)


def test_declined_and_error_replies_are_not_aggregated():
    declined = Message(
        RecordDict({"decline": ConfigRecord({"reason": "over its cap", "site-id": "site-7"}),
                    "site": ConfigRecord({"site-id": "site-7"})}),
        reply_to=request(7),
    )
    failed = Message(Error(code=0, reason="node lost"), reply_to=request(8))
    result = run_screen([*honest_replies(), declined, failed])
    assert result.declined == {"site-7": "over its cap"}
    assert result.rejected == {"node-8": "error reply: node lost"}
    assert len(result.accepted) == len(HONEST)
    assert_honest_fedavg(result.accepted)


def test_a_1000x_scaled_honest_update_is_set_aside_by_the_default_screen():
    scaled = {key: GLOBAL[key] + 1000 * (value - GLOBAL[key]) for key, value in site_update(ROGUE_NODE).items()}
    rogue = reply(ROGUE_NODE, scaled, {"num-examples": 10, "steps": 2, "server-round": 1})
    result = run_screen([*honest_replies(), rogue])
    assert "more than 4× the round's median" in result.rejected[f"site-{ROGUE_NODE}"]
    assert_honest_fedavg(result.accepted)


def test_with_two_sites_the_earlier_rounds_median_and_the_ceiling_still_bound_an_update():
    two = honest_replies()[:2]
    scaled = {key: GLOBAL[key] + 50 * (value - GLOBAL[key]) for key, value in site_update(ROGUE_NODE).items()}
    rogue = reply(ROGUE_NODE, scaled, {"num-examples": 10, "steps": 2, "server-round": 1})
    reference = run_screen(honest_replies()).median_norm()
    result = run_screen([two[0], rogue], reference_norm=reference)
    assert "earlier rounds' median" in result.rejected[f"site-{ROGUE_NODE}"]
    result = run_screen([two[0], rogue], norm_ceiling=1.0)
    assert "exceeds the ceiling 1" in result.rejected[f"site-{ROGUE_NODE}"]


def test_the_update_ceiling_bounds_what_adam_can_move_in_the_steps_a_site_may_take():
    import torch

    from common.bounds import ADAM_STEP_BOUND, update_ceiling
    from common.train import BETAS

    # 3 coordinates moved by the largest Adam step 10 times: exactly at the ceiling.
    assert update_ceiling(0.01, 10, {"w": (3,)}) == pytest.approx(0.01 * 10 * ADAM_STEP_BOUND * 3**0.5)
    # The worst case: gradients that grow by β2/β1 every step. AdamW's last step then moves a coordinate more than
    # twice Kingma & Ba's (1-β1)/√(1-β2), and never more than the bound.
    weight = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    adam = torch.optim.AdamW([weight], lr=1.0, betas=BETAS, eps=0.0, weight_decay=0.0)
    steps, growth = 2000, BETAS[1] / BETAS[0]
    for step in range(steps):
        weight.grad = torch.tensor([growth ** (step - steps)], dtype=torch.float64)
        before = weight.item()
        adam.step()
    moved = abs(weight.item() - before)
    assert 2 * (1 - BETAS[0]) / (1 - BETAS[1]) ** 0.5 < moved <= ADAM_STEP_BOUND


def test_evaluation_replies_with_scores_outside_zero_to_one_or_huge_counts_are_rejected():
    def evaluation(node, **metrics):
        base = {"num-examples": 40, "server-round": 1, "accuracy": 0.5, "macro_f1": 0.4}
        return reply(node, None, {**base, **metrics})

    replies = [evaluation(1), evaluation(2, accuracy=1.5), evaluation(3, num_examples=10**7),
               evaluation(4, macro_f1=-0.1)]
    replies[2].content["metrics"]["num-examples"] = 10**7
    result = screen(replies, Rules(server_round=1, required_metrics=("num-examples", "server-round", "accuracy",
                                                                     "macro_f1"),
                                   max_weight=10_000, score_keys=("accuracy", "macro_f1")), SiteIdentities())
    assert [m.metadata.src_node_id for m in result.accepted] == [1]
    assert "accuracy=1.5 is outside [0, 1]" in result.rejected["site-2"]
    assert "exceeds max-site-weight" in result.rejected["site-3"]
    assert "macro_f1=-0.1" in result.rejected["site-4"]


def test_a_node_cannot_take_another_sites_id_once_it_is_bound():
    identities = SiteIdentities()
    run_screen(honest_replies(), identities)  # round 1 binds node 1 to site-1, and so on
    impostor = reply(ROGUE_NODE, rogue_arrays(), {"num-examples": 10, "steps": 2, "server-round": 2}, site="site-1")
    result = run_screen([*honest_replies(2), impostor], identities, server_round=2)
    assert result.rejected == {f"node-{ROGUE_NODE}": f"node {ROGUE_NODE} claims site-1, which node 1 already is"}
    assert_honest_fedavg(result.accepted)
    # A bound node naming another site is set aside too.
    turncoat = reply(1, site_update(1), {"num-examples": 10, "steps": 2, "server-round": 2}, site="site-2")
    result = run_screen([turncoat], identities, server_round=2)
    assert result.rejected == {"site-1": "node 1 is site-1 but its reply names site-2"}


def test_two_new_nodes_claiming_one_site_id_are_both_set_aside():
    impostor = reply(ROGUE_NODE, rogue_arrays(), {"num-examples": 10, "steps": 2, "server-round": 1}, site="site-1")
    result = run_screen([*honest_replies(), impostor])
    assert "claimed by 2 new nodes" in result.rejected["node-1"]
    assert [m.metadata.src_node_id for m in result.accepted] == [2, 3]


def test_with_a_registry_a_site_is_the_key_it_registered(tmp_path):
    from types import SimpleNamespace

    from common import pki
    from server.identity import read_registry

    keys = {}
    for site in ("site-1", "site-2"):
        _, public = pki.write_site_keys(tmp_path, site)
        keys[site] = public
    (tmp_path / "sites.toml").write_text('[sites]\nsite-1 = "site-1.pub"\nsite-2 = "site-2.pub"\n')
    identities = SiteIdentities(read_registry(tmp_path / "sites.toml"))
    pem = {site: _pem(path) for site, path in keys.items()}
    identities.learn_nodes([SimpleNamespace(node_id=1, public_key=pem["site-1"]),
                            SimpleNamespace(node_id=2, public_key=pem["site-2"]),
                            SimpleNamespace(node_id=ROGUE_NODE, public_key=b"")])
    liar = reply(2, site_update(2), {"num-examples": 20, "steps": 2, "server-round": 1}, site="site-3")
    stranger = reply(ROGUE_NODE, site_update(ROGUE_NODE), {"num-examples": 20, "steps": 2, "server-round": 1},
                     site="site-3")
    result = run_screen([honest_replies()[0], liar, stranger], identities)
    assert result.sites == {1: "site-1"}
    assert result.rejected["site-2"] == "node 2 is site-2 but its reply names site-3"
    assert "has no key in the site registry" in result.rejected[f"node-{ROGUE_NODE}"]


def _pem(openssh_path):
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_ssh_public_key(openssh_path.read_bytes())
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def test_malformed_site_and_decline_records_do_not_crash_the_server():
    nameless = reply(4, site_update(4), {"num-examples": 3, "steps": 1, "server-round": 1})
    nameless.content["site"] = ConfigRecord({"name": "x"})
    shouting = reply(5, site_update(5), {"num-examples": 3, "steps": 1, "server-round": 1}, site="a\nforged log line")
    bare_decline = Message(RecordDict({"decline": ConfigRecord({})}), reply_to=request(6))
    long_decline = Message(RecordDict({"decline": ConfigRecord({"reason": "x" * 10_000})}), reply_to=request(7))
    result = run_screen([nameless, shouting, bare_decline, long_decline])
    assert sorted(result.sites.values()) == ["node-4", "node-5", "node-6", "node-7"]
    assert result.declined["node-6"] == "no reason given"
    assert len(result.declined["node-7"]) < 400
    assert len(result.accepted) == 2


def test_max_update_norm_and_max_site_weight_are_validated_and_mirrored_in_the_run_config():
    assert RunConfig().max_update_norm == 0.0 and RunConfig().max_site_weight == 10_000
    assert RunConfig.from_mapping({"max-update-norm": 2}).max_update_norm == 2.0
    with pytest.raises(ConfigError, match=r"max-update-norm=-1.0 is out of range; allowed range: \[0, 1000000\]"):
        RunConfig.from_mapping({"max-update-norm": -1.0})
    with pytest.raises(ConfigError, match=r"max-site-weight=0 is out of range"):
        RunConfig.from_mapping({"max-site-weight": 0})
