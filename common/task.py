"""What the federation learns: the shared label set and the held-back test split, derived from the run config."""

from __future__ import annotations

import functools

import numpy as np
import torch

from common import data
from common.config import BUNDLED_DATASETS, RunConfig
from common.model import load_tokenizer
from common.train import TensorData


def label_names(config: RunConfig) -> tuple[str, ...]:
    """The label set every site and the server share: the bundled set's, the run's `labels`, or the file's own."""
    if config.dataset in BUNDLED_DATASETS:
        return data.load_bundled(config.dataset).label_names
    if config.labels:
        return tuple(sorted({name.strip() for name in config.labels.split(",") if name.strip()}))
    examples = read_file(config.dataset, config.text_column, config.label_column)
    return tuple(sorted(set(examples.labels)))


@functools.lru_cache(maxsize=8)
def read_file(path: str, text_column: str, label_column: str, labels: tuple[str, ...] | None = None) -> data.Examples:
    """A site's data file, read and checked once per process."""
    return data.read_examples(path, text_column, label_column, label_names=labels)


@functools.lru_cache(maxsize=4)
def tokenizer(model: str):
    """The base model's tokenizer, loaded once per process."""
    return load_tokenizer(model)


def encode(texts, labels, config: RunConfig) -> TensorData:
    """Tokenize texts and pair them with label indexes."""
    input_ids, attention_mask = data.tokenize(list(texts), tokenizer(config.model), config.max_length)
    return TensorData(input_ids, attention_mask, torch.as_tensor(np.asarray(labels), dtype=torch.long))


def central_test_set(config: RunConfig, limit: int | None = None) -> TensorData | None:
    """The bundled data set's held-back test split (a fixed random `limit` of it), or None for site-only data."""
    if config.dataset not in BUNDLED_DATASETS:
        return None
    bundled = data.load_bundled(config.dataset)
    labels = data.encode_labels(bundled.test.labels, bundled.label_names, source=f"{config.dataset} test split")
    index = np.arange(len(labels))
    if limit:
        index = np.sort(np.random.default_rng(config.seed).permutation(index)[:limit])
    return encode([bundled.test.texts[i] for i in index], labels[index], config)
