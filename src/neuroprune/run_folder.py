"""The run folder: what one `neuroprune train` writes and every other command reads (contract in
the README). Nothing else in the package knows its layout.

    RUN_DIR/run_config.json   resolved settings (`TrainSettings`)
    RUN_DIR/versions.json     Python, library and machine versions
    RUN_DIR/metrics.json      one record per evaluation, the last one marked final
    RUN_DIR/sparsity.json     the final model's sparsity report
    RUN_DIR/model/            the final model (`neuroprune.load` reads it)
    RUN_DIR/checkpoints/      sealed checkpoints for `--resume`
    RUN_DIR/logs/             TensorBoard logs
    RUN_DIR/compact/          written by `neuroprune compact`
    RUN_DIR/report/           written by `neuroprune report`

Every JSON file is written atomically, by the main process only (with torchrun, rank 0)."""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
from pathlib import Path
from typing import Any

from neuroprune.distributed import is_main_process
from neuroprune.errors import CheckpointError, NeuroPruneError
from neuroprune.files import write_json
from neuroprune.guards import newest_good_checkpoint
from neuroprune.model.checkpoint import STRUCTURE_FILE
from neuroprune.version import __version__

SETTINGS_FILE = "run_config.json"
VERSIONS_FILE = "versions.json"
METRICS_FILE = "metrics.json"
SPARSITY_FILE = "sparsity.json"


def versions(seed: int | None = None) -> dict[str, Any]:
    """What versions.json records: the machine and every library a result depends on."""
    import accelerate
    import datasets
    import torch
    import transformers

    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "datasets": datasets.__version__,
        "accelerate": accelerate.__version__,
        "neuroprune": __version__,
        "seed": seed,
    }


class RunDir:
    """One run folder (see the module docstring). Also accepts a bare model folder where a command
    takes "a run directory or a model folder" (`model_dir`)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.checkpoints = self.path / "checkpoints"
        self.model = self.path / "model"
        self.logs = self.path / "logs"
        self.compact = self.path / "compact"

    # --- the JSON records ---
    def write(self, name: str, data: Any) -> None:
        if is_main_process():  # with several processes (torchrun), rank 0 writes the run folder
            write_json(self.path / name, data)

    def read(self, name: str, default: Any = None) -> Any:
        path = self.path / name
        if not path.exists():
            return default
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise NeuroPruneError(
                f"{path} is not valid JSON ({err}); was the run interrupted while writing it?"
            ) from None

    def settings(self) -> dict[str, Any]:
        """The run's settings as saved (run_config.json; empty if there is none)."""
        return self.read(SETTINGS_FILE, {})

    def metrics(self) -> list[dict[str, Any]]:
        """The evaluation records (metrics.json), oldest first; empty if there are none."""
        records = self.read(METRICS_FILE, [])
        return records if isinstance(records, list) else [records]

    def sparsity(self) -> dict[str, Any] | None:
        """The final model's sparsity report (sparsity.json), if the run finished."""
        return self.read(SPARSITY_FILE)

    def has_run(self) -> bool:
        return (self.path / SETTINGS_FILE).exists()

    def has_results(self) -> bool:
        """Whether the run saved anything worth keeping (a checkpoint, an evaluation record or a
        model); a start that failed before any of these left only its settings behind."""
        return bool(self.metrics()) or self.model.is_dir() or (
            self.checkpoints.is_dir() and any(self.checkpoints.glob("checkpoint-*"))
        )

    def final_record(self) -> dict[str, Any] | None:
        """The record of the finished run ("final": true in metrics.json), or None if it did not
        finish."""
        return next((r for r in reversed(self.metrics()) if r.get("final")), None)

    # --- the model folders ---
    def model_dir(self, plain_ok: bool = False) -> Path:
        """The run's model/ folder, or the folder itself if it is a model folder (one with
        neuroprune.json). With `plain_ok`, a folder without neuroprune.json (a plain transformers
        model) is accepted too; otherwise that raises `CheckpointError`."""
        for candidate in (self.model, self.path):
            if (candidate / STRUCTURE_FILE).exists():
                return candidate
        if plain_ok:
            return self.model if self.model.is_dir() else self.path
        raise CheckpointError(
            f"{self.path} is neither a run directory with a model/ folder nor a model folder (no "
            f"{STRUCTURE_FILE} in it); pass the --output-dir of `neuroprune train` or a folder written "
            "by save_pretrained()."
        )

    def deployable_model_dir(self) -> Path:
        """The model to ship: compact/ if the run was compacted, else `model_dir()`."""
        return self.compact if self.compact.is_dir() else self.model_dir()

    def latest_checkpoint(self) -> Path | None:
        """The newest complete and intact checkpoint (sealed by its manifest, every file matching
        it); newer unfinished or corrupted ones are reported and skipped."""
        if not self.checkpoints.is_dir():
            return None
        return newest_good_checkpoint(list(self.checkpoints.glob("checkpoint-*")))

    def clear(self) -> None:
        """Remove what a run wrote (for `--overwrite`)."""
        if not is_main_process():
            return
        for item in (SETTINGS_FILE, VERSIONS_FILE, METRICS_FILE, SPARSITY_FILE):
            (self.path / item).unlink(missing_ok=True)
        for folder in (self.checkpoints, self.model, self.logs):
            shutil.rmtree(folder, ignore_errors=True)
