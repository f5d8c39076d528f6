"""Classification metrics: accuracy, macro-F1, the per-class report, and fairness across sites."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.metrics import accuracy_score, classification_report, f1_score


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
