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
from neuroprune.model import flops
from neuroprune.model.index import ModelIndex
from neuroprune.model.structure import (
    add_bias,
    drop_output_rows,
    gather_block_inputs,
    kept_inputs,
    kept_outputs,
    projections,
)
from neuroprune.model.surgery import in_features, out_features, weight_matrix
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

def _bias(bias: torch.Tensor | None, rows: int, like: torch.Tensor) -> torch.Tensor:
    return like.new_zeros(rows) if bias is None else bias.detach()


def neuron_constants(unit: MLPUnit) -> tuple[torch.Tensor, torch.Tensor]:
    """Which neurons are removable (bool per current neuron) and, for those, the constant their
    activation takes (what the contract sees), to be folded into the contract bias."""
    up = unit.up_matrix().detach()
    n = up.shape[0]
    dead_out = ~weight_matrix(unit.down).detach().ne(0).any(0)
    up_zero = ~up.ne(0).any(1)
    b_up = _bias(unit.up_bias(), n, up)
    act = unit.activation()
    constant = torch.zeros_like(b_up)
    if not unit.gated:
        if act is not None:  # act(b_up) is a constant; without a known act it is not removable
            constant = torch.where(up_zero, act(b_up), constant)
        removable = dead_out | (up_zero & (act is not None))
    else:
        gate = unit.gate_matrix().detach()
        gate_zero = ~gate.ne(0).any(1)
        b_gate = _bias(unit.gate_bias(), n, gate)
        gate_value = act(b_gate) if act is not None else torch.full_like(b_gate, float("nan"))
        # act(gate) * up is constant when both rows are zero, and 0 when either factor is 0.
        zero = (up_zero & ~b_up.ne(0)) | (gate_zero & (gate_value == 0))
        both = gate_zero & up_zero & ~gate_value.isnan()
        constant = torch.where(both & ~zero, gate_value * b_up, constant)
        removable = dead_out | zero | both
    return removable, torch.where(dead_out, torch.zeros_like(constant), constant)


def dead_groups(unit: AttentionUnit) -> list[int]:
    """Current positions of key/value groups whose query heads write nothing (zero O columns);
    none where the family's heads cannot be removed (`AttentionUnit.head_removal_refused`)."""
    if unit.head_removal_refused:
        return []
    o = weight_matrix(unit.o).detach()
    return [g for g in range(unit.num_kv_heads) if not o[:, unit.query_rows([g])].ne(0).any()]


# --- the plan: what compact would remove, without removing it ---------------------------------

@dataclass
class AttentionPlan:
    """What `compact` does to one attention block: the key/value groups it keeps (current
    positions; None: all) and the current input positions its q/k/v projections keep reading
    (None: no gather)."""

    unit: AttentionUnit
    keep_groups: list[int] | None
    keep_inputs: list[int] | None


@dataclass
class MLPPlan:
    """What `compact` does to one MLP: the neurons it removes (bool per current neuron), the
    constants they fold into the contract bias, whether that needs a new bias, and the current
    contract rows it keeps computing (None: all)."""

    unit: MLPUnit
    removable: torch.Tensor
    constant: torch.Tensor
    adds_bias: bool
    keep_rows: list[int] | None

    @property
    def keep_neurons(self) -> list[int]:
        return (~self.removable).nonzero().flatten().tolist()


@torch.no_grad()
def plan_attention(unit: AttentionUnit, rule: CompactionRule) -> AttentionPlan:
    """Dead groups (all their query heads' output-projection columns zero), then the input
    dimensions that are zero in every q/k/v row of the groups that stay."""
    dead = dead_groups(unit)
    keep = [g for g in range(unit.num_kv_heads) if g not in dead] or [0]
    q, k, v = (m.detach() for m in unit.qkv_matrices())
    kv_rows = unit.kv_rows(keep)
    alive = q[unit.query_rows(keep)].ne(0).any(0) | k[kv_rows].ne(0).any(0) | v[kv_rows].ne(0).any(0)
    width = alive.numel()
    if int(alive.sum()) == 0:
        alive[0] = True  # keep one (zero) column rather than a zero-width matmul
    inputs = None
    if 1 - int(alive.sum()) / width >= rule.min_input_fraction and not bool(alive.all()):
        inputs = alive.nonzero().flatten().tolist()
    return AttentionPlan(unit, keep if len(keep) < unit.num_kv_heads else None, inputs)


@torch.no_grad()
def plan_mlp(unit: MLPUnit, rule: CompactionRule) -> MLPPlan:
    """Removable neurons (rounded to `rule.multiple_of` kept), then the contract rows that are
    zero over the neurons that stay."""
    removable, constant = neuron_constants(unit)
    removable = _round_up_kept(removable, rule.multiple_of)
    down = weight_matrix(unit.down).detach()
    adds_bias = False
    if bool(removable.any()):
        contribution = down[:, removable] @ constant[removable].to(down.dtype)
        adds_bias = unit.down.bias is None and bool(contribution.ne(0).any())
    rows_alive = ~_round_up_kept(~down[:, ~removable].ne(0).any(1), rule.multiple_of)
    rows = None
    if 1 - int(rows_alive.sum()) / rows_alive.numel() >= rule.min_row_fraction and not bool(rows_alive.all()):
        rows = rows_alive.nonzero().flatten().tolist()
    return MLPPlan(unit, removable, constant, adds_bias, rows)


@dataclass
class CompactionPlan:
    """What `compact(index, rule=rule)` would remove from every block, decided by the same
    functions it uses (`neuroprune.model.flops` counts FLOPs and parameters from it)."""

    attention: list[AttentionPlan]
    mlps: list[MLPPlan]


def plan(index: ModelIndex, rule: CompactionRule | None = None) -> CompactionPlan:
    """The compaction plan of every block of `index`, without changing the model."""
    rule = rule or CompactionRule()
    return CompactionPlan([plan_attention(u, rule) for u in index.attention],
                          [plan_mlp(u, rule) for u in index.mlps])


def flop_count(model_or_index: nn.Module | ModelIndex | Any, seq_len: int = flops.DEFAULT_SEQ_LEN,
               rule: CompactionRule | None = None, config: Any = None) -> flops.FlopCount:
    """Block FLOPs (attention + MLP at `seq_len`, dense and compacted, `fraction`) and parameters
    (whole model, dense and compacted) of the model as `compact(..., rule=rule)` would leave it;
    the model is not changed. Accepts what `compact` accepts."""
    index = _index_of(model_or_index, config)
    return flops.count(index, plan(index, rule), seq_len)


# --- carrying the plan out --------------------------------------------------------------------

@torch.no_grad()
def apply_attention_plan(p: AttentionPlan) -> None:
    unit = p.unit
    if p.keep_groups is not None:
        unit.keep_groups(p.keep_groups)
    if p.keep_inputs is not None:
        current = kept_inputs(projections(unit)[0]) or list(range(in_features(projections(unit)[0])))
        gather_block_inputs(unit, [current[i] for i in p.keep_inputs])


@torch.no_grad()
def apply_mlp_plan(p: MLPPlan) -> None:
    unit, removable, constant = p.unit, p.removable, p.constant
    if bool(removable.any()):
        down = weight_matrix(unit.down)
        contribution = down[:, removable] @ constant[removable].to(down.dtype)
        if bool(contribution.ne(0).any()):
            if unit.down.bias is None:
                add_bias(unit.down)
                unit.added_contract_bias = True
            unit.down.bias += contribution
        unit.keep_neurons(p.keep_neurons)
    if p.keep_rows is not None:
        current = kept_outputs(unit.down) or list(range(out_features(unit.down)))
        drop_output_rows(unit.down, [current[r] for r in p.keep_rows])


def compact_attention(unit: AttentionUnit, rule: CompactionRule) -> None:
    apply_attention_plan(plan_attention(unit, rule))


def _round_up_kept(removable: torch.Tensor, multiple: int) -> torch.Tensor:
    """Un-remove the first few removable entries so that the number kept is a multiple of
    `multiple` (at least one is kept, never a zero-width matmul)."""
    removable = removable.clone()
    kept = int((~removable).sum())
    target = min(removable.numel(), max(multiple, -(-kept // multiple) * multiple))
    removable[removable.nonzero().flatten()[: target - kept]] = False
    return removable


def compact_mlp(unit: MLPUnit, rule: CompactionRule) -> None:
    apply_mlp_plan(plan_mlp(unit, rule))


def _index_of(model_or_index: nn.Module | ModelIndex | Any, config: Any) -> ModelIndex:
    index = model_or_index
    if isinstance(getattr(index, "index", None), ModelIndex):  # a method: its index
        index = index.index
    if not isinstance(index, ModelIndex):
        index = ModelIndex(model_or_index, config)
    return index


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
    index = _index_of(model_or_index, config)
    rule = rule or CompactionRule()
    for unit in index.attention:
        compact_attention(unit, rule)
    for unit in index.mlps:
        compact_mlp(unit, rule)
    return index
