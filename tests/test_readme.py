"""The README as a test: its user-facing commands, taken from its code blocks and run as written in a fresh directory
(only a tiny model and tiny data are put in through the documented options), checked for their exit status, for
one-line user errors, and for privacy documents that say what the sites' ledgers say.

One federation (the own-CSV walk-through, 3 sites, 1 round) is shared by every check; the bad inputs stop before
anything starts, so the module takes well under a minute.
"""

import json
import os
import random
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from privet.cli import main
from tests.model_fixtures import TAGS, write_adapter

pytestmark = pytest.mark.readme

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
PREFIX = ".venv/bin/privet "
LABELS = {"card": "card fee charge fraud", "loan": "loan student debt interest", "mortgage": "mortgage payment late"}


def commands() -> list[str]:
    """Every `.venv/bin/privet …` line of the README's bash blocks, continuation lines joined, comments dropped."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith(PREFIX):
                found.append(line)
    return found


def command(*needles: str) -> str:
    """The one README command holding every needle."""
    matches = [line for line in commands() if all(needle in line for needle in needles)]
    assert len(matches) == 1, f"README commands with {needles}: {matches}"
    return matches[0]


def argv(line: str, extra_config: str = "") -> list[str]:
    """The command's arguments after `privet`; `extra_config` is appended to its --run-config (the tiny model)."""
    args = shlex.split(line.removeprefix(PREFIX))
    if extra_config:
        at = args.index("--run-config") + 1
        args[at] = f"{args[at]} {extra_config}"
    return args


def privet(capsys, args: list[str]) -> tuple[int, str, str]:
    """Run `privet ARGS` in this process: (exit status, stdout, stderr)."""
    status = main(args)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def one_line_error(status: int, err: str, command_name: str) -> str:
    lines = err.strip().splitlines()
    assert status == 1 and len(lines) == 1 and lines[0].startswith(f"privet {command_name}: error: "), (status, err)
    return lines[0]


def write_csv(path: Path, n: int, seed: int, labelled: bool = True) -> None:
    rng = random.Random(seed)
    rows = ["id,text,label" if labelled else "id,text"]
    for i in range(n):
        label = rng.choice(sorted(LABELS))
        words = LABELS[label].split() + "the my bank account was not".split()
        text = " ".join(rng.choice(words) for _ in range(8))
        rows.append(f"{i},{text},{label}" if labelled else f"{i},{text}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(rows) + "\n")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_model_dir):
    """A fresh directory holding data/train.csv, data/test.csv and new.csv, where the README's walk-through ran."""
    work = tmp_path_factory.mktemp("readme")
    write_csv(work / "data" / "train.csv", 150, seed=0)
    write_csv(work / "data" / "test.csv", 45, seed=1)
    write_csv(work / "new.csv", 12, seed=2, labelled=False)
    before = Path.cwd()
    os.chdir(work)
    try:
        assert main(argv(command("run-name='mine'"), tiny_config(tiny_model_dir))) == 0
    finally:
        os.chdir(before)
    return work


def tiny_config(model_dir) -> str:
    return f"model='{model_dir}' num-server-rounds=1 batch-size=8 max-length=16 max-examples-per-site=0"


@pytest.fixture(autouse=True)
def in_workdir(request, monkeypatch):
    if "workdir" in request.fixturenames:
        monkeypatch.chdir(request.getfixturevalue("workdir"))


def ledgers(run: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(run.glob("sites/*/ledger.json"))}


def ledger_noise(run: Path, kind: str) -> set[float]:
    """The noise multipliers the sites' ledgers record for one kind of release of the run."""
    return {entry["noise_multiplier"] for ledger in ledgers(run).values() for entry in ledger["rounds"]
            if entry["run"] == run.name and entry["kind"] == kind}


def stated_noise(text: str, name: str) -> set[float]:
    """The noise multipliers a document states for a kind of release ("DP evaluation: … multiplier(s) 5.3, 6.1.")."""
    found = re.search(rf"{name}: \d+ release\(s\)[^\n]*?noise multiplier\(s\) ([\d., ]+?)\.(\s|$|<)", text)
    assert found, f"no statement on {name}"
    return {float(value) for value in found.group(1).split(", ")}


# ---- the walk-through ---------------------------------------------------------------------------------------------

def test_the_own_csv_run_trains_and_its_metrics_line_prints(workdir):
    run = workdir / "runs" / "mine"
    assert (run / "final" / "privet.json").is_file() and (run / "final_evaluation.json").is_file()
    line = next(line for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S)
                for line in block.splitlines() if line.startswith("python -c") and "metrics.jsonl" in line)
    out = subprocess.run([sys.executable, *shlex.split(line)[1:]], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["1", *out.split()[1:3], "server-test-split"]


def test_evaluate_reproduces_the_final_evaluation(workdir, capsys):
    status, out, _ = privet(capsys, argv(command("privet evaluate runs/mine/final")))
    assert status == 0
    written = json.loads((workdir / "runs/mine/eval/evaluation.json").read_text())
    final = json.loads((workdir / "runs/mine/final_evaluation.json").read_text())
    assert written["accuracy"] == pytest.approx(final["accuracy"], abs=1 / 45 + 1e-9)


def test_predict_writes_every_row_and_keeps_an_integer_id_an_integer(workdir, capsys):
    assert privet(capsys, argv(command("--input new.csv --output predictions.csv")))[0] == 0
    assert len((workdir / "predictions.csv").read_text().splitlines()) == 13
    status, _, _ = privet(capsys, ["predict", "runs/mine/final", "--input", "new.csv", "--output", "predictions.jsonl"])
    rows = [json.loads(line) for line in (workdir / "predictions.jsonl").read_text().splitlines()]
    assert status == 0 and [row["id"] for row in rows] == list(range(12))


def test_ner_predict_emits_valid_iob2(workdir, tiny_model_dir, capsys):
    write_adapter(tiny_model_dir, workdir / "runs" / "ner" / "final", "token-classification", TAGS, max_length=12)
    words = "my bank account wire transfer money was late the fee".split()
    (workdir / "sentences.conll").write_text("\n\n".join("\n".join(words[i:] + words[:i]) for i in range(10)) + "\n")
    assert privet(capsys, argv(command("--input sentences.conll --output tagged.conll")))[0] == 0
    tagged = (workdir / "tagged.conll").read_text().split("\n\n")
    for sentence in tagged:
        tags = [line.split("\t")[1] for line in sentence.strip().splitlines()]
        for before, tag in zip(["O", *tags], tags):
            assert not tag.startswith("I-") or before[2:] == tag[2:], tags


def test_ledger_prints_the_statement(workdir, capsys):
    status, out, _ = privet(capsys, argv(command("privet ledger runs/mine/sites/site-0/ledger.json")))
    assert status == 0 and "DP evaluation" in out


def test_export_model_card_states_what_the_ledgers_record(workdir, capsys):
    assert privet(capsys, argv(command("privet export runs/mine/final exported/mine")))[0] == 0
    card = (workdir / "exported/mine/README.md").read_text()
    run = workdir / "runs/mine"
    for kind, name in (("evaluate", "DP evaluation"), ("count", "DP example count"), ("train", "DP-SGD training")):
        assert stated_noise(card, name) == ledger_noise(run, kind)
    # The default recipe trains only the head: the card says so, with the head's settings, and no fixed sentences.
    assert "head-only round(s) 1" in card and "head-epochs=10" in card and "LoRA round(s)" not in card
    assert "without DP" not in card and "each trained a LoRA adapter" not in card


def test_audit_on_the_run_fits_the_site_and_lands_in_the_report(workdir, capsys):
    # The README gives the simulated-site audit inline: `privet audit --run-dir runs/<run-name> --site 0 --sites 4`.
    inline = re.search(r"`(privet audit --run-dir runs/<run-name> [^`]*)`", README).group(1)
    status, out, err = privet(capsys, shlex.split(inline.replace("<run-name>", "mine"))[1:])
    assert status == 0, err
    assert (workdir / "runs/mine/audit.json").is_file()
    report = (workdir / "runs/mine/report.md").read_text()
    assert "Verdict: " in report and "No audit in this run directory" not in report


def test_report_states_what_the_ledgers_record(workdir, capsys):
    assert privet(capsys, ["report", "runs/mine"])[0] == 0
    run = workdir / "runs/mine"
    for path in (run / "report.md", run / "report.html"):
        text = path.read_text()
        assert stated_noise(text, "DP evaluation") == ledger_noise(run, "evaluate")
        assert stated_noise(text, "DP example count") == ledger_noise(run, "count")
        assert "1 of 1 planned rounds trained" in text
    assert "&lt;" not in (run / "report.md").read_text()


def test_rerunning_a_used_name_says_what_to_do_in_one_line(workdir, tiny_model_dir):
    """Through the real front door (`python -m privet`): stderr holds exactly one line, no traceback."""
    args = argv(command("run-name='mine'"), tiny_config(tiny_model_dir))
    done = subprocess.run([sys.executable, "-m", "privet", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    line = one_line_error(done.returncode, done.stderr, "simulate")
    assert "already holds run 'mine'" in line and "resume=true" in line and "delete" in line


# ---- bad inputs: one line, status 1, nothing left behind ------------------------------------------------------------

@pytest.mark.parametrize("extra, needle", [
    ("model='/nonexistent/model' run-name='nomodel'", "model '/nonexistent/model' is not a directory on this machine"),
    ("dataset='data/missing.csv' text-column='text' label-column='label' run-name='nodata'",
     "data/missing.csv: the data file does not exist"),
    ("run-name=unquoted", "run-name must be a string in quotes"),
    ("num-server-rounds=many", "num-server-rounds must be a whole number"),
])
def test_a_bad_input_is_one_line_and_leaves_no_run_directory(workdir, tiny_model_dir, capsys, extra, needle):
    # The demo-shaped command (bundled data) with the mistake appended: it stops before Ray starts.
    status, _, err = privet(capsys, argv(command("run-name='eps3'"), f"model='{tiny_model_dir}' {extra}"))
    assert needle in one_line_error(status, err, "simulate")
    assert not any((workdir / "runs" / name).exists() for name in ("eps3", "nomodel", "nodata", "unquoted"))


def test_predict_with_a_missing_model_names_the_option_given(workdir, capsys):
    status, _, err = privet(capsys, [*argv(command("--input new.csv --output predictions.csv")), "--force",
                                     "--model", "/nonexistent/model"])
    line = one_line_error(status, err, "predict")
    assert "'/nonexistent/model' is not a directory on this machine" in line and "pass --model" not in line


def test_the_readme_simulates_with_privet_simulate_not_flwr_run():
    blocks = "".join(re.findall(r"```bash\n(.*?)```", README, flags=re.S))
    assert "flwr run . --stream" not in blocks and "privet simulate" in blocks
