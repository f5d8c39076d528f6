"""A site's privacy statement from its ledger: ε recomputed with Opacus' accountant, δ, the releases by run and
the cap, as data (`ledger_statement`) and in plain words (`format_statement`) for `privet ledger`."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

from client.policy import PolicyError, SitePolicy
from common.ledger import LEDGER_FORMAT, Ledger
from common.privacy import NOISE_RNG_NOTE, compute_epsilon

ACCOUNTANTS = {"prv": "PRV (privacy random variable)", "rdp": "RDP (Rényi DP)"}


def ledger_statement(path: Path | None, policy_path: Path | None) -> dict:
    """A site's privacy statement: ε recomputed with Opacus' accountant, δ, the releases, the cap and headroom."""
    if path is None and policy_path is None:
        raise PolicyError("give the ledger's path, or --policy with the site policy that names it")
    policy = SitePolicy.load(policy_path) if policy_path is not None else None
    if policy is not None and path is not None and path.resolve() != policy.ledger_path:
        raise PolicyError(f"{path} is not the ledger the policy names ({policy.ledger_path}); give one or the other")
    ledger_path = path if path is not None else policy.ledger_path
    if path is not None and not path.is_file():
        raise PolicyError(f"{path}: no ledger there (resolved to {path.resolve()}). Fix: give the site's "
                          "ledger.json (the policy's ledger-path), or --policy")
    # With a policy, a ledger that does not exist yet is a site that has released nothing so far.
    ledger = Ledger.read(ledger_path, delta=policy.delta if policy else None)
    private = not ledger.non_private_rounds
    recomputed, accountant = compute_epsilon(ledger.history, ledger.delta, ledger.accountant) if private else (
        math.inf, ledger.accountant)
    stored = ledger.epsilon
    matches = (math.isinf(stored) and math.isinf(recomputed)) or math.isclose(stored, recomputed, rel_tol=1e-6,
                                                                               abs_tol=1e-9)
    runs: dict[str, dict] = {}
    for release in ledger.rounds:
        run = runs.setdefault(release["run"], {"run": release["run"], "rounds": [], "releases": Counter(),
                                               "first": release.get("time"), "last": release.get("time"),
                                               "epsilon_after": None})
        if release["round"] not in run["rounds"]:
            run["rounds"].append(release["round"])
        run["releases"][release.get("kind", "train")] += 1
        run["last"], run["epsilon_after"] = release.get("time"), release.get("epsilon")
    cap = policy.epsilon_cap if policy else None
    left = None if cap is None or not private else max(0.0, cap - recomputed)
    return {
        "format": LEDGER_FORMAT,
        "site": ledger.site or (policy.site_id if policy else ""),
        "ledger": str(ledger_path),
        "policy": str(policy_path) if policy_path else None,
        "private": private,
        "epsilon": _number(recomputed),
        "epsilon_stored": _number(stored),
        "epsilon_matches": matches,
        "delta": ledger.delta,
        "accountant": accountant,
        "history": [list(entry) for entry in ledger.history],
        "unit": "one record: one row of the site's data file (one sentence for token classification)",
        "releases": len(ledger.rounds),
        "non_private_rounds": ledger.non_private_rounds,
        "runs": [{**run, "releases": dict(run["releases"])} for run in runs.values()],
        "epsilon_cap": cap,
        "epsilon_left": left,
        "noise": NOISE_RNG_NOTE,
    }


def _number(value: float) -> float | None:
    """JSON has no infinity: an unbounded ε (a round without DP) is null, and "private" says so."""
    return value if math.isfinite(value) else None


def format_statement(s: dict) -> str:
    """The statement in plain words for a site administrator or a privacy officer."""
    site = s["site"] or "(unnamed site)"
    accountant = ACCOUNTANTS.get(s["accountant"], s["accountant"])
    lines = [f"Privacy statement for site {site}", f"Ledger: {s['ledger']}", ""]
    if not s["releases"]:
        lines.append("No release from this site's data is recorded yet: ε = 0.")
    elif not s["private"]:
        lines.append(f"No differential-privacy guarantee: {s['non_private_rounds']} training round(s) ran without DP, "
                     "so ε is unbounded for this data.")
    else:
        lines += [
            f"Guarantee: ({s['epsilon']:.4f}, {s['delta']:g})-differential privacy per record, over every release "
            "below together.",
            f"Unit protected: {s['unit']}. A person with several records is protected per record, not per person.",
            f"ε was recomputed now with Opacus' {accountant} accountant from the ledger's history "
            f"({len(s['history'])} [noise multiplier, sample rate, steps] entries) at δ = {s['delta']:g}: "
            f"{s['epsilon']:.4f}. The ledger records ε = {s['epsilon_stored']:.4f}: "
            + ("they match." if s["epsilon_matches"] else "they DIFFER: the ledger's stored ε is not what its "
               "history gives; keep the recomputed value and check the ledger's integrity (restore from backup)."),
        ]
    if s["runs"]:
        lines += ["", f"Releases ({s['releases']}), by run:"]
        for run in s["runs"]:
            kinds = ", ".join(f"{count} {_kind(kind, count)}" for kind, count in run["releases"].items())
            rounds = run["rounds"]
            span = f"round {rounds[0]}" if len(rounds) == 1 else f"rounds {min(rounds)}-{max(rounds)}"
            after = "∞" if run["epsilon_after"] is None else f"{run['epsilon_after']:.4f}"
            lines.append(f"  {run['run']}: {span}; {kinds}; ε after its last release {after} "
                         f"({run['first']} to {run['last']})")
    lines.append("")
    if s["epsilon_cap"] is None:
        lines.append("Cap: not in the ledger; pass --policy to compare ε with the site's epsilon-cap.")
    else:
        left = "none: ε is unbounded" if s["epsilon_left"] is None else f"{s['epsilon_left']:.4f}"
        lines.append(f"Cap: ε {s['epsilon_cap']:g} (site policy {s['policy']}); left: {left}. The site refuses any "
                     "round that would take its total ε past the cap (ε does not add up linearly: the accountant "
                     "decides what a further round costs).")
    lines += ["", f"Noise: {s['noise']}"]
    return "\n".join(lines)


def _kind(kind: str, count: int) -> str:
    singular = {"train": "training round", "evaluate": "DP evaluation", "count": "DP example count"}.get(kind, kind)
    return singular + ("s" if count != 1 else "")
