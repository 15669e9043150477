"""Guards of a training run: stop on the first non-finite loss or weight instead of training on
NaNs, and resume only from checkpoints whose files are complete and intact.

A NaN loss poisons every weight at the next optimiser step, and the regularisers then see
"degrees" and head distances of NaN: pruning would silently remove nothing or everything. The
error names the step and the last checkpoint known to be good, so the user can resume from it with
a smaller learning rate or penalty weight.

A checkpoint folder is written file by file (the Trainer's model, optimiser, RNG states...), so a
run killed while saving leaves a partial folder, and a disk can truncate or corrupt a finished one.
`write_manifest` seals a folder once everything is in it (sizes and checksums, written last by an
atomic rename); `newest_good_checkpoint` resumes from the newest folder that still matches its
seal and says why it skipped any newer one.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from neuroprune.errors import NonFiniteError
from neuroprune.files import sha256, write_json


def _advice(step: int, last_good: str | Path | None) -> str:
    where = (
        f"The last good checkpoint is {last_good}: resume from it (--resume)"
        if last_good
        else "No checkpoint had been written yet: restart"
    )
    return (
        f"{where} with a lower learning rate, alpha or beta, or with gradient clipping "
        f"(training stopped at step {step})."
    )


def check_loss(loss: torch.Tensor | float, step: int, last_good: str | Path | None = None,
               what: str = "loss") -> None:
    """Raise `NonFiniteError` if `loss` (a scalar tensor or number) is NaN or infinite."""
    value = float(loss.detach()) if torch.is_tensor(loss) else float(loss)
    if not math.isfinite(value):
        raise NonFiniteError(f"the training {what} is {value} at step {step}. {_advice(step, last_good)}")


@torch.no_grad()
def first_non_finite(model: nn.Module) -> str | None:
    """Name of the first parameter holding a NaN or infinity, or None."""
    for name, param in model.named_parameters():
        if param.is_floating_point() and not bool(torch.isfinite(param).all()):
            return name
    return None


def check_weights(model: nn.Module, step: int, last_good: str | Path | None = None) -> None:
    """Raise `NonFiniteError` naming the first non-finite parameter, if there is one."""
    name = first_non_finite(model)
    if name is not None:
        raise NonFiniteError(
            f"parameter {name} holds NaN or infinite values at step {step}. {_advice(step, last_good)}"
        )


# --- checkpoints that can be trusted after a crash ---------------------------------------------
MANIFEST_FILE = "neuroprune_manifest.json"


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_FILE)


def write_manifest(folder: str | Path) -> Path:
    """Seal a finished checkpoint folder: size and sha256 of every file, written last and
    atomically. A folder without a manifest, or whose files no longer match it, is not used."""
    folder = Path(folder)
    # each file is flushed to disk as it is hashed, so a listed file survives a power cut too
    entries = {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": sha256(p, fsync=True)}
               for p in _files(folder)}
    write_json(folder / MANIFEST_FILE, {"files": entries}, fsync=True)
    return folder / MANIFEST_FILE


def checkpoint_problem(folder: str | Path) -> str | None:
    """Why a checkpoint folder cannot be trusted (missing manifest, missing, truncated or altered
    file), or None if every file matches its manifest."""
    folder = Path(folder)
    try:
        files = json.loads((folder / MANIFEST_FILE).read_text())["files"]
    except FileNotFoundError:
        return "it was never completed (no manifest: the run stopped while saving it)"
    except (json.JSONDecodeError, KeyError, TypeError):
        return f"its {MANIFEST_FILE} is corrupt"
    for name, expected in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != expected["bytes"]:
            return f"{name} has {path.stat().st_size} bytes instead of {expected['bytes']} (truncated?)"
        if sha256(path, fsync=True) != expected["sha256"]:
            return f"{name} does not match its checksum (corrupted on disk?)"
    return None


def newest_good_checkpoint(
    candidates: list[Path], report: Callable[[str], None] | None = None
) -> Path | None:
    """The newest candidate (highest trailing step number) that passes `checkpoint_problem`;
    every newer one that fails is reported (to stderr by default) and skipped."""
    report = report or (lambda message: print(f"neuroprune: {message}", file=sys.stderr))
    numbered = [p for p in candidates if p.name.rsplit("-", 1)[-1].isdigit()]
    for folder in sorted(numbered, key=lambda p: int(p.name.rsplit("-", 1)[-1]), reverse=True):
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder
        report(f"checkpoint {folder} is unusable: {problem}; trying the previous one.")
    return None
