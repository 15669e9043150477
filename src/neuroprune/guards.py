"""Stop a run on the first non-finite loss or weight instead of training on NaNs.

A NaN loss poisons every weight at the next optimiser step, and the regularisers then see
"degrees" and head distances of NaN: pruning would silently remove nothing or everything. The
error names the step and the last checkpoint known to be good, so the user can resume from it with
a smaller learning rate or penalty weight.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from .errors import NeuroPruneError


class NonFiniteError(NeuroPruneError):
    """The loss or a weight became NaN or infinite during training."""


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
