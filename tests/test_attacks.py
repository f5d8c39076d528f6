"""The attack suite: a malicious server against the real site code, one test per channel (README: Privacy).

The principle under test: everything the server can observe of a site (each reply's values, whether it replies or
declines, a decline's reason, the reply's kind) is a function of public values (policy, run config, ledger) and DP
releases only. Each test plays an attack with crafted messages or crafted global adapters against `client.app`'s
handlers, `common.train.train_round` or the ledger, mostly on two neighbouring sites (one holds a target record, the
other does not), and asserts that the server sees the same. None depends on secret noise: the noise is zero, a DP
release is held fixed, or the assertion is structural.
"""

import dataclasses
import json
import math
import re

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch import nn

import client.app
import client.site
from client.app import evaluate, train
from common import adapters, privacy
from common.bounds import global_distance_bound
from common.config import AGGREGATIONS, ConfigError, RunConfig
from common.data import record_bucket
from common.model import HeadOnly, build_model
from common.task import TASKS, sort_labels
from common.train import MAX_PHYSICAL_BATCH, DPSettings, FeatureData, features, train_round
from tests.conftest import WORDS, write_tiny_model
from tests.test_client import LABELS, context, message, site, task_identity  # noqa: F401  (fixtures)
from tests.test_model_train import NUM_LABELS, make_data, make_token_data
from tests.test_simulation import write_site_data
from tests.test_site_privacy import ledger_of, policy_for

TARGET = "wire transfer fraud reported by my bank"  # on the training side of the site's stable split
RARE_LABEL = "wire-fraud"
NER_WORDS = "account bank card credit debt loan mortgage payment report score student transfer".split()


def ner_target(validation: bool) -> list[str]:
    """A sentence of the tiny vocabulary that the site's stable split puts on the asked side (public: a hash)."""
    for first in NER_WORDS:
        for second in NER_WORDS:
            words = ["the", first, "wire", second, "money"]
            if (record_bucket(" ".join(words)) < client.site.VAL_FRACTION) == validation:
                return words
    raise AssertionError("no such sentence")


def ner_neighbours(tmp_path, model_dir, target: list[str]) -> dict:
    """Two token-classification policy sites whose JSON lines differ by `target` only, tagged with the rare type LOC;
    every other sentence holds a PER entity, so a label set without PER leaves the target alone, or nothing."""
    rows = [{"tokens": ["my", NER_WORDS[i % 12], "loan", NER_WORDS[(5 * i) % 12]], "tags": ["O", "B-PER", "I-PER", "O"]}
            for i in range(40)]
    rare = {"tokens": target, "tags": ["O", "B-LOC", "I-LOC", "O", "O"]}
    sites = {}
    for name, records in (("with", [*rows, rare]), ("without", rows)):
        home = tmp_path / name
        home.mkdir()
        (home / "notes.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
        policy = policy_for(home, home / "notes.jsonl", model_dir)
        policy.write_text(policy.read_text().replace('"text"', '"tokens"').replace('"product"', '"tags"'))
        sites[name] = policy
    return sites


def ner_run(model_dir, labels: str, **more) -> dict:
    return {"task": "token-classification", "dataset": "policy", "labels": labels, "model": str(model_dir),
            "batch-size": 8, "max-length": 16, "max-examples-per-site": 0, "num-server-rounds": 3,
            "target-epsilon": 2.0, **more}


def favour(label: str, labels: str):
    """An edit of the global head that makes every position predict `label` (a bias well inside the honest bound)."""
    index = sort_labels(name.strip() for name in labels.split(",")).index(label)

    def edit(state):
        key = next(k for k in state if "classifier" in k and k.endswith("bias"))
        state[key][index] = 100.0

    return edit


def neighbours(tmp_path, tiny_model_dir, target_row: str, extra: str = "") -> dict:
    """Two policy sites whose data differ by `target_row` only, each with its own policy and ledger."""
    base = write_site_data(tmp_path / "base.csv", n=80).read_text().splitlines()[1:]
    sites = {}
    for name, rows in (("with", [*base, target_row]), ("without", base)):
        home = tmp_path / name
        home.mkdir()
        (home / "notes.csv").write_text("text,product\n" + "\n".join(rows) + "\n")
        sites[name] = policy_for(home, home / "notes.csv", tiny_model_dir, extra)
    return sites


def observed(reply) -> tuple:
    """What the server sees of a reply besides DP-released values: its kind and a decline's reason, or its metrics'
    names and its tensors' keys, shapes and finiteness."""
    content = reply.content
    if "decline" in content.config_records:
        return "decline", content["decline"]["reason"]
    tensors = {key: value.numpy() for key, value in content["arrays"].items()} if content.array_records else {}
    return ("reply", tuple(sorted(content["metrics"])),
            tuple((key, a.shape, bool(np.isfinite(a).all())) for key, a in sorted(tensors.items())))


def crafted(tiny_model_dir, num_labels: int, *, server_round: int = 1, kind=MessageType.TRAIN, edit=None) -> Message:
    """A server message whose global adapter is the run's public start (FFA-LoRA, seed 42), changed by `edit`."""
    model = build_model(str(tiny_model_dir), num_labels, lora_r=8, lora_alpha=16, ffa=True, seed=42)
    state = adapters.trainable_state(model)
    if edit is not None:
        edit(state)
    config = ConfigRecord({"run-name": "r1", "runs-dir": "/nonexistent", "server-round": server_round, "frozen-a": ""})
    return Message(RecordDict({"arrays": adapters.to_record(state), "config": config}), dst_node_id=7,
                   message_type=kind)


def both(sites, overrides, msg, handler=train) -> dict:
    """Send one message to both neighbours; what the server observes of each."""
    return {name: observed(handler(msg, context(overrides, policy))) for name, policy in sites.items()}


@pytest.fixture()
def reads(monkeypatch):
    """Every time a site reads its data set."""
    calls, real = [], client.site.site_tensors

    def watched(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(client.app, "site_tensors", watched)
    monkeypatch.setattr(client.site, "site_tensors", watched)
    return calls


def only_batches(monkeypatch, first: list[int]):
    """Poisson sampling that draws `first` in its first batch and nothing after: empty batches, deterministically."""
    def batches(sampler):
        yield list(first)
        for _ in range(sampler.steps - 1):
            yield []

    monkeypatch.setattr(UniformWithReplacementSampler, "__iter__", batches)


# 1. Non-finite per-example gradients -------------------------------------------------------------------------------

def test_a_head_that_overflows_one_records_logit_cannot_mark_it(tiny_model_dir):
    """The issue's attack: a finite head row along one record's (layer-normed) features, scaled so only its logit
    overflows. Its gradient is NaN; it must count as zero, so the release neither turns NaN nor depends on it."""
    model = build_model(str(tiny_model_dir), NUM_LABELS, lora_r=4, lora_alpha=8, ffa=True, seed=0)
    data = features(model, make_data(n=40))
    unit = data.features / data.features.norm(dim=1, keepdim=True)
    cosines = (unit @ unit.T).fill_diagonal_(-1.0)
    target = int(cosines.max(dim=1).values.argmin())  # the record least like any other is the easiest to single out
    order = [target, *[i for i in range(40) if i != target]]
    data = FeatureData(data.features[order], data.labels[order])  # the target first
    closest = float(cosines[target].max())
    head = nn.Sequential(nn.Linear(unit.shape[1], NUM_LABELS))
    with torch.no_grad():
        # The target's logit lands at float32's largest value divided by √closest (overflow), every other one below it
        # times √closest.
        x = data.features[0]
        head[0].weight[0] = x / x.norm() * (torch.finfo(torch.float32).max / closest**0.5 / float(x.norm()))
        head[0].bias.zero_()
        logits = head(data.features)
    assert torch.isinf(logits[0, 0]) and torch.isfinite(logits[1:]).all()  # the crafted head does what it should
    start = {key: value.clone() for key, value in head.state_dict().items()}

    def release(rows, sigma):
        head.load_state_dict(start)
        # Sample rate 1: the target is in every batch. The expected batch size is public, the same for both.
        train_round(head, FeatureData(data.features[rows], data.labels[rows]), loss_fn=nn.functional.cross_entropy,
                    epochs=2, batch_size=40, learning_rate=0.01, dp=DPSettings(sigma, 1.0, 1.0))
        return {key: value.clone() for key, value in head.state_dict().items()}

    with_target, without = release(list(range(40)), 0.0), release(list(range(1, 40)), 0.0)
    for key in start:
        assert torch.isfinite(with_target[key]).all()
        torch.testing.assert_close(with_target[key], without[key], rtol=0, atol=1e-6)
    assert all(torch.isfinite(value).all() for value in release(list(range(40)), 1.0).values())


@pytest.mark.parametrize("lora_rounds, tensor, server_round", [
    (0, "classifier", 1), (0, "classifier", 2), (0, "lora_B", 1), (3, "classifier", 1), (3, "lora_B", 1),
    (3, "lora_B", 2),
], ids=["head-only head r1", "head-only head r2", "head-only lora_B r1", "LoRA head r1", "LoRA lora_B r1",
        "LoRA lora_B r2"])
def test_a_crafted_global_adapter_is_declined_before_any_data_is_read(site, tiny_model_dir, reads, lora_rounds, tensor,
                                                                      server_round):
    """In head-only and LoRA phases alike, whichever trainable tensor the server crafts."""
    tmp_path, _, overrides = site
    sites = neighbours(tmp_path, tiny_model_dir, f"{TARGET},card")

    def overflow(state):
        key = next(k for k in sorted(state) if tensor in k and k.endswith("weight"))
        state[key][0] = 1e30  # finite, but farther from the start than any aggregation of honest rounds

    run = {**overrides, "lora-rounds": lora_rounds}
    seen = both(sites, run, crafted(tiny_model_dir, len(LABELS), server_round=server_round, edit=overflow))
    assert seen["with"] == seen["without"]
    assert seen["with"][0] == "decline" and "public start" in seen["with"][1]
    assert reads == [] and not any((policy.parent / "state").exists() for policy in sites.values())


def test_a_global_adapter_an_honest_round_produced_is_used(site, tiny_model_dir):
    """The control: round 1's evaluation and round 2's training take the global adapter round 1 moved."""
    tmp_path, data, overrides = site
    policy = policy_for(tmp_path, data, tiny_model_dir)

    def moved(state):
        for value in state.values():
            value.add_(1e-3)

    for kind, handler, server_round in ((MessageType.EVALUATE, evaluate, 1), (MessageType.TRAIN, train, 2)):
        msg = crafted(tiny_model_dir, len(LABELS), server_round=server_round, kind=kind, edit=moved)
        assert observed(handler(msg, context(overrides, policy)))[0] == "reply"


def test_an_evaluation_row_that_is_not_finite_counts_as_zero():
    rows = np.ones((6, 3))
    poisoned = np.vstack([rows, [[np.nan, 1.0, 1.0]], [[np.inf, 0.0, 0.0]]])
    released = privacy.gaussian_sum(poisoned, bound=2.0, noise_multiplier=0.0)
    assert np.array_equal(released, privacy.gaussian_sum(rows, bound=2.0, noise_multiplier=0.0))


# 2. Declines that would depend on the exact data -------------------------------------------------------------------

def test_a_label_set_that_leaves_no_record_is_answered_like_one_that_leaves_one(site, tiny_model_dir):
    """`labels='<rare label>'` asks whether the site holds a record with it: both neighbours must train and evaluate
    (on one record, or on none: then the update is noise only)."""
    tmp_path, _, overrides = site
    assert record_bucket(TARGET) >= client.site.VAL_FRACTION  # the target trains rather than validates
    sites = neighbours(tmp_path, tiny_model_dir, f"{TARGET},{RARE_LABEL}")
    probe = {**overrides, "labels": f"{RARE_LABEL},zz-held-by-nobody"}
    for kind, handler in ((MessageType.TRAIN, train), (MessageType.EVALUATE, evaluate)):
        seen = both(sites, probe, crafted(tiny_model_dir, 2, kind=kind), handler)
        assert seen["with"] == seen["without"] and seen["with"][0] == "reply", seen
    for policy in sites.values():
        assert [r["kind"] for r in ledger_of(policy.parent)["rounds"]] == ["count", "train", "evaluate"]


def test_a_token_label_set_that_leaves_no_record_is_answered_like_one_that_leaves_one(tmp_path, tiny_model_dir):
    """The same probe for token classification: `labels='O,B-LOC,I-LOC'` leaves the target sentence, or nothing."""
    sites = ner_neighbours(tmp_path, tiny_model_dir, ner_target(False))
    probe = ner_run(tiny_model_dir, "O,B-LOC,I-LOC")
    for kind, handler in ((MessageType.TRAIN, train), (MessageType.EVALUATE, evaluate)):
        seen = both(sites, probe, crafted(tiny_model_dir, 3, kind=kind), handler)
        assert seen["with"] == seen["without"] and seen["with"][0] == "reply", seen
    for policy in sites.values():
        assert [r["kind"] for r in ledger_of(policy.parent)["rounds"]] == ["count", "train", "evaluate"]


@pytest.mark.parametrize("labels, odd", [("O,B-LOC,I-LOC,ZZZ", "ZZZ"), ("O,B-LOC,I-LOC,E-LOC", "E-LOC")])
def test_a_token_label_set_scoring_cannot_read_is_refused_before_any_data_is_read(tmp_path, tiny_model_dir, reads,
                                                                                 labels, odd):
    """A label seqeval cannot parse, and a global head biased to predict it everywhere: scoring raised on the
    predictions of the target's sentence only (the only one the label set leaves), so a failed evaluation meant the
    target is there. The label set must be refused on its own, before any data is read."""
    sites = ner_neighbours(tmp_path, tiny_model_dir, ner_target(True))
    msg = crafted(tiny_model_dir, 4, kind=MessageType.EVALUATE, edit=favour(odd, labels))
    seen = both(sites, ner_run(tiny_model_dir, labels), msg, evaluate)
    assert seen["with"] == seen["without"], seen
    assert seen["with"][0] == "decline" and seen["with"][1].startswith("labels:") and reads == []


@pytest.mark.parametrize("labels, problem", [
    ("O,I-LOC", "'I-LOC' has no 'B-LOC'"), ("B-LOC,I-LOC", "no 'O'"), ("O,B-LOC,LOC", "'LOC' is not an IOB2 tag"),
    ("O,B-LOC,B--LOC", "'B--LOC' is not an IOB2 tag"), (",".join(f"B-T{i}" for i in range(1000)) + ",O", "1001 labels"),
])
def test_a_token_label_set_that_is_not_iob2_is_refused_naming_labels(tmp_path, tiny_model_dir, reads, labels, problem):
    sites = ner_neighbours(tmp_path, tiny_model_dir, ner_target(True))
    seen = both(sites, ner_run(tiny_model_dir, labels), crafted(tiny_model_dir, 2))
    assert seen["with"] == seen["without"] and seen["with"][0] == "decline", seen
    assert seen["with"][1].startswith("labels:") and problem in seen["with"][1] and reads == []
    with pytest.raises(ConfigError, match=f"^labels: .*{re.escape(problem)}"):
        TASKS["token-classification"].check_labels(sort_labels(labels.split(",")))


def test_a_head_that_predicts_broken_iob2_everywhere_is_scored_alike(tmp_path, tiny_model_dir):
    """A valid label set, and a head that predicts I-LOC at every position (no B-LOC: not an entity in strict IOB2):
    both neighbours answer the evaluation."""
    sites = ner_neighbours(tmp_path, tiny_model_dir, ner_target(True))
    labels = "O,B-LOC,I-LOC"
    msg = crafted(tiny_model_dir, 3, kind=MessageType.EVALUATE, edit=favour("I-LOC", labels))
    seen = both(sites, ner_run(tiny_model_dir, labels), msg, evaluate)
    assert seen["with"] == seen["without"] and seen["with"][0] == "reply", seen


def test_a_max_length_beyond_the_models_positions_is_declined_before_any_data_is_read(site, tiny_model_dir, reads):
    """Combined with a label probe, a forward pass that fails only when a record is left would answer it."""
    tmp_path, _, overrides = site
    sites = neighbours(tmp_path, tiny_model_dir, f"{TARGET},{RARE_LABEL}")
    probe = {**overrides, "labels": f"{RARE_LABEL},zz-held-by-nobody", "max-length": 256}  # the tiny BERT has 128
    seen = both(sites, probe, crafted(tiny_model_dir, 2))
    assert seen["with"] == seen["without"]
    assert seen["with"][0] == "decline" and "max-length=256" in seen["with"][1] and reads == []


@pytest.fixture(scope="module")
def tiny_roberta_dir(tmp_path_factory):
    """A tiny RoBERTa (positions numbered from padding_idx + 1) with 18 position embeddings: 17 usable."""
    from transformers import RobertaConfig, RobertaModel

    path = write_tiny_model(tmp_path_factory.mktemp("tiny-roberta"))  # its BERT tokenizer pads with id 0
    for weights in path.glob("*.safetensors"):
        weights.unlink()
    config = RobertaConfig(vocab_size=len(WORDS) + 5, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=18, pad_token_id=0)
    torch.manual_seed(0)
    RobertaModel(config).save_pretrained(path)
    return path


def test_a_max_length_a_roberta_cannot_hold_is_declined_before_any_data_is_read(site, tiny_roberta_dir, reads):
    """18 position embeddings hold 17 tokens in RoBERTa: at max-length=18 a record of 18 tokens or more made the
    forward pass fail, and only a site holding one failed."""
    tmp_path, _, overrides = site
    long = " ".join(["money", "wire", "transfer", "report", "my", "bank", "account"] * 3)
    assert record_bucket(long) >= client.site.VAL_FRACTION  # the long record trains
    sites = neighbours(tmp_path, tiny_roberta_dir, f"{long},card")
    run = {**overrides, "model": str(tiny_roberta_dir), "max-length": 18}
    seen = both(sites, run, crafted(tiny_roberta_dir, len(LABELS)))
    assert seen["with"] == seen["without"], seen
    assert seen["with"][0] == "decline" and "max-length=18" in seen["with"][1] and "at most 17" in seen["with"][1]
    assert reads == []


def test_a_roberta_site_with_no_usable_record_answers_like_one_with_records(site, tiny_roberta_dir):
    """At the usable length, a label probe leaves the target or nothing: the site with nothing computes its
    features' shape from a public blank input, and both train and evaluate alike."""
    tmp_path, _, overrides = site
    sites = neighbours(tmp_path, tiny_roberta_dir, f"{TARGET},{RARE_LABEL}")
    probe = {**overrides, "model": str(tiny_roberta_dir), "max-length": 17,
             "labels": f"{RARE_LABEL},zz-held-by-nobody"}
    for kind, handler in ((MessageType.TRAIN, train), (MessageType.EVALUATE, evaluate)):
        seen = both(sites, probe, crafted(tiny_roberta_dir, 2, kind=kind), handler)
        assert seen["with"] == seen["without"] and seen["with"][0] == "reply", seen


# 3. Empty Poisson batches ------------------------------------------------------------------------------------------

def _round(tiny_model_dir, setup: str, rows: slice, sigma: float):
    """One DP round of the real loop (head-only on cached features, a LoRA round, or token classification); the module
    it trained, and what Opacus ran."""
    task = TASKS["token-classification" if setup == "token" else "sequence-classification"]
    model = build_model(str(tiny_model_dir), NUM_LABELS, lora_r=4, lora_alpha=8, ffa=True, seed=0, head=task.head)
    data = make_token_data(n=16) if setup == "token" else make_data(n=16)
    data = data.subset(range(16)[rows])
    runner, inputs = (HeadOnly(model), features(model, data)) if setup == "head-only" else (model, data)
    result = train_round(runner, inputs, loss_fn=task.loss, epochs=1, batch_size=4, learning_rate=0.05,
                         dp=DPSettings(sigma, 1.0, 0.25))
    return runner, result


@pytest.mark.parametrize("setup", ["head-only", "lora", "token"])
def test_an_empty_batch_takes_the_noise_only_step(tiny_model_dir, monkeypatch, setup):
    """Opacus' rand_on_empty would forward a random row in an empty batch and add its clipped gradient: sensitivity
    2C on those steps while the ledger accounts C. With σ=0 an empty step's gradient must be exactly zero."""
    only_batches(monkeypatch, first=[0, 1])  # one batch of two records, then three empty ones
    for rows in (slice(None), slice(0, 15)):  # with and without the target (the last record)
        runner, result = _round(tiny_model_dir, setup, rows, sigma=0.0)
        assert result.ran == [(0.0, 0.25, 4)] and result.steps == 4
        trainable = [p for p in runner.parameters() if p.requires_grad]
        # The last step was empty: its gradient (noise only, here σ=0) is exactly zero.
        assert all(p.grad is not None and not p.grad.any() for p in trainable)
        assert all(torch.isfinite(p).all() for p in trainable)


def test_a_site_with_no_records_releases_exactly_the_noise_only_steps(tiny_model_dir):
    """No records at all: every batch is empty. With σ=0 the update is exactly nothing, and Opacus counted each step."""
    model = build_model(str(tiny_model_dir), NUM_LABELS, lora_r=4, lora_alpha=8, ffa=True, seed=0)
    start = adapters.trainable_state(model)
    result = train_round(model, make_data(n=16).subset([]), loss_fn=nn.functional.cross_entropy, epochs=2,
                         batch_size=4, learning_rate=0.05, dp=DPSettings(0.0, 1.0, 0.25))
    assert result.ran == [(0.0, 0.25, 8)]
    assert all(torch.equal(value, start[key]) for key, value in adapters.trainable_state(model).items())


def test_the_noise_only_step_is_the_sampled_gaussian_mechanism(monkeypatch):
    """An empty step: the zero sum plus N(0, (σC)²) per coordinate, averaged over the public expected batch size."""
    import opacus.optimizers.optimizer as opacus_optimizer

    monkeypatch.setattr(opacus_optimizer, "_generate_noise",
                        lambda std, reference, generator=None, secure_mode=False: torch.full_like(reference, std))
    layer = nn.Linear(3, 2)
    dataset = torch.utils.data.TensorDataset(torch.randn(8, 3), torch.zeros(8, dtype=torch.long))
    private = privacy.make_private(layer, torch.optim.SGD(layer.parameters(), lr=0.0), dataset, noise_multiplier=1.5,
                                   max_grad_norm=2.0, sample_rate=0.5, batch_size=4, device="cpu")
    private.optimizer.noise_step()
    assert all(torch.equal(p.grad, torch.full_like(p, 1.5 * 2.0 / 4)) for p in layer.parameters())
    assert private.ran() == [(1.5, 0.5, 1)]
    private.close()


def test_a_round_of_empty_batches_releases_the_noise_alone(site, tiny_model_dir, monkeypatch):
    """One record in the first batch, every later batch empty, and the noise held at zero: an empty step must add
    nothing but the noise, so both neighbours send back the same adapter, and what Opacus ran, empty steps included,
    is the ledger's entry. (rand_on_empty forwarded a random row on each empty step, whose clipped gradient moved
    the head: the two updates differed by whatever those rows were.)"""
    import opacus.optimizers.optimizer as opacus_optimizer

    only_batches(monkeypatch, first=[0])  # each epoch: the first training record (the same at both sites), then empty
    monkeypatch.setattr(opacus_optimizer, "_generate_noise",
                        lambda std, reference, generator=None, secure_mode=False: torch.zeros_like(reference))
    ran, real = [], client.app.train_round

    def watched(*args, **kwargs):
        result = real(*args, **kwargs)
        ran.append(result.ran)
        return result

    monkeypatch.setattr(client.app, "train_round", watched)
    tmp_path, _, overrides = site
    overrides = {**overrides, "head-batch-size": 8}  # 9 steps an epoch
    sites = neighbours(tmp_path, tiny_model_dir, f"{TARGET},card", "public-example-count = 72\n")
    msg = crafted(tiny_model_dir, len(LABELS))
    released = {}
    for name, policy in sites.items():
        reply = train(msg, context(overrides, policy))
        assert observed(reply)[0] == "reply"
        released[name] = {key: value.numpy().copy() for key, value in reply.content["arrays"].items()}
        (entry,) = [r for r in ledger_of(policy.parent)["rounds"] if r["kind"] == "train"]
        assert entry["steps"] == RunConfig().head_epochs * round(1 / entry["sample_rate"])
        assert ran[-1] == [(entry["noise_multiplier"], entry["sample_rate"], entry["steps"])]
        assert entry["sample_rate"] == 1 / 9
    assert all(np.array_equal(released["with"][key], released["without"][key]) for key in released["with"])


def test_a_large_poisson_batch_goes_through_the_model_in_parts_with_the_same_clipped_sum(monkeypatch):
    """A server-set batch size of 300 is processed in parts of at most MAX_PHYSICAL_BATCH (memory stays bounded),
    and the step is still the sum of every record's clipped gradient over the expected batch size."""
    generator = torch.Generator().manual_seed(0)  # the test's own data and head
    n, clip = 300, 0.5
    x, y = torch.randn(n, 8, generator=generator) * 3, torch.randint(0, 3, (n,), generator=generator)
    head = nn.Linear(8, 3)
    start = {key: value.clone() for key, value in head.state_dict().items()}
    sizes = []
    head.register_forward_hook(lambda module, inputs, output: sizes.append(len(inputs[0])))
    only_batches(monkeypatch, first=list(range(n)))
    train_round(head, FeatureData(x, y), loss_fn=nn.functional.cross_entropy, epochs=1, batch_size=n,
                learning_rate=0.01, dp=DPSettings(0.0, clip, 1.0))
    assert sizes == [MAX_PHYSICAL_BATCH, MAX_PHYSICAL_BATCH, n - 2 * MAX_PHYSICAL_BATCH]
    reference = nn.Linear(8, 3)
    reference.load_state_dict(start)
    total = [torch.zeros_like(p) for p in reference.parameters()]
    for i in range(n):
        reference.zero_grad()
        nn.functional.cross_entropy(reference(x[i:i + 1]), y[i:i + 1]).backward()
        grads = [p.grad for p in reference.parameters()]
        factor = min(1.0, clip / (float(torch.sqrt(sum(g.pow(2).sum() for g in grads))) + 1e-6))
        for t, g in zip(total, grads):
            t += g * factor
    for p, t in zip(head.parameters(), total):
        torch.testing.assert_close(p.grad, t / n, rtol=1e-5, atol=1e-7)


# 4. Server-set numbers reaching accounting or allocation -----------------------------------------------------------

def refuse_to_account(monkeypatch):
    """Make every accountant computation fail at once: a test of a number that once made an accountant loop for hours
    or exhaust memory then fails cleanly, and fast, on code that still runs one."""
    import opacus.accountants.prv as prv

    def refuse(*args, **kwargs):
        raise MemoryError("an accountant ran on a server-set number it should never have been given")

    monkeypatch.setattr(privacy, "create_accountant", refuse)
    monkeypatch.setattr(privacy, "compute_safe_domain_size", refuse, raising=False)  # only where PRV is sized first
    monkeypatch.setattr(prv, "discretize", refuse)


@pytest.mark.parametrize("value", [1e-3, 5e-324, 1e9])
def test_an_evaluation_noise_that_would_exhaust_memory_is_refused_at_the_edge(site, tiny_model_dir, reads, monkeypatch,
                                                                              value):
    refuse_to_account(monkeypatch)
    with pytest.raises(ConfigError, match="eval-noise-multiplier"):
        RunConfig.from_mapping({"eval-noise-multiplier": value})
    tmp_path, _, overrides = site
    sites = neighbours(tmp_path, tiny_model_dir, f"{TARGET},card")
    asked = {**overrides, "eval-noise-multiplier": value}
    seen = both(sites, asked, crafted(tiny_model_dir, len(LABELS), kind=MessageType.EVALUATE), evaluate)
    assert seen["with"] == seen["without"] and "eval-noise-multiplier" in seen["with"][1] and reads == []


def test_the_accountant_never_allocates_an_unbounded_grid(monkeypatch):
    """A noise multiplier of 1e-3 made PRV allocate GBs; 5e-324 exhausted memory. Tiny noise is ε=∞ outright, with no
    accountant run at all, and a history whose PRV grid would be huge is accounted with RDP, an upper bound, before
    anything is allocated."""
    import opacus.accountants.prv as prv

    with monkeypatch.context() as refusing:
        refuse_to_account(refusing)
        for sigma in (1e-3, 1e-160, 5e-324):
            assert privacy.compute_epsilon([(sigma, 1.0, 1)], 1e-5)[0] == float("inf")

    def refuse(*args, **kwargs):
        raise MemoryError("PRV discretised an unbounded grid")

    monkeypatch.setattr(prv, "discretize", refuse)
    epsilon, accountant = privacy.compute_epsilon([(1.0, 0.025, 40_000)], 1e-5)
    assert accountant == "rdp" and 0 < epsilon < float("inf")


def test_a_plan_of_endless_steps_is_declined_on_the_public_count(site, tiny_model_dir, monkeypatch):
    refuse_to_account(monkeypatch)  # decided on the public count, before any accountant runs
    tmp_path, _, overrides = site
    sites = neighbours(tmp_path, tiny_model_dir, f"{TARGET},card", "public-example-count = 72\n")
    monkeypatch.setattr(client.app, "train_round", lambda *a, **k: pytest.fail("the site trained"))
    endless = {**overrides, "head-epochs": 10_000, "head-batch-size": 1}
    seen = both(sites, endless, crafted(tiny_model_dir, len(LABELS)))
    assert seen["with"] == seen["without"] and "head-epochs" in seen["with"][1]


NUMERIC_KEYS = [f for f in dataclasses.fields(RunConfig) if f.type in ("int", "float", int, float)]


@pytest.mark.parametrize("key", [f.name.replace("_", "-") for f in NUMERIC_KEYS])
def test_every_server_set_number_has_a_finite_range_named_in_its_error(key):
    with pytest.raises(ConfigError, match=rf"^{key}=[0-9.e+]+ is out of range; allowed range: [\[(]\S+, [0-9.e+]+[\])]$"):
        RunConfig.from_mapping({key: 1e300})


def test_the_global_check_stays_finite_at_the_top_of_every_range():
    """A bound of ∞ (max-site-weight=1e300) would accept any crafted global adapter."""
    top = {f.name: f.metadata["hi"] for f in NUMERIC_KEYS if not f.metadata["hi_open"]}
    spec = {"weight": (4096, 4096)}
    for aggregation in AGGREGATIONS:
        for extra in ({}, {"secure_aggregation": True}, {"central_dp": True}):
            config = dataclasses.replace(RunConfig(), **top, aggregation=aggregation, **extra)
            assert math.isfinite(global_distance_bound(config, spec, config.num_server_rounds)), (aggregation, extra)


@pytest.mark.parametrize("task", list(TASKS))
def test_a_label_set_of_more_than_a_thousand_labels_is_refused_naming_labels(task):
    names = ("O", *(f"B-T{i}" for i in range(1000)))
    with pytest.raises(ConfigError, match="^labels: the label set has 1001 labels; allowed: 1 to 1000$"):
        TASKS[task].check_labels(names)
    TASKS[task].check_labels(names[:1000])


# 5. Other randomness -----------------------------------------------------------------------------------------------

def test_the_global_generator_is_secret_whenever_a_site_trains(site, tiny_model_dir, monkeypatch):
    """Dropout in LoRA rounds draws from PyTorch's global generator: a server knowing its state (the default seed,
    the run's seed) would know the masks. Each request must start it from the OS entropy."""
    tmp_path, data, overrides = site
    policy = policy_for(tmp_path, data, tiny_model_dir)
    lora = {**overrides, "lora-rounds": 3}
    states, real = [], client.app.train_round

    def watched(*args, **kwargs):
        states.append(torch.get_rng_state())
        return real(*args, **kwargs)

    monkeypatch.setattr(client.app, "train_round", watched)
    for server_round in (1, 2, 3):
        torch.manual_seed(RunConfig().seed)  # the server knows the state the request starts from
        assert "decline" not in train(message(lora, tiny_model_dir, server_round), context(lora, policy)).content
    known = torch.manual_seed(RunConfig().seed).get_state()
    assert not torch.equal(states[1], states[2]) and not any(torch.equal(state, known) for state in states)


# Channels closed before this suite: replayed evaluation, the count via batch-size, label sets in the policy --------

def test_a_replayed_evaluation_is_refused_alike(site, tiny_model_dir):
    tmp_path, _, overrides = site
    sites = neighbours(tmp_path, tiny_model_dir, f"{TARGET},card")
    msg = crafted(tiny_model_dir, len(LABELS), kind=MessageType.EVALUATE)
    first, again = both(sites, overrides, msg, evaluate), both(sites, overrides, msg, evaluate)
    assert first["with"] == first["without"] and first["with"][0] == "reply"
    assert again["with"] == again["without"] and "already answered an evaluation" in again["with"][1]


def test_batch_size_cannot_binary_search_the_count(site, tiny_model_dir, monkeypatch):
    """The LoRA batch-size check uses the DP count: held at one released value, neighbours whose exact counts
    straddle the batch size answer alike."""
    tmp_path, _, overrides = site
    sites = neighbours(tmp_path, tiny_model_dir, f"{TARGET},card")
    texts = [row.rsplit(",", 1)[0] for row in (tmp_path / "with" / "notes.csv").read_text().splitlines()[1:]]
    exact = sum(record_bucket(text) >= client.site.VAL_FRACTION for text in texts)  # with the target; one less without
    released = exact - 10
    monkeypatch.setattr(privacy, "noisy_count", lambda count, noise_multiplier: released)
    for batch_size in (released - 5, exact):  # the second straddles the exact counts: exact-1 < batch-size <= exact
        probe = {**overrides, "lora-rounds": 3, "batch-size": batch_size}
        msg = crafted(tiny_model_dir, len(LABELS))
        msg.content["config"]["run-name"] = f"b{batch_size}"
        seen = both(sites, probe, msg)
        assert seen["with"] == seen["without"], batch_size
        assert (seen["with"][0] == "decline") == (batch_size > released)


def test_a_policy_label_set_refuses_another_before_any_data_is_read(site, tiny_model_dir, reads):
    tmp_path, _, overrides = site
    sites = neighbours(tmp_path, tiny_model_dir, f"{TARGET},card", f"labels = {json.dumps(LABELS)}\n")
    narrowed = {**overrides, "labels": ",".join(LABELS[:2])}
    seen = both(sites, narrowed, crafted(tiny_model_dir, 2))
    assert seen["with"] == seen["without"] and "differs from the run's" in seen["with"][1] and reads == []
