"""Use a finished run's model: load its adapter, predict and evaluate.

```python
from common import inference
model = inference.load("runs/bank-demo")          # the run directory, or its final/ (any round-<n>/) directory
result = model.predict(["I was charged twice for one card payment"])
result.labels[0], result.probabilities[0]         # the label, and one probability per class (model.labels order)
```

A token-classification run predicts one IOB2 tag per word (the tag of the word's first sub-word); pass
sentences as word lists. Nothing here logs or quotes a text or a label from the data. common.export writes the
model out for use without Privet.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from common.model import ModelError, load_adapter, load_tokenizer, pick_device, resolve_model, weights_sha256
from common.task import IGNORE, TASKS
from common.token_data import valid_iob2

INFO_FILE = "privet.json"
INFO_KEYS = ("task", "labels", "model", "max_length", "seed", "head")
SEQUENCE = "sequence-classification"
DEFAULT_BATCH_SIZE = 64


class InferenceError(ValueError):
    """A run directory, base model or input Privet cannot use; the message says what to fix."""


@dataclass(frozen=True)
class Predictions:
    """`labels`: one label per text, or one tag list per sentence (token classification), valid IOB2 (an I-X that
    would start an entity is given as B-X).

    `probabilities`: an (N, classes) array per text, or per sentence a (words, classes) array; columns follow
    ``label_names``. A word the tokenizer turns into no sub-word at all is tagged "O" with NaN probabilities.
    """

    labels: list
    probabilities: np.ndarray | list[np.ndarray]
    label_names: tuple[str, ...]


class PrivetModel:
    """A run's base model with its adapter merged in, its tokenizer and its label set, ready to predict."""

    def __init__(self, adapter_dir: Path, info: dict, base_model: str, module: torch.nn.Module, tokenizer,
                 device: torch.device):
        self.adapter_dir = adapter_dir
        self.base_model = base_model
        self.info = info
        self.task: str = info["task"]
        self.labels: tuple[str, ...] = tuple(info["labels"])
        self.max_length: int = int(info["max_length"])
        self.module = module
        self.tokenizer = tokenizer
        self.device = device

    def predict(self, inputs: Sequence, *, batch_size: int = DEFAULT_BATCH_SIZE, progress: bool = False) -> Predictions:
        """Predict texts (sequence classification) or sentences given as word lists (token classification).

        Texts longer than the run's max_length tokens are truncated, as in training; a long sentence is tagged in
        consecutive windows that fit, so every word gets a tag. `progress` shows a bar only on a terminal.
        """
        if batch_size < 1:
            raise InferenceError(f"batch size {batch_size} must be at least 1")
        bar = tqdm(total=len(inputs), unit="text" if self.task == SEQUENCE else "sentence", leave=False,
                   disable=not (progress and sys.stderr.isatty()))
        try:
            if self.task == SEQUENCE:
                return self._predict_texts(list(inputs), batch_size, bar)
            return self._predict_sentences([_words(item) for item in inputs], batch_size, bar)
        finally:
            bar.close()

    def evaluate(self, inputs: Sequence, labels: Sequence, *, batch_size: int = DEFAULT_BATCH_SIZE,
                 progress: bool = False) -> dict:
        """Scores of the predictions against `labels` (a label per text, or a tag list per sentence).

        The result has the fields of a run's final_evaluation.json (per_class or per_type) plus ``examples``
        and ``confusion_matrix`` (rows: true label or tag, columns: predicted; word level for tags). Every word is
        scored, also past max_length (the server's own final evaluation skips those, as training does).
        """
        if len(inputs) != len(labels):
            raise InferenceError(f"{len(inputs)} inputs but {len(labels)} labels")
        predicted = self.predict(inputs, batch_size=batch_size, progress=progress).labels
        index = {name: i for i, name in enumerate(self.labels)}
        task = TASKS[self.task]
        if self.task == SEQUENCE:
            true_ids = _indexes(labels, index, "label")
            pred_ids = [index[label] for label in predicted]
            report = task.report(torch.tensor(true_ids), torch.tensor(pred_ids), self.labels)
            report["per_class"]["micro avg"] = _micro(report["accuracy"], len(true_ids))
            report["micro_f1"] = report["accuracy"]  # one label per text: micro precision = recall = F1 = accuracy
            flat_true, flat_pred = true_ids, pred_ids
        else:
            for position, (sentence, tags) in enumerate(zip(inputs, labels), start=1):
                if len(_words(sentence)) != len(tags):
                    raise InferenceError(f"sentence {position} has {len(_words(sentence))} words but {len(tags)} tags")
            flat_true = _indexes([tag for tags in labels for tag in tags], index, "tag")
            flat_pred = [index[tag] for tags in predicted for tag in tags]
            width = max((len(tags) for tags in labels), default=0)
            true_rows, pred_rows = _padded(labels, index, width), _padded(predicted, index, width)
            report = task.report(true_rows, pred_rows, self.labels)
            report["words"] = len(flat_true)
        matrix = np.zeros((len(self.labels), len(self.labels)), dtype=np.int64)
        np.add.at(matrix, (np.asarray(flat_true, dtype=np.int64), np.asarray(flat_pred, dtype=np.int64)), 1)
        return {"task": self.task, "examples": len(inputs), **report,
                "confusion_matrix": {"labels": list(self.labels), "rows": "true", "columns": "predicted",
                                     "matrix": matrix.tolist()}}

    @torch.inference_mode()
    def _logits(self, batch) -> torch.Tensor:
        return self.module(batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)).float().cpu()

    def _predict_texts(self, texts: list[str], batch_size: int, bar) -> Predictions:
        probabilities = []
        for start in range(0, len(texts), batch_size):
            chunk = texts[start:start + batch_size]
            # Padding to the longest text of the batch: masked positions change nothing, and short texts run faster.
            batch = self.tokenizer(chunk, truncation=True, max_length=self.max_length, padding=True,
                                   return_tensors="pt")
            probabilities.append(self._logits(batch).softmax(dim=-1).numpy())
            bar.update(len(chunk))
        table = np.concatenate(probabilities) if probabilities else np.zeros((0, len(self.labels)), np.float32)
        return Predictions([self.labels[i] for i in table.argmax(axis=1)], table, self.labels)

    def _predict_sentences(self, sentences: list[list[str]], batch_size: int, bar) -> Predictions:
        budget = max(1, self.max_length - self.tokenizer.num_special_tokens_to_add(pair=False))
        windows = []  # (sentence, first word, end word): a long sentence is tagged in several windows
        for start in range(0, len(sentences), batch_size):
            chunk = [(s, sentences[s]) for s in range(start, min(start + batch_size, len(sentences))) if sentences[s]]
            if not chunk:
                continue
            counted = self.tokenizer([words for _, words in chunk], is_split_into_words=True, add_special_tokens=False)
            for row, (s, words) in enumerate(chunk):
                counts = np.bincount([w for w in counted.word_ids(row) if w is not None], minlength=len(words))
                windows += [(s, a, b) for a, b in _windows(counts.tolist(), budget)]
        scores = [np.full((len(words), len(self.labels)), np.nan, dtype=np.float32) for words in sentences]
        for start in range(0, len(windows), batch_size):
            chunk = windows[start:start + batch_size]
            batch = self.tokenizer([sentences[s][a:b] for s, a, b in chunk], is_split_into_words=True,
                                   truncation=True, max_length=self.max_length, padding=True, return_tensors="pt")
            probabilities = self._logits(batch).softmax(dim=-1).numpy()
            for row, (s, a, _) in enumerate(chunk):
                seen = set()
                for position, word in enumerate(batch.word_ids(row)):
                    if word is not None and word not in seen:  # a word's tag is its first sub-word's
                        seen.add(word)
                        scores[s][a + word] = probabilities[row, position]
            bar.update(sum(b == len(sentences[s]) for s, _, b in chunk))  # a sentence is done with its last window
        bar.update(bar.total - bar.n)
        tags = [valid_iob2([self.labels[int(np.argmax(word))] if not np.isnan(word).any() else "O" for word in rows])
                for rows in scores]
        return Predictions(tags, scores, self.labels)


def _words(item) -> list[str]:
    """A sentence as its words: a list as given, a string split on whitespace."""
    return item.split() if isinstance(item, str) else list(item)


def _windows(counts: list[int], budget: int) -> list[tuple[int, int]]:
    """Consecutive (start, end) word ranges whose sub-word counts fit `budget`; a longer word gets a window alone."""
    windows, start, used = [], 0, 0
    for position, count in enumerate(counts):
        if position > start and used + count > budget:
            windows.append((start, position))
            start, used = position, 0
        used += count
    if counts:
        windows.append((start, len(counts)))
    return windows


def _indexes(labels: Sequence[str], index: dict[str, int], what: str) -> list[int]:
    unknown = [position for position, label in enumerate(labels, start=1) if label not in index]
    if unknown:
        shown = ", ".join(str(n) for n in unknown[:10]) + (", ..." if len(unknown) > 10 else "")
        raise InferenceError(
            f"{len(unknown)} {what}(s) are not in the run's label set of {len(index)} (at {what} {shown}); "
            f"allowed: {', '.join(repr(name) for name in index)}"
        )
    return [index[label] for label in labels]


def _padded(tag_lists: Sequence[Sequence[str]], index: dict[str, int], width: int) -> torch.Tensor:
    """Tag lists as an (N, width) index tensor, IGNORE after each sentence's end (the task's report skips it)."""
    rows = torch.full((len(tag_lists), width), IGNORE, dtype=torch.long)
    for row, tags in enumerate(tag_lists):
        rows[row, :len(tags)] = torch.tensor([index[tag] for tag in tags], dtype=torch.long)
    return rows


def _micro(accuracy: float, support: int) -> dict:
    return {"precision": accuracy, "recall": accuracy, "f1-score": accuracy, "support": support}


def adapter_dir(path: str | Path) -> Path:
    """The adapter directory `path` names: itself when it holds privet.json, else its final/ directory."""
    path = Path(path)
    for candidate in (path, path / "final"):
        if (candidate / INFO_FILE).is_file():
            return candidate
    if not path.exists():
        raise InferenceError(f"{path} does not exist (resolved to {path.resolve()}); give a run directory "
                             "(runs/<run-name>) or its final/ directory")
    raise InferenceError(f"{path} holds no {INFO_FILE}: give a run directory (runs/<run-name>) or an adapter "
                         "directory inside it (final/ or round-<n>/)")


def read_info(directory: Path) -> dict:
    """The adapter directory's privet.json, checked: task, label set, base model, max_length, seed, head."""
    where = directory / INFO_FILE
    try:
        info = json.loads(where.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise InferenceError(f"{where} is unreadable ({err}); copy the run's final/ directory again") from None
    missing = [key for key in INFO_KEYS if not isinstance(info, dict) or key not in info]
    if missing:
        raise InferenceError(f"{where} lacks {', '.join(missing)}: it was not written by this version of Privet")
    if info["task"] not in TASKS:
        raise InferenceError(f"{where}: unknown task {info['task']!r}; this Privet knows {', '.join(TASKS)}")
    if info["head"] != TASKS[info["task"]].head.__name__:
        raise InferenceError(f"{where}: head {info['head']!r} is not this Privet's {info['task']} head")
    if not info["labels"] or not all(isinstance(name, str) for name in info["labels"]):
        raise InferenceError(f"{where}: labels must be a non-empty list of label names")
    if not (adapter := directory / "adapter_model.safetensors").is_file():
        raise InferenceError(f"{adapter} is missing; copy the run's whole final/ directory")
    return info


def load(path: str | Path, *, model: str | None = None, device: str | torch.device | None = None) -> PrivetModel:
    """Load a run (its directory, or an adapter directory such as final/) for prediction.

    `model` replaces the base model privet.json names (a local copy on this machine); it must have the same
    weights (SHA-256), or the adapter would be applied to another model. `device` defaults to the GPU when present.
    """
    directory = adapter_dir(path)
    info = read_info(directory)
    base = _base_model(info, model)
    device = torch.device(device) if device is not None else pick_device()
    try:
        peft_model = load_adapter(directory, base, len(info["labels"]), seed=int(info["seed"]),
                                  head=TASKS[info["task"]].head, device=device)
        tokenizer = load_tokenizer(base)
    except (OSError, RuntimeError, ModelError) as err:
        raise InferenceError(f"cannot load the adapter in {directory} onto {base}: {err}") from None
    # Merged once here, LoRA costs nothing per prediction; the merge is exact up to float rounding.
    module = peft_model.merge_and_unload().eval()
    return PrivetModel(directory, info, base, module, tokenizer, device)


def _base_model(info: dict, override: str | None) -> str:
    """The base model directory to load, checked against the SHA-256 the run recorded."""
    name = override or info["model"]
    try:
        path = resolve_model(name)
    except ModelError as err:
        raise InferenceError(str(err)) from None
    if override is not None and not Path(path).is_dir():
        raise InferenceError(f"--model (model=) {name!r} is not a directory on this machine: give a local copy of "
                             "the run's base model")
    if not Path(path).is_dir():
        raise InferenceError(
            f"the base model {name!r} is not a directory on this machine; pass --model (model=) with a local copy "
            "of the run's base model"
        )
    expected = info.get("model_sha256")
    if expected:
        try:
            found = weights_sha256(path)
        except ModelError as err:
            raise InferenceError(str(err)) from None
        if found != expected:
            raise InferenceError(
                f"the base model {name!r} is not the one this run trained on (weights SHA-256 {found[:12]}…, the "
                f"run's is {expected[:12]}…); pass --model (model=) with the run's base model"
            )
    return path

