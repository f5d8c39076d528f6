"""The ClientApp called directly, as a SuperNode would: policy enforcement, the ε cap, and what a reply carries."""

import json
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common.config import get_fused_config_from_dir
from flwr.supercore.task_identity import TaskIdentity

from client.app import evaluate, train
from common import adapters
from common.config import RunConfig
from common.model import build_model, weights_sha256
from tests.test_simulation import LABELS, write_site_data

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def task_identity():
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


@pytest.fixture()
def site(tmp_path, tiny_model_dir):
    data = write_site_data(tmp_path / "notes.csv", n=80)
    overrides = {
        "dataset": str(data), "text-column": "text", "label-column": "product", "model": str(tiny_model_dir),
        "batch-size": 8, "max-length": 16, "max-examples-per-site": 0, "num-server-rounds": 3,
        "labels": ",".join(LABELS), "target-epsilon": 2.0,
    }
    return tmp_path, data, overrides


def write_policy(tmp_path, data, models, cap=2.0, max_rounds=3):
    policy = tmp_path / "policy.toml"
    policy.write_text(
        f'site-id = "clinic-a"\ndata-path = "{data.name}"\ntext-column = "text"\nlabel-column = "product"\n'
        f'epsilon-cap = {cap}\ndelta = 1e-5\nledger-path = "state/ledger.json"\n'
        f"allowed-models = {json.dumps(models)}\nmax-rounds = {max_rounds}\n"
    )
    return policy


def message(overrides, tiny_model_dir, server_round=1, kind=MessageType.TRAIN, frozen_a=""):
    ffa = RunConfig.from_mapping(get_fused_config_from_dir(ROOT, overrides)).aggregation == "ffa-lora"
    model = build_model(str(tiny_model_dir), len(LABELS), lora_r=8, lora_alpha=16, ffa=ffa, seed=42)
    config = {"run-name": overrides.get("run-name") or "r1", "runs-dir": "/nonexistent", "server-round": server_round, "frozen-a": frozen_a}
    content = RecordDict({"arrays": adapters.to_record(adapters.trainable_state(model)), "config": ConfigRecord(config)})
    return Message(content=content, dst_node_id=7, message_type=kind)


def context(overrides, policy):
    run_config = get_fused_config_from_dir(ROOT, overrides)
    return Context(run_id=1, node_id=7, node_config={"policy": str(policy)}, state=RecordDict(), run_config=run_config)


def test_policy_site_trains_and_reports_epsilon_from_its_own_ledger(site, tiny_model_dir):
    tmp_path, data, overrides = site
    policy = write_policy(tmp_path, data, [weights_sha256(str(tiny_model_dir))])
    reply = train(message(overrides, tiny_model_dir), context(overrides, policy))
    assert "decline" not in reply.content
    metrics = reply.content["metrics"]
    ledger = json.loads((tmp_path / "state" / "ledger.json").read_text())
    assert metrics["epsilon"] == pytest.approx(ledger["epsilon"]) and 0 < metrics["epsilon"] <= 2.0
    assert reply.content["site"]["site-id"] == "clinic-a"
    assert all(".lora_" in k or "classifier" in k for k in reply.content["arrays"])


def test_server_cannot_raise_the_cap_or_bring_an_unlisted_model(site, tiny_model_dir):
    tmp_path, data, overrides = site
    policy = write_policy(tmp_path, data, ["0" * 64])
    reply = train(message(overrides, tiny_model_dir), context(overrides, policy))
    assert "does not allow model" in reply.content["decline"]["reason"]
    assert reply.content["site"]["site-id"] == "clinic-a"  # the server can name who declined
    assert not (tmp_path / "state" / "ledger.json").exists()


def test_site_refuses_dp_off_when_its_policy_governs(site, tiny_model_dir):
    tmp_path, data, overrides = site
    policy = write_policy(tmp_path, data, [weights_sha256(str(tiny_model_dir))])
    reply = train(message({**overrides, "dp": False}, tiny_model_dir), context({**overrides, "dp": False}, policy))
    assert "requires DP" in reply.content["decline"]["reason"]


def train_rounds(overrides, tiny_model_dir, policy, rounds, evaluate_too=False):
    """Rounds of one run as the server drives them; the ε each trained round reported, and the last reply."""
    epsilons, reply = [], None
    for server_round in rounds:
        reply = train(message(overrides, tiny_model_dir, server_round), context(overrides, policy))
        if "decline" in reply.content:
            break
        epsilons.append(reply.content["metrics"]["epsilon"])
        if evaluate_too:
            evaluate(message(overrides, tiny_model_dir, server_round, kind=MessageType.EVALUATE),
                     context(overrides, policy))
    return epsilons, reply


def test_site_refuses_a_round_past_its_cap_and_says_so(site, tiny_model_dir):
    tmp_path, data, overrides = site
    policy = write_policy(tmp_path, data, [weights_sha256(str(tiny_model_dir))], cap=2.0, max_rounds=10)
    # The server asks for a far higher target than the policy's cap, and for a round past its own plan.
    asked = {**overrides, "target-epsilon": 50.0}
    epsilons, reply = train_rounds(asked, tiny_model_dir, policy, range(1, 5), evaluate_too=True)
    assert len(epsilons) == 3 and max(epsilons) <= 2.0
    assert "outside this run's num-server-rounds=3" in reply.content["decline"]["reason"]
    # A new run finds the budget spent: the calibrated plan used it all (training and evaluations).
    _, reply = train_rounds({**asked, "run-name": "r2"}, tiny_model_dir, policy, [1])
    ledger = json.loads((tmp_path / "state" / "ledger.json").read_text())
    assert "decline" in reply.content and ledger["epsilon"] <= 2.0
    assert [(r["round"], r["kind"]) for r in ledger["rounds"] if r["run"] == "r1"] == [
        (1, "count"), (1, "train"), (1, "evaluate"), (2, "train"), (2, "evaluate"), (3, "train"), (3, "evaluate")]


def test_rounds_beyond_the_policy_limit_are_declined(site, tiny_model_dir):
    tmp_path, data, overrides = site
    policy = write_policy(tmp_path, data, [weights_sha256(str(tiny_model_dir))], max_rounds=1)
    reply = train(message(overrides, tiny_model_dir, server_round=2), context(overrides, policy))
    assert "at most 1 rounds" in reply.content["decline"]["reason"]


def test_bad_site_data_is_reported_without_the_data(site, tiny_model_dir):
    tmp_path, data, overrides = site
    data.write_text("text,product\nsecret diagnosis text,card\n,loan\n")
    policy = write_policy(tmp_path, data, [weights_sha256(str(tiny_model_dir))])
    reply = train(message(overrides, tiny_model_dir), context(overrides, policy))
    reason = reply.content["decline"]["reason"]
    assert "cannot use its data" in reason and "secret" not in reason and str(data) not in reason


def test_mismatched_frozen_a_is_declined(site, tiny_model_dir):
    tmp_path, data, overrides = site
    policy = write_policy(tmp_path, data, [weights_sha256(str(tiny_model_dir))])
    ffa = {**overrides, "aggregation": "ffa-lora"}
    msg = message(ffa, tiny_model_dir, frozen_a="deadbeef")
    model = build_model(str(tiny_model_dir), len(LABELS), lora_r=8, lora_alpha=16, ffa=True, seed=42)
    msg.content["arrays"] = adapters.to_record(adapters.trainable_state(model))
    reply = train(msg, context(ffa, policy))
    assert "frozen LoRA A differs" in reply.content["decline"]["reason"]


def test_evaluate_returns_only_aggregate_scores(site, tiny_model_dir):
    tmp_path, data, overrides = site
    policy = write_policy(tmp_path, data, [weights_sha256(str(tiny_model_dir))])
    reply = evaluate(message(overrides, tiny_model_dir, kind=MessageType.EVALUATE), context(overrides, policy))
    assert set(reply.content["metrics"]) == {"num-examples", "server-round", "accuracy", "macro_f1", "epsilon"}
    assert not reply.content.array_records
