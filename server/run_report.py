"""The run report: ``report.html`` (one self-contained file) and ``report.md`` with its PNG plots.

Built only from what the run directory holds, so it can be written at the end of a run, on
resume, or again later with ``python -m server.run_report runs/<run-name>``.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import re
import sys
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from common.metrics import fairness
from common.privacy import NOISE_RNG_NOTE
from common.release_facts import phase_text, phases, release_sentences, releases, trained_rounds
from common.task import TASKS
from server.checkpoint import read_rows
from server.robust import MIN_ROBUST_SITES

PLOT_FILES = {"global": "report-global.png", "sites": "report-sites.png", "epsilon": "report-epsilon.png",
              "utility": "report-utility.png"}
SOURCES = {"server-test-split": "server test split", "sites-weighted": "sites' validation (weighted, DP-noised)"}
LABELS = {"accuracy": "accuracy", "macro_f1": "macro-F1", "entity_f1": "entity F1 (micro)",
          "entity_macro_f1": "entity macro-F1", "precision": "entity precision", "recall": "entity recall"}
CSS = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222;line-height:1.45}
h1{border-bottom:2px solid #345}h2{margin-top:1.8em;border-bottom:1px solid #ccc;color:#234}
table{border-collapse:collapse;margin:.8em 0;font-size:.92em}th{background:#eef2f6}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left;vertical-align:top}
td:first-child{white-space:nowrap}td.n{text-align:right;font-variant-numeric:tabular-nums}
img{max-width:100%;display:block;margin:.6em 0}
"""


def write_report(run_path: Path) -> tuple[Path, Path]:
    """Write ``report.html``, ``report.md`` and the PNG plots into the run directory; return the two report paths."""
    run = Path(run_path)
    title, sections = _sections(_load(run))
    for block in (b for _, blocks in sections for b in blocks if b[0] == "img"):
        _write(run / PLOT_FILES[block[1]], block[2])
    html_path, md_path = run / "report.html", run / "report.md"
    _write(html_path, _html(title, sections).encode("utf-8"))
    _write(md_path, _markdown(title, sections).encode("utf-8"))
    return html_path, md_path


def _load(run: Path) -> dict:
    """Everything the report needs, read from the run directory (absent files give empty values)."""
    state = _json(run / "state.json") or {}
    config = state.get("config", {})
    rows = read_rows(run / "metrics.jsonl")
    if "last_round" in state:  # lines past the last confirmed round are crash leftovers that resume drops
        rows = [row for row in rows if row["round"] <= state["last_round"]]
    rounds = [p for p in run.glob("round-*/privet.json") if p.parent.name.removeprefix("round-").isdigit()]
    rounds.sort(key=lambda p: int(p.parent.name.removeprefix("round-")))
    info = _json(run / "final" / "privet.json") or (_json(rounds[-1]) if rounds else None) or {}
    ledgers = {p.parent.name: _json(p) for p in sorted(run.glob("sites/*/ledger.json"))}
    return {"name": config.get("run-name") or run.name, "config": config, "rows": rows, "info": info,
            "final": _json(run / "final_evaluation.json"), "ledgers": {k: v for k, v in ledgers.items() if v},
            "audit": _json(run / "audit.json"), "path": run}


def _json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _sections(run: dict) -> tuple[str, list[tuple[str, list[tuple]]]]:
    """The title and (heading, blocks) sections; a block is ("p", text), ("list", items), ("table", head, rows)
    or ("img", plot key, png, alt), rendered alike to HTML and Markdown."""
    config, rows, last = run["config"], run["rows"], (run["rows"] or [None])[-1]
    task = TASKS.get(config.get("task", "sequence-classification"), TASKS["sequence-classification"])
    sites = sorted({s["site"] for row in rows for s in row["sites"]} | set(run["ledgers"]))
    eps = _final_epsilon(run, sites)
    sections = [
        ("Overview", _overview(run, sites, last, eps, task)),
        ("Global metrics per round", _global(rows, task)),
        ("Per-site metrics", _per_site(rows, sites, last, task)),
        ("Fairness across sites", _fairness(rows, last, task)),
        ("Privacy budget (ε) per site", _epsilon(rows, sites, eps, config)),
        ("What each ε bought", _utility(rows, task)),
        ("Report of the final adapter", _classification(run["final"], task)),
        ("Declined, rejected and failed sites", _incidents(rows)),
        ("Transparency for the privacy officer", _transparency(run, eps, _central(last))),
        ("Empirical privacy audit", _audit(run["audit"], run["path"])),
        ("Configuration", _configuration(config, run["info"])),
    ]
    empty = lambda block: block[0] == "table" and not block[2]  # noqa: E731
    return f"Privet run report: {run['name']}", [(h, [b for b in blocks if not empty(b)]) for h, blocks in sections]


def _overview(run: dict, sites: list[str], last: dict | None, eps: dict[str, dict], task) -> list[tuple]:
    config = run["config"]
    planned = config.get("num-server-rounds", "?")
    if last is None:
        return [("p", f"No round has completed yet ({planned} planned).")]
    scores = ", ".join(f"{LABELS[key]} {_num(last.get(key))}" for key in task.score_keys)
    trained = trained_rounds(run["rows"])
    took_part = sorted({s["site"] for row in run["rows"] for s in row["sites"] if s["status"] == "trained"})
    # A round in which no site trained changed nothing: it is not counted as a completed training round.
    progress = (f"{len(trained)} of {planned} planned rounds trained (at least one site's update accepted), "
                f"{len(run['rows'])} ran" if trained else
                f"NO SITE TRAINED in any of the {len(run['rows'])} round(s) that ran ({planned} planned): the model "
                "is its untrained start")
    text = (f"{task.name}: {progress}; {len(took_part)} of {len(sites)} site(s) trained, aggregation "
            f"{config.get('aggregation', '?')}. After round {last['round']}: {scores} "
            f"({SOURCES.get(last['global_source'], last['global_source'])}).")
    few = [row["round"] for row in run["rows"] if 0 < row.get("aggregated_sites", 0) < MIN_ROBUST_SITES]
    if few:
        text += (f" Fewer than {MIN_ROBUST_SITES} sites contributed in round(s) {', '.join(map(str, few))}: with two, "
                 f"nobody can tell a rogue site from an honest one; robustness needs an honest majority of at least "
                 f"{MIN_ROBUST_SITES}.")
    spent = [e["epsilon"] for e in eps.values() if e["epsilon"] is not None]
    if not config.get("dp", True):
        text += " Trained WITHOUT differential privacy (dp=false)."
    elif spent:
        text += f" Highest ε spent by a site: {_num(max(spent))} (target {config.get('target-epsilon', '?')})."
    return [("p", text)]


def _global(rows: list[dict], task) -> list[tuple]:
    if not rows:
        return [("p", "No metrics yet (metrics.jsonl is empty or absent).")]
    series = {LABELS[key]: [row.get(key) for row in rows] for key in task.score_keys}
    png = _plot("Global scores per round", "score", [row["round"] for row in rows], series, ylim=(0, 1))
    table = [[row["round"], *(_num(row.get(key)) for key in task.score_keys),
              SOURCES.get(row["global_source"], row["global_source"]), row.get("aggregated_sites", "–"),
              row.get("aggregation", "–"), _num(row.get("seconds"), 1)] for row in rows]
    head = ["round", *(LABELS[key] for key in task.score_keys), "scored on", "sites aggregated", "how", "seconds"]
    return [("img", "global", png, "Global scores per round"), ("table", head, table)]


def _per_site(rows: list[dict], sites: list[str], last: dict | None, task) -> list[tuple]:
    if last is None:
        return [("p", "No rounds yet.")]
    table = [[s["site"], s["status"], s.get("examples", 0), *(_num(s.get(key)) for key in task.score_keys),
              s.get("eval_examples", 0), _num(s.get("epsilon"))] for s in last["sites"]]
    series = {site: [_site(row, site).get(task.primary) for row in rows] for site in sites}
    png = _plot(f"Validation {LABELS[task.primary]} per site", LABELS[task.primary], [row["round"] for row in rows],
                series, ylim=(0, 1))
    return [("p", f"Round {last['round']} (the last completed). Scores are on each site's own validation split and "
                  "carry the site's DP noise; example counts are the sites' public (declared or DP-noised) counts."),
            ("table", ["site", "status", "training examples (public)",
                       *(f"validation {LABELS[key]}" for key in task.score_keys), "validation examples (noisy)",
                       "ε so far"], table),
            ("img", "sites", png, f"Each site's validation {LABELS[task.primary]} per round")]


def _site(row: dict, site: str) -> dict:
    return next((s for s in row["sites"] if s["site"] == site), {})


def _scores(row: dict, key: str) -> dict[str, float]:
    return {s["site"]: s[key] for s in row["sites"] if s.get(key) is not None}


def _fairness(rows: list[dict], last: dict | None, task) -> list[tuple]:
    key, name = task.primary, LABELS[task.primary]
    fair = fairness(_scores(last, key)) if last else {}
    if not fair:
        return [("p", "No site reported validation scores, so fairness cannot be assessed.")]
    text = (f"Round {last['round']}: the worst site is {fair['worst_site']} with {name} {_num(fair['worst'])}; "
            f"the mean over {len(_scores(last, key))} site(s) is {_num(fair['mean'])}, a gap of {_num(fair['gap'])}. "
            "Site scores are DP-noised, so small gaps may be noise.")
    table = []
    for row in rows:
        f = fairness(_scores(row, key))
        table.append([row["round"], f.get("worst_site", "–"), *(_num(f.get(k)) for k in ("worst", "mean", "gap"))])
    return [("p", text), ("table", ["round", "worst site", f"worst {name}", f"mean site {name}", "gap"], table)]


def _final_epsilon(run: dict, sites: list[str]) -> dict[str, dict]:
    """Per site: ε reached, accountant, δ and where they come from (the site's ledger, else metrics.jsonl)."""
    out = {}
    for site in sites:
        reported = [s["epsilon"] for row in run["rows"] for s in row["sites"]
                    if s["site"] == site and s.get("epsilon") is not None]
        last = reported[-1] if reported else None
        ledger = run["ledgers"].get(site)
        if not ledger:
            out[site] = {"epsilon": last, "accountant": None, "delta": None, "reported": None,
                         "source": "reported by the site (no ledger in the run directory)"}
            continue
        epsilon = ledger.get("epsilon")
        if epsilon is None and ledger.get("non_private_rounds"):
            epsilon = math.inf  # the ledger writes a non-private ε as null
        trained = [r for r in ledger.get("rounds", []) if r.get("kind", "train") == "train"]
        this_run = sum(1 for r in trained if r.get("run") == run["name"])
        out[site] = {"epsilon": epsilon, "accountant": ledger.get("accountant"), "delta": ledger.get("delta"),
                     "reported": last,
                     "source": f"ledger ({this_run} training round(s) of this run, {len(trained)} in all)"}
    return out


def _utility(rows: list[dict], task) -> list[tuple]:
    """The global score after each round against the ε the sites had spent by then: the run's utility curve."""
    points = []
    for row in rows:
        spent = [s["epsilon"] for s in row["sites"] if s.get("epsilon") is not None and math.isfinite(s["epsilon"])]
        if spent and row.get(task.primary) is not None:
            points.append((max(spent), row[task.primary], row["round"]))
    if not points:
        return [("p", "No round reported both a global score and a finite ε, so there is no utility curve.")]
    fig = Figure(figsize=(8, 3.6), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot([p[0] for p in points], [p[1] for p in points], marker="o")
    for x, y, rnd in points:
        ax.annotate(f"round {rnd}", (x, y), textcoords="offset points", xytext=(4, -12), fontsize="small")
    ax.set(title=f"Global {LABELS[task.primary]} against the highest ε any site had spent", xlabel="ε (δ as "
           "configured)", ylabel=LABELS[task.primary], ylim=(0, 1), xlim=(0, None))
    ax.grid(alpha=0.3)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    table = [[rnd, _num(x), _num(y)] for x, y, rnd in points]
    return [("p", "Each round buys accuracy with privacy budget: the global score after a round against the highest "
                  "cumulative ε any site had spent by then. The README's Performance section has the same curve "
                  "across target ε for the default recipe."),
            ("img", "utility", buffer.getvalue(), f"Global {LABELS[task.primary]} against ε spent"),
            ("table", ["round", "highest ε spent", LABELS[task.primary]], table)]


def _epsilon(rows: list[dict], sites: list[str], eps: dict[str, dict], config: dict) -> list[tuple]:
    blocks = []
    series = {site: [_site(row, site).get("epsilon") for row in rows] for site in sites}
    if any(v is not None and math.isfinite(v) for values in series.values() for v in values):
        target = config.get("target-epsilon") if config.get("dp", True) else None
        png = _plot("ε spent per site (cumulative)", "ε", [row["round"] for row in rows], series, hline=target)
        blocks.append(("img", "epsilon", png, "Each site's cumulative ε per round"))
    else:
        blocks.append(("p", "No site reported ε in any round."))

    def known(value, key):
        if value is None:
            return f"{config.get(key, '–')} (run config)"
        return _num(value, 6) if isinstance(value, float) else str(value)

    table = [[site, _num(e["epsilon"]), known(e["accountant"], "accountant"), known(e["delta"], "delta"), e["source"]]
             for site, e in eps.items()]
    blocks.append(("table", ["site", "ε reached", "accountant", "δ", "source"], table))
    if any(e["accountant"] is None for e in eps.values()):
        blocks.append(("p", "Values marked (run config) are what the run asked for; the site's policy and its "
                            "ledger, which this directory does not hold, are authoritative."))
    ahead = [f"{site} (ledger {_num(e['epsilon'])}, last reported {_num(e['reported'])})" for site, e in eps.items()
             if e["reported"] is not None and e["epsilon"] is not None and e["epsilon"] > e["reported"] + 1e-9]
    if ahead:
        blocks.append(("p", "The ledger counts more than the last completed round reported for: " + "; ".join(ahead)
                       + ". A round is recorded before training starts, so an interrupted round or a later run "
                       "still counts against the site's budget."))
    return blocks


def _classification(final: dict | None, task) -> list[tuple]:
    if not final:
        return [("p", "No final evaluation: final_evaluation.json is absent (the run has no test set on the "
                      "server, or it has not finished).")]
    scores = ", ".join(f"{LABELS[key]} {_num(final.get(key))}" for key in task.score_keys)
    text = f"The final adapter on the held-back test set ({final.get('test_examples', '?')} examples): {scores}."
    if "per_type" in final:
        table = [[name, *(_num(v.get(k)) for k in ("precision", "recall", "f1-score")), int(v.get("support", 0))]
                 for name, v in final["per_type"].items() if isinstance(v, dict)]
        return [("p", text + " Entity-level, strict IOB2 matching (seqeval)."),
                ("table", ["entity type", "precision", "recall", "F1", "support"], table)]
    table = [[name, *(_num(v.get(k)) for k in ("precision", "recall", "f1-score")), int(v.get("support", 0))]
             for name, v in final.get("per_class", {}).items() if isinstance(v, dict)]
    return [("p", text), ("table", ["class", "precision", "recall", "F1", "support"], table)]


def _incidents(rows: list[dict]) -> list[tuple]:
    table = []
    for row in rows:
        for s in row["sites"]:
            if s["status"] != "trained":
                table.append([row["round"], s["site"], s["status"], s.get("reason") or "–"])
            elif s.get("eval_examples", 0) == 0:
                table.append([row["round"], s["site"], "no validation scores",
                              "its evaluation reply was missing or rejected"])
    if not table:
        return [("p", "Every site trained and reported validation scores in every round.")]
    return [("table", ["round", "site", "status", "reason"], table)]


def _central(last: dict | None) -> str | None:
    """A sentence on central (site-level) DP, when metrics.jsonl records it (``central_dp``)."""
    central = (last or {}).get("central_dp")
    if not central:
        return None
    return (f"In addition, the server added central DP noise to the aggregate: site-level (ε, δ) = "
            f"({_num(central.get('epsilon'))}, {_num(central.get('delta'), 6)}) after {central.get('releases', '?')} "
            "release(s), which covers each site's whole contribution to the released model.")


def _transparency(run: dict, eps: dict[str, dict], central: str | None) -> list[tuple]:
    config = run["config"]
    if config.get("aggregation") == "ffa-lora":
        tensors = "the LoRA B matrices (LoRA A is frozen at a seed shared by all sites and never sent)"
    else:
        tensors = "the LoRA A and B matrices"
    ran = phases(config, trained_rounds(run["rows"]))
    trained = {phase["phase"] for phase in ran}
    changed = "; only the head changed: head-only rounds leave LoRA at its shared start" if trained == {"head-only"} \
        else ""
    left = [f"The adapter's trainable tensors: {tensors} and the task head, after DP-SGD{changed}. No base-model "
            "weights. Inside ε.",
            "Each round it trained: its example count (the number its policy declares public, or the DP example "
            "count below, released once per run and charged to its ledger), the number of DP-SGD steps (derived "
            "from that count) and ε spent so far (derived from the ledger). Inside ε or declared public.",
            "Each round it evaluated (at most once; a policy may switch evaluation off): validation scores and the "
            "validation count, computed from per-example counts summed with Gaussian noise (the DP evaluations "
            "below) and charged to its ledger. Inside ε.",
            "Whether it took part, and the reason when it declined (a policy, its budget, or 'cannot use its data'). "
            "Public.",
            "Never text, labels, per-example values or the training loss."]
    if config.get("secure-aggregation"):
        left.append("Secure aggregation was on: the server saw only the sum of the sites' adapters, never one site's.")
    private = config.get("dp", True)
    if private:
        guarantee = ("Each site's training data has record-level (ε, δ)-differential privacy from Opacus DP-SGD "
                     "with Poisson sampling: adding or removing any one record changes the probability of anything "
                     "the site released by at most a factor e^ε, plus δ. ε counts every round of every run on the "
                     "site's ledger; nothing the server does with the updates afterwards can weaken it.")
    else:
        guarantee = ("This run trained WITHOUT differential privacy (dp=false): the sites' updates carry no formal "
                     "privacy guarantee.")
    table = []
    for site, e in eps.items():
        kind = "record-level (ε, δ)-DP"
        if not private or (e["epsilon"] is not None and not math.isfinite(e["epsilon"])):
            kind = "none (not private)"
        elif e["epsilon"] is None:
            kind = "unknown (no ε reported)"
        delta = "not reported" if e["delta"] is None else _num(e["delta"], 6)
        table.append([site, kind, e["accountant"] or "not reported", delta, _num(e["epsilon"])])
    caveats = ["A person with several records is protected per record, not per person: their k records together "
               "get only about k·ε. Per-person sampling is not built yet.",
               "Simulated sites (privet simulate) keep their ledgers in the run directory: a new run starts them "
               "at ε=0. Real sites keep one ledger across all runs.",
               NOISE_RNG_NOTE]
    what_ran = [phase_text(phase) for phase in ran] or ["no site trained in any round"]
    if run["ledgers"]:
        recorded = [("p", f"What the sites' ledgers in this directory record for run {run['name']}:"),
                    ("list", release_sentences(releases(run["ledgers"], run["name"])))]
    else:
        asked = config.get("eval-noise-multiplier", "?")
        recorded = [("p", "The sites' ledgers are not in this directory: each site's own statement (`privet ledger`) "
                          f"says what it released. The run asked for eval-noise-multiplier={asked} (0: each site "
                          "picks its own).")]
    return [("p", "What ran:"), ("list", what_ran),
            ("p", "What left each site, and nothing else:"), ("list", left), *recorded,
            ("p", "The guarantee each site has:"), ("p", guarantee), *([("p", central)] if central else []),
            ("table", ["site", "guarantee", "accountant", "δ", "ε reached"], table),
            ("p", "What the guarantee does NOT cover:"), ("list", caveats)]


def _audit(audit: dict | None, run_path: Path) -> list[tuple]:
    """What `privet audit` found for a site of this run (audit.json), if one ran."""
    if not audit:
        return [("p", f"No audit in this run directory. `privet audit --run-dir {run_path} --site 0` trains one "
                      "site's exact path once with secret canaries and checks that the ε it claims is not "
                      "contradicted.")]
    claimed = audit.get("claimed_epsilon")
    return [
        ("p", f"Verdict: {str(audit.get('verdict', '?')).upper()}. {audit.get('explanation', '')}"),
        ("p", f"ε ≥ {_num(audit.get('epsilon_lower_bound'))} at {_num(audit.get('confidence'), 2)} confidence "
              f"(δ={audit.get('delta')}) against a claimed ε of {_num(claimed)}; an audit of this size can prove at "
              f"most ε = {_num(audit.get('epsilon_ceiling'))}."),
        ("table", ["site", "canaries", "included", "guesses", "right", "wall seconds"],
         [[audit.get("site", "?"), audit.get("canaries"), audit.get("canaries_included"), audit.get("guesses"),
           audit.get("right"), _num(audit.get("wall_seconds"), 1)]]),
        ("p", "A lower bound from one membership attack on canaries: a bound above the claim proves the code does not "
              "keep its promise; a bound at or below it is consistent with the claim but is no proof of privacy."),
    ]


def _configuration(config: dict, info: dict) -> list[tuple]:
    blocks = [("p", f"Base model: {info.get('model', config.get('model', '?'))}; SHA-256 of its weights: "
                    f"{info.get('model_sha256') or 'not recorded'}.")]
    if info.get("labels"):
        blocks.append(("p", "Shared label set: " + "; ".join(info["labels"]) + "."))
    if not config:
        return [*blocks, ("p", "No configuration recorded (state.json is absent).")]
    shown = [[key, "(empty)" if value == "" else str(value).lower() if isinstance(value, bool) else value]
             for key, value in config.items()]
    return [*blocks, ("table", ["key", "value"], shown)]


def _plot(title: str, ylabel: str, x: list[int], series: dict[str, list], ylim=None, hline=None) -> bytes:
    """A line plot as PNG bytes (Agg): one line per series through its known points, no marker where one is missing."""
    fig = Figure(figsize=(8, 3.6), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for i, (label, values) in enumerate(series.items()):
        points = [(r, v) for r, v in zip(x, values) if v is not None and math.isfinite(v)]
        # Earlier series are drawn larger, so sites with identical values (same calibration) stay visible.
        ax.plot([r for r, _ in points], [v for _, v in points], marker="osD^v<>ph"[i % 9],
                markersize=max(4, 9 - 1.5 * i), linewidth=max(1.2, 3 - 0.6 * i), label=label)
    if hline is not None:
        ax.axhline(hline, color="grey", linestyle="--", linewidth=1, label=f"target {hline:g}")
    ax.set(title=title, xlabel="round", ylabel=ylabel, xlim=(min(x) - 0.5, max(x) + 0.5))
    ax.set_ylim(*(ylim or (0, None)))
    if hline is not None:  # room above the target line
        ax.set_ylim(top=max(ax.get_ylim()[1], hline * 1.08))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5), ncol=1 + len(series) // 16)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


def _num(value, digits: int = 3) -> str:
    """A fixed-point number (or, with more than 3 digits, significant digits); "–" for None, "∞" for infinity."""
    if value is None:
        return "–"
    if isinstance(value, float) and not math.isfinite(value):
        return "∞"
    return f"{value:.{digits}g}" if digits > 3 else f"{value:.{digits}f}"


def _html(title: str, sections: list) -> str:
    e = html.escape
    out = [f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title>'
           f"<style>{CSS}</style></head><body>\n<h1>{e(title)}</h1>",
           "<nav><ol>" + "".join(f'<li><a href="#s{i}">{e(t)}</a></li>' for i, (t, _) in enumerate(sections))
           + "</ol></nav>"]
    for i, (heading, blocks) in enumerate(sections):
        out.append(f'<h2 id="s{i}">{e(heading)}</h2>')
        for block in blocks:
            if block[0] == "p":
                out.append(f"<p>{e(block[1])}</p>")
            elif block[0] == "list":
                out.append("<ul>" + "".join(f"<li>{e(item)}</li>" for item in block[1]) + "</ul>")
            elif block[0] == "img":
                data = base64.b64encode(block[2]).decode("ascii")
                out.append(f'<img src="data:image/png;base64,{data}" alt="{e(block[3])}">')
            else:
                head = "".join(f"<th>{e(str(h))}</th>" for h in block[1])
                body = "".join("<tr>" + "".join(_td(cell) for cell in row) + "</tr>" for row in block[2])
                out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
    return "\n".join(out) + "\n</body></html>\n"


def _td(cell) -> str:
    text = str(cell)
    numeric = isinstance(cell, (int, float)) or re.fullmatch(r"[-+]?[\d.]+(e-?\d+)?|–|∞", text)
    attribute = ' class="n"' if numeric else ""
    return f"<td{attribute}>{html.escape(text)}</td>"


def _md(text) -> str:
    """Text safe in a Markdown paragraph or table cell: no raw HTML, no column breaks, one line. Outside `code`
    spans a backslash escapes "<" (shown as "<", never read as a tag); inside them Markdown shows it as written."""
    parts = str(text).replace("\n", " ").split("`")
    if len(parts) % 2 == 0:  # an unpaired backtick opens no code span
        return "\\`".join(_md_plain(part) for part in parts)
    return "`".join(part.replace("|", "\\|") if i % 2 else _md_plain(part) for i, part in enumerate(parts))


def _md_plain(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("<", "\\<")


def _markdown(title: str, sections: list) -> str:
    out = [f"# {_md(title)}", ""]
    for heading, blocks in sections:
        out += [f"## {heading}", ""]
        for block in blocks:
            if block[0] == "p":
                out += [_md(block[1]), ""]
            elif block[0] == "list":
                out += [*(f"- {_md(item)}" for item in block[1]), ""]
            elif block[0] == "img":
                out += [f"![{_md(block[3])}]({PLOT_FILES[block[1]]})", ""]
            else:
                out += ["| " + " | ".join(_md(h) for h in block[1]) + " |", "|" + "---|" * len(block[1])]
                out += ["| " + " | ".join(_md(cell) for cell in row) + " |" for row in block[2]] + [""]
    return "\n".join(out)


def _write(path: Path, data: bytes) -> None:
    """Replace `path` in one rename, so a reader never sees half a report."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m server.run_report RUNS_DIR/RUN_NAME")
    for written in write_report(Path(sys.argv[1])):
        print(written)
