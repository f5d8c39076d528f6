"""Users' unlabelled files for `privet predict`: read texts (CSV, TSV, JSON lines, Parquet) or sentences (CoNLL,
JSON lines), and write them back with the predictions, atomically.

Messages point at files, columns and line numbers, never at a text from the data. common.data (it imports torch) is
imported inside the functions: `privet` imports this module at start-up for the column names below.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json", ".parquet")
CONLL_SUFFIXES = (".conll", ".bio", ".iob", ".iob2", ".txt", ".tsv")
JSON_SUFFIXES = (".jsonl", ".json")
PREDICTED_TAGS, TAG_PROBABILITY = "predicted_tags", "tag_probability"


@dataclass
class Table:
    """An input file's rows, all columns kept, and where each row is (for messages)."""

    columns: list[str]
    rows: list[dict]
    texts: list[str]
    arrow: object = None  # the Parquet input's pyarrow table: a Parquet output keeps its column types


def _check_input(path: Path, suffixes: tuple[str, ...], what: str) -> None:
    from common.data import DataError

    if not path.is_file():
        problem = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise DataError(f"{path}: the input file {problem} (resolved to {path.resolve()}). Fix: correct the path; "
                        "a relative path is read from the folder the command was started in.")
    if path.suffix.lower() not in suffixes:
        raise DataError(f"{path}: unsupported file type {path.suffix or '(no extension)'!r} for {what}. "
                        f"Fix: save it as one of {', '.join(dict.fromkeys(suffixes))}.")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty (0 bytes). Fix: export the data again.")


def read_table(path: Path, text_column: str) -> Table:
    """A CSV, TSV, JSON-lines or Parquet file with a text column; every row must have a non-empty text."""
    from common.data import DataError, decode_utf8, read_delimited

    _check_input(path, TABLE_SUFFIXES, "prediction")
    suffix, where = path.suffix.lower(), str(path)
    arrow = None
    if suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            arrow = pq.read_table(path)
        except (OSError, pa.ArrowException):
            raise DataError(f"{path}: not a readable Parquet file. Fix: export the data again.") from None
        columns = arrow.column_names
        _require_column(where, columns, text_column)
        rows, unit = arrow.to_pylist(), "row"
        numbers = list(range(1, len(rows) + 1))
    elif suffix in (".csv", ".tsv"):
        text = decode_utf8(where, path.read_bytes())
        sep = "," if suffix == ".csv" else "\t"
        # read_delimited checks the header, the quoting and the field counts, and knows each record's first line.
        numbers = [number for number, _, _ in read_delimited(where, text, sep, text_column, text_column)]
        records = [record for record in csv.reader(io.StringIO(text, newline=""), delimiter=sep) if record]
        columns = [name.strip() for name in records[0]]
        rows, unit = [dict(zip(columns, record)) for record in records[1:]], "line"
        _type_columns(rows, [name for name in columns if name != text_column])
    else:
        rows, numbers, columns = _read_objects(where, decode_utf8(where, path.read_bytes()))
        _require_column(where, columns, text_column)
        unit = "line"
    if not rows:
        raise DataError(f"{path}: the file has no data rows. Fix: export the data rows too.")
    texts = [_text(row.get(text_column)) for row in rows]
    _reject_rows(where, unit, [n for n, t in zip(numbers, texts) if not t],
                 f"the text column {text_column!r} is empty", "fill in the text or delete the row")
    return Table(columns, rows, texts, arrow)


def _type_columns(rows: list[dict], columns: list[str]) -> None:
    """Give a CSV column whose every value is a number written plainly (`42`, `-3`, `0.5`; not `007` or `1e3`) that
    number's type, so a JSON-lines or Parquet output keeps an id an integer; a CSV output writes it back unchanged."""
    for column in columns:
        values = [row.get(column, "") for row in rows]
        for kind in (int, float):
            if all(value == "" or _plain(value, kind) for value in values) and any(values):
                for row in rows:
                    if column in row:
                        row[column] = kind(row[column]) if row[column] != "" else None
                break


def _plain(value: str, kind: type) -> bool:
    """Whether `value` is exactly how Python writes that `kind` of number (so it round-trips through a CSV)."""
    try:
        number = kind(value)
    except ValueError:
        return False
    return str(number) == value and math.isfinite(number)


def _read_objects(where: str, text: str) -> tuple[list[dict], list[int], list[str]]:
    """JSON lines: the objects, their line numbers and every key seen, in first-seen order."""
    from common.data import DataError

    rows, numbers, keys = [], [], {}
    # Split on newlines only: str.splitlines would also split on U+2028, which JSON strings may hold unescaped.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            raise DataError(f"{where}, line {number}: the line is not valid JSON. Fix: write one complete JSON "
                            "object per line.") from None
        if not isinstance(record, dict):
            raise DataError(f"{where}, line {number}: the line holds a JSON {type(record).__name__}, not an object. "
                            "Fix: write one JSON object per line.")
        rows.append(record)
        numbers.append(number)
        keys.update(dict.fromkeys(record))
    if not rows:
        raise DataError(f"{where}: the file has no JSON objects. Fix: export the data again.")
    return rows, numbers, list(keys)


def _require_column(where: str, columns: list[str], column: str) -> None:
    from common.data import DataError

    if column not in columns:
        shown = ", ".join(repr(c) if len(c) <= 40 else f"<a {len(c)}-character name>" for c in columns[:30])
        raise DataError(f"{where}: there is no text column {column!r}; columns found: {shown or '(none)'}. "
                        "Fix: pass --text-column with one of the columns found.")


def _text(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value).strip()


def _reject_rows(where: str, unit: str, numbers: list[int], what: str, fix: str) -> None:
    from common.data import DataError

    if numbers:
        listed = ", ".join(str(n) for n in numbers[:10]) + (", ..." if len(numbers) > 10 else "")
        others = f" ({len(numbers)} {unit}s have this problem: {listed})" if len(numbers) > 1 else ""
        raise DataError(f"{where}, {unit} {numbers[0]}: {what}{others}. Fix: {fix}.")


def write_table(path: Path, table: Table, new_columns: list[str]) -> None:
    """The rows with their new columns, in the format the suffix names, written atomically."""
    from common.data import DataError

    columns = [*table.columns, *new_columns]
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            base = table.arrow if table.arrow is not None else pa.Table.from_pylist(
                [{c: row.get(c) for c in table.columns} for row in table.rows])
            for name in new_columns:
                base = base.append_column(name, pa.array([row[name] for row in table.rows]))
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            raise DataError(f"{path}: a column of the input mixes value types, which Parquet cannot store. "
                            "Fix: write .csv or .jsonl instead.") from None
        _atomic(path, lambda handle: pq.write_table(base, handle), binary=True)
    elif suffix in (".csv", ".tsv"):
        def write(handle):
            writer = csv.writer(handle, delimiter="," if suffix == ".csv" else "\t", lineterminator="\n")
            writer.writerow(columns)
            writer.writerows([_cell(row.get(c)) for c in columns] for row in table.rows)
        _atomic(path, write)
    else:
        _atomic(path, lambda handle: handle.writelines(
            json.dumps({c: row.get(c) for c in columns}, ensure_ascii=False, default=str) + "\n"
            for row in table.rows))


def _cell(value) -> str:
    """A value as a CSV cell: lists and objects (from JSON lines or Parquet) as JSON."""
    if value is None:
        return ""
    if isinstance(value, (list, dict)):
        return json.dumps(value, ensure_ascii=False, default=str)
    return str(value)


def _atomic(path: Path, write, binary: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8", "newline": ""})) as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_sentences(path: Path, tokens_key: str) -> tuple[list[list[str]], list[dict]]:
    """Sentences to tag, as word lists, and one object per sentence to write back (JSON lines keep their keys).

    CoNLL: the first column of each line is the word (later columns are ignored), a blank line ends a sentence.
    JSON lines: `tokens_key` holds a list of words (or a string, split on whitespace).
    """
    from common.data import DataError, decode_utf8

    _check_input(path, CONLL_SUFFIXES + JSON_SUFFIXES, "token classification (CoNLL or JSON lines)")
    where, text = str(path), decode_utf8(str(path), path.read_bytes())
    if path.suffix.lower() in JSON_SUFFIXES:
        records, numbers, keys = _read_objects(where, text)
        if tokens_key not in keys:
            _require_column(where, keys, tokens_key)
        sentences, bad, empty = [], [], []
        for number, record in zip(numbers, records):
            value = record.get(tokens_key)
            words = value.split() if isinstance(value, str) else value
            if not isinstance(words, list) or not all(isinstance(w, str) and w.strip() for w in words):
                bad.append(number)
            elif not words:
                empty.append(number)
            sentences.append(words if isinstance(words, list) else [])
        _reject_rows(where, "line", bad, f"{tokens_key!r} is not a list of non-empty words",
                     f'write it as a list of strings, one per word, e.g. {{"{tokens_key}": ["word", ...]}}')
        _reject_rows(where, "line", empty, "the sentence has no words", "delete the line or fill in the sentence")
        return sentences, records
    sentences, current, empty = [], [], []
    for number, line in enumerate(text.split("\n"), start=1):
        # A tab, when present, separates the columns (a word may hold spaces); otherwise any run of spaces.
        cells = [cell.strip() for cell in line.split("\t")] if "\t" in line else line.split()
        if not any(cells) or cells[0] == "-DOCSTART-":
            if current:
                sentences.append(current)
            current = []
            continue
        if not cells[0]:
            empty.append(number)
        current.append(cells[0])
    if current:
        sentences.append(current)
    _reject_rows(where, "line", empty, "the word (first column) is empty", "put the word first on the line")
    if not sentences:
        raise DataError(f"{where}: the file holds no words, only blank or -DOCSTART- lines. Fix: write one word "
                        "per line, a blank line between sentences.")
    return sentences, [{tokens_key: words} for words in sentences]


def write_tags(path: Path, sentences: list[list[str]], records: list[dict], result) -> None:
    """CoNLL (word<TAB>predicted tag, a blank line between sentences) or JSON lines (the input objects plus tags)."""
    if path.suffix.lower() in JSON_SUFFIXES:
        def write(handle):
            index = {name: i for i, name in enumerate(result.label_names)}
            for record, tags, scores in zip(records, result.labels, result.probabilities):
                # The emitted tag's probability: after the IOB2 repair it need not be the row's largest.
                chosen = [None if math.isnan(row.max()) else round(float(row[index[tag]]), 6)
                          for tag, row in zip(tags, scores)]
                handle.write(json.dumps({**record, PREDICTED_TAGS: tags, TAG_PROBABILITY: chosen},
                                        ensure_ascii=False, default=str) + "\n")
    else:
        def write(handle):
            handle.write("\n".join("".join(f"{word}\t{tag}\n" for word, tag in zip(words, tags))
                                   for words, tags in zip(sentences, result.labels)))
    _atomic(path, write)

