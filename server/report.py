"""Per-round metrics rows for ``metrics.jsonl`` and the summary table printed at the end of a run."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from server.strategy import Screened


def round_row(task, server_round: int, trained: Screened, evaluated: Screened, central: dict | None,
              seconds: float) -> dict:
    """One ``metrics.jsonl`` object: the task's global scores, and per site its public example count, ε and scores."""
    sites: dict[str, dict] = {}
    for msg in trained.accepted:
        metrics = msg.content["metrics"]
        sites[trained.sites[msg.metadata.src_node_id]] = {
            "examples": int(metrics["num-examples"]),
            "epsilon": float(metrics["epsilon"]) if "epsilon" in metrics else None,
            "status": "trained",
        }
    for site, reason in {**trained.declined, **trained.rejected}.items():
        status = "declined" if site in trained.declined else "rejected"
        sites[site] = {"examples": 0, "epsilon": None, "status": status, "reason": reason}
    eval_scores = {}
    for msg in evaluated.accepted:
        metrics = msg.content["metrics"]
        site = evaluated.sites[msg.metadata.src_node_id]
        eval_scores[site] = {key: float(metrics[key]) for key in task.score_keys}
        eval_scores[site]["eval_examples"] = int(metrics["num-examples"])
        if "epsilon" in metrics:  # the evaluation is charged after training: its ε is the site's latest
            eval_scores[site]["epsilon"] = float(metrics["epsilon"])
    no_scores = {**{key: None for key in task.score_keys}, "eval_examples": 0}
    rows = []
    for site in sorted(set(sites) | set(eval_scores)):
        base = sites.get(site, {"examples": 0, "epsilon": None, "status": "not-sampled"})
        rows.append({"site": site, **base, **eval_scores.get(site, no_scores)})
    if central is not None:
        scores, source = {key: central[key] for key in task.score_keys}, "server-test-split"
    else:
        scores, source = {key: _weighted(eval_scores, key) for key in task.score_keys}, "sites-weighted"
    return {
        "round": server_round,
        **scores,
        "global_source": source,
        "aggregated_sites": len(trained.accepted),
        "sites": rows,
        "seconds": round(seconds, 2),
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _weighted(scores: dict[str, dict], key: str) -> float | None:
    total = sum(s["eval_examples"] for s in scores.values())
    if not total:
        return None
    return sum(s[key] * s["eval_examples"] for s in scores.values()) / total


def summary_table(rows: list[dict], score_keys: tuple[str, ...] = ("accuracy", "macro_f1")) -> str:
    """A plain-text table: one line per round with the global scores and each site's ε."""
    sites = sorted({s["site"] for row in rows for s in row["sites"]})
    header = ["round", *score_keys, *[f"ε {site}" for site in sites]]
    lines = [header]
    for row in rows:
        eps = {s["site"]: s["epsilon"] for s in row["sites"]}
        lines.append([str(row["round"]), *[_cell(row.get(key)) for key in score_keys],
                      *[_cell(eps.get(s)) for s in sites]])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.rjust(width) for cell, width in zip(line, widths)) for line in lines)


def _cell(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def print_summary(rows: list[dict], run_path: Path, score_keys: tuple[str, ...]) -> None:
    print(f"\nPrivet run summary ({run_path})\n{summary_table(rows, score_keys)}\n", flush=True)
