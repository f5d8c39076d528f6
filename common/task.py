"""What a federation learns. A task is what differs between sequence and token classification: the head, the
per-example loss, the data reader and the metrics; everything else (sites, DP, ledger, apps, aggregation) is shared.

The run config's ``task`` picks one from ``TASKS``. The label set and the held-back test split are derived here.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from common import data, metrics, token_data
from common.config import BUNDLED_DATASETS, ConfigError, RunConfig
from common.model import MeanPoolClassifier, TokenClassifier, load_tokenizer
from common.train import TensorData

IGNORE = token_data.IGNORE_INDEX  # a label position the loss and metrics skip (later sub-words, special tokens, padding)
# The head has a row per label, and an evaluation row three counts per label: the server's label set sizes both.
MAX_LABELS = 1000


class Task:
    """The interface: read a site's file, build the head, encode examples, the per-example loss, and the metrics.

    ``counts`` gives every example a row of additive counts whose sum determines ``scores``; a site
    releases that sum with the Gaussian mechanism, so one example's row must have an L2 norm of at
    most ``count_bound`` (larger rows are clipped).
    """

    name: str
    head: type[nn.Module]
    score_keys: tuple[str, ...]  # the scores an evaluation reports, each in [0, 1]
    primary: str  # the score the report ranks sites and rounds by
    count_bound: float

    def check_labels(self, names: Sequence[str]) -> None:
        """Raise ``ConfigError`` naming `labels` unless `names` is a label set this task can train and score.

        Checked before any data is read: a label set the metrics cannot handle would make a site fail on some
        records' predictions only, and whether it failed would tell the server those records are there.
        """
        if not 1 <= len(names) <= MAX_LABELS:
            raise ConfigError(f"labels: the label set has {len(names)} labels; allowed: 1 to {MAX_LABELS}")

    def read(self, path: str, text_column: str, label_column: str, label_names: Sequence[str] | None):
        raise NotImplementedError

    def labels_in(self, examples) -> set[str]:
        raise NotImplementedError

    def within(self, examples, label_names: Sequence[str]) -> list[int]:
        """Indexes of the examples whose labels all belong to `label_names`."""
        raise NotImplementedError

    def record_keys(self, examples) -> list[str]:
        """One string per example that identifies its content, for the stable train/validation split."""
        raise NotImplementedError

    def strata(self, examples) -> list[str]:
        """One class per example that simulated non-IID shares are drawn over."""
        raise NotImplementedError

    def encode(self, examples, label_names: Sequence[str], tokenizer, max_length: int) -> TensorData:
        raise NotImplementedError

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The batch mean of the per-example losses (Opacus clips each example's gradient of its own term)."""
        raise NotImplementedError

    def counts(self, labels: torch.Tensor, predictions: torch.Tensor, label_names: Sequence[str]) -> np.ndarray:
        raise NotImplementedError

    def scores(self, summed: np.ndarray, label_names: Sequence[str]) -> dict[str, float]:
        raise NotImplementedError

    def report(self, labels: torch.Tensor, predictions: torch.Tensor, label_names: Sequence[str]) -> dict:
        """The final evaluation's per-class (or per-entity-type) report."""
        raise NotImplementedError


class SequenceClassification(Task):
    """One label per text: complaint → product, review → condition."""

    name = "sequence-classification"
    head = MeanPoolClassifier
    score_keys = ("accuracy", "macro_f1")
    primary = "macro_f1"
    # An example adds 1 to one class's TP, or 1 to one FP and 1 to one FN.
    count_bound = math.sqrt(2)

    def read(self, path, text_column, label_column, label_names):
        return data.read_examples(path, text_column, label_column, label_names=label_names)

    def labels_in(self, examples):
        return set(examples.labels)

    def within(self, examples, label_names):
        allowed = set(label_names)
        return [i for i, label in enumerate(examples.labels) if label in allowed]

    def record_keys(self, examples):
        return list(examples.texts)

    def strata(self, examples):
        return list(examples.labels)

    def encode(self, examples, label_names, tokenizer, max_length):
        labels = data.encode_labels(examples.labels, label_names)
        input_ids, attention_mask = data.tokenize(list(examples.texts), tokenizer, max_length)
        return TensorData(input_ids, attention_mask, torch.as_tensor(labels, dtype=torch.long))

    def loss(self, logits, labels):
        return nn.functional.cross_entropy(logits, labels)

    def counts(self, labels, predictions, label_names):
        return metrics.classification_counts(labels.numpy(), predictions.numpy(), len(label_names))

    def scores(self, summed, label_names):
        scores = metrics.classification_scores(summed)
        return {key: scores[key] for key in self.score_keys}

    def report(self, labels, predictions, label_names):
        exact = metrics.classification_metrics(labels.numpy(), predictions.numpy(), len(label_names))
        return {**exact, "per_class": metrics.per_class_report(labels.numpy(), predictions.numpy(), label_names)}


class TokenClassification(Task):
    """One BIO tag per word (named entities); a DP record is one sentence, its loss the mean over its words."""

    name = "token-classification"
    head = TokenClassifier
    score_keys = ("entity_f1", "entity_macro_f1", "precision", "recall")
    primary = "entity_f1"
    # A sentence's [TP, FP, FN] row per entity type is clipped to this L2 norm: most sentences hold 0-2 entities.
    count_bound = 3.0

    def check_labels(self, names):
        super().check_labels(names)
        bad = [name for name in names if not token_data.is_iob2_tag(name)]
        if bad:
            raise ConfigError(f"labels: {bad[0]!r} is not an IOB2 tag; {token_data.IOB2_TAGS}")
        if "O" not in names:
            raise ConfigError(f"labels: the label set has no 'O'; {token_data.IOB2_TAGS}")
        orphan = next((name for name in names if name.startswith("I-") and "B-" + name[2:] not in names), None)
        if orphan:
            raise ConfigError(f"labels: {orphan!r} has no 'B-{orphan[2:]}'; {token_data.IOB2_TAGS}")

    def read(self, path, text_column, label_column, label_names):
        return token_data.read_token_examples(
            path, tokens_key=text_column or "tokens", tags_key=label_column or "tags", label_names=label_names
        )

    def labels_in(self, examples):
        return set(token_data.label_set(examples))

    def within(self, examples, label_names):
        allowed = set(label_names)
        return [i for i, tags in enumerate(examples.tags) if set(tags) <= allowed]

    def record_keys(self, examples):
        return [" ".join(tokens) for tokens in examples.tokens]

    def strata(self, examples):
        # A sentence's first entity type (or "O"): sites then differ in which entities they see most.
        return [next((tag[2:] for tag in tags if tag != "O"), "O") for tags in examples.tags]

    def encode(self, examples, label_names, tokenizer, max_length):
        input_ids, attention_mask, labels = token_data.encode_sentences(
            examples.tokens, examples.tags, tokenizer, max_length, label_names
        )
        return TensorData(input_ids, attention_mask, labels)

    def loss(self, logits, labels):
        per_token = nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE, reduction="none")
        labelled = (labels != IGNORE).to(per_token.dtype)
        # Mean over each sentence's labelled words, then over sentences: one sentence, one DP record.
        per_sentence = (per_token * labelled).sum(dim=1) / labelled.sum(dim=1).clamp(min=1.0)
        return per_sentence.mean()

    def counts(self, labels, predictions, label_names):
        true, pred = _tag_sequences(labels, predictions, label_names)
        return metrics.entity_counts(true, pred, token_data.entity_types(label_names))

    def scores(self, summed, label_names):
        scores = metrics.entity_scores(summed, token_data.entity_types(label_names))
        return {"entity_f1": scores["micro_f1"], "entity_macro_f1": scores["macro_f1"],
                "precision": scores["precision"], "recall": scores["recall"]}

    def report(self, labels, predictions, label_names):
        true, pred = _tag_sequences(labels, predictions, label_names)
        summed = metrics.entity_counts(true, pred, token_data.entity_types(label_names)).sum(axis=0)
        return {**self.scores(summed, label_names), "per_type": metrics.entity_report(true, pred)}


def _tag_sequences(labels: torch.Tensor, predictions: torch.Tensor, label_names: Sequence[str]):
    """Per sentence, the true and predicted tags of its labelled positions (first sub-word of each word)."""
    true, pred = [], []
    for row_labels, row_predictions in zip(labels.tolist(), predictions.tolist()):
        kept = [(t, p) for t, p in zip(row_labels, row_predictions) if t != IGNORE]
        true.append([label_names[t] for t, _ in kept])
        pred.append(token_data.valid_iob2([label_names[p] for _, p in kept]))
    return true, pred


TASKS: dict[str, Task] = {task.name: task for task in (SequenceClassification(), TokenClassification())}


def get(config: RunConfig) -> Task:
    """The run's task."""
    return TASKS[config.task]


def label_names(config: RunConfig) -> tuple[str, ...]:
    """The label set every site and the server share: the bundled set's, the run's `labels`, or the server's file's."""
    if config.dataset in BUNDLED_DATASETS:
        return data.load_bundled(config.dataset).label_names
    if config.labels:
        return checked_labels(config, parse_labels(config.labels))
    examples = read_file(config.task, config.dataset, config.text_column, config.label_column)
    return checked_labels(config, sort_labels(get(config).labels_in(examples)))


def checked_labels(config: RunConfig, names: tuple[str, ...]) -> tuple[str, ...]:
    """`names`, once the run's task has accepted them as its label set (``ConfigError`` naming `labels` if not)."""
    get(config).check_labels(names)
    return names


def parse_labels(text: str) -> tuple[str, ...]:
    """A comma-separated label list, as the run config and a site policy give it, in canonical order."""
    return sort_labels({name.strip() for name in text.split(",") if name.strip()})


def sort_labels(names) -> tuple[str, ...]:
    """Sorted, with a tagging scheme's "O" first, so every party numbers the labels alike."""
    return tuple(sorted(names, key=lambda name: (name != "O", name)))


@functools.lru_cache(maxsize=8)
def read_file(task: str, path: str, text_column: str, label_column: str, labels: tuple[str, ...] | None = None):
    """A data file, read and checked once per process."""
    return TASKS[task].read(path, text_column, label_column, labels)


@functools.lru_cache(maxsize=4)
def tokenizer(model: str):
    """The base model's tokenizer, loaded once per process."""
    return load_tokenizer(model)


def encode(examples, config: RunConfig, names: Sequence[str]) -> TensorData:
    """Tokenize examples and turn their labels into indexes of `names`."""
    return get(config).encode(examples, names, tokenizer(config.model), config.max_length)


def central_test_set(config: RunConfig, limit: int | None = None) -> TensorData | None:
    """The held-back test set the server scores with: the bundled set's test split or the run's `test-dataset`
    (a fixed random `limit` of it); None when the run has neither."""
    names = label_names(config)
    if config.test_dataset:
        examples = read_file(config.task, config.test_dataset, config.text_column, config.label_column, names)
    elif config.dataset in BUNDLED_DATASETS:
        examples = data.load_bundled(config.dataset).test
    else:
        return None
    if limit and limit < len(examples):
        index = np.sort(np.random.default_rng(config.seed).permutation(len(examples))[:limit])
        examples = examples.select(index)
    return encode(examples, config, names)
