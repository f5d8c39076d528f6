"""Secure aggregation (Flower SecAgg+) through real simulated federations, plus the site-side pieces alone.

Every site weighs 1 (equal weights; sites claim 10-40 examples here, which must change nothing).
The bound every comparison asserts is ``server.secure.error_bound``: 3·c·m/Σq_i per coordinate,
with c the clipping range, m the summed sites and q_i = Q their quantized weights (stochastic
rounding moves each site's value by < one step 2c/Q, and the mean divides by Σq_i/Q).
"""

import json
import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from client import secure as site_side
from client.site import SIMULATION_ENV
from common import secure_wire as wire
from server.secure import SecureAggregation, SecureRound, error_bound, majority_threshold, quantization_range_for
from tests import secure_apps
from tests.test_simulation import write_site_data

ROOT = Path(__file__).resolve().parent.parent
F32 = np.finfo(np.float32).eps


def _simulate(server_app, client_app, num_sites, overrides=None):
    """Flower's simulation engine in this process, the run config fused from pyproject.toml as `flwr run` does."""
    from flwr.common.config import get_fused_config_from_dir
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.constant import NOOP_FEDERATION_ID
    from flwr.supercore.run import Run
    from flwr.supercore.telemetry import EventType

    overrides = dict(overrides or {})
    os.environ[SIMULATION_ENV] = "1"  # as `privet simulate` does: these sites run without a policy
    run = replace(Run.create_empty(run_id=1), override_config=overrides, federation_id=NOOP_FEDERATION_ID,
                  primary_task_id=1)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run.run_id, SUPERLINK_NODE_ID
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                      run_config=get_fused_config_from_dir(ROOT, overrides))
    started = time.perf_counter()
    _run_simulation(
        num_supernodes=num_sites,
        exit_event=EventType.FLWR_SIMULATION_RUN_LEAVE,
        client_app=client_app,
        server_app=server_app,
        backend_name="ray",
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                        "init_args": {"num_cpus": min(2, os.cpu_count() or 1), "logging_level": "error"}},
        app_dir=str(ROOT),
        run=run,
        server_app_context=context,
        is_app=True,
    )
    return time.perf_counter() - started


def _expected_mean_delta(record, sites):
    """The exact equally weighted mean (float64) of the named sites' updates as deltas from the round's global."""
    updates = [record["updates"][s][0] for s in sites]
    return {
        key: sum(u[key].astype(np.float64) - g.astype(np.float64) for u in updates) / len(updates)
        for key, g in record["global"].items()
    }


def _check_against_fedavg(record, sites):
    outcome = record["outcome"]
    assert outcome.failure is None
    assert sorted(outcome.site_ids[n] for n in outcome.trained) == sorted(sites)
    p = outcome.protocol
    assert p["max_weight"] == wire.SITE_WEIGHT == 1  # fixed, never learnt from what sites claim
    bound = error_bound([wire.SITE_WEIGHT] * len(sites), p["clipping_range"], p["quantization_range"],
                        p["max_weight"])
    expected = _expected_mean_delta(record, sites)
    worst = 0.0
    for key, exp in expected.items():
        got = outcome.mean_delta[key]
        worst = max(worst, float(np.abs(got - exp).max()))
        assert np.all(np.abs(got - exp) <= bound), key
        # The new global adapter is that mean added to the old one, cast to the fp32 wire format.
        new = record["global"][key].astype(np.float64) + exp
        assert np.allclose(outcome.arrays[key].numpy(), new, rtol=F32, atol=bound + F32)
    # Not trivially true: the sites' updates really differ by far more than the bound.
    spread = max(float(np.abs(record["updates"][a][0][k] - record["updates"][b][0][k]).max())
                 for a in sites for b in sites for k in expected)
    assert spread > 1000 * bound
    return worst, bound


@pytest.fixture(scope="module")
def federation(tiny_model_dir, tmp_path_factory):
    """One simulated federation of 4 sites: the numpy scenarios, then a secure round of real Privet training."""
    tmp = tmp_path_factory.mktemp("secure")
    # Each site's LoRA round needs its DP count (noise σ=20) at or above batch-size: near-equal sites of ~200
    # records keep it ~10σ above 8, so no draw of the secret count noise can make a site decline.
    data = write_site_data(tmp / "sites.csv", n=800)
    overrides = {
        "dirichlet-alpha": 1000.0,
        "dataset": str(data), "text-column": "text", "label-column": "product", "model": str(tiny_model_dir),
        "num-server-rounds": 1, "runs-dir": str(tmp / "runs"), "run-name": "secure", "batch-size": 8,
        "max-length": 16, "max-examples-per-site": 0, "target-epsilon": 4.0, "learning-rate": 0.02,
        "accountant": "rdp", "min-sites": 3, "secure-aggregation": True, "lora-rounds": 1,
    }
    secure_apps.RESULTS.clear()
    seconds = _simulate(secure_apps.server_app, secure_apps.client_app, 4, overrides)
    rounds = {record["name"]: record for record in secure_apps.RESULTS["numpy"]}
    return rounds, seconds, secure_apps.RESULTS["privet"], tmp


@pytest.fixture(scope="module")
def numpy_run(federation):
    rounds, seconds, _, _ = federation
    return rounds, seconds


ALL = ["site-0", "site-1", "site-2", "site-3"]


def test_secure_mean_equals_fedavg_within_quantization_error(numpy_run):
    rounds, seconds = numpy_run
    record = rounds["all"]
    worst, bound = _check_against_fedavg(record, ALL)
    print(f"\nall 4 sites: max |secure - mean| {worst:.2e} (bound {bound:.2e}); "
          f"secure round {record['outcome'].seconds:.2f}s, "
          f"plain round {rounds['drop-while-training']['plain_seconds']:.2f}s "
          f"(first plain round {record['plain_seconds']:.2f}s starts the actors); whole federation {seconds:.1f}s")
    assert record["outcome"].protocol["threshold"] == 3 and not record["outcome"].dropped


def test_round_completes_when_a_site_drops_while_training(numpy_run):
    rounds, _ = numpy_run
    record = rounds["drop-while-training"]  # site-3 fails in the stage that trains, after sharing its keys
    _check_against_fedavg(record, ["site-0", "site-1", "site-2"])
    (reason,) = record["outcome"].dropped.values()
    assert reason.startswith("stage collect_masked_vectors") and "simulated site failure" in reason


def test_round_completes_when_a_site_drops_at_unmask(numpy_run):
    rounds, _ = numpy_run
    record = rounds["drop-at-unmask"]  # site-1 sent its masked update, then vanished: the others unmask it
    _check_against_fedavg(record, ALL)
    (reason,) = record["outcome"].dropped.values()
    assert reason.startswith("stage unmask")
    screened = record["screened"]  # its update is in the sum, so the report counts it as trained
    assert len(screened.accepted) == 4 and not screened.rejected


def test_round_completes_when_a_site_drops_before_sharing_keys(numpy_run):
    """flwr 1.42's workflow loses the whole round here (KeyError at every site); server.secure patches it."""
    rounds, _ = numpy_run
    record = rounds["drop-before-sharing-keys"]
    _check_against_fedavg(record, ["site-0", "site-1", "site-3"])
    (reason,) = record["outcome"].dropped.values()
    assert reason.startswith("stage share_keys")


def test_declining_site_adds_nothing_and_keeps_its_reason(numpy_run):
    rounds, _ = numpy_run
    record = rounds["decline"]
    _check_against_fedavg(record, ["site-1", "site-2", "site-3"])
    outcome = record["outcome"]
    assert list(outcome.declined.values()) == ["site-0 has spent its ε"] and not outcome.dropped
    screened = record["screened"]
    assert screened.declined == {"site-0": "site-0 has spent its ε"}
    assert sorted(screened.sites[m.metadata.src_node_id] for m in screened.accepted) == ["site-1", "site-2", "site-3"]


def test_more_dropouts_than_tolerated_leave_the_adapter_unchanged(numpy_run):
    rounds, _ = numpy_run
    outcome = rounds["two-drop"]["outcome"]
    assert outcome.arrays is None and "halted" in outcome.failure and len(outcome.dropped) == 2
    assert len(rounds["two-drop"]["screened"].rejected) == 2


def test_round_where_every_site_declines_changes_nothing(numpy_run):
    rounds, _ = numpy_run
    outcome = rounds["all-decline"]["outcome"]
    assert outcome.arrays is None and outcome.failure.startswith("no site contributed")
    assert len(outcome.declined) == 4 and not outcome.dropped and not outcome.trained


def test_a_site_that_inflates_its_masked_weight_gets_the_round_refused(numpy_run):
    """A rogue site's own SecAgg+ code can put any weight in its masked vector; the unmasked sum gives it away."""
    rounds, _ = numpy_run
    outcome = rounds["inflated-weight"]["outcome"]
    assert outcome.arrays is None and len(outcome.trained) == 4
    assert outcome.failure.startswith("the masked weights sum to 7 sites' worth, but 4 site(s) trained")


def test_a_site_that_skips_the_clip_gets_the_round_refused(numpy_run):
    """A mean of deltas clipped to ±c lies within ±c: a rogue site's own code that skips the clip gives itself away."""
    rounds, _ = numpy_run
    outcome = rounds["unclipped"]["outcome"]
    assert outcome.arrays is None and len(outcome.trained) == 4
    assert outcome.failure.startswith("the unmasked mean leaves the clipping range ±8: a site sent values outside it")


def test_aggregate_feeds_message_api_strategies(numpy_run):
    rounds, _ = numpy_run
    record = rounds["all"]
    new = {k: record["outcome"].arrays[k].numpy() for k in record["global"]}
    for key, value in record["fedavg"].items():
        assert np.array_equal(value, new[key])  # FedAvg of the one aggregate reply is the aggregate
    # FedAdam steps from the old global adapter in the direction of the mean delta.
    moved = sum(float(np.sum((record["fedadam"][k] - record["global"][k]) * record["outcome"].mean_delta[k]))
                for k in new)
    assert moved > 0


def test_server_holds_only_masked_integers(numpy_run):
    rounds, _ = numpy_run
    from flwr.common import bytes_to_ndarray
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

    record = rounds["all"]
    for reply in record["outcome"]._replies.values():
        assert all(len(r) == 0 for r in reply.content.array_records.values())
        vectors = [bytes_to_ndarray(b) for b in reply.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]]
        assert all(v.dtype.kind == "i" for v in vectors)
        # A masked coordinate looks uniform on [0, 2^32), nothing like the quantized update (~Q/2 = 2^28).
        spread = np.concatenate([v.ravel() for v in vectors[1:]])
        assert spread.std() > 2**30


# ---- pieces alone ---------------------------------------------------------------------------


def _reply(new: dict, examples: int) -> RecordDict:
    return RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in new.items()}),
                       "metrics": MetricRecord({"num-examples": examples, "loss": 0.5})})


def test_site_clips_coordinates_bounds_norm_and_weighs_one_whatever_its_count():
    old = [np.zeros(4, dtype=np.float32)]
    delta, weight, notes = site_side.contribution(
        _reply({"w": np.array([0.5, -3.0, 9.0, 0.0], dtype=np.float32)}, 250), ["w"], old, 2.0, 1.0
    )
    assert delta[0].dtype == np.float64 and np.array_equal(delta[0], [0.5, -2.0, 2.0, 0.0])
    assert notes[wire.CLIPPED] == 2 and weight == 1  # 250 examples weigh what 5 do
    delta, _, notes = site_side.contribution(
        _reply({"w": np.array([3.0, 4.0, 0, 0], dtype=np.float32)}, 5), ["w"], old, 8.0, 1.0, max_norm=1.0
    )
    assert np.allclose(delta[0], [0.6, 0.8, 0, 0]) and notes[wire.NORM_SCALE] == pytest.approx(0.2)
    with pytest.raises(site_side.SecureUpdateError, match="NaN"):
        site_side.contribution(_reply({"w": np.array([np.nan, 0, 0, 0], np.float32)}, 5), ["w"], old, 8.0, 1.0)
    with pytest.raises(site_side.SecureUpdateError, match="keys"):
        site_side.contribution(_reply({"v": np.zeros(4, np.float32)}, 5), ["w"], old, 8.0, 1.0)


def test_site_declines_a_server_that_asks_for_another_weight():
    """A server sending max weight 1000 would scale this site's share of the sum 1000-fold down (or up)."""
    old = [np.zeros(4, dtype=np.float32)]
    with pytest.raises(site_side.SecureUpdateError, match="max weight 1000, but every site weighs 1"):
        site_side.contribution(_reply({"w": np.ones(4, np.float32)}, 250), ["w"], old, 8.0, 1000.0)


def test_site_refuses_another_weight_before_it_trains():
    """Checked on the server's request, not after training: a refused update must cost the site no ε."""
    from flwr.common import ndarrays_to_parameters
    from flwr.compat.common import recorddict_compat as compat

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    fitins = {wire.KEYS: ["w"], wire.CLIPPING_RANGE: 8.0, wire.MAX_WEIGHT: 1000.0, "server-round": 1}
    content = RecordDict({"fitins.config": ConfigRecord(fitins),
                          "fitins.parameters": compat.parameters_to_arrayrecord(
                              ndarrays_to_parameters([np.zeros(4, np.float32)]), keep_input=True)})
    msg = Message(content=content, dst_node_id=7, message_type=MessageType.TRAIN)
    context = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})
    trained = []
    reply = site_side._train_for_secagg(msg, context, lambda m, c: trained.append(m))
    assert not trained
    fitres = compat.recorddict_to_fitres(reply.content, keep_input=False)
    assert fitres.num_examples == 0 and "max weight 1000, but every site weighs 1" in fitres.metrics[wire.DECLINE]


def test_mod_passes_plain_messages_through():
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    msg = Message(content=RecordDict({"config": ConfigRecord({"server-round": 1})}), dst_node_id=7,
                  message_type=MessageType.TRAIN)
    context = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})
    seen = []
    out = site_side.secure_train_mod(msg, context, lambda m, c: seen.append(m) or "reply")
    assert out == "reply" and seen == [msg] and not context.state.config_records


def test_protocol_parameters():
    assert [majority_threshold(n) for n in (2, 3, 4, 5, 10)] == [2, 2, 3, 3, 6]
    for sites in (2, 3, 4, 7, 8, 100, 1000):
        q = quantization_range_for(sites)
        assert sites * q < 2**32 and (4 * (sites + 1) * q > 2**32 or q == 2**30)
    assert quantization_range_for(1000) == 2**22  # Flower's default at a thousand sites
    with pytest.raises(ValueError):
        SecureAggregation(clipping_range=0)


@pytest.mark.parametrize("aggregation", ["fedavg", "ffa-lora", "fedprox", "fedadam"])
def test_aggregate_reply_goes_through_privets_strategies(aggregation):
    from common.config import RunConfig
    from server.strategy import make_strategy

    class ThreeNodes:
        def get_node_ids(self):
            return [1, 2, 3]

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    config = RunConfig.from_mapping({"aggregation": aggregation, "min-sites": 3, "secure-aggregation": True})
    strategy = make_strategy(config)
    old = np.ones((2, 3), np.float32)
    messages = list(strategy.configure_train(1, ArrayRecord({"w": Array(old)}), ConfigRecord({}), ThreeNodes()))
    assert len(messages) == 3 and all(m.content["config"]["server-round"] == 1 for m in messages)
    outcome = SecureRound(
        server_round=1, arrays=ArrayRecord({"w": Array(old + 0.5)}), mean_delta={"w": np.full((2, 3), 0.5)},
        examples=30, trained={7: {"num-examples": 10, "loss": 1.0, "steps": 2}},
    )
    new, _ = strategy.aggregate_secure(1, outcome.reply(), 3)
    new = new["w"].numpy()
    assert new.dtype == np.float32
    if aggregation == "fedadam":
        assert np.all(new > old)  # a server-optimizer step along the mean delta
    else:
        assert np.array_equal(new, old + 0.5)


def test_too_few_sites_are_refused_before_any_message():
    class NoGrid:
        def send_and_receive(self, *args, **kwargs):
            raise AssertionError("nothing may be sent")

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    content = RecordDict({"arrays": ArrayRecord({"w": Array(np.zeros(2, np.float32))}),
                          "config": ConfigRecord({"server-round": 1})})
    messages = [Message(content=content, dst_node_id=n, message_type=MessageType.TRAIN) for n in (5, 6)]
    outcome = SecureAggregation().exchange(NoGrid(), messages)
    assert outcome.arrays is None and "at least 3 sites" in outcome.failure


# ---- the real Privet training path (tiny BERT, DP-SGD, privacy ledger) -------------------------


def test_privet_sites_train_with_dp_and_only_the_mean_reaches_the_server(federation):
    _, _, privet, tmp = federation
    (record,) = privet
    outcome = record["outcome"]
    assert outcome.failure is None and len(outcome.trained) == 4
    updates = {}
    for site in outcome.site_ids.values():
        saved = np.load(tmp / "runs" / "spy" / f"{site}-round1.npz")
        updates[site] = ({k: saved[k] for k in record["global"]}, int(saved["examples"]))
    record["updates"] = updates
    _check_against_fedavg(record, sorted(updates))
    for node, metrics in outcome.trained.items():
        site = outcome.site_ids[node]
        ledger = json.loads((tmp / "runs" / "secure" / "sites" / site / "ledger.json").read_text())
        assert metrics["epsilon"] == pytest.approx(ledger["epsilon"]) and 0 < metrics["epsilon"] <= 4.0
        # Nothing that describes a site's update travels in plain text beside the masked vector.
        assert not {wire.CLIPPED, wire.NORM_SCALE} & set(metrics)
    # LoRA B starts at zero and really moved.
    assert any("lora_B" in k and np.abs(d).max() > 0 for k, d in outcome.mean_delta.items())
