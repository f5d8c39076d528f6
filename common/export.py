"""Export a run's model as a self-contained transformers model directory with a model card (README.md).

The export loads with transformers alone; `privet export` is this module's command.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path

from common.config import BUNDLED_DATASETS
from common.files import write_json_atomic
from common.inference import INFO_FILE, SEQUENCE, InferenceError, PrivetModel, load
from common.release_facts import phase_text, phases, release_sentences, releases, trained_rounds
from common.task import TASKS

CARD_FACTS = "model-card.json"  # the facts an export's README.md states, for scripts
# The run-config keys a model card shows beside the settings of the phases that trained (common.release_facts).
CARD_CONFIG = ("num-server-rounds", "lora-rounds", "aggregation", "dp", "target-epsilon", "delta",
               "eval-noise-multiplier", "accountant", "max-grad-norm", "max-length", "seed")


# The sequence head as a transformers model, shipped as modeling_privet.py in an export. Only torch and
# transformers are imported, so the export loads without Privet (trust_remote_code=True runs this file).
REMOTE_CODE = '''"""Privet's sequence-classification model: masked mean pooling of the encoder's last hidden states, a
parameter-free layer norm, and a linear classifier (Privet's MeanPoolClassifier). Needs torch and transformers."""

import torch
from torch import nn
from transformers import AutoModel, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput


class PrivetMeanPoolForSequenceClassification(PreTrainedModel):
    base_model_prefix = "encoder"

    def __init__(self, config):
        super().__init__(config)
        self.encoder = AutoModel.from_config(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def _init_weights(self, module):
        # The encoder architecture's own initialisation (it also sets buffers such as BERT's position ids).
        type(self.encoder)._init_weights(self.encoder, module)

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None, **kwargs):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        logits = self.classifier(nn.functional.layer_norm(pooled, pooled.shape[-1:]))
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)
'''
REMOTE_CLASS = "PrivetMeanPoolForSequenceClassification"


def export(path: str | Path, out: str | Path, *, model: str | None = None, force: bool = False) -> Path:
    """Write a self-contained transformers model directory: LoRA merged into the encoder, the head, the tokenizer,
    the label names, privet.json and a README.md model card (ε per site, δ, data, metrics; model-card.json).

    Token classification is a standard ``AutoModelForTokenClassification``; sequence classification loads with
    ``AutoModelForSequenceClassification.from_pretrained(out, trust_remote_code=True)`` (modeling_privet.py).
    `force` replaces an earlier export at `out`; any other existing, non-empty path is refused.
    """
    from transformers import AutoConfig

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not force:
            raise FileExistsError(f"{out} already exists and is not empty; choose a new directory, or pass --force "
                                  "(force=True) to replace an earlier export")
        if not (out / CARD_FACTS).is_file():
            raise FileExistsError(f"{out} is not an earlier Privet export (no {CARD_FACTS}); --force replaces only "
                                  "those: choose a new directory")
    loaded = load(path, model=model, device="cpu")
    config = AutoConfig.from_pretrained(loaded.base_model)
    config.num_labels = len(loaded.labels)
    config.id2label = dict(enumerate(loaded.labels))
    config.label2id = {name: i for i, name in enumerate(loaded.labels)}
    out.parent.mkdir(parents=True, exist_ok=True)
    # Built beside `out` and renamed into place: an interrupted export never leaves half a model.
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        if loaded.task == SEQUENCE:
            _save_sequence_model(loaded, config, staging)
        else:
            _save_token_model(loaded, config, staging)
        # Truncating at the run's length by default, as Privet trains and predicts.
        loaded.tokenizer.model_max_length = loaded.max_length
        loaded.tokenizer.save_pretrained(staging)
        write_json_atomic(staging / INFO_FILE, loaded.info)
        facts = run_facts(loaded)
        write_json_atomic(staging / CARD_FACTS, facts)
        (staging / "README.md").write_text(model_card(facts, out.name), encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _save_sequence_model(loaded: PrivetModel, config, out: Path) -> None:
    from safetensors.torch import save_file

    config.architectures = [REMOTE_CLASS]
    config.auto_map = {"AutoModelForSequenceClassification": f"modeling_privet.{REMOTE_CLASS}"}
    config.save_pretrained(out)
    # The merged MeanPoolClassifier's keys (encoder.*, classifier.*) are the remote class's own.
    state = {key: value.detach().contiguous() for key, value in loaded.module.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "modeling_privet.py").write_text(REMOTE_CODE, encoding="utf-8")


def _save_token_model(loaded: PrivetModel, config, out: Path) -> None:
    from transformers import AutoModelForTokenClassification

    target = AutoModelForTokenClassification.from_config(config)
    wanted = target.state_dict()
    prefix = target.base_model_prefix
    state = {f"{prefix}.{key.removeprefix('encoder.')}" if key.startswith("encoder.") else key: value
             for key, value in loaded.module.state_dict().items()}
    # The standard class has no pooler, and every weight it does have must come from the run.
    state = {key: value for key, value in state.items() if key in wanted}
    missing = [key for key in wanted if key not in state or state[key].shape != wanted[key].shape]
    if missing:
        raise InferenceError(
            f"the {config.model_type} base model does not map onto transformers' {type(target).__name__} "
            f"(no matching weight for {', '.join(missing[:3])}); exporting this architecture is not supported"
        )
    target.load_state_dict(state)
    target.save_pretrained(out)


def run_facts(loaded: PrivetModel) -> dict:
    """What the model card states, from privet.json and the run directory around the adapter when present:
    ε per site (its ledger, else what it reported in metrics.jsonl), data, the final evaluation, configuration."""
    run = loaded.adapter_dir.parent
    config = (_read_json(run / "state.json") or {}).get("config", {})
    rows = []
    if (run / "metrics.jsonl").is_file():
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    sites: dict[str, dict] = {}
    ledgers = {}
    for row in rows:
        for reported in row.get("sites", []):
            site = sites.setdefault(reported["site"], {
                "site": reported["site"], "epsilon": None, "delta": config.get("delta"),
                "accountant": config.get("accountant"), "examples": 0, "source": "metrics.jsonl"})
            if reported.get("epsilon") is not None:  # a site reports its whole ledger's ε: the latest is the total
                site["epsilon"] = reported["epsilon"]
            site["examples"] = max(site["examples"], int(reported.get("examples") or 0))
    for path in sorted(run.glob("sites/*/ledger.json")):  # simulated sites keep their ledgers in the run directory
        ledger = _read_json(path)
        if ledger:
            ledgers[path.parent.name] = ledger
            site = sites.setdefault(path.parent.name, {"site": path.parent.name, "examples": 0})
            # A ledger's null ε means a round ran without DP: no guarantee.
            site.update(epsilon=ledger["epsilon"] if ledger.get("epsilon") is not None else math.inf,
                        delta=ledger.get("delta"), accountant=ledger.get("accountant"), source="ledger")
    dataset = str(config.get("dataset", ""))
    name = config.get("run-name") or run.name
    return {
        "run": name,
        "task": loaded.task,
        "labels": list(loaded.labels),
        "max_length": loaded.max_length,
        "base_model": loaded.info["model"],
        "model_sha256": loaded.info.get("model_sha256"),
        # A server-side path is reduced to its file name: the directory layout is nobody's business.
        "dataset": dataset if dataset in BUNDLED_DATASETS or dataset in ("", "policy") else Path(dataset).name,
        "text_column": config.get("text-column") or None,
        "label_column": config.get("label-column") or None,
        "sites": [{**sites[name], "epsilon": _json_number(sites[name]["epsilon"])} for name in sorted(sites)],
        "evaluation": _read_json(run / "final_evaluation.json") if loaded.adapter_dir.name == "final" else None,
        "config": {key: config[key] for key in CARD_CONFIG if key in config},
        # What trained and what the sites' ledgers beside the run record (None: no ledgers there).
        "phases": phases(config, trained_rounds(rows)),
        "releases": releases(ledgers, name) if ledgers else None,
    }


def model_card(facts: dict, name: str) -> str:
    """The export's README.md: how to load it, labels, privacy per site, data, evaluation, provenance."""
    sequence = facts["task"] == SEQUENCE
    auto = "AutoModelForSequenceClassification" if sequence else "AutoModelForTokenClassification"
    sites = facts["sites"]
    lines = [
        "---", "library_name: transformers",
        f"pipeline_tag: {'text-classification' if sequence else 'token-classification'}",
        "tags: [privet, federated-learning, differential-privacy, lora]", "---", "",
        f"# {name}", "",
        f"A {facts['task']} model fine-tuned with Privet: {len(sites) or 'several'} sites trained on their own "
        "data with DP-SGD and a Flower server averaged their updates. "
        + ("Phases that trained: " + "; ".join(phase_text(phase) for phase in facts["phases"]) + "."
           if facts["phases"] else "No round's training was recorded beside the adapter (no metrics.jsonl).")
        + " The adapter is merged into the base encoder here.",
        "", "## Load it", "",
        "It needs torch and transformers (tested with transformers 5.23.0), not Privet:", "",
        "```python", "import torch", f"from transformers import AutoTokenizer, {auto}", "",
        f'tokenizer = AutoTokenizer.from_pretrained("{name}")',
        f'model = {auto}.from_pretrained("{name}"{", trust_remote_code=True" if sequence else ""}).eval()',
    ]
    if sequence:
        lines += [
            'batch = tokenizer(["first text", "second text"], truncation=True, padding=True, return_tensors="pt")',
            "with torch.no_grad():", "    probabilities = model(**batch).logits.softmax(dim=-1)",
            "labels = [model.config.id2label[int(i)] for i in probabilities.argmax(dim=-1)]", "```", "",
            "The head is Privet's (masked mean pooling of the last hidden states, a parameter-free layer norm, a "
            "linear layer); transformers has no stock class for it, so `trust_remote_code=True` runs "
            "`modeling_privet.py` from this directory (read its 30 lines before you trust them). Without it, "
            "`AutoModel.from_pretrained` loads the bare encoder only.",
        ]
    else:
        lines += [
            'words = ["Anna", "moved", "to", "Berlin"]',
            'batch = tokenizer(words, is_split_into_words=True, truncation=True, return_tensors="pt")',
            "with torch.no_grad():", "    ids = model(**batch).logits[0].argmax(dim=-1)",
            "tags, seen = [], set()",
            "for position, word in enumerate(batch.word_ids()):",
            "    if word is not None and word not in seen:  # a word's tag is its first sub-word's",
            "        seen.add(word)", "        tags.append(model.config.id2label[int(ids[position])])",
            "# Valid IOB2, as Privet tags: an I-X that would start an entity becomes B-X.",
            "tags = [f\"B-{t[2:]}\" if t.startswith(\"I-\") and (i == 0 or tags[i - 1][2:] != t[2:]) else t",
            "        for i, t in enumerate(tags)]", "```", "",
            "A standard token-classification model (the LoRA-merged encoder and a linear tag head): one IOB2 tag per "
            "word, read at the word's first sub-word. Privet tags a sentence longer than the limit in consecutive "
            "windows.",
        ]
    lines += ["", f"The tokenizer truncates at {facts['max_length']} tokens, the length the model was trained at.",
              "", "## Labels", "", ", ".join(f"`{label}`" for label in facts["labels"]), "", "## Privacy", ""]
    if sites:
        lines += [
            "Each site's training data has record-level (ε, δ)-differential privacy: DP-SGD with Poisson sampling "
            "(Opacus), ε composed over every release in the site's ledger (so it includes the site's other runs). "
            "Source `ledger`: the site's ledger beside the run (simulated sites); `metrics.jsonl`: the ε the site "
            "reported in its last round.", "",
            "| site | ε | δ | accountant | source |", "|---|---|---|---|---|",
            *(f"| {s['site']} | {_epsilon_text(s['epsilon'])} | {s.get('delta')} | {s.get('accountant') or '–'} | "
              f"{s['source']} |" for s in sites),
        ]
    else:
        lines.append("No per-site privacy figures were found beside the adapter (no metrics.jsonl or ledgers): ask "
                     "each site for its statement (`privet ledger`).")
    if facts["releases"] is not None:
        lines += ["", f"What the sites' ledgers beside the run record for run `{facts['run']}` (each is inside ε):",
                  "", *(f"- {line}" for line in release_sentences(facts["releases"]))]
    else:
        lines += ["", "The sites' ledgers are not beside the run: each site's own statement (`privet ledger`) says "
                      "what it released (training, DP evaluations, a DP example count)."]
    lines += [
        "", "Not covered: a person with several records is protected per record, not per person; the noise comes "
        "from PyTorch generators seeded from the operating system's entropy, not from a cryptographic generator.",
        "", "## Data", "", _data_text(facts), "", "## Evaluation", "", *_evaluation_lines(facts), "",
        "## Provenance", "",
        f"Base model `{facts['base_model']}`, weights SHA-256 `{facts['model_sha256'] or 'not recorded'}`. "
        f"Privet run `{facts['run']}`"
        + (": " + ", ".join(f"{key}={value}" for key, value in facts["config"].items()) if facts["config"] else "")
        + "." + "".join(f" {phase_text(phase)[0].upper()}{phase_text(phase)[1:]}." for phase in facts["phases"]),
        "",
        f"`privet.json` holds the task, label set, base model and max length; `{CARD_FACTS}` the facts above.",
    ]
    return "\n".join(lines) + "\n"


def _data_text(facts: dict) -> str:
    dataset = {"": "not recorded", "policy": "each site's own data, named by its site policy"}.get(
        facts["dataset"], f"`{facts['dataset']}`")
    columns = f" (text column `{facts['text_column']}`, label column `{facts['label_column']}`)" if facts[
        "text_column"] else ""
    counts = [f"{s['site']} {s['examples']}" for s in facts["sites"] if s.get("examples")]
    per_site = f"; training examples per site, as the sites reported them: {', '.join(counts)}" if counts else ""
    return f"Task {facts['task']}; data set {dataset}{columns}{per_site}."


def _evaluation_lines(facts: dict) -> list[str]:
    final = facts["evaluation"]
    if not final:
        return ["No final evaluation beside the adapter (the run had no test set, or this is not its final/)."]
    scores = ", ".join(f"{key} {final[key]:.4f}" for key in TASKS[facts["task"]].score_keys if key in final)
    lines = [f"The run's held-back test set ({final.get('test_examples', '?')} examples): {scores}.", ""]
    per = final.get("per_class") or final.get("per_type") or {}
    rows = [(name, row) for name, row in per.items() if isinstance(row, dict)]
    if rows:
        lines += ["| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
        lines += [f"| {name} | {row['precision']:.3f} | {row['recall']:.3f} | {row['f1-score']:.3f} | "
                  f"{int(row['support'])} |" for name, row in rows]
    return lines


def _epsilon_text(epsilon) -> str:
    if epsilon is None:
        return "not reported"
    return "∞ (a round ran without DP)" if epsilon == "inf" else f"{epsilon:.4g}"


def _json_number(value):
    """JSON has no infinity: an unbounded ε is written as the string "inf"."""
    return "inf" if isinstance(value, float) and math.isinf(value) else value


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
