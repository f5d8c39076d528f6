"""A site's guarantee checked against an adversary who knows the run config: what Opacus really ran, whether the
server can replay a site's update, which paths a site opens, and what an evaluation costs."""

import json

import pytest
import torch
from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from client.app import evaluate, train
from common import adapters, privacy
from common import train as training
from common.model import build_model, weights_sha256
from common.train import DPSettings
from tests.test_client import LABELS, context, message, site, task_identity, write_policy  # noqa: F401  (fixtures)


def policy_for(tmp_path, data, tiny_model_dir, extra=""):
    policy = write_policy(tmp_path, data, [weights_sha256(str(tiny_model_dir))], cap=8.0)
    policy.write_text(policy.read_text() + extra)
    return policy


def ledger_of(tmp_path):
    return json.loads((tmp_path / "state" / "ledger.json").read_text())


@pytest.mark.parametrize("lora_rounds", [0, 3], ids=["head-only round", "LoRA round"])
def test_ledger_entry_is_what_the_opacus_optimizer_and_loader_really_ran(site, tiny_model_dir, monkeypatch, lora_rounds):
    tmp_path, data, overrides = site
    overrides = {**overrides, "lora-rounds": lora_rounds, "head-batch-size": 16}
    policy = policy_for(tmp_path, data, tiny_model_dir)
    seen = {}
    real = privacy.make_private

    def watched(*args, **kwargs):
        private = real(*args, **kwargs)
        optimizer, step = private.optimizer, private.optimizer.step
        seen.update(sigma=optimizer.noise_multiplier, rate=private.loader.sample_rate, steps=0,
                    batch=optimizer.expected_batch_size, noise_rng=optimizer.generator,
                    sample_rng=private.loader.batch_sampler.generator)

        def counted(*a, **k):
            seen["steps"] += 1
            return step(*a, **k)

        optimizer.step = counted
        return private

    monkeypatch.setattr(training.privacy, "make_private", watched)
    reply = train(message(overrides, tiny_model_dir), context(overrides, policy))
    assert "decline" not in reply.content
    trained = [r for r in ledger_of(tmp_path)["rounds"] if r["kind"] == "train"]
    assert len(trained) == 1 and seen["steps"] > 0
    assert (trained[0]["noise_multiplier"], trained[0]["sample_rate"], trained[0]["steps"]) == (
        seen["sigma"], seen["rate"], seen["steps"])
    # Averaged over the public expected batch, sampled and noised by generators of its own, not the global one.
    batch = overrides["batch-size"] if lora_rounds else overrides["head-batch-size"]
    assert seen["batch"] == batch
    assert seen["noise_rng"] is not None and seen["sample_rng"] is not None
    assert seen["noise_rng"] is not torch.default_generator and seen["sample_rng"] is not torch.default_generator
    # The public count the reply carries is the one the sample rate came from.
    count = reply.content["metrics"]["num-examples"]
    assert seen["rate"] == privacy.poisson_schedule(count, batch)[0]


def _site_update(home, data, overrides, tiny_model_dir):
    """One fresh site (its own ledger) trains round 1; return its policy path, update and ledger entry."""
    home.mkdir(parents=True, exist_ok=True)
    (home / data.name).write_text(data.read_text())
    policy = policy_for(home, home / data.name, tiny_model_dir, "public-example-count = 72\n")
    reply = train(message(overrides, tiny_model_dir), context(overrides, policy))
    update = {k: v.numpy() for k, v in reply.content["arrays"].items()}
    return policy, update, ledger_of(home)["rounds"][0]


def _replay(policy, overrides, entry, tiny_model_dir):
    """The adversary: the config (seed included), the site's data and its (σ, q, steps), run through the same path."""
    from flwr.common.config import get_fused_config_from_dir

    from client.site import site_label_names, site_terms, site_tensors
    from common.config import RunConfig
    from common.model import HeadOnly
    from tests.test_client import ROOT

    config = RunConfig.from_mapping(get_fused_config_from_dir(ROOT, overrides))
    terms = site_terms(config, {"policy": str(policy)}, policy.parent)
    train_data, _ = site_tensors(terms, config, site_label_names(config, terms.policy), None)
    torch.manual_seed(config.seed)
    model = build_model(str(tiny_model_dir), len(LABELS), lora_r=8, lora_alpha=16, ffa=True, seed=config.seed)
    training.train_round(HeadOnly(model), training.features(model, train_data), loss_fn=torch.nn.functional.cross_entropy,
                         epochs=config.head_epochs, batch_size=config.head_batch_size,
                         learning_rate=config.head_learning_rate, decay=(1.0, 2 / 3),
                         dp=DPSettings(entry["noise_multiplier"], config.max_grad_norm, entry["sample_rate"]))
    return {k: v.numpy() for k, v in adapters.to_record(adapters.trainable_state(model)).items()}


def _differ(a, b) -> bool:
    return any(not (a[k] == b[k]).all() for k in a)


def test_the_server_can_replay_neither_a_sites_update_nor_its_noise(site, tiny_model_dir, monkeypatch):
    tmp_path, data, overrides = site
    # Control: with the noise taken out, the adversary's replay reproduces the site's update: the replay is faithful
    # (72 declared records, full-batch Poisson sampling at rate 1: nothing else is random).
    import opacus.optimizers.optimizer as dp_optimizer

    with monkeypatch.context() as patch:
        patch.setattr(dp_optimizer, "_generate_noise", lambda std, reference, *a, **k: torch.zeros_like(reference))
        policy, quiet, entry = _site_update(tmp_path / "quiet", data, overrides, tiny_model_dir)
        assert entry["sample_rate"] == 1.0
        assert not _differ(quiet, _replay(policy, overrides, entry, tiny_model_dir))
    # With the site's secret noise, two runs of the same config release different updates, and the replay matches none.
    updates = []
    for attempt in range(2):
        policy, update, entry = _site_update(tmp_path / f"site-{attempt}", data, overrides, tiny_model_dir)
        updates.append(update)
    assert _differ(updates[0], updates[1])
    replay = _replay(policy, overrides, entry, tiny_model_dir)
    assert all(_differ(replay, update) for update in updates)


def test_a_policy_site_never_opens_a_path_the_server_names(site, tiny_model_dir):
    tmp_path, data, overrides = site
    policy = policy_for(tmp_path, data, tiny_model_dir)
    # The server names a file at the site; the site reads only its policy's data path.
    asked = {**overrides, "dataset": str(tmp_path / "server-chose-this.csv")}
    reply = train(message(asked, tiny_model_dir), context(asked, policy))
    assert "decline" not in reply.content
    no_labels = {**asked, "labels": ""}
    reply = train(message(no_labels, tiny_model_dir, server_round=2), context(no_labels, policy))
    assert "has no label set" in reply.content["decline"]["reason"]
    # Its own policy may name the labels instead.
    own = policy_for(tmp_path, data, tiny_model_dir, f"labels = {json.dumps(LABELS)}\n")
    reply = train(message(no_labels, tiny_model_dir, server_round=2), context(no_labels, own))
    assert "decline" not in reply.content


def test_a_node_without_policy_refuses_unless_marked_simulated(site, tiny_model_dir, monkeypatch):
    from client.site import SIMULATION_ENV

    tmp_path, data, overrides = site
    monkeypatch.delenv(SIMULATION_ENV, raising=False)
    msg = message(overrides, tiny_model_dir)
    ctx = context(overrides, "unused")
    ctx.node_config.clear()
    ctx.node_config.update({"partition-id": 0, "num-partitions": 2})
    reply = train(msg, ctx)
    assert "has no site policy" in reply.content["decline"]["reason"]
    monkeypatch.setenv(SIMULATION_ENV, "1")
    msg.content["config"]["runs-dir"] = str(tmp_path / "runs")
    assert "decline" not in train(msg, ctx).content
    assert (tmp_path / "runs" / "r1" / "sites" / "site-0" / "ledger.json").exists()


def test_an_unsafe_run_name_is_refused_before_any_path_is_built(site, tiny_model_dir, monkeypatch):
    from client.site import SIMULATION_ENV

    tmp_path, data, overrides = site
    monkeypatch.setenv(SIMULATION_ENV, "1")
    msg = message(overrides, tiny_model_dir)
    msg.content["config"]["run-name"] = "../../escape"
    msg.content["config"]["runs-dir"] = str(tmp_path / "runs")
    ctx = context(overrides, "unused")
    ctx.node_config.clear()
    ctx.node_config.update({"partition-id": 0, "num-partitions": 2})
    assert "run-name" in train(msg, ctx).content["decline"]["reason"]
    assert not (tmp_path / "runs").exists() and not (tmp_path.parent / "escape").exists()


def test_one_evaluation_per_round_each_charged_and_noised(site, tiny_model_dir):
    tmp_path, data, overrides = site
    policy = policy_for(tmp_path, data, tiny_model_dir)
    first = evaluate(message(overrides, tiny_model_dir, kind=MessageType.EVALUATE), context(overrides, policy))
    again = evaluate(message(overrides, tiny_model_dir, kind=MessageType.EVALUATE), context(overrides, policy))
    assert "already answered an evaluation for round 1" in again.content["decline"]["reason"]
    later = evaluate(message(overrides, tiny_model_dir, 2, kind=MessageType.EVALUATE), context(overrides, policy))
    ledger = ledger_of(tmp_path)
    assert [r["kind"] for r in ledger["rounds"]] == ["evaluate", "evaluate"]
    ((sigma, rate, releases),) = ledger["history"]
    assert (rate, releases) == (1.0, 2)  # two Gaussian releases of sensitivity-normalised counts
    # eval-noise-multiplier=0: the site's own choice, at which the run's 3 evaluations alone cost an eighth of ε=2.
    assert privacy.compute_epsilon([(sigma, 1.0, 3)], 1e-5)[0] == pytest.approx(2.0 / 8, abs=0.011)
    assert privacy.compute_epsilon([(sigma * 0.9, 1.0, 3)], 1e-5)[0] > 2.0 / 8
    scores = [reply.content["metrics"] for reply in (first, later)]
    # The same adapter on the same validation split: only the noise differs.
    assert scores[0]["accuracy"] != scores[1]["accuracy"] or scores[0]["num-examples"] != scores[1]["num-examples"]
    assert all(0 <= s[key] <= 1 for s in scores for key in ("accuracy", "macro_f1"))


def test_the_server_cannot_binary_search_the_exact_count_with_batch_size(site, tiny_model_dir):
    tmp_path, data, overrides = site  # 80 records, about 72 of them for training
    policy = policy_for(tmp_path, data, tiny_model_dir)
    evaluate(message(overrides, tiny_model_dir, kind=MessageType.EVALUATE), context(overrides, policy))
    # Free probes (round 1 is answered already): the reply must not depend on whether batch-size exceeds the count.
    reasons = {evaluate(message({**overrides, "batch-size": b}, tiny_model_dir, kind=MessageType.EVALUATE),
                        context({**overrides, "batch-size": b}, policy)).content["decline"]["reason"] for b in (8, 500)}
    assert len(reasons) == 1 and "already answered" in reasons.pop()
    # A LoRA round too large for the site is refused on its DP count, which is charged before anything depends on it.
    lora = {**overrides, "batch-size": 500, "lora-rounds": 3}
    reason = train(message(lora, tiny_model_dir), context(lora, policy)).content["decline"]["reason"]
    assert "public example count" in reason and "below batch-size 500" in reason
    assert [r["kind"] for r in ledger_of(tmp_path)["rounds"]] == ["evaluate", "count"]


def test_the_server_cannot_test_for_a_label_by_leaving_it_out_of_the_run(site, tiny_model_dir):
    tmp_path, data, overrides = site  # the site's records carry all three labels; its policy names none
    policy = policy_for(tmp_path, data, tiny_model_dir)
    narrowed = {**overrides, "labels": ",".join(LABELS[:2])}
    model = build_model(str(tiny_model_dir), 2, lora_r=8, lora_alpha=16, ffa=True, seed=42)
    config = ConfigRecord({"run-name": "r1", "runs-dir": "/nonexistent", "server-round": 1, "frozen-a": ""})
    msg = Message(RecordDict({"arrays": adapters.to_record(adapters.trainable_state(model)), "config": config}),
                  dst_node_id=7, message_type=MessageType.TRAIN)
    reply = train(msg, context(narrowed, policy))
    # Trained, not refused: a refusal would have told the server that the site holds a record labelled LABELS[2].
    assert "decline" not in reply.content and "arrays" in reply.content
    # With its own label set in the policy, the site refuses any other set before reading its data.
    strict = policy_for(tmp_path, data, tiny_model_dir, f"labels = {json.dumps(LABELS)}\n")
    reason = train(msg, context(narrowed, strict)).content["decline"]["reason"]
    assert "label set" in reason and "differs from the run's" in reason


def test_a_site_can_switch_evaluation_off(site, tiny_model_dir):
    tmp_path, data, overrides = site
    policy = policy_for(tmp_path, data, tiny_model_dir, "evaluate = false\n")
    reply = evaluate(message(overrides, tiny_model_dir, kind=MessageType.EVALUATE), context(overrides, policy))
    assert "evaluate = false" in reply.content["decline"]["reason"]
    assert not (tmp_path / "state" / "ledger.json").exists()


def test_delta_must_be_below_one_over_the_number_of_records(site, tiny_model_dir):
    tmp_path, data, overrides = site
    policy = policy_for(tmp_path, data, tiny_model_dir)
    policy.write_text(policy.read_text().replace("delta = 1e-5", "delta = 0.05"))
    reply = train(message(overrides, tiny_model_dir), context(overrides, policy))
    assert "is not below 1/N" in reply.content["decline"]["reason"]


def test_a_declared_public_count_is_sent_as_is_and_costs_nothing(site, tiny_model_dir):
    tmp_path, data, overrides = site
    policy = policy_for(tmp_path, data, tiny_model_dir, "public-example-count = 70\n")
    reply = train(message(overrides, tiny_model_dir), context(overrides, policy))
    assert reply.content["metrics"]["num-examples"] == 70
    assert [r["kind"] for r in ledger_of(tmp_path)["rounds"]] == ["train"]
    assert set(reply.content["metrics"]) == {"num-examples", "steps", "server-round", "epsilon"}  # no loss


def test_a_dp_count_is_released_once_per_run_and_charged(site, tiny_model_dir):
    tmp_path, data, overrides = site
    policy = policy_for(tmp_path, data, tiny_model_dir)
    counts = [train(message(overrides, tiny_model_dir, r), context(overrides, policy)).content["metrics"]["num-examples"]
              for r in (1, 2)]
    assert counts[0] == counts[1]
    kinds = [r["kind"] for r in ledger_of(tmp_path)["rounds"]]
    assert kinds == ["count", "train", "train"]
