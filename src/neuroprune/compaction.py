"""Compaction: turn the structure NeuroPrune learned into smaller dense matrices.

Zeros left inside dense matrices cost as much as any other weight (the paper measured ~11% faster
inference at 95% sparsity); a smaller dense matrix is the fastest sparse kernel there is. This
module removes, exactly (outputs unchanged up to float rounding):

- dead MLP neurons: an all-zero contract column, or an all-zero expand row (gate and up rows for
  gated MLPs) whose activation is then a constant, folded into the contract bias;
- dead attention heads: key/value groups whose query heads' output-projection columns are all zero
  (heads found redundant are already removed by `NeuroPrune.prune_redundant_heads`);
- dead attention input dimensions: hidden dimensions whose [Q, K, V] row group (columns of the q,
  k, v weights) is all zero; the projections then read a gathered input;
- zero contract rows: MLP output dimensions whose contract row is all zero; the contract then
  computes the other rows and the constant rows are put back around it.

The last two need an index copy per call, so they are applied only where enough is removed for
the smaller matmul to pay for the copy (`CompactionRule`, thresholds measured on CPU, see
docs/compaction.md). What was removed is recorded in `ModelIndex.structure()` (`structure.py`) so that
`neuroprune.load` rebuilds the same shapes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from neuroprune.errors import ConfigError
from neuroprune.model.architectures import activation_of
from neuroprune.model.index import ModelIndex
from neuroprune.model.structure import (
    add_bias,
    drop_output_rows,
    gather_block_inputs,
    kept_inputs,
    kept_outputs,
    projections,
)
from neuroprune.model.surgery import weight_matrix
from neuroprune.model.units import AttentionUnit, MLPUnit


@dataclass(frozen=True)
class CompactionRule:
    """When the index-copy kinds of compaction are worth their copy (fractions of one block).

    Attributes:
        min_input_fraction: gather the input of a block's q/k/v projections when at least this
            fraction of its input dimensions is dead.
        min_row_fraction: drop the zero rows of an MLP's contract matrix when at least this
            fraction of its rows is zero.
        multiple_of: round the number of neurons (and of contract rows) kept up to a multiple of
            this, keeping a few dead ones (exact either way): CPU GEMM kernels ran up to 1.5x
            slower on widths like 922 than on 920 (benchmarks, docs/compaction.md). 1 = off.
    Dead neurons and dead heads are always removed: that costs nothing at run time.
    """

    min_input_fraction: float = 0.25
    min_row_fraction: float = 0.25
    multiple_of: int = 8

    def __post_init__(self) -> None:
        for name in ("min_input_fraction", "min_row_fraction"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise ConfigError(f"{name}={value!r} must be a number between 0 and 1 (1 = never).")
        multiple = self.multiple_of
        if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1:
            raise ConfigError(f"multiple_of={self.multiple_of!r} must be a positive integer.")


# --- policy: what is dead ---------------------------------------------------------------------

def _bias(module: nn.Module | None, rows: int, like: torch.Tensor) -> torch.Tensor:
    if module is None or module.bias is None:
        return like.new_zeros(rows)
    return module.bias.detach()


def neuron_constants(unit: MLPUnit) -> tuple[torch.Tensor, torch.Tensor]:
    """Which neurons are removable (bool per current neuron) and, for those, the constant their
    activation takes (what the contract sees), to be folded into the contract bias."""
    up = weight_matrix(unit.up).detach()
    n = up.shape[0]
    dead_out = ~weight_matrix(unit.down).detach().ne(0).any(0)
    up_zero = ~up.ne(0).any(1)
    b_up = _bias(unit.up, n, up)
    act = activation_of(unit.module, unit.layout.up)
    constant = torch.zeros_like(b_up)
    if unit.gate is None:
        if act is not None:  # act(b_up) is a constant; without a known act it is not removable
            constant = torch.where(up_zero, act(b_up), constant)
        removable = dead_out | (up_zero & (act is not None))
    else:
        gate = weight_matrix(unit.gate).detach()
        gate_zero = ~gate.ne(0).any(1)
        b_gate = _bias(unit.gate, n, gate)
        gate_value = act(b_gate) if act is not None else torch.full_like(b_gate, float("nan"))
        # act(gate) * up is constant when both rows are zero, and 0 when either factor is 0.
        zero = (up_zero & ~b_up.ne(0)) | (gate_zero & (gate_value == 0))
        both = gate_zero & up_zero & ~gate_value.isnan()
        constant = torch.where(both & ~zero, gate_value * b_up, constant)
        removable = dead_out | zero | both
    return removable, torch.where(dead_out, torch.zeros_like(constant), constant)


def dead_groups(unit: AttentionUnit) -> list[int]:
    """Current positions of key/value groups whose query heads write nothing (zero O columns)."""
    o = weight_matrix(unit.o).detach()
    return [g for g in range(unit.num_kv_heads) if not o[:, unit.query_rows([g])].ne(0).any()]


# --- the whole model --------------------------------------------------------------------------

@torch.no_grad()
def compact_attention(unit: AttentionUnit, rule: CompactionRule) -> None:
    dead = dead_groups(unit)
    if dead:
        keep = [g for g in range(unit.num_kv_heads) if g not in dead] or [0]
        if len(keep) < unit.num_kv_heads:
            unit.keep_groups(keep)
    alive = unit.input_l1().detach().ne(0)
    width = alive.numel()
    if int(alive.sum()) == 0:
        alive[0] = True  # keep one (zero) column rather than a zero-width matmul
    if 1 - int(alive.sum()) / width >= rule.min_input_fraction and not bool(alive.all()):
        current = kept_inputs(projections(unit)[0]) or list(range(width))
        keep = [current[p] for p in alive.nonzero().flatten().tolist()]
        gather_block_inputs(unit, keep)


def _round_up_kept(removable: torch.Tensor, multiple: int) -> torch.Tensor:
    """Un-remove the first few removable entries so that the number kept is a multiple of
    `multiple` (at least one is kept, never a zero-width matmul)."""
    removable = removable.clone()
    kept = int((~removable).sum())
    target = min(removable.numel(), max(multiple, -(-kept // multiple) * multiple))
    removable[removable.nonzero().flatten()[: target - kept]] = False
    return removable


@torch.no_grad()
def compact_mlp(unit: MLPUnit, rule: CompactionRule) -> None:
    removable, constant = neuron_constants(unit)
    removable = _round_up_kept(removable, rule.multiple_of)
    if bool(removable.any()):
        down = weight_matrix(unit.down)
        contribution = down[:, removable] @ constant[removable].to(down.dtype)
        if bool(contribution.ne(0).any()):
            if unit.down.bias is None:
                add_bias(unit.down)
                unit.added_contract_bias = True
            unit.down.bias += contribution
        unit.keep_neurons((~removable).nonzero().flatten().tolist())
    rows_alive = ~_round_up_kept(~weight_matrix(unit.down).detach().ne(0).any(1), rule.multiple_of)
    if 1 - int(rows_alive.sum()) / rows_alive.numel() >= rule.min_row_fraction and not bool(rows_alive.all()):
        current = kept_outputs(unit.down) or list(range(rows_alive.numel()))
        drop_output_rows(unit.down, [current[p] for p in rows_alive.nonzero().flatten().tolist()])


def compact(
    model_or_index: nn.Module | ModelIndex | Any,
    config: Any = None,
    rule: CompactionRule | None = None,
) -> ModelIndex:
    """Physically remove the structure a finalised model has learned, in place.

    Accepts a `ModelIndex`, a sparse-training method (its index is used, so the head history is
    kept) or a plain model (indexed with the discovery options of `config`, e.g. a
    `NeuroPruneConfig`). Returns the `ModelIndex` whose `model` is now compacted; save it with
    `save_pretrained` and reload with `neuroprune.load`. Only exact zeros count: finalize first.
    """
    index = model_or_index
    if isinstance(getattr(index, "index", None), ModelIndex):  # a method: its index
        index = index.index
    if not isinstance(index, ModelIndex):
        index = ModelIndex(model_or_index, config)
    rule = rule or CompactionRule()
    for unit in index.attention:
        compact_attention(unit, rule)
    for unit in index.mlps:
        compact_mlp(unit, rule)
    return index
