"""Structured magnitude pruning (`--method structured`): the baseline a user would otherwise reach
for. Whole units go, smallest weights first, on the same cubic schedule and to the same FLOP
budget as NeuroPrune's `--target-flops`, with no penalty in the loss:

- an MLP neuron by the norm of its fan-in row (the gate and up rows together for gated MLPs;
  optionally times its contract column's norm),
- an attention head (a key/value group: its query heads with their K and V) by the norm of its
  whole parameter slice: Q, K, V rows and the output projection's columns,
- an attention input dimension by the norm of its [Q, K, V] column over the groups still present.

The selection itself is `methods.structural` (shared with NeuroPrune: scores of each kind divided
by their mean, lowest first until the planned compacted FLOPs reach the scheduled fraction, each
unit's saving read from `compaction.plan`), and so are the masks that hold removed units at exact
zero after every optimiser step. Only the scores are this module's. The survivors train freely.

    method = build_method("structured", model, target_flops=0.5)     # half the block FLOPs
    method = StructuredMagnitude(model, StructuredConfig(norm=1), SparsityTarget(flops=0.25))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from neuroprune.config import MethodConfig
from neuroprune.errors import ConfigError
from neuroprune.methods.base import SparsityMethod
from neuroprune.methods.steering import SparsityTarget
from neuroprune.methods.structural import Removed, StructuralPruner, UnitScores, alive_rows
from neuroprune.model.index import ModelIndex
from neuroprune.model.surgery import ParamChange, weight_matrix


@dataclass(frozen=True, kw_only=True)
class StructuredConfig(MethodConfig):
    """Structured magnitude pruning (the shared options of `MethodConfig` plus; the FLOP budget,
    its schedule and which unit kinds may go are the method's `SparsityTarget`):

    Attributes:
        norm: the p of the norms that rank units: 2 (default, Euclidean) or 1 (sum of |w|).
        neuron_fan_out: rank a neuron by its fan-in row norm times its contract column norm
            (what it reads and what it writes) instead of its fan-in row alone. Off by default:
            the plain row norm is the textbook baseline.
    """

    norm: int = 2
    neuron_fan_out: bool = False

    def validate(self) -> None:
        super().validate()
        if isinstance(self.norm, bool) or self.norm not in (1, 2):
            raise ConfigError(f"norm={self.norm!r} must be 1 or 2 (the p of the unit norms).")
        if not isinstance(self.neuron_fan_out, bool):
            raise ConfigError(f"neuron_fan_out must be true or false, got {self.neuron_fan_out!r}.")


def _pnorm(t: torch.Tensor, p: int, dim: int | None = None) -> torch.Tensor:
    """The p-th power of the p-norm (additive over the parts of a unit), so parts can be summed
    before the root is taken."""
    powered = t.abs() if p == 1 else t * t
    return powered.sum() if dim is None else powered.sum(dim)


@torch.no_grad()
def magnitude_scores(index: ModelIndex, removed: Removed | None = None, p: int = 2,
                     neuron_fan_out: bool = False) -> UnitScores:
    """The structured-magnitude scores (module docstring), the one home of "plain norms" (the
    ablation of NeuroPrune's scores uses them too): a neuron's fan-in row p-norm (times its
    fan-out column norm with `neuron_fan_out`), a key/value group's norm over its Q/K/V rows and
    output-projection columns, an input dim's q/k/v column norm over the groups present."""
    removed = removed or Removed()
    root = 1.0 / p
    neurons = []
    for unit in index.mlps:
        fan_in = sum(_pnorm(m.detach(), p, 1) for m in unit.expand_matrices()) ** root
        if neuron_fan_out:
            fan_in = fan_in * _pnorm(weight_matrix(unit.down).detach(), p, 0) ** root
        neurons.append(fan_in)
    groups, inputs = [], []
    for b, unit in enumerate(index.attention):
        o = weight_matrix(unit.o).detach()
        blocks = _pnorm(unit.group_blocks(), p, 1)
        out = torch.stack([_pnorm(o[:, unit.query_rows([g])], p) for g in range(unit.num_kv_heads)])
        groups.append((blocks + out) ** root)
        rows = alive_rows(unit, removed.groups.get(b, []))
        inputs.append(sum(_pnorm(r, p, 0) for r in rows) ** root)
    return UnitScores(neurons, groups, inputs)


class StructuredMagnitude(SparsityMethod):
    """Structured magnitude pruning to a FLOP budget (module docstring). Runtime state: the
    `StructuralPruner`'s (removed units, last selection, scheduled and planned FLOP fractions),
    saved in checkpoints; the masks are rebuilt from it in `on_train_begin`."""

    name = "structured"
    config_class = StructuredConfig
    config: StructuredConfig

    def __init__(self, model: nn.Module | ModelIndex, config: StructuredConfig | None = None,
                 target: SparsityTarget | float | None = None) -> None:
        super().__init__(model, config)
        if isinstance(target, (int, float)) and not isinstance(target, bool):
            target = SparsityTarget(flops=float(target))
        if target is None or target.flops is None:
            raise ConfigError(
                "structured magnitude pruning removes whole units to a FLOP budget: give "
                "--target-flops F (e.g. 0.5 for half the dense blocks' FLOPs), not --target-sparsity; "
                "for magnitude pruning to an element sparsity use --method gmp."
            )
        self.target = target
        self.structural = StructuralPruner(self.index, target, self.unit_scores)

    # --- scores ----------------------------------------------------------------------------------
    def unit_scores(self, removed: Removed) -> UnitScores:
        """Norms of each present unit's weights (`magnitude_scores`); higher = keep."""
        return magnitude_scores(self.index, removed, self.config.norm, self.config.neuron_fan_out)

    # --- hooks -----------------------------------------------------------------------------------
    def on_train_begin(self, total_steps: int, optimizer: torch.optim.Optimizer | None = None) -> None:
        super().on_train_begin(total_steps, optimizer)
        self.structural.begin(total_steps)  # after a resume: the masks of the saved removals

    def on_step_end(self, step: int) -> list[ParamChange]:
        super().on_step_end(step)
        self.structural.step(step)  # masks only, no surgery: the optimiser state stays valid
        return []

    # --- logs and state --------------------------------------------------------------------------
    def log_values(self, detailed: bool = False) -> dict[str, float]:
        values = super().log_values(detailed)
        return {**values, **self.structural.log_values(values["heads_kept"])}

    def summary(self) -> dict[str, Any]:
        return {**super().summary(), "target_flops": self.target.flops}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "structural": self.structural.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if "structural" in state:
            self.structural.load_state_dict(state["structural"])
