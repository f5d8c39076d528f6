"""Token-classification (NER) data: reading and checking CoNLL/BIO and JSON-lines files, tag sets, sub-word labels.

Privacy promise, as in common.data: no message or log line written here quotes a word or a tag from the data.
Errors name the file, the line and the fix. Tags are IOB2: "O", "B-<type>" starting an entity, "I-<type>" inside it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from common.data import (DataError, _DuplicateKey, _label_list, _names, _read_bytes, _unique_keys, check_characters,
                         decode_utf8)

log = logging.getLogger(f"flwr.privet.{__name__}")  # Flower's handler prints it, as in every Flower process

# One token and its tag per line, tag last; .tsv here means that layout, not a table with a header.
CONLL_SUFFIXES = (".conll", ".bio", ".iob", ".iob2", ".txt", ".tsv")
JSON_SUFFIXES = (".jsonl", ".json")
REPAIRS = ("reject", "iob2")
IGNORE_INDEX = -100  # the label PyTorch's cross-entropy skips: later sub-words, special tokens, padding
# BERT-family models see at most 512 positions, and every word is at least one of them: later words are never seen.
MAX_WORDS = 512
_DOCSTART = "-DOCSTART-"
_IOB2_FIX = "tags must be O, B-<type> (first word of an entity) or I-<type> (later words of the same entity)"
# What a run's tag set must be, for messages that refuse one.
IOB2_TAGS = ('a token-classification label set is IOB2: "O", and B-<type> / I-<type> tags (a type without spaces), '
             "with a B-<type> for every I-<type>")


@dataclass(frozen=True)
class TokenExamples:
    """Sentences as word lists and their IOB2 tag lists (one tag per word), in file order."""

    tokens: list[list[str]]
    tags: list[list[str]]

    def __len__(self) -> int:
        return len(self.tokens)

    def select(self, indices: Sequence[int]) -> TokenExamples:
        """The sentences at `indices`, in that order."""
        return TokenExamples([self.tokens[i] for i in indices], [self.tags[i] for i in indices])


@dataclass(frozen=True)
class BundledTokenData:
    """A bundled NER demo set: its train and test splits and the tag set they share ("O" first)."""

    train: TokenExamples
    test: TokenExamples
    label_names: tuple[str, ...]


# A word as a reader hands it on: where it is (for messages, and a line number to order them) and its word and tag.
_Word = tuple[str, int, str, str]  # (location such as "line 7", line number, word, tag)


def read_token_examples(
    path,
    *,
    tokens_key: str = "tokens",
    tags_key: str = "tags",
    label_names: Sequence[str] | None = None,
    repair: str = "reject",
    max_words: int = MAX_WORDS,
) -> TokenExamples:
    """Read a CoNLL-style file (.conll .bio .iob .iob2 .txt .tsv) or JSON lines (.jsonl, .json) of tagged sentences.

    CoNLL: one word per line with its tag in the last column (columns split by tabs when the line has one, else
    by spaces; columns in between are ignored), a blank line between sentences, `-DOCSTART-` lines skipped.
    JSON lines: one object per line whose `tokens_key` and `tags_key` hold equally long lists of strings.
    An entity that starts with I-<type> (IOB1, or a broken sequence) is an error with repair="reject", the
    default, because a silent rewrite would hide annotation mistakes; repair="iob2" rewrites it to B-<type>.
    Sentences over `max_words` words are cut to that length with a warning.
    """
    if repair not in REPAIRS:
        raise ValueError(f"repair must be one of {', '.join(REPAIRS)}, got {repair!r}")
    path = Path(path)
    _check_file(path)
    where = str(path)
    text = decode_utf8(where, _read_bytes(path))
    if path.suffix.lower() in JSON_SUFFIXES:
        sentences = _read_json_lines(where, text, tokens_key, tags_key)
    else:
        sentences = _read_conll(where, text)
    return _checked(where, sentences, label_names, repair, max_words)


def _check_file(path: Path) -> None:
    if not path.is_file():
        problem = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise DataError(
            f"{path}: the data file {problem} (resolved to {path.resolve()}). "
            "Fix: correct the data path; a relative path is read from the folder the command was started in."
        )
    suffix = path.suffix.lower()
    if suffix not in CONLL_SUFFIXES + JSON_SUFFIXES:
        raise DataError(
            f"{path}: unsupported file type {suffix or '(no extension)'!r} for token classification. "
            f"Fix: save the data as CoNLL ({', '.join(CONLL_SUFFIXES)}: one word and its tag per line) "
            f"or JSON lines ({', '.join(JSON_SUFFIXES)}: one object with a word list and a tag list per line)."
        )
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty (0 bytes). Fix: export the data again.")


def _read_conll(where: str, text: str) -> list[list[_Word]]:
    sentences: list[list[_Word]] = []
    current: list[_Word] = []
    # Split on newlines only: str.splitlines would also split inside a word holding U+2028 or a form feed.
    for number, line in enumerate(text.split("\n"), start=1):
        # A tab, when present, is the separator, so that a word may hold spaces; otherwise any run of spaces.
        cells = [cell.strip() for cell in line.split("\t")] if "\t" in line else line.split()
        if not any(cells) or cells[0] == _DOCSTART:
            if current:
                sentences.append(current)
            current = []
            continue
        # A single column is a word without a tag; the problem is reported with the others in _checked.
        tag = cells[-1] if len(cells) > 1 else ""
        current.append((f"line {number}", number, cells[0], tag))
    if current:
        sentences.append(current)
    if not sentences:
        raise DataError(
            f"{where}: the file holds no sentences, only blank or {_DOCSTART} lines. "
            "Fix: export the data again, one word and its tag per line."
        )
    return sentences


def _read_json_lines(where: str, text: str, tokens_key: str, tags_key: str) -> list[list[_Word]]:
    sentences: list[list[_Word]] = []
    # Split on newlines only: str.splitlines would also split on U+2028, which JSON strings may hold unescaped.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        at = f"{where}, line {number}"
        try:
            record = json.loads(line, object_pairs_hook=_unique_keys)
        except _DuplicateKey as err:
            raise DataError(f"{at}: the object has the key {_names([err.key])} more than once. "
                            "Fix: rename the duplicate key.") from None
        except ValueError:
            raise DataError(
                f"{at}: the line is not valid JSON. Fix: write one complete JSON object per line, "
                f'such as {{"{tokens_key}": ["word", ...], "{tags_key}": ["O", ...]}}.'
            ) from None
        if not isinstance(record, dict):
            raise DataError(
                f"{at}: the line holds a JSON {type(record).__name__}, not an object. "
                f'Fix: write one object per line, such as {{"{tokens_key}": [...], "{tags_key}": [...]}}.'
            )
        words, tags = (_string_list(at, record, key) for key in (tokens_key, tags_key))
        if len(words) != len(tags):
            raise DataError(
                f"{at}: {tokens_key!r} has {len(words)} items but {tags_key!r} has {len(tags)}. "
                "Fix: give exactly one tag per word."
            )
        if not words:
            raise DataError(f"{at}: the sentence is empty (no words). Fix: delete the line or fill in the sentence.")
        sentences.append([
            (f"line {number}, word {k}", number, word, tag.strip()) for k, (word, tag) in enumerate(zip(words, tags), 1)
        ])
    if not sentences:
        raise DataError(f"{where}: the file has no JSON objects. Fix: export the data again.")
    return sentences


def _string_list(at: str, record: dict, key: str) -> list[str]:
    if key not in record:
        raise DataError(
            f"{at}: the object has no key {key!r}; keys found: {_names(sorted(record))}. "
            f"Fix: name the key {key!r} in the file, or set the key the run reads to one of the keys found."
        )
    value = record[key]
    if not isinstance(value, list):
        raise DataError(f"{at}: {key!r} holds a JSON {type(value).__name__}, not a list. "
                        "Fix: write it as a list of strings, one per word.")
    for k, item in enumerate(value, start=1):
        if not isinstance(item, str):
            raise DataError(f"{at}: item {k} of {key!r} is a JSON {type(item).__name__}, not a string. "
                            "Fix: write every word and every tag as a string.")
        check_characters(at, key, item)
    return value


def _checked(
    where: str, sentences: list[list[_Word]], label_names: Sequence[str] | None, repair: str, max_words: int
) -> TokenExamples:
    allowed = None if label_names is None else frozenset(label_names)
    # problem kind -> (sort key, location) of each word that has it; the first in the file is reported.
    problems: dict[str, list[tuple[int, str]]] = {}
    repaired = 0
    tokens, tags = [], []
    for sentence in sentences:
        words, sentence_tags = [], []
        previous = "O"
        for location, key, word, tag in sentence:
            kind = None
            if not word.strip():
                kind = "empty word"
            elif not tag:
                kind = "no tag"
            elif not is_iob2_tag(tag):
                kind, tag = "bad tag", "O"  # read on as O, so the next tag is judged on its own
            elif tag.startswith("I-") and previous[2:] != tag[2:]:
                if repair == "iob2":
                    tag, repaired = "B-" + tag[2:], repaired + 1
                else:
                    kind = "entity starts with I-"
            if kind is None and allowed is not None and tag not in allowed:
                kind = "unknown tag"
            if kind is not None:
                problems.setdefault(kind, []).append((key, location))
            words.append(word)
            sentence_tags.append(tag)
            previous = tag
        tokens.append(words)
        tags.append(sentence_tags)
    if problems:
        _raise_first(where, problems, label_names)
    if repaired:
        log.warning(
            "%s: %d entities started with I- and were rewritten to start with B- (repair=iob2)", where, repaired
        )
    long = [len(words) for words in tokens if len(words) > max_words]
    if long:
        # Cutting an IOB2 sequence keeps it valid IOB2: an entity cut at the limit just ends there.
        tokens, tags = [words[:max_words] for words in tokens], [labels[:max_words] for labels in tags]
        log.warning(
            "%s: %d sentence(s) longer than %d words were cut to that length; "
            "a file without blank lines between sentences reads as one long sentence",
            where, len(long), max_words,
        )
    return TokenExamples(tokens, tags)


def _raise_first(where: str, problems: dict[str, list[tuple[int, str]]], label_names: Sequence[str] | None) -> None:
    kind, found = min(problems.items(), key=lambda item: item[1][0][0])
    what, fix = {
        "empty word": ("the word is empty", "fill in the word or delete the line"),
        "no tag": (
            "the line has a word but no tag column",
            "put the tag after the word, separated by a tab (O for a word outside any entity)",
        ),
        "bad tag": (
            "the tag is not an IOB2 tag",
            f"{_IOB2_FIX}; convert IOBES/BILOU files to IOB2, and remove any header line",
        ),
        "entity starts with I-": (
            "an entity starts with an I- tag, not B- (IOB1 tagging, or a tag whose type differs from the word "
            "before)",
            "change that I- to B- or correct the type; or, if the file is IOB1, ask the coordinator to read it "
            "with repair=iob2, which turns every such I- into B-",
        ),
        "unknown tag": (
            "the tag is not one of the run's tags",
            f"use one of {_label_list(label_names or ())}, or ask the coordinator to add the tag to the run",
        ),
    }[kind]
    others = ""
    if len(found) > 1:
        listed = ", ".join(location for _, location in found[:10]) + (", ..." if len(found) > 10 else "")
        others = f" ({len(found)} words have this problem: {listed})"
    raise DataError(f"{where}, {found[0][1]}: {what}{others}. Fix: {fix}.")


def is_iob2_tag(tag: str) -> bool:
    """Whether `tag` is "O", "B-<type>" or "I-<type>" with a type that has no spaces and no leading or trailing "-"."""
    if tag == "O":
        return True
    kind = tag[2:]
    # seqeval strips "-" around the type, so "B--X" and "B-X" would silently be one type.
    return tag[:2] in ("B-", "I-") and bool(kind) and kind == kind.strip("-") and not any(c.isspace() for c in kind)


def valid_iob2(tags: Sequence[str]) -> list[str]:
    """Predicted tags made valid IOB2: an I-X that does not continue an X entity (after B-X or I-X) starts one as
    B-X. A model predicts each word's tag alone, so it can emit what training data may not hold; scoring and
    `privet predict` both see the repaired tags."""
    out = []
    for tag in tags:
        if tag.startswith("I-") and (not out or out[-1][2:] != tag[2:]):  # "O"[2:] is no entity type
            tag = "B-" + tag[2:]
        out.append(tag)
    return out


def label_set(*examples: TokenExamples) -> tuple[str, ...]:
    """The sorted tag set of `examples` with "O" first, holding both B- and I- of every entity type seen.

    Both are added because a sample may lack one-word or multi-word entities of a type that other sites have.
    """
    types = entity_types(tag for sentences in examples for sentence in sentences.tags for tag in sentence)
    return ("O", *sorted(f"{prefix}-{kind}" for kind in types for prefix in "BI"))


def entity_types(tags) -> tuple[str, ...]:
    """The sorted entity types named by IOB2 `tags` (an iterable of tag strings, such as a run's label names)."""
    return tuple(sorted({tag[2:] for tag in tags if tag != "O"}))


def align_labels(word_ids: Sequence[int | None], word_tags: Sequence[str], tag_index: Mapping[str, int]) -> list[int]:
    """One label per sub-word token: the word's tag id at its first sub-word, IGNORE_INDEX everywhere else.

    `word_ids` is a fast tokenizer's word_ids() for one sentence (None for special tokens and padding).
    """
    labels = []
    previous = None
    for word_id in word_ids:
        first = word_id is not None and word_id != previous
        labels.append(tag_index[word_tags[word_id]] if first else IGNORE_INDEX)
        previous = word_id
    return labels


def encode_sentences(
    tokens_list: Sequence[Sequence[str]],
    tags_list: Sequence[Sequence[str]],
    tokenizer,
    max_length: int,
    label_names: Sequence[str],
    *,
    source: str = "",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids, attention_mask and labels (int64, shape (N, max_length)), truncated and padded to max_length.

    Words cut off by truncation get no label: they neither train nor count, and a warning says how many.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("token classification needs a fast (Rust) tokenizer: only it maps sub-words to words")
    if len(tokens_list) != len(tags_list):
        raise ValueError(f"{len(tokens_list)} sentences but {len(tags_list)} tag lists")
    index = {name: i for i, name in enumerate(label_names)}
    for position, (words, tags) in enumerate(zip(tokens_list, tags_list), start=1):
        if len(words) != len(tags):
            raise ValueError(f"sentence {position} has {len(words)} words but {len(tags)} tags")
        if any(tag not in index for tag in tags):
            raise DataError(
                f"{source or 'the data'}, sentence {position}: a tag is not one of the run's tags. "
                f"Fix: use one of {_label_list(label_names)}, or ask the coordinator to add the tag to the run."
            )
    if not tokens_list:
        empty = torch.zeros((0, max_length), dtype=torch.int64)
        return empty, empty.clone(), empty.clone()
    batch = tokenizer(
        [list(words) for words in tokens_list],
        is_split_into_words=True,
        truncation=True,
        padding="max_length",
        max_length=max_length,
    )
    labels, cut_sentences, cut_words = [], 0, 0
    for i, tags in enumerate(tags_list):
        word_ids = batch.word_ids(i)
        labels.append(align_labels(word_ids, tags, index))
        unlabelled = len(tags) - len({word_id for word_id in word_ids if word_id is not None})
        cut_sentences += unlabelled > 0
        cut_words += unlabelled
    if cut_words:
        log.warning(
            "%s: %d of %d sentences are longer than max-length %d tokens (or hold words the tokenizer drops); "
            "their %d words past the limit get no label. Fix: raise max-length to label them",
            source or "the data", cut_sentences, len(tags_list), max_length, cut_words,
        )
    return (
        torch.tensor(batch["input_ids"], dtype=torch.int64),
        torch.tensor(batch["attention_mask"], dtype=torch.int64),
        torch.tensor(labels, dtype=torch.int64),
    )
