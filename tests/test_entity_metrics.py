"""Entity metrics (seqeval, strict IOB2) and the per-example counts whose sums give the same scores under DP noise."""

import json

import numpy as np
import pytest
from seqeval.metrics import f1_score
from seqeval.scheme import IOB2

from common.metrics import (
    classification_counts,
    classification_metrics,
    classification_scores,
    entity_counts,
    entity_report,
    entity_scores,
)

TYPES = ("LOC", "ORG", "PER")
TRUE = [
    ["B-PER", "I-PER", "O", "B-LOC"],
    ["B-ORG", "I-ORG", "O", "O", "B-PER"],
    ["O", "O", "B-LOC", "I-LOC"],
    ["O", "B-PER"],
]
PRED = [
    ["B-PER", "I-PER", "O", "B-ORG"],  # PER right; LOC missed; an ORG that is not there
    ["B-ORG", "O", "O", "O", "I-PER"],  # ORG span too short (one FP, one FN); I-PER starts nothing in strict IOB2
    ["O", "O", "B-LOC", "I-LOC"],  # LOC right
    ["O", "B-PER"],  # PER right
]
# By hand: LOC TP 1 FP 0 FN 1; ORG TP 0 FP 2 FN 1; PER TP 2 FP 0 FN 1.
F1 = {"LOC": 2 / 3, "ORG": 0.0, "PER": 0.8}
MICRO_P, MICRO_R, MICRO_F1 = 3 / 5, 3 / 6, 6 / 11


def test_entity_counts_per_sentence_by_hand():
    #                   LOC TP FP FN, ORG TP FP FN, PER TP FP FN
    expected = [[0, 0, 1, 0, 1, 0, 1, 0, 0],
                [0, 0, 0, 0, 1, 1, 0, 0, 1],
                [1, 0, 0, 0, 0, 0, 0, 0, 0],
                [0, 0, 0, 0, 0, 0, 1, 0, 0]]
    counts = entity_counts(TRUE, PRED, TYPES)
    assert counts.dtype == np.int64 and counts.tolist() == expected


def test_summed_counts_give_the_hand_computed_scores_and_seqevals_strict_ones():
    scores = entity_scores(entity_counts(TRUE, PRED, TYPES).sum(axis=0), TYPES)
    assert scores["precision"] == pytest.approx(MICRO_P) and scores["recall"] == pytest.approx(MICRO_R)
    assert scores["micro_f1"] == pytest.approx(MICRO_F1)
    assert scores["f1_per_type"] == pytest.approx(F1)
    assert scores["macro_f1"] == pytest.approx((2 / 3 + 0.0 + 0.8) / 3)
    report = entity_report(TRUE, PRED)
    assert scores["micro_f1"] == pytest.approx(f1_score(TRUE, PRED, mode="strict", scheme=IOB2))
    assert scores["micro_f1"] == pytest.approx(report["micro avg"]["f1-score"])
    assert scores["macro_f1"] == pytest.approx(report["macro avg"]["f1-score"])  # every type occurs here
    assert {kind: report[kind]["f1-score"] for kind in TYPES} == pytest.approx(scores["f1_per_type"])


def test_entity_report_is_strict_and_plain_json():
    report = entity_report(TRUE, PRED)
    assert report["PER"] == pytest.approx({"precision": 1.0, "recall": 2 / 3, "f1-score": 0.8, "support": 3})
    assert report["ORG"] == pytest.approx({"precision": 0.0, "recall": 0.0, "f1-score": 0.0, "support": 1})
    assert report["micro avg"]["precision"] == pytest.approx(MICRO_P)
    assert report["micro avg"]["support"] == 6
    # The lenient (conlleval) mode would count the I-PER that starts an entity as a right guess: strict does not.
    assert f1_score(TRUE, PRED) > report["micro avg"]["f1-score"]
    json.dumps(report, allow_nan=False)
    nothing = entity_report([["O", "O"]], [["O", "O"]])
    assert nothing["macro avg"]["f1-score"] == 0.0 and json.dumps(nothing, allow_nan=False)


def test_macro_f1_counts_every_type_of_the_run_even_one_never_seen():
    types = (*TYPES, "MISC")
    scores = entity_scores(entity_counts(TRUE, PRED, types).sum(axis=0), types)
    assert scores["f1_per_type"]["MISC"] == 0.0
    assert scores["macro_f1"] == pytest.approx((2 / 3 + 0.0 + 0.8 + 0.0) / 4)
    assert scores["micro_f1"] == pytest.approx(MICRO_F1)


def test_entity_counts_refuse_misaligned_tags_and_true_types_outside_the_run():
    with pytest.raises(ValueError, match="same number"):
        entity_counts([["O", "B-PER"]], [["O"]], TYPES)
    with pytest.raises(ValueError, match="not in entity_types"):
        entity_counts([["B-DATE"]], [["O"]], TYPES)


@pytest.mark.parametrize("odd", ["FOO", "BX", "E-PER", "I-", "B-", "", "-", "B-DATE", "I-DATE", "B- PER"])
def test_any_predicted_tag_is_counted_as_o_when_it_names_no_entity_type_of_the_run(odd):
    """Scoring never raises on a prediction (a site scores whatever the server's model predicts): a predicted tag
    that is not IOB2, or of a type outside the run, counts as O, in the counts and the report alike."""
    true = [["B-PER", "I-PER", "O"]]
    pred = [["B-PER", odd, odd]]
    as_o = [["B-PER", "O", "O"]]
    assert entity_counts(true, pred, TYPES).tolist() == entity_counts(true, as_o, TYPES).tolist()
    if not odd.endswith("DATE"):  # the report lists every type predicted, as seqeval does
        assert entity_report(true, pred) == entity_report(true, as_o)


def test_noisy_and_negative_counts_give_finite_scores_between_0_and_1():
    exact = entity_counts(TRUE, PRED, TYPES).sum(axis=0)
    rng = np.random.default_rng(0)
    for noisy in [exact + rng.normal(0, 5, exact.shape) for _ in range(50)] + [-np.ones(9), np.zeros(9)]:
        scores = entity_scores(noisy, TYPES)
        values = [scores[key] for key in ("precision", "recall", "micro_f1", "macro_f1")]
        values += list(scores["f1_per_type"].values())
        assert all(np.isfinite(value) and 0.0 <= value <= 1.0 for value in values)
    assert entity_scores(-np.ones(9), TYPES)["micro_f1"] == 0.0


# Sequence classification: the same additive counts.

LABELS = np.array([0, 0, 1, 2, 2, 2, 1])
PREDICTIONS = np.array([0, 1, 1, 2, 0, 2, 2])


def test_classification_counts_per_example_by_hand():
    counts = classification_counts(LABELS, PREDICTIONS, 3)
    assert counts.shape == (7, 9) and counts.dtype == np.int64
    assert counts[0].tolist() == [1, 0, 0, 0, 0, 0, 0, 0, 0]  # 0 right
    assert counts[1].tolist() == [0, 0, 1, 0, 1, 0, 0, 0, 0]  # 0 taken for 1: FN of 0, FP of 1
    assert counts.sum(axis=0).tolist() == [1, 1, 1, 1, 1, 1, 2, 1, 1]


@pytest.mark.parametrize("num_labels", [3, 4])  # 4: a class of the run that no example has
def test_summed_classification_counts_match_scikit_learn(num_labels):
    scores = classification_scores(classification_counts(LABELS, PREDICTIONS, num_labels).sum(axis=0))
    expected = classification_metrics(LABELS, PREDICTIONS, num_labels)
    assert scores["accuracy"] == pytest.approx(expected["accuracy"]) == pytest.approx(4 / 7)
    assert scores["macro_f1"] == pytest.approx(expected["macro_f1"])
    assert scores["num_examples"] == 7


def test_noisy_classification_counts_give_finite_scores_between_0_and_1():
    exact = classification_counts(LABELS, PREDICTIONS, 3).sum(axis=0)
    rng = np.random.default_rng(1)
    for noisy in [exact + rng.normal(0, 5, exact.shape) for _ in range(50)] + [-np.ones(9)]:
        scores = classification_scores(noisy)
        assert 0.0 <= scores["accuracy"] <= 1.0 and 0.0 <= scores["macro_f1"] <= 1.0
        assert scores["num_examples"] >= 0.0
    with pytest.raises(ValueError, match="3 \\* num_labels"):
        classification_scores(np.ones(4))
