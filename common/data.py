"""Site data: reading and checking a site's file, the bundled demo sets, simulated non-IID splits, tokenization.

Privacy promise: no message or log line written here quotes a text or a label from the data. Errors name
the file, the line (or row, for Parquet), the column and the fix; that is all a site administrator needs.
"""

from __future__ import annotations

import codecs
import csv
import functools
import hashlib
import io
import json
import logging
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(f"flwr.privet.{__name__}")  # Flower's handler prints it, as in every Flower process

SUPPORTED_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json", ".parquet")
_MAX_DRAWS = 20
_UTF8_FIX = "re-save the file as UTF-8 (in Excel: 'CSV UTF-8'; on the command line: iconv -f <its encoding> -t UTF-8)"


class DataError(ValueError):
    """Data Privet cannot use; the message names the file, the row where there is one, and the fix."""


@dataclass(frozen=True)
class Examples:
    """Texts and their raw label strings, in file order."""

    texts: list[str]
    labels: list[str]

    def __len__(self) -> int:
        return len(self.texts)

    def select(self, index) -> Examples:
        return Examples([self.texts[i] for i in index], [self.labels[i] for i in index])


@dataclass(frozen=True)
class BundledData:
    """A bundled demo data set: its train and test splits and the sorted label set they share."""

    train: Examples
    test: Examples
    label_names: tuple[str, ...]


# A row as a reader hands it on: its line (or Parquet row) number, and the raw text and label cells.
_Row = tuple[int, object, object]


def read_examples(
    path,
    text_column: str,
    label_column: str,
    *,
    label_names: Sequence[str] | None = None,
    max_chars: int = 20_000,
) -> Examples:
    """Read a CSV (.csv), TSV (.tsv), JSON-lines (.jsonl or .json with one object per line) or Parquet (.parquet) file.

    Every row needs a text and a label (one of `label_names` when given); texts over `max_chars` are truncated.
    """
    path = Path(path)
    if not path.is_file():
        problem = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise DataError(
            f"{path}: the data file {problem} (resolved to {path.resolve()}). "
            "Fix: correct the data path; a relative path is read from the folder the command was started in."
        )
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise DataError(
            f"{path}: unsupported file type {suffix or '(no extension)'!r}. "
            f"Fix: save the data as one of {', '.join(SUPPORTED_SUFFIXES)} (.json with one object per line)."
        )
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty (0 bytes). Fix: export the data again.")
    if suffix == ".parquet":
        unit, rows = "row", _read_parquet(path, text_column, label_column)
    else:
        text = decode_utf8(str(path), _read_bytes(path))
        if suffix in (".csv", ".tsv"):
            sep = "," if suffix == ".csv" else "\t"
            unit, rows = "line", read_delimited(str(path), text, sep, text_column, label_column)
        else:
            unit, rows = "line", _read_json_lines(str(path), text, text_column, label_column)
    return _checked_examples(str(path), unit, rows, text_column, label_column, label_names, max_chars)


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise DataError(
            f"{path}: cannot read the file ({err.strerror}). Fix: give the user running Privet read access to it."
        ) from None


def decode_utf8(where: str, raw: bytes) -> str:
    """The file's text as strict UTF-8 (an Excel byte-order mark is dropped); DataError names the first bad line."""
    start = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    try:
        return raw[start:].decode("utf-8")
    except UnicodeDecodeError as err:
        offset = start + err.start
        line = raw.count(b"\n", 0, offset) + 1
        raise DataError(
            f"{where}, line {line}: the file is not valid UTF-8 (first bad byte at byte offset {offset}). "
            f"Fix: {_UTF8_FIX}."
        ) from None


def read_delimited(where: str, text: str, sep: str, text_column: str, label_column: str) -> list[_Row]:
    """Rows of (line where the record starts, text cell, label cell) from CSV or TSV text with a header line."""
    # The stdlib reader, unlike pandas, tells us where each record starts, even when quoted fields span lines.
    # Long texts are truncated later with a warning; the reader's default 128 KiB field cap would reject them.
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=sep, strict=True)
    header: list[str] | None = None
    rows: list[_Row] = []
    start = 1
    try:
        for record in reader:
            if not record:
                pass  # a blank line holds no record
            elif header is None:
                header = [name.strip() for name in record]
                _check_header(f"{where}, line {start}", header, text_column, label_column, sep)
                text_at, label_at = header.index(text_column), header.index(label_column)
            elif len(record) != len(header):
                raise DataError(
                    f"{where}, line {start}: the record has {len(record)} fields but the header has {len(header)}. "
                    f"Fix: quote fields that contain {_sep_name(sep)} or line breaks, or remove stray separators."
                )
            else:
                rows.append((start, record[text_at], record[label_at]))
            start = reader.line_num + 1
    except csv.Error as err:
        if "unexpected end of data" in str(err):
            problem = "has a quote (\") that is never closed, so the rest of the file ran into it"
        elif reader.line_num == start:
            problem = "has a quote (\") in the wrong place"
        else:
            problem = f"has a quote (\") in the wrong place (the parser stopped at line {reader.line_num})"
        raise DataError(
            f"{where}, line {start}: the record starting on this line {problem}. "
            'Fix: enclose the whole field in quotes and double any quote inside it ("").'
        ) from None
    if header is None:
        raise DataError(f"{where}: the file has no header and no data. Fix: export the data again.")
    if not rows:
        raise DataError(f"{where}: the file has a header but no data rows. Fix: export the data rows too.")
    return rows


def _sep_name(sep: str) -> str:
    return "commas" if sep == "," else "tabs"


def _check_header(where: str, header: list[str], text_column: str, label_column: str, sep: str) -> None:
    duplicates = sorted({name for name, count in Counter(header).items() if count > 1 and name})
    if duplicates:
        raise DataError(
            f"{where}: the header names column(s) {_names(duplicates)} more than once. "
            "Fix: rename the duplicates so every column name is unique."
        )
    hint = ""
    if len(header) == 1:
        hint = f" The file has a single column: check that it is separated by {_sep_name(sep)}."
    _require_columns(where, header, text_column, label_column, hint)


def _require_columns(where: str, found: Iterable[str], text_column: str, label_column: str, hint: str = "") -> None:
    found = list(found)
    for role, column in (("text", text_column), ("label", label_column)):
        if column not in found:
            raise DataError(
                f"{where}: there is no {role} column {column!r}; columns found: {_names(found)}.{hint} "
                f"Fix: set the {role} column to one of the columns found, or rename that column in the file."
            )


def _names(names: Sequence[str]) -> str:
    # A file without a header has data where the names should be: never echo a long cell.
    shown = [repr(name) if len(name) <= 40 else f"<a {len(name)}-character name>" for name in names[:30]]
    more = f" and {len(names) - 30} more" if len(names) > 30 else ""
    return ", ".join(shown) + more if shown else "(none)"


def _label_list(label_names: Sequence[str]) -> str:
    """The run's label set; it comes from the run config, not from the site's data, so it may be shown."""
    return ", ".join(repr(name) for name in label_names)


def _read_json_lines(where: str, text: str, text_column: str, label_column: str) -> list[_Row]:
    rows: list[_Row] = []
    keys: set[str] = set()
    # Split on newlines only: str.splitlines would also split on U+2028, which JSON strings may hold unescaped.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line, object_pairs_hook=_unique_keys)
        except _DuplicateKey as err:
            raise DataError(
                f"{where}, line {number}: the object has the key {_names([err.key])} more than once. "
                "Fix: rename the duplicate key."
            ) from None
        except ValueError:
            raise DataError(
                f"{where}, line {number}: the line is not valid JSON. Fix: write one complete JSON object per line "
                "(e.g. pandas: df.to_json(path, orient='records', lines=True))."
            ) from None
        if not isinstance(record, dict):
            raise DataError(
                f"{where}, line {number}: the line holds a JSON {type(record).__name__}, not an object. "
                "Fix: write one JSON object per line, not a JSON array "
                "(e.g. pandas: df.to_json(path, orient='records', lines=True))."
            )
        keys.update(record)
        for column in (text_column, label_column):
            check_characters(f"{where}, line {number}", column, record.get(column))
        rows.append((number, record.get(text_column), record.get(label_column)))
    if not rows:
        raise DataError(f"{where}: the file has no JSON objects. Fix: export the data again.")
    _require_columns(where, sorted(keys), text_column, label_column)
    return rows


def check_characters(at: str, key: str, value: object) -> None:
    """Raise ``DataError`` when a JSON string holds an escaped lone surrogate (such as "\\ud800").

    JSON lets one through, but it is no character: the tokenizer would fail on that record later, in a round.
    """
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise DataError(
                f"{at}: {key!r} holds an escaped lone surrogate (a \\ud800-\\udfff escape without its pair), "
                "which is not a character. Fix: export the data again as valid UTF-8."
            ) from None


class _DuplicateKey(ValueError):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen[key] = value
    return seen


def _read_parquet(path: Path, text_column: str, label_column: str) -> list[_Row]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(path).names
        duplicates = sorted({name for name, count in Counter(names).items() if count > 1})
        if duplicates:
            raise DataError(
                f"{path}: the file has column(s) {_names(duplicates)} more than once. Fix: rename the duplicates."
            )
        _require_columns(str(path), names, text_column, label_column)
        table = pq.read_table(path, columns=[text_column, label_column])
    except (OSError, pa.ArrowException):
        raise DataError(f"{path}: not a readable Parquet file. Fix: export the data again as Parquet or CSV.") from None
    if table.num_rows == 0:
        raise DataError(f"{path}: the file has no data rows. Fix: export the data rows too.")
    texts, labels = table.column(text_column).to_pylist(), table.column(label_column).to_pylist()
    return [(number, text, label) for number, (text, label) in enumerate(zip(texts, labels), start=1)]


def _cell(value: object) -> str:
    """The stripped text of a cell; '' when it is missing (None or NaN)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value).strip()


def _checked_examples(
    where: str,
    unit: str,
    rows: list[_Row],
    text_column: str,
    label_column: str,
    label_names: Sequence[str] | None,
    max_chars: int,
) -> Examples:
    allowed = None if label_names is None else frozenset(label_names)
    problems: dict[str, list[int]] = {}
    texts, labels = [], []
    truncated = 0
    for number, raw_text, raw_label in rows:
        text, label = _cell(raw_text), _cell(raw_label)
        if not text:
            problems.setdefault("empty text", []).append(number)
        if not label:
            problems.setdefault("missing label", []).append(number)
        elif allowed is not None and label not in allowed:
            problems.setdefault("unknown label", []).append(number)
        if len(text) > max_chars:
            text = text[:max_chars]
            truncated += 1
        texts.append(text)
        labels.append(label)
    if problems:
        # Report the problem that occurs first in the file, with where else it occurs.
        kind, numbers = min(problems.items(), key=lambda item: item[1][0])
        what, fix = {
            "empty text": (f"the text column {text_column!r} is empty", "fill in the text or delete the row"),
            "missing label": (f"the label column {label_column!r} is empty", "fill in the label or delete the row"),
            "unknown label": (
                f"the label in column {label_column!r} is not one of the run's labels",
                f"use one of {_label_list(label_names or ())}, or ask the coordinator to add the label to the run",
            ),
        }[kind]
        others = ""
        if len(numbers) > 1:
            listed = ", ".join(str(n) for n in numbers[:10]) + (", ..." if len(numbers) > 10 else "")
            others = f" ({len(numbers)} {unit}s have this problem: {listed})"
        raise DataError(f"{where}, {unit} {numbers[0]}: {what}{others}. Fix: {fix}.")
    if truncated:
        log.warning(
            "%s: %d text(s) longer than %d characters were truncated to that length", where, truncated, max_chars
        )
    return Examples(texts, labels)


@functools.lru_cache(maxsize=None)
def load_bundled(name: str) -> BundledData:
    """One of the bundled demo data sets ("bank" or "hospital"), read once per process."""
    # Imported here because the demo sets are built with this module's readers.
    from common import datasets

    return datasets.load(name)


def encode_labels(labels: Sequence[str], label_names: Sequence[str], *, source: str = "") -> np.ndarray:
    """Label strings as int64 indexes into `label_names`."""
    index = {name: i for i, name in enumerate(label_names)}
    encoded = np.empty(len(labels), dtype=np.int64)
    for position, label in enumerate(labels):
        if label not in index:
            raise DataError(
                f"{source or 'the data'}, data row {position + 1}: the label is not one of the run's labels. "
                f"Fix: use one of {_label_list(label_names)}, or ask the coordinator to add the label to the run."
            )
        encoded[position] = index[label]
    return encoded


def dirichlet_partition(labels: np.ndarray, num_sites: int, alpha: float, seed: int) -> list[np.ndarray]:
    """Non-IID split: for each class, site shares drawn from Dirichlet(alpha).

    Returns sorted, disjoint index arrays covering every index, the same for the same seed; each site
    gets at least min(len(labels) // num_sites, 10) examples.
    """
    labels = np.asarray(labels)
    if num_sites < 1 or not alpha > 0:
        raise ValueError(f"need num_sites >= 1 and alpha > 0, got {num_sites} and {alpha}")
    if len(labels) < num_sites:
        raise DataError(
            f"the data has {len(labels)} examples, too few to give each of {num_sites} sites one. "
            f"Fix: simulate at most {len(labels)} sites, or use more data."
        )
    floor = min(len(labels) // num_sites, 10)
    rng = np.random.default_rng(seed)
    for _ in range(_MAX_DRAWS):
        sites = _dirichlet_draw(labels, num_sites, alpha, rng)
        if min(len(site) for site in sites) >= floor:
            break
    else:
        # Small alpha keeps leaving some site nearly empty: top those up from the largest sites.
        _top_up(sites, floor, rng)
    return [np.sort(site).astype(np.int64) for site in sites]


def _dirichlet_draw(labels: np.ndarray, num_sites: int, alpha: float, rng: np.random.Generator) -> list[np.ndarray]:
    parts: list[list[np.ndarray]] = [[] for _ in range(num_sites)]
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        cuts = (np.cumsum(rng.dirichlet(np.full(num_sites, alpha)))[:-1] * len(members)).astype(int)
        for site, share in enumerate(np.split(members, cuts)):
            parts[site].append(share)
    return [np.concatenate(shares) for shares in parts]


def _top_up(sites: list[np.ndarray], floor: int, rng: np.random.Generator) -> None:
    while True:
        sizes = [len(site) for site in sites]
        small, large = int(np.argmin(sizes)), int(np.argmax(sizes))
        need = floor - sizes[small]
        if need <= 0:
            return
        moving = rng.permutation(len(sites[large]))[: min(need, sizes[large] - floor)]
        sites[small] = np.concatenate([sites[small], sites[large][moving]])
        sites[large] = np.delete(sites[large], moving)


def split_train_val(keys: Sequence[str], val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Sorted train and validation indexes, chosen by a stable hash of each record's content.

    Neither the row order nor the server's seed decides: a record stays on the same side in every
    run, so no sequence of runs can cycle a site's records through validation.
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    buckets = np.array([record_bucket(key) for key in keys], dtype=np.float64)
    val = buckets < val_fraction
    return np.flatnonzero(~val).astype(np.int64), np.flatnonzero(val).astype(np.int64)


def record_bucket(key: str) -> float:
    """A record's place in [0, 1), from the SHA-256 of its content (Python's hash() is salted per process)."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def tokenize(texts: Sequence[str], tokenizer, max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask (int64), truncated and padded to max_length."""
    if not texts:
        empty = torch.zeros((0, max_length), dtype=torch.int64)
        return empty, empty.clone()
    batch = tokenizer(
        list(texts), truncation=True, padding="max_length", max_length=max_length, return_tensors="pt"
    )
    return batch["input_ids"].to(torch.int64), batch["attention_mask"].to(torch.int64)
