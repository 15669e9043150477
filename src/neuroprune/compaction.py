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
docs/compaction.md). What was removed is recorded in `NeuroPrune.structure()` so that
`neuroprune.load` rebuilds the same shapes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .architectures import ACTIVATION_ATTRS
from .checkpoint import CheckpointError
from .config import NeuroPruneConfig
from .errors import ConfigError
from .surgery import in_features, out_features, select_inputs, select_outputs, weight_matrix
from .units import AttentionUnit, MLPUnit

if TYPE_CHECKING:
    from .pruner import NeuroPrune

INPUT_INDEX = "neuroprune_input_index"  # non-persistent buffer: original input dims a projection reads
OUTPUT_INDEX = "neuroprune_output_index"  # non-persistent buffer: original output dims it computes
OUTPUT_FILL = "neuroprune_output_fill"  # persistent buffer: the constant value of every output dim
SHARED_GATHER = "_neuroprune_shared_gather"  # attribute: a `SharedGather` of the block's projections


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


# --- surgery with a gathered input or a scattered output --------------------------------------

def select_last(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`x[..., index]` through a 2-D view of `x`: on CPU, `index_select` on the last dimension of
    a (batch, sequence, hidden) tensor ran ~10x slower than on its (tokens, hidden) view (1.6 vs
    0.16 ms for 4096 x 384 -> 77), which was ~5% of a 90%-compacted MiniLM's forward pass."""
    return x.reshape(-1, x.shape[-1]).index_select(1, index).view(*x.shape[:-1], index.numel())


class SharedGather:
    """The gathered input of the q, k and v projections of one block, computed once: they are
    called one after the other on the same tensor, so the second and third reuse the first's
    gather. Released after the last use, so no activation outlives the block."""

    def __init__(self, users: int) -> None:
        self.users = users
        self.source: torch.Tensor | None = None
        self.value: torch.Tensor | None = None
        self.left = 0

    def __call__(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        if self.source is x and self.left > 0:
            value, self.left = self.value, self.left - 1
            if not self.left:
                self.source = self.value = None
            return value
        value = select_last(x, index)
        self.source, self.value, self.left = (x, value, self.users - 1) if self.users > 1 else (None, None, 0)
        return value


def _gather_input(module: nn.Module, args: tuple) -> tuple:
    index = getattr(module, INPUT_INDEX)
    shared = getattr(module, SHARED_GATHER, None)
    gathered = shared(args[0], index) if shared is not None else select_last(args[0], index)
    return (gathered, *args[1:])


def _scatter_output(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    fill = getattr(module, OUTPUT_FILL)
    index = getattr(module, OUTPUT_INDEX)
    full = fill.to(output.dtype).expand(*output.shape[:-1], fill.shape[0])
    return full.scatter(-1, index.expand(*output.shape[:-1], index.shape[0]), output)


def kept_inputs(module: nn.Module) -> list[int] | None:
    """Original input dimensions a gathered projection still reads (None: not gathered)."""
    index = getattr(module, INPUT_INDEX, None)
    return None if index is None else index.tolist()


def kept_outputs(module: nn.Module) -> list[int] | None:
    """Original output dimensions a row-compacted projection still computes (None: all)."""
    index = getattr(module, OUTPUT_INDEX, None)
    return None if index is None else index.tolist()


def gather_inputs(module: nn.Module, keep: list[int], shared: SharedGather | None = None) -> None:
    """Keep only the (original) input dimensions `keep` of a projection; a forward pre-hook
    selects them from the full-width input (once for all projections given the same `shared`)."""
    current = kept_inputs(module) or list(range(in_features(module)))
    positions = _positions(current, keep, f"input dimensions of {type(module).__name__}")
    device = module.weight.device
    select_inputs(module, torch.tensor(positions, dtype=torch.long))
    index = torch.tensor(keep, dtype=torch.long, device=device)
    if shared is not None:
        setattr(module, SHARED_GATHER, shared)
    if INPUT_INDEX in module._buffers:
        setattr(module, INPUT_INDEX, index)
    else:
        module.register_buffer(INPUT_INDEX, index, persistent=False)
        module.register_forward_pre_hook(_gather_input)


def drop_output_rows(module: nn.Module, keep: list[int]) -> None:
    """Keep only the (original) output rows `keep` of a projection; the others are constant (their
    bias, 0 without one) and a forward hook writes them back around the computed rows."""
    current = kept_outputs(module) or list(range(out_features(module)))
    positions = _positions(current, keep, f"output rows of {type(module).__name__}")
    weight = weight_matrix(module)
    if OUTPUT_FILL in module._buffers:
        fill = getattr(module, OUTPUT_FILL)
    else:
        fill = weight.new_zeros(out_features(module))
        module.register_buffer(OUTPUT_FILL, fill)
    with torch.no_grad():
        if module.bias is not None:
            dropped = sorted(set(current) - set(keep))
            fill[dropped] = module.bias.detach()[[current.index(d) for d in dropped]]
    select_outputs(module, torch.tensor(positions, dtype=torch.long))
    index = torch.tensor(keep, dtype=torch.long, device=weight.device)
    if OUTPUT_INDEX in module._buffers:
        setattr(module, OUTPUT_INDEX, index)
    else:
        module.register_buffer(OUTPUT_INDEX, index, persistent=False)
        module.register_forward_hook(_scatter_output)


def add_bias(module: nn.Module) -> None:
    """Give a bias-less projection a zero bias (to fold constants into)."""
    module.bias = nn.Parameter(weight_matrix(module).new_zeros(out_features(module)))


def _positions(current: list[int], keep: list[int], what: str) -> list[int]:
    where = {d: p for p, d in enumerate(current)}
    missing = [d for d in keep if d not in where]
    if missing:
        raise CheckpointError(f"the saved structure keeps {what} {missing[:5]} that are already gone.")
    return [where[d] for d in keep]


# --- policy: what is dead ---------------------------------------------------------------------

def activation_of(unit: MLPUnit) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The MLP's activation function, looked up on the module holding `up`, then the MLP module."""
    parent_path = unit.layout.up.rpartition(".")[0]
    for owner in (unit.module.get_submodule(parent_path) if parent_path else unit.module, unit.module):
        for attr in ACTIVATION_ATTRS:
            fn = getattr(owner, attr, None)
            if callable(fn):
                return fn
    return None


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
    act = activation_of(unit)
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


def _projections(unit: AttentionUnit) -> list[nn.Module]:
    return [unit.qkv] if unit.qkv is not None else [unit.q, unit.k, unit.v]


def gather_block_inputs(unit: AttentionUnit, keep: list[int]) -> None:
    """Gather the input of a block's query / key / value projection(s) to the dimensions `keep`."""
    projections = _projections(unit)
    shared = SharedGather(len(projections))
    for module in projections:
        gather_inputs(module, keep, shared)


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
        current = kept_inputs(_projections(unit)[0]) or list(range(width))
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
    model_or_pruner: nn.Module | NeuroPrune,
    config: NeuroPruneConfig | None = None,
    rule: CompactionRule | None = None,
) -> NeuroPrune:
    """Physically remove the structure a (finalised) NeuroPrune model has learned, in place.

    Accepts a `NeuroPrune` (keeps its head history) or a plain model (wrapped with `config`).
    Returns the `NeuroPrune` whose `model` is now compacted; save it with `save_pretrained` and
    reload with `neuroprune.load`. Only exact zeros count: call `finalize()` first.
    """
    from .pruner import NeuroPrune

    pruner = model_or_pruner
    if not isinstance(pruner, NeuroPrune):
        pruner = NeuroPrune(model_or_pruner, config)
    rule = rule or CompactionRule()
    for unit in pruner.attention:
        compact_attention(unit, rule)
    for unit in pruner.mlps:
        compact_mlp(unit, rule)
    return pruner


# --- checkpoints ------------------------------------------------------------------------------

def compaction_structure(pruner: NeuroPrune) -> dict[str, Any]:
    """The compacted shapes, by original indices (empty for a model that was never compacted)."""
    out: dict[str, Any] = {}
    neurons = {u.name: list(u.kept_neurons) for u in pruner.mlps if len(u.kept_neurons) < u.original_neurons}
    inputs = {u.name: kept_inputs(_projections(u)[0]) for u in pruner.attention}
    rows = {u.name: kept_outputs(u.down) for u in pruner.mlps}
    biases = [u.name for u in pruner.mlps if u.added_contract_bias]
    for key, value in (
        ("mlp_neurons", neurons),
        ("attention_inputs", {k: v for k, v in inputs.items() if v is not None}),
        ("contract_rows", {k: v for k, v in rows.items() if v is not None}),
        ("contract_biases", biases),
    ):
        if value:
            out[key] = value
    return out


@torch.no_grad()
def restore_compaction(pruner: NeuroPrune, structure: dict[str, Any]) -> None:
    """Re-apply `compaction_structure` to a model whose heads are already restored, so that the
    saved weights fit (the values themselves come from the weights file)."""
    attention = _by_name(pruner.attention, structure.get("attention_inputs", {}), "attention blocks")
    mlps = {u.name: u for u in pruner.mlps}
    for key in ("mlp_neurons", "contract_rows"):
        _by_name(pruner.mlps, structure.get(key, {}), "MLP blocks")
    _by_name(pruner.mlps, dict.fromkeys(structure.get("contract_biases", [])), "MLP blocks")
    for name, keep in structure.get("mlp_neurons", {}).items():
        unit = mlps[name]
        unit.keep_neurons(_positions(unit.kept_neurons, keep, f"neurons of {name}"))
    for name in structure.get("contract_biases", []):
        if mlps[name].down.bias is None:
            add_bias(mlps[name].down)
            mlps[name].added_contract_bias = True
    for name, keep in structure.get("contract_rows", {}).items():
        drop_output_rows(mlps[name].down, keep)
    for name, keep in structure.get("attention_inputs", {}).items():
        gather_block_inputs(attention[name], keep)


def _by_name(units: list, saved: dict[str, Any], what: str) -> dict[str, Any]:
    own = {u.name: u for u in units}
    unknown = sorted(set(saved) - set(own))
    if unknown:
        raise CheckpointError(
            f"the saved compaction structure names {what} this model does not have: {unknown[:5]}; "
            "was it saved from a different model?"
        )
    return own
