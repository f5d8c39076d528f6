"""What a run trained and released, from its metrics, the sites' ledgers and its run config: the facts the run
report and the exported model card state about privacy. Both documents write these, never a fixed sentence, so
they say what the ledgers record (`privet ledger` reads the same ledgers).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from common.ledger import KINDS

# The run-config keys that shape each training phase, shown with the phase when it ran.
HEAD_KEYS = ("head-epochs", "head-batch-size", "head-learning-rate")
LORA_KEYS = ("local-epochs", "batch-size", "learning-rate", "lora-r", "lora-alpha", "aggregation")
KIND_NAMES = {"train": "DP-SGD training", "evaluate": "DP evaluation", "count": "DP example count"}


def trained_rounds(rows: Sequence[Mapping]) -> list[int]:
    """The rounds in which at least one site's training update was accepted (metrics.jsonl rows)."""
    return [row["round"] for row in rows if any(s.get("status") == "trained" for s in row.get("sites", []))]


def releases(ledgers: Mapping[str, Mapping], run: str) -> dict[str, dict]:
    """Per release kind (train, evaluate, count), the releases the sites' ledgers record for run `run`: how many,
    by which sites, in which rounds, with which noise multipliers, and how many ran without DP."""
    out = {}
    for kind in KINDS:
        entries = [(site, entry) for site, ledger in ledgers.items() for entry in ledger.get("rounds", [])
                   if entry.get("run") == run and entry.get("kind", "train") == kind]
        out[kind] = {
            "releases": len(entries),
            "sites": sorted({site for site, _ in entries}),
            "rounds": sorted({entry["round"] for _, entry in entries}),
            "noise_multipliers": sorted({entry["noise_multiplier"] for _, entry in entries
                                         if entry.get("noise_multiplier") is not None}),
            "without_dp": sum(1 for _, entry in entries if entry.get("noise_multiplier") is None),
        }
    return out


def phases(config: Mapping, rounds: Sequence[int]) -> list[dict]:
    """The training phases that ran in `rounds`: head-only rounds (the head on the frozen encoder's features), then
    LoRA rounds (LoRA and the head), each with its rounds and the run-config settings that shaped it."""
    planned = int(config.get("num-server-rounds", 0))
    first_lora = planned - int(config.get("lora-rounds", 0)) + 1
    out = []
    for name, ran, keys in (("head-only", [r for r in rounds if r < first_lora], HEAD_KEYS),
                            ("LoRA", [r for r in rounds if r >= first_lora], LORA_KEYS)):
        if ran:
            out.append({"phase": name, "rounds": list(ran), "settings": {k: config[k] for k in keys if k in config}})
    return out


def phase_text(phase: Mapping) -> str:
    """One phase in words: "head-only rounds 1–2 (head-epochs=10, ...)"."""
    what = "the head on the frozen encoder's features" if phase["phase"] == "head-only" else "LoRA and the head"
    settings = ", ".join(f"{key}={value}" for key, value in phase["settings"].items())
    return f"{phase['phase']} round(s) {_span(phase['rounds'])}, training {what} ({settings})"


def release_sentences(found: Mapping[str, dict]) -> list[str]:
    """What the ledgers record, one sentence per release kind."""
    lines = []
    for kind in ("count", "train", "evaluate"):
        facts = found[kind]
        name = KIND_NAMES[kind]
        if not facts["releases"]:
            lines.append(f"{name}: none recorded" + (" (the sites' example counts were public, or declared by "
                                                     "their policies)" if kind == "count" else "") + ".")
            continue
        noise = ", ".join(str(value) for value in facts["noise_multipliers"]) or "none"
        text = (f"{name}: {facts['releases']} release(s) by {len(facts['sites'])} site(s) in round(s) "
                f"{_span(facts['rounds'])}, Gaussian noise multiplier(s) {noise}")
        if facts["without_dp"]:
            text += f"; {facts['without_dp']} WITHOUT DP (no noise, no guarantee)"
        lines.append(text + ".")
    return lines


def _span(rounds: Sequence[int]) -> str:
    rounds = sorted(rounds)
    if rounds and rounds == list(range(rounds[0], rounds[-1] + 1)) and len(rounds) > 1:
        return f"{rounds[0]}–{rounds[-1]}"
    return ", ".join(str(r) for r in rounds)
