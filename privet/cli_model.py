"""`privet predict`, `evaluate`, `ledger` and `export`: their parsers and handlers (the work is in common.inference,
common.prediction_files, common.export and privet.ledger_statement).

Errors a user can fix raise one of the project's user-error types, which `privet` prints in one line with exit
status 1 (privet.cli.user_errors). Messages point at files, columns and row numbers, never at a text or a label
from the data.
"""

from __future__ import annotations

import argparse
import io
import json
import time
from pathlib import Path

from common.prediction_files import (CONLL_SUFFIXES, JSON_SUFFIXES, PREDICTED_TAGS, TABLE_SUFFIXES, TAG_PROBABILITY,
                                     read_sentences, read_table, write_table, write_tags)

PREDICTED = "predicted_label"
PROBABILITY = "probability_{}"
PLOT_FILE, REPORT_FILE = "confusion_matrix.png", "evaluation.json"


def add_commands(subparsers) -> None:
    """Register predict, evaluate, ledger and export on `privet`'s subparsers."""
    _add_predict(subparsers)
    _add_evaluate(subparsers)
    _add_ledger(subparsers)
    _add_export(subparsers)


def _add_model_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("adapter", type=Path, metavar="RUN_DIR/final",
                        help="a run's adapter directory (final/ or round-<n>/), or the run directory")
    parser.add_argument("--model", default=None, metavar="DIR",
                        help="a local copy of the run's base model, when the path in privet.json is not on this "
                        "machine (its weights must have the run's SHA-256)")
    parser.add_argument("--batch-size", type=int, default=64, help="texts per forward pass (default 64)")


def _add_predict(subparsers) -> None:
    parser = subparsers.add_parser(
        "predict", help="predict labels (or NER tags) for a file of texts with a run's model",
        description="Write the input rows plus the predicted label and one probability column per class "
        f"({PREDICTED}, {PROBABILITY.format('<label>')}); the output's format follows its suffix "
        "(.csv .tsv .jsonl .parquet). For a token-classification run the input is CoNLL (one word per line, a blank "
        "line between sentences) or JSON lines with a word list, and the output CoNLL (word<TAB>tag) or JSON lines "
        f"(the input objects plus {PREDICTED_TAGS} and {TAG_PROBABILITY}). Uses the GPU when there is one.",
    )
    _add_model_argument(parser)
    parser.add_argument("--input", type=Path, required=True, help="the file to predict")
    parser.add_argument("--output", type=Path, required=True, help="where to write the predictions")
    parser.add_argument("--text-column", default=None,
                        help="the column (JSON key) holding the text; default 'text', or 'tokens' for NER")
    parser.add_argument("--force", action="store_true", help="overwrite the output file")
    parser.set_defaults(handler=_run_predict)


def _add_evaluate(subparsers) -> None:
    parser = subparsers.add_parser(
        "evaluate", help="score a run's model on a labelled file: report and confusion matrix",
        description="Print the classification report (per class, micro/macro/weighted averages; for NER the "
        f"seqeval entity report) and the confusion matrix; with --out, write {REPORT_FILE} and {PLOT_FILE}.",
    )
    _add_model_argument(parser)
    parser.add_argument("--data", type=Path, required=True, help="the labelled file (the formats training reads)")
    parser.add_argument("--text-column", default=None, help="the text column (NER JSON lines: the word-list key, "
                        "default 'tokens')")
    parser.add_argument("--label-column", default=None, help="the label column (NER JSON lines: the tag-list key, "
                        "default 'tags')")
    parser.add_argument("--out", type=Path, default=None, help=f"directory to write {REPORT_FILE} and {PLOT_FILE}")
    parser.set_defaults(handler=_run_evaluate)


def _add_ledger(subparsers) -> None:
    parser = subparsers.add_parser(
        "ledger", help="a site's privacy statement from its ledger, in plain words",
        description="State a site's privacy guarantee: ε recomputed from the ledger's history with Opacus' "
        "accountant (and whether it matches the stored ε), δ, the unit protected, every release by run and kind, "
        "and, with --policy, the site's cap and what is left.",
    )
    parser.add_argument("path", type=Path, nargs="?", default=None, metavar="PATH", help="the ledger.json")
    parser.add_argument("--policy", type=Path, default=None,
                        help="the site policy (names ledger-path and epsilon-cap); PATH may then be left out")
    parser.add_argument("--json", action="store_true", help="print the statement as JSON, for scripts")
    parser.set_defaults(handler=_run_ledger)


def _add_export(subparsers) -> None:
    parser = subparsers.add_parser(
        "export", help="write a run's model as a self-contained transformers model directory",
        description="Merge the LoRA adapter into the base encoder and write a transformers model directory "
        "(weights, head, tokenizer, label names, README.md model card with ε per site, data and metrics) that "
        "loads without Privet: AutoModelForTokenClassification.from_pretrained(OUT) for NER, "
        "AutoModelForSequenceClassification.from_pretrained(OUT, trust_remote_code=True) for text classification.",
    )
    parser.add_argument("adapter", type=Path, metavar="RUN_DIR/final", help="a run's adapter directory, or the run")
    parser.add_argument("out", type=Path, metavar="OUT", help="the directory to create")
    parser.add_argument("--model", default=None, metavar="DIR", help="a local copy of the run's base model")
    parser.add_argument("--force", action="store_true", help="replace an earlier export at OUT")
    parser.set_defaults(handler=_run_export)


def _load(args):
    """The run's model, with transformers' own progress bars off (they would print on every load)."""
    from transformers.utils import logging as transformers_logging

    from common import inference

    transformers_logging.disable_progress_bar()
    if args.batch_size < 1:
        raise inference.InferenceError(f"--batch-size {args.batch_size} must be at least 1")
    return inference.load(args.adapter, model=args.model)


# ---- predict -------------------------------------------------------------------------------------------------

def _run_predict(args) -> None:
    from common import inference
    from common.data import DataError

    if args.output.exists() and args.input.exists() and args.output.resolve() == args.input.resolve():
        raise DataError(f"{args.output}: the output would overwrite the input. Fix: choose another output file.")
    if args.output.exists() and not args.force:
        raise FileExistsError(f"{args.output} already exists; choose another output file or pass --force")
    # The input is read and checked before the model loads: a mistake in it shows at once.
    info = inference.read_info(inference.adapter_dir(args.adapter))
    if info["task"] == "sequence-classification":
        _check_suffix(args.output, TABLE_SUFFIXES, "the predictions")
        table = read_table(args.input, args.text_column or "text")
        new = [PREDICTED, *(PROBABILITY.format(label) for label in info["labels"])]
        clash = [name for name in new if name in table.columns]
        if clash:
            raise DataError(f"{args.input}: the input already has a column {clash[0]!r}, which predict writes. "
                            "Fix: rename or drop that column (e.g. predictions from an earlier run).")
        inputs = table.texts
    else:
        _check_suffix(args.output, CONLL_SUFFIXES + JSON_SUFFIXES, "NER predictions")
        inputs, records = read_sentences(args.input, args.text_column or "tokens")
    model = _load(args)
    started = time.perf_counter()
    result = model.predict(inputs, batch_size=args.batch_size, progress=True)
    seconds = time.perf_counter() - started
    if model.task == "sequence-classification":
        for row, label, probabilities in zip(table.rows, result.labels, result.probabilities):
            row[PREDICTED] = label
            row.update({PROBABILITY.format(name): round(float(p), 6) for name, p in zip(model.labels, probabilities)})
        write_table(args.output, table, new)
    else:
        write_tags(args.output, inputs, records, result)
    unit = "texts" if model.task == "sequence-classification" else "sentences"
    print(f"wrote {len(inputs)} predictions to {args.output} "
          f"({len(inputs) / max(seconds, 1e-9):.1f} {unit}/s on {model.device})")


def _check_suffix(path: Path, allowed: tuple[str, ...], what: str) -> None:
    from common.data import DataError

    if path.suffix.lower() not in allowed:
        raise DataError(f"{path}: cannot write {what} as {path.suffix or '(no extension)'!r}. "
                        f"Fix: give the output one of the suffixes {', '.join(dict.fromkeys(allowed))}.")


# ---- evaluate ------------------------------------------------------------------------------------------------

def _run_evaluate(args) -> None:
    from common import inference
    from common.data import DataError, read_examples
    from common.token_data import read_token_examples

    info = inference.read_info(inference.adapter_dir(args.adapter))
    names = set(info["labels"])
    if info["task"] == "sequence-classification":
        if not (args.text_column and args.label_column):
            raise DataError("this run classifies texts: pass --text-column and --label-column (the file's columns)")
        examples = read_examples(args.data, args.text_column, args.label_column)
        inputs, labels = examples.texts, examples.labels
        outside = [n for n, label in enumerate(labels, start=1) if label not in names]
        values = {label for label in labels if label not in names}
        unit, kind = "data row", "label"
    else:
        examples = read_token_examples(args.data, tokens_key=args.text_column or "tokens",
                                       tags_key=args.label_column or "tags")
        inputs, labels = examples.tokens, examples.tags
        outside = [n for n, tags in enumerate(labels, start=1) if any(tag not in names for tag in tags)]
        values = {tag for tags in labels for tag in tags if tag not in names}
        unit, kind = "sentence", "tag"
    if outside:
        listed = ", ".join(str(n) for n in outside[:10]) + (", ..." if len(outside) > 10 else "")
        others = f" ({len(outside)} {unit}s have this problem: {listed})" if len(outside) > 1 else ""
        raise DataError(
            f"{args.data}, {unit} {outside[0]} (counted from 1 in file order): a {kind} is not in the run's {kind} "
            f"set{others}; the file holds {len(values)} {kind} value(s) the run lacks. The run has {len(names)} "
            f"{kind}s: {', '.join(repr(name) for name in info['labels'])}. Fix: map those {kind}s onto the run's, "
            "or drop those rows: the model cannot predict any other."
        )
    model = _load(args)
    result = model.evaluate(inputs, labels, batch_size=args.batch_size, progress=True)
    result.update(data=str(args.data), adapter=str(model.adapter_dir))
    print(format_report(result))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        from common.files import write_json_atomic

        write_json_atomic(args.out / REPORT_FILE, result)
        (args.out / PLOT_FILE).write_bytes(confusion_png(result["confusion_matrix"]))
        print(f"wrote {args.out / REPORT_FILE} and {args.out / PLOT_FILE}")


def format_report(result: dict) -> str:
    """The evaluation as a text table: per class (or entity type), the averages, then the confusion matrix."""
    sequence = result["task"] == "sequence-classification"
    per = result["per_class"] if sequence else result["per_type"]
    classes = [(name, row) for name, row in per.items() if isinstance(row, dict) and not name.endswith(" avg")]
    averages = [(name, per[name]) for name in ("micro avg", "macro avg", "weighted avg") if name in per]
    width = max([12, *(len(name) for name, _ in classes)]) + 2
    lines = [f"{result['adapter']} on {result['data']}: {result['examples']} "
             f"{'examples' if sequence else 'sentences'}"
             + ("" if sequence else f", {result['words']} words (entities scored with seqeval, strict IOB2)"), "",
             f"{'':<{width}}{'precision':>10}{'recall':>10}{'f1-score':>10}{'support':>10}"]
    for name, row in [*classes, ("", None), *averages]:
        lines.append("" if row is None else f"{name:<{width}}{row['precision']:>10.4f}{row['recall']:>10.4f}"
                     f"{row['f1-score']:>10.4f}{int(row['support']):>10d}")
    keys = ("accuracy", "macro_f1") if sequence else ("entity_f1", "entity_macro_f1", "precision", "recall")
    lines += ["", "  ".join(f"{key} {result[key]:.4f}" for key in keys)]
    matrix = result["confusion_matrix"]
    labels = matrix["labels"]
    if len(labels) <= 20:
        cell = max(6, *(len(name) for name in labels)) + 1
        lines += ["", f"confusion matrix ({'words; ' if not sequence else ''}rows: true, columns: predicted)",
                  " " * width + "".join(f"{name:>{cell}}" for name in labels)]
        lines += [f"{name:<{width}}" + "".join(f"{count:>{cell}d}" for count in counts)
                  for name, counts in zip(labels, matrix["matrix"])]
    else:
        lines.append(f"(the {len(labels)}×{len(labels)} confusion matrix is in --out's {REPORT_FILE} and {PLOT_FILE})")
    return "\n".join(lines)


def confusion_png(matrix: dict) -> bytes:
    """The confusion matrix as a PNG heat map (Agg), counts written in each cell when there is room."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    labels, counts = matrix["labels"], np.asarray(matrix["matrix"])
    size = min(24.0, max(4.5, 0.55 * len(labels) + 2.5))
    fig = Figure(figsize=(size, size * 0.9), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(counts, cmap="Blues")
    fig.colorbar(image, ax=ax, shrink=0.8)
    ax.set(xticks=range(len(labels)), yticks=range(len(labels)), xlabel="predicted", ylabel="true",
           title="confusion matrix")
    ax.set_xticklabels(labels, rotation=45, ha="right")
    ax.set_yticklabels(labels)
    if len(labels) <= 30:
        top = counts.max() if counts.size else 0
        for (i, j), value in np.ndenumerate(counts):
            ax.text(j, i, str(value), ha="center", va="center", fontsize="small",
                    color="white" if top and value > top / 2 else "black")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


# ---- ledger --------------------------------------------------------------------------------------------------

def _run_ledger(args) -> None:
    from privet.ledger_statement import format_statement, ledger_statement

    statement = ledger_statement(args.path, args.policy)
    print(json.dumps(statement, indent=2) if args.json else format_statement(statement))


# ---- export --------------------------------------------------------------------------------------------------

def _run_export(args) -> None:
    from transformers.utils import logging as transformers_logging

    from common import export

    transformers_logging.disable_progress_bar()
    out = export.export(args.adapter, args.out, model=args.model, force=args.force)
    facts = json.loads((out / export.CARD_FACTS).read_text())
    auto = ("AutoModelForSequenceClassification", ", trust_remote_code=True") if facts["task"] == \
        "sequence-classification" else ("AutoModelForTokenClassification", "")
    print(f"exported to {out} (model card: {out / 'README.md'}); load it without Privet with:")
    print(f"  from transformers import {auto[0]}, AutoTokenizer")
    print(f"  model = {auto[0]}.from_pretrained({str(out)!r}{auto[1]})")
    print(f"  tokenizer = AutoTokenizer.from_pretrained({str(out)!r})")

