"""Classification and entity metrics, their per-example additive counts for private evaluation, and fairness.

Counts are laid out [TP, FP, FN] per class (or entity type), so column 3*k + j is count j of class k: one row per
example, which a site can sum, clip and noise before it leaves, and the scores are computed from the sums.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
from seqeval.metrics import classification_report as seqeval_report
from seqeval.scheme import IOB2, Entities
from sklearn.metrics import accuracy_score, classification_report, f1_score

from common.token_data import is_iob2_tag


def classification_metrics(labels: np.ndarray, predictions: np.ndarray, num_labels: int) -> dict[str, float]:
    """Accuracy and macro-F1 over all `num_labels` classes (a class never predicted counts as F1 0)."""
    return {
        "accuracy": float(accuracy_score(labels, predictions)),
        "macro_f1": float(
            f1_score(labels, predictions, labels=list(range(num_labels)), average="macro", zero_division=0)
        ),
    }


def per_class_report(labels: np.ndarray, predictions: np.ndarray, label_names: Sequence[str]) -> dict:
    """Precision, recall, F1 and support per class, as scikit-learn's dict report."""
    return classification_report(
        labels,
        predictions,
        labels=list(range(len(label_names))),
        target_names=list(label_names),
        output_dict=True,
        zero_division=0,
    )


def fairness(site_scores: dict[str, float]) -> dict[str, float | str]:
    """The worst site, its score, and the gap between the mean site and the worst."""
    if not site_scores:
        return {}
    worst = min(site_scores, key=site_scores.get)
    mean = float(np.mean(list(site_scores.values())))
    return {"worst_site": worst, "worst": site_scores[worst], "mean": mean, "gap": mean - site_scores[worst]}


def entity_report(true_tags: list[list[str]], pred_tags: list[list[str]]) -> dict:
    """Per-type precision, recall, F1 and support with micro, macro and weighted averages (seqeval, strict IOB2).

    Strict: an entity counts only when its B- and I- tags delimit exactly the true span with the true type.
    """
    pred_tags = _predicted(pred_tags)
    with warnings.catch_warnings():
        # With no entity in truth or prediction seqeval's macro average is a mean of nothing (NaN, and a warning).
        warnings.simplefilter("ignore", RuntimeWarning)
        report = seqeval_report(true_tags, pred_tags, mode="strict", scheme=IOB2, output_dict=True, zero_division=0)
    # Plain numbers, NaN as 0, so that the report can be written as JSON.
    return {
        name: {key: int(value) if key == "support" else float(np.nan_to_num(value)) for key, value in row.items()}
        for name, row in report.items()
    }


def entity_counts(true_tags: list[list[str]], pred_tags: list[list[str]], entity_types: Sequence[str]) -> np.ndarray:
    """Per sentence, [TP, FP, FN] per entity type under seqeval's strict IOB2 matching (int64, (N, 3 * types)).

    A predicted entity is a TP when a true entity has the same type and span; an I- that starts an entity
    is not an entity in strict IOB2, in the truth or the prediction. Any predicted tag sequence is counted (a
    predicted tag that is not IOB2 or whose type is not in `entity_types` reads as "O"); true tags must be the run's.
    """
    if len(true_tags) != len(pred_tags) or any(len(t) != len(p) for t, p in zip(true_tags, pred_tags)):
        raise ValueError("true and predicted tags need the same number of sentences and of tags per sentence")
    column = {kind: 3 * k for k, kind in enumerate(entity_types)}
    counts = np.zeros((len(true_tags), 3 * len(entity_types)), dtype=np.int64)
    true_entities = Entities(true_tags, IOB2).entities
    pred_entities = Entities(_predicted(pred_tags, column), IOB2).entities
    for i, (truth, pred) in enumerate(zip(true_entities, pred_entities)):
        truth, pred = {entity.to_tuple() for entity in truth}, {entity.to_tuple() for entity in pred}
        for entities, offset in ((truth & pred, 0), (pred - truth, 1), (truth - pred, 2)):
            for _, kind, _, _ in entities:
                if kind not in column:
                    raise ValueError("the tags hold an entity type that is not in entity_types")
                counts[i, column[kind] + offset] += 1
    return counts


def _predicted(pred_tags: list[list[str]], entity_types=None) -> list[list[str]]:
    """Predicted tags with each one seqeval cannot read, or of a type outside `entity_types` (when given), as "O".

    A site scores whatever the server's model predicts: were scoring to raise on some records' predictions only,
    a failed evaluation would tell the server that those records are there.
    """
    def readable(tag: str) -> bool:
        return is_iob2_tag(tag) and (entity_types is None or tag == "O" or tag[2:] in entity_types)

    return [[tag if readable(tag) else "O" for tag in sentence] for sentence in pred_tags]


def entity_scores(summed_counts: np.ndarray, entity_types: Sequence[str]) -> dict:
    """Micro precision, recall and F1, macro-F1 and per-type F1 from [TP, FP, FN] counts summed over sentences.

    Noisy counts are clamped at 0, so every score is finite and in [0, 1]. Macro-F1 averages over all
    `entity_types` (a type with no entities scores 0): seqeval's macro averages only the types it sees.
    """
    tp, fp, fn = _clamped(summed_counts, len(entity_types))
    per_type = _f1(tp, fp, fn)
    return {
        "precision": _ratio(tp.sum(), tp.sum() + fp.sum()),
        "recall": _ratio(tp.sum(), tp.sum() + fn.sum()),
        "micro_f1": float(_f1(tp.sum(), fp.sum(), fn.sum())),
        "macro_f1": float(per_type.mean()) if len(entity_types) else 0.0,
        "f1_per_type": {kind: float(f1) for kind, f1 in zip(entity_types, per_type)},
    }


def classification_counts(labels: np.ndarray, predictions: np.ndarray, num_labels: int) -> np.ndarray:
    """Per example, [TP, FP, FN] per class (int64, shape (N, 3 * num_labels)): one TP, or one FN and one FP."""
    labels, predictions = np.asarray(labels, dtype=np.int64), np.asarray(predictions, dtype=np.int64)
    if labels.shape != predictions.shape or labels.ndim != 1:
        raise ValueError(f"labels {labels.shape} and predictions {predictions.shape} must be equally long 1-d arrays")
    counts = np.zeros((len(labels), 3 * num_labels), dtype=np.int64)
    rows = np.arange(len(labels))
    right = labels == predictions
    counts[rows[right], 3 * labels[right]] = 1
    counts[rows[~right], 3 * predictions[~right] + 1] = 1
    counts[rows[~right], 3 * labels[~right] + 2] = 1
    return counts


def classification_scores(summed_counts: np.ndarray) -> dict[str, float]:
    """Accuracy, macro-F1 (over every class, as classification_metrics) and the example count from summed counts.

    Every example adds one TP or one FN, so their sum counts the examples; noisy counts are clamped at 0.
    """
    summed_counts = np.asarray(summed_counts)
    if summed_counts.ndim != 1 or len(summed_counts) % 3:
        raise ValueError(f"summed counts must be a 1-d array of 3 * num_labels values, got shape {summed_counts.shape}")
    tp, fp, fn = _clamped(summed_counts, len(summed_counts) // 3)
    examples = tp.sum() + fn.sum()
    return {
        "accuracy": _ratio(tp.sum(), examples),
        "macro_f1": float(_f1(tp, fp, fn).mean()) if len(tp) else 0.0,
        "num_examples": float(examples),
    }


def _clamped(summed_counts: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    counts = np.asarray(summed_counts, dtype=np.float64)
    if counts.shape != (3 * num_classes,):
        raise ValueError(f"expected {3 * num_classes} summed counts, got shape {counts.shape}")
    # Noise can push a count below zero; no true count is.
    counts = np.clip(counts, 0.0, None).reshape(num_classes, 3)
    return counts[:, 0], counts[:, 1], counts[:, 2]


def _f1(tp, fp, fn):
    # 2TP / (2TP + FP + FN) is the harmonic mean of precision and recall, and 0 where there is nothing to score.
    denominator = 2 * tp + fp + fn
    return np.divide(2 * tp, denominator, out=np.zeros_like(denominator, dtype=np.float64), where=denominator > 0)


def _ratio(numerator: float, denominator: float) -> float:
    return float(numerator / denominator) if denominator > 0 else 0.0
