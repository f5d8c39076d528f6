"""One rogue site on the bank demo: it scales its honest update 1000× every round. With the default screening, the final
global accuracy should match the same run without that site (its share declined), within 0.02.

Run: ``.venv/bin/python -m bench.rogue [--sites 4]``. Both runs are full simulated federations at the defaults.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from bench.performance import ROOT, simulate_subprocess
from client import app as real

ROGUE = 0  # the partition that misbehaves (or, in the comparison run, stays away)
MODE_KEY = "PRIVET_BENCH_ROGUE"  # "scale" or "absent", set in the simulation's environment

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    import os

    if int(context.node_config["partition-id"]) != ROGUE:
        return real.train(msg, context)
    if os.environ.get(MODE_KEY) == "absent":
        content = RecordDict({"decline": ConfigRecord({"reason": "absent from this run"}),
                              "site": ConfigRecord({"site-id": f"site-{ROGUE}"})})
        return Message(content, reply_to=msg)
    reply = real.train(msg, context)
    if "arrays" in reply.content.array_records:
        start = {key: value.numpy() for key, value in msg.content["arrays"].items()}
        scaled = {key: start[key] + 1000 * (value.numpy() - start[key])
                  for key, value in reply.content["arrays"].items()}
        reply.content["arrays"] = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in scaled.items()})
    return reply


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return real.evaluate(msg, context)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.rogue", description=__doc__)
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "rogue.json")
    args = parser.parse_args(argv)
    results = {}
    for mode in ("absent", "scale"):
        print(f"[{mode}] simulating {args.sites} sites ...", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            run = simulate_subprocess(args.sites, "", Path(tmp), client_app="bench.rogue:app", env={MODE_KEY: mode})
        rogue_rows = [next(s for s in row["sites"] if s["site"] == f"site-{ROGUE}") for row in run["rows"]]
        results[mode] = {"final_accuracy": run["final"]["accuracy"], "final_macro_f1": run["final"]["macro_f1"],
                         "aggregated_sites": [row["aggregated_sites"] for row in run["rows"]],
                         "rogue_status": [(s["status"], s.get("reason", "")) for s in rogue_rows],
                         "wall_s": run["wall_s"]}
        print(f"[{mode}] {json.dumps(results[mode])}", flush=True)
    gap = abs(results["scale"]["final_accuracy"] - results["absent"]["final_accuracy"])
    results["accuracy_gap"] = gap
    args.out.write_text(json.dumps(results, indent=2))
    print(f"\nfinal accuracy without the rogue site {results['absent']['final_accuracy']:.3f}, with it (scaling 1000×) "
          f"{results['scale']['final_accuracy']:.3f}: gap {gap:.3f} (target ≤ 0.02)\nwritten to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
