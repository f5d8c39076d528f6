"""`privet predict`, `evaluate`, `ledger` and `export`, and the Python API behind them (common.inference).

A tiny federation with a separate test file checks the end-to-end path; everything else uses adapters built
directly from the tiny model, so each test takes seconds.
"""

import json
import subprocess
import sys
import sysconfig

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from opacus.accountants import create_accountant

from common import inference
from common.ledger import Ledger
from privet.cli import main
from server.simulate import simulate
from tests.model_fixtures import SEQUENCE_LABELS, TAGS, write_adapter, write_labelled_csv

TEXTS = ["my card was charged a fee", "student loan interest and debt", "the mortgage payment was late",
         " ".join(["the late mortgage payment fee"] * 10)]  # longer than max_length: truncated, as in training
SENTENCES = [["my", "bank", "account"], ["the", "money", "wire", "transfer", "was", "late"]]


@pytest.fixture(scope="module")
def adapter(tiny_model_dir, tmp_path_factory):
    return write_adapter(tiny_model_dir, tmp_path_factory.mktemp("seq-run") / "final")


@pytest.fixture(scope="module")
def ner_adapter(tiny_model_dir, tmp_path_factory):
    return write_adapter(tiny_model_dir, tmp_path_factory.mktemp("ner-run") / "final", "token-classification", TAGS,
                         max_length=12)


@pytest.fixture(scope="module")
def federation(tiny_model_dir, tmp_path_factory):
    """A 2-site, 1-round federation on a CSV, scored on a separate test CSV (the run's test-dataset)."""
    tmp = tmp_path_factory.mktemp("federation")
    train, test = write_labelled_csv(tmp / "train.csv", 120, seed=0), write_labelled_csv(tmp / "test.csv", 40, seed=1)
    simulate(2, {
        "dataset": str(train), "test-dataset": str(test), "text-column": "text", "label-column": "product",
        "model": str(tiny_model_dir), "num-server-rounds": 1, "runs-dir": str(tmp / "runs"), "run-name": "e2e",
        "batch-size": 8, "max-length": 16, "max-examples-per-site": 0, "target-epsilon": 4.0,
    }, cpus_per_site=1)
    return tmp / "runs" / "e2e", test


def privet(capsys, *args):
    """Run `privet ARGS` in this process: (exit status, stdout, stderr)."""
    status = main([str(arg) for arg in args])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def one_line_error(err, command):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"privet {command}: error: "), err
    return lines[0]


# ---- the Python API ---------------------------------------------------------------------------------------------

def test_load_takes_the_run_directory_or_its_final_and_predicts_a_label_and_probabilities(adapter):
    model = inference.load(adapter.parent)
    assert model.adapter_dir == adapter and model.labels == tuple(SEQUENCE_LABELS)
    result = model.predict(TEXTS, batch_size=3)
    assert len(result.labels) == len(TEXTS) and set(result.labels) <= set(SEQUENCE_LABELS)
    assert result.probabilities.shape == (len(TEXTS), 3)
    assert result.probabilities.sum(axis=1) == pytest.approx(1.0, abs=1e-5)
    assert [SEQUENCE_LABELS[i] for i in result.probabilities.argmax(axis=1)] == result.labels
    # Batching changes nothing: the same texts one by one give the same answers.
    single = [model.predict([text]).probabilities[0] for text in TEXTS]
    np.testing.assert_allclose(single, result.probabilities, atol=1e-5)


def test_api_prediction_is_the_trained_adapter_applied_to_the_base_model(adapter):
    """The merged model predicts what Privet's own PEFT model (as the server evaluates it) predicts."""
    from common.data import Examples
    from common.model import load_adapter, load_tokenizer
    from common.task import TASKS
    from common.train import predict

    info = inference.read_info(adapter)
    task = TASKS[info["task"]]
    peft_model = load_adapter(adapter, info["model"], 3, seed=info["seed"], head=task.head)
    tokens = task.encode(Examples(TEXTS, ["card"] * len(TEXTS)), SEQUENCE_LABELS, load_tokenizer(info["model"]),
                         info["max_length"])
    expected = [SEQUENCE_LABELS[i] for i in predict(peft_model, tokens)]
    assert inference.load(adapter).predict(TEXTS).labels == expected


def test_token_model_tags_every_word_of_every_sentence_even_past_max_length(ner_adapter):
    model = inference.load(ner_adapter)
    long_sentence = ["the", "bank", "wire", "transfer", "was", "late"] * 5  # 30 words for 12 tokens
    result = model.predict([*SENTENCES, long_sentence, "my bank fee"], batch_size=2)
    assert [len(tags) for tags in result.labels] == [3, 6, 30, 3]
    assert all(tag in TAGS for tags in result.labels for tag in tags)
    assert [p.shape for p in result.probabilities] == [(3, 5), (6, 5), (30, 5), (3, 5)]
    # A short sentence's tags do not depend on the batch it is in.
    assert model.predict([SENTENCES[1]]).labels[0] == result.labels[1]


def test_evaluate_api_reports_per_class_averages_and_a_confusion_matrix(adapter):
    model = inference.load(adapter)
    truth = ["card", "loan", "mortgage", "mortgage"]
    report = model.evaluate(TEXTS, truth)
    predicted = model.predict(TEXTS).labels
    assert report["accuracy"] == pytest.approx(sum(p == t for p, t in zip(predicted, truth)) / 4)
    assert {"card", "loan", "mortgage", "micro avg", "macro avg", "weighted avg"} <= set(report["per_class"])
    matrix = report["confusion_matrix"]["matrix"]
    assert sum(map(sum, matrix)) == 4 and sum(matrix[i][i] for i in range(3)) == round(report["accuracy"] * 4)


# ---- predict ----------------------------------------------------------------------------------------------------

def write_input(path):
    path.write_text('id,text\n1,my card was charged a fee\n2,"student loan, interest"\n\n3,the mortgage payment\n')
    return path


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".parquet"])
def test_predict_writes_the_input_rows_plus_label_and_probabilities_in_the_output_format(adapter, tmp_path, capsys,
                                                                                         suffix):
    output = tmp_path / f"out{suffix}"
    status, out, _ = privet(capsys, "predict", adapter, "--input", write_input(tmp_path / "in.csv"), "--output", output)
    assert status == 0 and "wrote 3 predictions" in out
    if suffix == ".parquet":
        rows = pq.read_table(output).to_pylist()
    elif suffix == ".jsonl":
        rows = [json.loads(line) for line in output.read_text().splitlines()]
    else:
        import csv
        rows = list(csv.DictReader(output.open(), delimiter="," if suffix == ".csv" else "\t"))
    expected = inference.load(adapter).predict(
        ["my card was charged a fee", "student loan, interest", "the mortgage payment"])
    # The CSV's id column holds plain integers: JSON lines and Parquet keep them integers, CSV and TSV write them back.
    assert [row["id"] for row in rows] == (["1", "2", "3"] if suffix in (".csv", ".tsv") else [1, 2, 3])
    assert rows[1]["text"] == "student loan, interest"
    assert [row["predicted_label"] for row in rows] == expected.labels
    for row, probabilities in zip(rows, expected.probabilities):
        assert [float(row[f"probability_{name}"]) for name in SEQUENCE_LABELS] == pytest.approx(list(probabilities),
                                                                                                abs=1e-6)


def test_predict_reads_json_lines_and_parquet_and_keeps_their_columns(adapter, tmp_path, capsys):
    source = tmp_path / "in.parquet"
    pq.write_table(pa.table({"body": ["my card fee", "the loan"], "score": [3, 4]}), source)
    status, _, _ = privet(capsys, "predict", adapter, "--input", source, "--output", tmp_path / "out.parquet",
                          "--text-column", "body")
    table = pq.read_table(tmp_path / "out.parquet")
    assert status == 0 and table.column("score").type == pa.int64()  # a Parquet round trip keeps the types
    lines = tmp_path / "in.jsonl"
    lines.write_text('{"body": "my card fee", "meta": {"a": 1}}\n{"body": "the loan", "meta": null}\n')
    status, _, _ = privet(capsys, "predict", adapter, "--input", lines, "--output", tmp_path / "out.jsonl",
                          "--text-column", "body")
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert status == 0 and rows[0]["meta"] == {"a": 1} and rows[1]["predicted_label"] in SEQUENCE_LABELS


def test_predict_tags_ner_sentences_as_conll_or_json_lines(ner_adapter, tmp_path, capsys):
    words = tmp_path / "words.txt"
    words.write_text("-DOCSTART-\n\nmy\nbank\naccount\n\nthe\tO\nmoney\tB-MONEY\nwire\nlate\nfee\n")
    status, _, _ = privet(capsys, "predict", ner_adapter, "--input", words, "--output", tmp_path / "tags.conll")
    expected = inference.load(ner_adapter).predict([["my", "bank", "account"], ["the", "money", "wire", "late", "fee"]])
    blocks = (tmp_path / "tags.conll").read_text().strip().split("\n\n")
    assert status == 0 and [[line.split("\t") for line in block.splitlines()] for block in blocks] == [
        [[word, tag] for word, tag in zip(sentence, tags)]
        for sentence, tags in zip([["my", "bank", "account"], ["the", "money", "wire", "late", "fee"]], expected.labels)]
    lines = tmp_path / "in.jsonl"
    lines.write_text('{"id": 7, "tokens": ["my", "bank", "account"]}\n')
    status, _, _ = privet(capsys, "predict", ner_adapter, "--input", lines, "--output", tmp_path / "tags.jsonl")
    row = json.loads((tmp_path / "tags.jsonl").read_text())
    assert status == 0 and row["id"] == 7 and row["predicted_tags"] == expected.labels[0]
    assert len(row["tag_probability"]) == 3 and all(0 < p <= 1 for p in row["tag_probability"])


def test_predict_errors_are_one_line_name_the_row_and_never_quote_the_data(adapter, tmp_path, capsys):
    secret = "confidential-complaint-text"
    data = tmp_path / "in.csv"
    data.write_text(f"id,text\n1,{secret}\n2,\n3,  \n")
    status, _, err = privet(capsys, "predict", adapter, "--input", data, "--output", tmp_path / "o.csv")
    line = one_line_error(err, "predict")
    assert status == 1 and "line 3" in line and "2 lines have this problem: 3, 4" in line and secret not in line
    assert not (tmp_path / "o.csv").exists()

    status, _, err = privet(capsys, "predict", adapter, "--input", data, "--output", tmp_path / "o.csv",
                            "--text-column", "body")
    assert status == 1 and "no text column 'body'; columns found: 'id', 'text'" in one_line_error(err, "predict")

    (tmp_path / "empty.csv").write_bytes(b"")
    status, _, err = privet(capsys, "predict", adapter, "--input", tmp_path / "empty.csv", "--output", tmp_path / "o.csv")
    assert status == 1 and "the file is empty" in one_line_error(err, "predict")

    status, _, err = privet(capsys, "predict", adapter, "--input", tmp_path / "missing.csv", "--output",
                            tmp_path / "o.csv")
    assert status == 1 and "does not exist" in one_line_error(err, "predict")

    status, _, err = privet(capsys, "predict", tmp_path / "no-run", "--input", data, "--output", tmp_path / "o.csv")
    assert status == 1 and "give a run directory" in one_line_error(err, "predict")

    status, _, err = privet(capsys, "predict", adapter, "--input", data, "--output", tmp_path / "o.xlsx")
    assert status == 1 and "cannot write the predictions as '.xlsx'" in one_line_error(err, "predict")


def test_predict_never_overwrites_the_input_or_an_existing_file_unless_forced(adapter, tmp_path, capsys):
    data = write_input(tmp_path / "in.csv")
    before = data.read_text()
    status, _, err = privet(capsys, "predict", adapter, "--input", data, "--output", data, "--force")
    assert status == 1 and "would overwrite the input" in one_line_error(err, "predict") and data.read_text() == before
    (tmp_path / "old.csv").write_text("keep")
    status, _, err = privet(capsys, "predict", adapter, "--input", data, "--output", tmp_path / "old.csv")
    assert status == 1 and "--force" in one_line_error(err, "predict") and (tmp_path / "old.csv").read_text() == "keep"
    assert privet(capsys, "predict", adapter, "--input", data, "--output", tmp_path / "old.csv", "--force")[0] == 0


def test_predict_refuses_a_base_model_with_other_weights(adapter, tmp_path, capsys):
    from tests.conftest import write_tiny_model

    other = write_tiny_model(tmp_path / "other-model")
    # One more byte: a different weights file (to the SHA-256), as a base model retrained or swapped would be.
    (other / "model.safetensors").write_bytes((other / "model.safetensors").read_bytes() + b" ")
    status, _, err = privet(capsys, "predict", adapter, "--input", write_input(tmp_path / "in.csv"), "--output",
                            tmp_path / "o.csv", "--model", other)
    assert status == 1 and "not the one this run trained on" in one_line_error(err, "predict")


# ---- evaluate ---------------------------------------------------------------------------------------------------

def test_evaluate_prints_the_report_and_writes_json_and_a_confusion_matrix_png(adapter, tmp_path, capsys):
    data = write_labelled_csv(tmp_path / "test.csv", 30, seed=3)
    status, out, _ = privet(capsys, "evaluate", adapter, "--data", data, "--text-column", "text", "--label-column",
                            "product", "--out", tmp_path / "eval")
    assert status == 0
    for name in (*SEQUENCE_LABELS, "micro avg", "macro avg", "weighted avg", "accuracy", "confusion matrix"):
        assert name in out
    report = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert report["examples"] == 30 and sum(map(sum, report["confusion_matrix"]["matrix"])) == 30
    assert report["confusion_matrix"]["labels"] == SEQUENCE_LABELS
    assert (tmp_path / "eval" / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_errors_name_the_problem_in_one_line(adapter, tmp_path, capsys):
    secret = "secret-product-name"
    data = tmp_path / "labelled.csv"
    data.write_text(f"text,product\nmy card fee,card\nthe loan,{secret}\nthe fee,{secret}\n")
    status, _, err = privet(capsys, "evaluate", adapter, "--data", data, "--text-column", "text", "--label-column",
                            "product")
    line = one_line_error(err, "evaluate")
    assert status == 1 and secret not in line and "data row 2" in line and "2 data rows have this problem" in line
    assert "The run has 3 labels: 'card', 'loan', 'mortgage'" in line

    status, _, err = privet(capsys, "evaluate", adapter, "--data", data, "--text-column", "text", "--label-column",
                            "label")
    assert status == 1 and "no label column 'label'" in one_line_error(err, "evaluate")
    status, _, err = privet(capsys, "evaluate", adapter, "--data", data)
    assert status == 1 and "--text-column and --label-column" in one_line_error(err, "evaluate")
    (tmp_path / "empty.csv").write_bytes(b"")
    status, _, err = privet(capsys, "evaluate", adapter, "--data", tmp_path / "empty.csv", "--text-column", "text",
                            "--label-column", "product")
    assert status == 1 and "the file is empty" in one_line_error(err, "evaluate")
    status, _, err = privet(capsys, "evaluate", adapter, "--data", tmp_path / "nope.csv", "--text-column", "text",
                            "--label-column", "product")
    assert status == 1 and "does not exist" in one_line_error(err, "evaluate")


def test_evaluate_scores_ner_entities_with_seqeval_and_rejects_unknown_tags(ner_adapter, tmp_path, capsys):
    data = tmp_path / "test.conll"
    data.write_text("my\tO\nbank\tB-BANK\naccount\tO\n\nthe\tO\nmoney\tB-MONEY\nwire\tI-MONEY\n")
    status, out, _ = privet(capsys, "evaluate", ner_adapter, "--data", data, "--out", tmp_path / "eval")
    report = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert status == 0 and "seqeval" in out and report["words"] == 6
    assert {"BANK", "MONEY", "micro avg"} <= set(report["per_type"]) and len(report["confusion_matrix"]["matrix"]) == 5
    data.write_text("my\tO\nbank\tB-ACCOUNT\n")
    status, _, err = privet(capsys, "evaluate", ner_adapter, "--data", data)
    line = one_line_error(err, "evaluate")
    assert status == 1 and "sentence 1" in line and "The run has 5 tags" in line and "ACCOUNT" not in line


# ---- a federation with a test file, then every command on its result ----------------------------------------------

def test_a_run_with_a_test_file_scores_every_round_on_it_and_writes_the_final_evaluation(federation):
    run, _ = federation
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [row["global_source"] for row in rows] == ["server-test-split"]
    final = json.loads((run / "final_evaluation.json").read_text())
    assert final["test_examples"] == 40 and set(final["per_class"]) >= set(SEQUENCE_LABELS)


def test_evaluate_on_the_test_file_reproduces_the_runs_final_evaluation(federation, tmp_path, capsys):
    run, test = federation
    status, _, _ = privet(capsys, "evaluate", run / "final", "--data", test, "--text-column", "text",
                          "--label-column", "product", "--out", tmp_path)
    ours = json.loads((tmp_path / "evaluation.json").read_text())
    server = json.loads((run / "final_evaluation.json").read_text())
    # The merged adapter equals the server's PEFT model up to float rounding: at most a near tie may flip.
    assert status == 0 and ours["examples"] == server["test_examples"]
    assert ours["accuracy"] == pytest.approx(server["accuracy"], abs=1 / 40 + 1e-9)


@pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha", "ignore:divide by zero")
def test_ledger_statement_matches_opacus_and_its_json_parses(federation, tmp_path, capsys):
    run, _ = federation
    path = run / "sites" / "site-0" / "ledger.json"
    raw = json.loads(path.read_text())
    accountant = create_accountant(mechanism=raw["accountant"])
    accountant.history = [tuple(entry) for entry in raw["history"]]
    epsilon = accountant.get_epsilon(delta=raw["delta"])
    status, out, _ = privet(capsys, "ledger", path, "--json")
    statement = json.loads(out)
    assert status == 0 and statement["epsilon"] == pytest.approx(epsilon, rel=1e-9) and statement["epsilon_matches"]
    assert statement["delta"] == raw["delta"] and statement["releases"] == len(raw["rounds"])
    assert statement["runs"][0]["run"] == "e2e" and statement["runs"][0]["releases"]["train"] == 1
    status, out, _ = privet(capsys, "ledger", path)
    assert status == 0 and f"{epsilon:.4f}" in out and "they match" in out and "one record" in out
    assert "operating system's entropy" in out and "pass --policy" in out


def write_policy(path, ledger, cap=8.0):
    path.write_text(f'site-id = "site-0"\ndata-path = "train.csv"\ntext-column = "text"\nlabel-column = "product"\n'
                    f'epsilon-cap = {cap}\ndelta = 1e-5\nledger-path = "{ledger}"\nallowed-models = ["{"0" * 64}"]\n'
                    "max-rounds = 10\n")
    return path


def test_ledger_with_a_policy_states_the_cap_and_what_is_left(federation, tmp_path, capsys):
    run, _ = federation
    ledger = run / "sites" / "site-0" / "ledger.json"
    policy = write_policy(tmp_path / "policy.toml", ledger)
    status, out, _ = privet(capsys, "ledger", "--policy", policy, "--json")
    statement = json.loads(out)
    assert status == 0 and statement["epsilon_cap"] == 8.0
    assert statement["epsilon_left"] == pytest.approx(8.0 - statement["epsilon"])
    status, out, _ = privet(capsys, "ledger", ledger, "--policy", policy)
    assert status == 0 and "Cap: ε 8" in out and f"left: {8.0 - statement['epsilon']:.4f}" in out
    # A site that has not trained yet: no ledger file, ε = 0, the whole cap left.
    fresh = write_policy(tmp_path / "fresh.toml", tmp_path / "none" / "ledger.json", cap=2.0)
    statement = json.loads(privet(capsys, "ledger", "--policy", fresh, "--json")[1])
    assert statement["epsilon"] == 0.0 and statement["epsilon_left"] == 2.0 and statement["releases"] == 0


def test_ledger_flags_a_stored_epsilon_its_history_does_not_give_and_a_round_without_dp(tmp_path, capsys):
    path = tmp_path / "ledger.json"
    with Ledger.locked(path, delta=1e-5, site="site-x") as ledger:
        ledger.record("r", 1, "train", (1.0, 0.1, 10))
    raw = json.loads(path.read_text())
    raw["epsilon"] = raw["epsilon"] / 2  # tampered
    path.write_text(json.dumps(raw))
    status, out, _ = privet(capsys, "ledger", path)
    assert status == 0 and "they DIFFER" in out
    with Ledger.locked(path, delta=1e-5) as ledger:
        ledger.record("r", 2, "train", None)
    statement = json.loads(privet(capsys, "ledger", path, "--json")[1])
    assert statement["private"] is False and statement["epsilon"] is None
    assert "No differential-privacy guarantee" in privet(capsys, "ledger", path)[1]


def test_ledger_errors_are_one_line(tmp_path, capsys):
    status, _, err = privet(capsys, "ledger", tmp_path / "missing.json")
    assert status == 1 and "no ledger there" in one_line_error(err, "ledger")
    (tmp_path / "data.json").write_text('{"text": "not a ledger"}')
    status, _, err = privet(capsys, "ledger", tmp_path / "data.json")
    assert status == 1 and "expected 'privet-ledger/1'" in one_line_error(err, "ledger")
    status, _, err = privet(capsys, "ledger")
    assert status == 1 and "--policy" in one_line_error(err, "ledger")


def test_export_of_the_run_carries_a_model_card_with_epsilon_per_site_and_the_test_metrics(federation, tmp_path,
                                                                                          capsys):
    run, _ = federation
    status, out, _ = privet(capsys, "export", run / "final", tmp_path / "exported")
    assert status == 0 and "trust_remote_code=True" in out
    card = (tmp_path / "exported" / "README.md").read_text()
    facts = json.loads((tmp_path / "exported" / "model-card.json").read_text())
    for site in ("site-0", "site-1"):
        ledger = json.loads((run / "sites" / site / "ledger.json").read_text())
        assert f"| {site} | {ledger['epsilon']:.4g} | 1e-05 | {ledger['accountant']} | ledger |" in card
    final = json.loads((run / "final_evaluation.json").read_text())
    assert f"accuracy {final['accuracy']:.4f}" in card and facts["evaluation"] == final
    assert facts["dataset"] == "train.csv" and str(run.parent) not in card  # no server-side directories
    status, _, err = privet(capsys, "export", run / "final", tmp_path / "exported")
    assert status == 1 and "--force" in one_line_error(err, "export")
    assert privet(capsys, "export", run / "final", tmp_path / "exported", "--force")[0] == 0


# ---- export: the exported model without Privet --------------------------------------------------------------------

OUTSIDE_PRIVET = """
import json, sys
sys.path.append(sys.argv[1])  # site-packages only: this checkout is not on the path
for name in ("common", "server", "client"):
    try:
        __import__(name)
    except ImportError:
        pass
    else:
        raise SystemExit(f"{name} is importable: the test would not show the export stands alone")
import torch
from transformers import AutoTokenizer, AutoModelForSequenceClassification, AutoModelForTokenClassification
inputs = json.loads(sys.argv[2])
tokenizer = AutoTokenizer.from_pretrained(".")
if sys.argv[3] == "sequence":
    model, info = AutoModelForSequenceClassification.from_pretrained(".", trust_remote_code=True,
                                                                     output_loading_info=True)
    batch = tokenizer(inputs, truncation=True, padding=True, return_tensors="pt")
    with torch.no_grad():
        probabilities = model.eval()(**batch).logits.softmax(dim=-1)
    out = {"labels": [model.config.id2label[int(i)] for i in probabilities.argmax(dim=-1)],
           "probabilities": probabilities.tolist()}
else:
    model, info = AutoModelForTokenClassification.from_pretrained(".", output_loading_info=True)
    out = {"labels": []}
    for words in inputs:
        batch = tokenizer(words, is_split_into_words=True, truncation=True, return_tensors="pt")
        with torch.no_grad():
            ids = model.eval()(**batch).logits[0].argmax(dim=-1)
        tags, seen = [], set()
        for position, word in enumerate(batch.word_ids()):
            if word is not None and word not in seen:
                seen.add(word)
                tags.append(model.config.id2label[int(ids[position])])
        # The model card's IOB2 step: an I-X that would start an entity becomes B-X.
        tags = [f"B-{t[2:]}" if t.startswith("I-") and (i == 0 or tags[i - 1][2:] != t[2:]) else t
                for i, t in enumerate(tags)]
        out["labels"].append(tags)
out["class"] = type(model).__name__
out["missing"] = sorted(info["missing_keys"])
out["unexpected"] = sorted(info["unexpected_keys"])
print(json.dumps(out))
"""


def load_outside_privet(directory, inputs, kind, tmp_path):
    """Load an export in a fresh interpreter whose path holds site-packages but not this checkout, and predict."""
    site_packages = sysconfig.get_paths()["purelib"]
    # -S: no site module, so neither the editable install's finder nor PYTHONPATH can bring Privet back in.
    result = subprocess.run(
        [sys.executable, "-S", "-c", OUTSIDE_PRIVET, site_packages, json.dumps(inputs), kind], cwd=directory,
        capture_output=True, text=True, timeout=300,
        env={"HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "hf-modules"), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_exported_text_classifier_predicts_like_privet_without_privet(adapter, tmp_path, capsys):
    assert privet(capsys, "export", adapter, tmp_path / "model")[0] == 0
    outside = load_outside_privet(tmp_path / "model", TEXTS, "sequence", tmp_path)
    ours = inference.load(adapter).predict(TEXTS)
    assert outside["class"] == "PrivetMeanPoolForSequenceClassification"
    assert outside["missing"] == [] and outside["unexpected"] == []
    assert outside["labels"] == ours.labels
    np.testing.assert_allclose(outside["probabilities"], ours.probabilities, atol=1e-5)


def test_exported_token_classifier_is_a_standard_transformers_model_that_tags_like_privet(ner_adapter, tmp_path,
                                                                                          capsys):
    assert privet(capsys, "export", ner_adapter, tmp_path / "model")[0] == 0
    assert not (tmp_path / "model" / "modeling_privet.py").exists()  # no remote code for a stock head
    outside = load_outside_privet(tmp_path / "model", SENTENCES, "tokens", tmp_path)
    assert outside["class"] == "BertForTokenClassification"
    assert outside["missing"] == [] and outside["unexpected"] == []
    assert outside["labels"] == inference.load(ner_adapter).predict(SENTENCES).labels
    card = (tmp_path / "model" / "README.md").read_text()
    assert "AutoModelForTokenClassification.from_pretrained" in card and "No final evaluation" in card


def test_export_refuses_to_replace_a_directory_that_is_not_an_export(adapter, tmp_path, capsys):
    precious = tmp_path / "documents"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep")
    status, _, err = privet(capsys, "export", adapter, precious, "--force")
    assert status == 1 and "not an earlier Privet export" in one_line_error(err, "export")
    assert (precious / "notes.txt").read_text() == "keep"
