"""The run directory ``runs/<run-name>/``: per-round adapters, the metrics log, and the state a resume starts from.

Write order per round: adapter directory (atomic rename), then the metrics line, then
``state.json`` (atomic). A crash between steps leaves at worst an extra adapter or metrics
line for a round ``state.json`` does not claim; resume drops those.
"""

from __future__ import annotations

import json
import logging
import shutil
from datetime import datetime
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from common.files import write_json_atomic

log = logging.getLogger("flwr.privet.server")

STATE_FILE = "state.json"
METRICS_FILE = "metrics.jsonl"
OPTIMIZER_FILE = "server_optimizer.safetensors"
# What a resumed run may set differently from its start; anything else would change what the adapter means.
RESUMABLE_CHANGES = {"resume", "num-server-rounds", "round-timeout", "min-sites"}


class RunDirError(RuntimeError):
    """The run directory cannot be used as asked (exists without resume, or nothing to resume)."""


def default_run_name() -> str:
    return datetime.now().strftime("run-%Y%m%d-%H%M%S")


class RunDir:
    """One run's directory on the server's disk."""

    def __init__(self, runs_dir: str | Path, run_name: str):
        self.name = run_name
        self.path = Path(runs_dir).resolve() / run_name

    def check(self, resume: bool, config: dict) -> int:
        """Whether the run may start as asked, writing nothing; return the last completed round (0 for a fresh run)."""
        state_file = self.path / STATE_FILE
        if state_file.exists() and not resume:
            progress, finished = self._progress()
            more = " with a larger num-server-rounds" if finished else ""
            raise RunDirError(
                f"run directory {self.path} already holds run {self.name!r} ({progress}); to continue it pass "
                f"resume=true{more}, or choose another run-name, or delete {self.path} to start that name afresh"
            )
        if resume and not state_file.exists():
            raise RunDirError(f"resume=true but {self.path} holds no run to resume (no {STATE_FILE}); "
                              "leave out resume=true to start it")
        if not resume:
            return 0
        state = json.loads(state_file.read_text())
        if state["config"].get("run-name") == "":
            state["config"]["run-name"] = self.name  # started without a run-name: the generated one is its name
        changed = sorted(
            key for key in set(state["config"]) | set(config)
            if key not in RESUMABLE_CHANGES and state["config"].get(key) != config.get(key)
        )
        if changed:
            raise RunDirError(
                f"resume=true but the run config differs from the one {self.name} started with in: "
                f"{', '.join(changed)}; resume with the same values (only {', '.join(sorted(RESUMABLE_CHANGES))} "
                f"may change), or choose another run-name, or delete {self.path}"
            )
        return int(state["last_round"])

    def start(self, resume: bool, config: dict) -> int:
        """Prepare the directory and return the last completed round (0 for a fresh run)."""
        last = self.check(resume, config)
        self.path.mkdir(parents=True, exist_ok=True)
        if not resume:
            write_json_atomic(self.path / STATE_FILE, {"last_round": 0, "config": config})
            return 0
        self._drop_rounds_after(last)
        return last

    def _progress(self) -> tuple[str, bool]:
        """How far the run in this directory got, for a message, and whether it finished."""
        try:
            state = json.loads((self.path / STATE_FILE).read_text())
            last, planned = int(state["last_round"]), int(state["config"]["num-server-rounds"])
        except (OSError, ValueError, KeyError, TypeError):
            return "its state.json is unreadable", False
        if last >= planned:
            return f"finished, {last} of {planned} rounds", True
        return f"stopped after round {last} of {planned}", False

    def _drop_rounds_after(self, last: int) -> None:
        """Forget metrics lines and adapters of rounds after `last` that a crash left unconfirmed."""
        metrics = self.path / METRICS_FILE
        if metrics.exists():
            kept = [row for row in read_rows(metrics) if row["round"] <= last]
            tmp = metrics.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(row) + "\n" for row in kept))
            tmp.replace(metrics)
        for directory in self.path.glob("round-*"):
            suffix = directory.name.removeprefix("round-")
            if suffix.isdigit() and int(suffix) > last:
                shutil.rmtree(directory)

    def adapter_dir(self, server_round: int | None) -> Path:
        return self.path / ("final" if server_round is None else f"round-{server_round}")

    def save_adapter(
        self, model, server_round: int | None, info: dict, optimizer: dict[str, np.ndarray] | None = None
    ) -> Path:
        """Save the PEFT adapter (loadable by ``PeftModel.from_pretrained``) plus Privet's ``privet.json``.

        `optimizer` is the server optimizer's state after this round (FedAdam's moments), kept beside the adapter.
        """
        target = self.adapter_dir(server_round)
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        write_json_atomic(tmp / "privet.json", info)
        if optimizer:
            save_file(optimizer, str(tmp / OPTIMIZER_FILE))
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
        return target

    def load_optimizer(self, server_round: int) -> dict[str, np.ndarray]:
        """The server optimizer state saved with a round's adapter; empty when that round saved none."""
        path = self.adapter_dir(server_round) / OPTIMIZER_FILE
        return load_file(str(path)) if path.exists() else {}

    def append_metrics(self, row: dict) -> None:
        with (self.path / METRICS_FILE).open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")

    def read_metrics(self) -> list[dict]:
        return read_rows(self.path / METRICS_FILE)

    def finish_round(self, server_round: int) -> None:
        """Confirm a round: from now on a resume starts after it."""
        state = json.loads((self.path / STATE_FILE).read_text())
        state["last_round"] = server_round
        write_json_atomic(self.path / STATE_FILE, state)


def read_rows(path: Path) -> list[dict]:
    """The rows of a metrics log; a last line cut short by a crash is dropped with a warning, not fatal."""
    if not path.exists():
        return []
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = []
    for number, line in enumerate(lines, start=1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines):
                raise RunDirError(f"{path}, line {number}: not a JSON row (only the last line can be torn by a crash); "
                                  "restore the file from backup") from None
            log.warning("%s: the last line was cut short (a crash while writing it) and is ignored", path)
    return rows
