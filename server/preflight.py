"""What a run checks before anything is started or written: its run directory, its model and its data.

`privet simulate` runs these before Ray starts, so a mistake shows in one line within seconds, and a failed start
leaves no run directory that would block the same command once the input is fixed.
"""

from __future__ import annotations

from pathlib import Path

from transformers import AutoConfig

from common import task as tasks
from common.config import BUNDLED_DATASETS, POLICY_DATA, RunConfig
from common.model import ModelError, check_model
from server.checkpoint import RunDir, RunDirError


def check_run(config: RunConfig) -> None:
    """Raise the user error (RunDirError, ModelError, DataError) that would stop this run, before it starts."""
    if config.resume and not config.run_name:
        raise RunDirError("resume=true needs run-name: the name of the run to continue (runs-dir lists them)")
    if config.run_name:  # a generated name is new by construction
        run = RunDir(config.runs_dir, config.run_name)
        run.check(config.resume, {**config.to_mapping(), "run-name": run.name})
    _check_model_config(check_model(config.model))
    if config.dataset not in BUNDLED_DATASETS and config.dataset != POLICY_DATA:
        tasks.read_file(config.task, config.dataset, config.text_column, config.label_column)
    if config.test_dataset:
        tasks.read_file(config.task, config.test_dataset, config.text_column, config.label_column,
                        tasks.label_names(config))


def _check_model_config(path: str) -> None:
    """A local model directory's config.json must load (a hub name is checked where it is fetched)."""
    if not Path(path).is_dir():
        return
    try:
        AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ModelError(f"model {path!r} has no usable config.json ({str(err).splitlines()[0]})") from None
