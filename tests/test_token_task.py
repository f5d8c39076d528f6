"""Named-entity recognition through the same federation: a 2-site, 2-round simulated run of task=token-classification
on a CoNLL file with the tiny model writes every output the sequence task writes, with entity-level scores."""

import json
import random

import pytest
from opacus.accountants import create_accountant
from peft import PeftModel

from common.model import TokenClassifier, build_base_model
from server.simulate import simulate

# Entities built from the tiny test vocabulary (tests/conftest.py): a word's type is learnable from the word.
ENTITIES = {"ORG": [["bank"], ["student", "loan"]], "PRODUCT": [["card"], ["mortgage"], ["credit", "card"]]}
FILLER = "the my i was not and to of for on in with they me account money".split()


def write_conll(path, n=120, seed=0):
    """A CoNLL file (word TAB tag, blank line between sentences, a -DOCSTART- line) with ORG and PRODUCT entities."""
    rng = random.Random(seed)
    lines = ["-DOCSTART-\tO", ""]
    for _ in range(n):
        words = []
        for _ in range(rng.randint(3, 6)):
            if rng.random() < 0.35:
                kind = rng.choice(sorted(ENTITIES))
                entity = rng.choice(ENTITIES[kind])
                words += [(w, ("B-" if i == 0 else "I-") + kind) for i, w in enumerate(entity)]
            else:
                words.append((rng.choice(FILLER), "O"))
        lines += [f"{word}\t{tag}" for word, tag in words] + [""]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def ner_run(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ner")
    overrides = {
        "task": "token-classification", "dataset": str(write_conll(tmp / "train.conll")),
        "test-dataset": str(write_conll(tmp / "test.conll", n=40, seed=1)), "model": str(tiny_model_dir),
        "num-server-rounds": 2, "runs-dir": str(tmp / "runs"), "run-name": "ner", "batch-size": 8,
        "max-length": 16, "max-examples-per-site": 0, "target-epsilon": 4.0, "learning-rate": 0.05,
        "dirichlet-alpha": 10.0,
    }
    simulate(2, overrides, cpus_per_site=1)
    return tmp / "runs" / "ner", tiny_model_dir


def test_every_round_reports_entity_scores_globally_and_per_site(ner_run):
    run, _ = ner_run
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [row["round"] for row in rows] == [1, 2]
    for row in rows:
        assert row["global_source"] == "server-test-split" and row["aggregated_sites"] == 2
        for key in ("entity_f1", "entity_macro_f1", "precision", "recall"):
            assert 0.0 <= row[key] <= 1.0
        for site in row["sites"]:
            assert site["status"] == "trained" and 0 < site["epsilon"] <= 4.0
            assert 0.0 <= site["entity_f1"] <= 1.0 and site["eval_examples"] > 0


def test_the_final_evaluation_has_seqeval_figures_per_entity_type(ner_run):
    run, _ = ner_run
    final = json.loads((run / "final_evaluation.json").read_text())
    assert final["test_examples"] == 40
    assert {"ORG", "PRODUCT"} <= set(final["per_type"])
    assert 0.0 <= final["entity_f1"] <= 1.0
    report = (run / "report.md").read_text()
    assert "entity type" in report and "entity F1 (micro)" in report


def test_the_adapter_and_ledgers_are_those_of_any_run(ner_run):
    run, model_dir = ner_run
    info = json.loads((run / "final" / "privet.json").read_text())
    assert info["task"] == "token-classification"
    assert info["labels"] == ["O", "B-ORG", "B-PRODUCT", "I-ORG", "I-PRODUCT"]
    base = build_base_model(str(model_dir), len(info["labels"]), seed=42, head=TokenClassifier)
    PeftModel.from_pretrained(base, run / "final")
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    for site in last["sites"]:
        ledger = json.loads((run / "sites" / site["site"] / "ledger.json").read_text())
        accountant = create_accountant(mechanism=ledger["accountant"])
        accountant.history = [tuple(e) for e in ledger["history"]]
        assert accountant.get_epsilon(delta=ledger["delta"]) == pytest.approx(site["epsilon"], rel=1e-9)
