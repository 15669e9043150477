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

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from neuroprune.errors import ConfigError, UnsupportedArchitectureError
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
from neuroprune.model.surgery import head_rows, in_features, out_features, weight_matrix
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


def _dead_group_mask(unit: AttentionUnit) -> torch.Tensor:
    """On the device: True per key/value group whose query heads' output-projection columns are
    all zero (all False where the family's heads cannot be removed). O's columns are head-major,
    so group g owns one contiguous slice: one pass over O for all groups."""
    o = weight_matrix(unit.o).detach()
    if unit.head_removal_refused:
        return torch.zeros(unit.num_kv_heads, dtype=torch.bool, device=o.device)
    return ~o.ne(0).any(0).reshape(unit.num_kv_heads, -1).any(1)


def dead_groups(unit: AttentionUnit) -> list[int]:
    """Current positions of key/value groups whose query heads write nothing (zero O columns);
    none where the family's heads cannot be removed (`AttentionUnit.head_removal_refused`)."""
    return [g for g, dead in enumerate(_dead_group_mask(unit).tolist()) if dead]


# --- the plan: what compact would remove, without removing it ---------------------------------
#
# The plan runs on every structural selection during training (`methods/structural.py`), so it is
# on the training path: every decision is first made on the device for all blocks, and the few
# numbers and positions the host needs come back in ONE copy (`to_host`) instead of an
# `int()` / `bool()` / `.tolist()` per block (each a host-device synchronisation on a GPU).

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
    """What `compact` does to one MLP: the neurons it removes (bool per current neuron, on the
    weights' device), the constants they fold into the contract bias, whether that needs a new
    bias, and the current contract rows it keeps computing (None: all). `dead_neurons`: the
    neurons `neuron_constants` found removable when planned, before `rule.multiple_of` kept some
    of them (host positions)."""

    unit: MLPUnit
    removable: torch.Tensor
    constant: torch.Tensor
    adds_bias: bool
    keep_rows: list[int] | None
    dead_neurons: list[int] = field(default_factory=list)
    _kept: tuple[int, int, int] | None = field(default=None, repr=False, compare=False)

    @property
    def keep_neurons(self) -> list[int]:
        return (~self.removable).nonzero().flatten().tolist()

    @property
    def kept_count(self) -> int:
        """How many neurons `compact` keeps: the count read with the plan's one host copy, counted
        again only if `removable` was replaced or changed in place since (`compact_uniform` does)."""
        key = (id(self.removable), self.removable._version)
        if self._kept is None or self._kept[:2] != key:
            self._kept = (*key, int((~self.removable).sum()))
        return self._kept[2]


def _attention_masks(unit: AttentionUnit) -> tuple[torch.Tensor, torch.Tensor]:
    """On the device: the groups `compact` keeps (the live ones, group 0 if none is) and the input
    dims that are non-zero in some q/k/v row of those groups (dim 0 if none is)."""
    q, k, v = (m.detach() for m in unit.qkv_matrices())
    groups = unit.num_kv_heads
    keep = ~_dead_group_mask(unit)
    keep[0] |= ~keep.any()  # keep one (dead) group rather than none
    alive = (q.ne(0).reshape(groups, -1, q.shape[1]).any(1) & keep[:, None]).any(0)
    for m in (k, v):
        if unit.multi_query:  # the shared key/value head, whichever groups stay
            alive |= m.ne(0).any(0)
        else:
            alive |= (m.ne(0).reshape(groups, -1, m.shape[1]).any(1) & keep[:, None]).any(0)
    alive[0] |= ~alive.any()  # keep one (zero) column rather than a zero-width matmul
    return keep, alive


def _attention_plan(unit: AttentionUnit, keep: list[bool], alive: list[bool],
                    rule: CompactionRule) -> AttentionPlan:
    """The plan of one block from its host masks (`_attention_masks`)."""
    kept = [g for g, k in enumerate(keep) if k]
    inputs = [i for i, a in enumerate(alive) if a]
    gather = len(inputs) < len(alive) and 1 - len(inputs) / len(alive) >= rule.min_input_fraction
    return AttentionPlan(unit, kept if len(kept) < unit.num_kv_heads else None, inputs if gather else None)


def _mlp_masks(unit: MLPUnit, rule: CompactionRule) -> dict[str, torch.Tensor]:
    """On the device: the removable neurons before and after rounding, their constants, whether
    folding them needs a new contract bias, and the contract rows alive over the kept neurons."""
    dead, constant = neuron_constants(unit)
    removable = _round_up_kept(dead, rule.multiple_of)
    down = weight_matrix(unit.down).detach()
    if unit.down.bias is None:  # the removed neurons' constants summed through the contract
        contribution = down @ torch.where(removable, constant, torch.zeros_like(constant)).to(down.dtype)
        adds_bias = contribution.ne(0).any().reshape(1)
    else:
        adds_bias = torch.zeros(1, dtype=torch.bool, device=down.device)
    rows_alive = ~_round_up_kept(~(down.ne(0) & ~removable[None, :]).any(1), rule.multiple_of)
    return {"dead": dead, "removable": removable, "constant": constant, "adds_bias": adds_bias,
            "rows_alive": rows_alive}


def _mlp_plan(unit: MLPUnit, masks: dict[str, torch.Tensor], host: dict[str, list[bool]],
              rule: CompactionRule) -> MLPPlan:
    """The plan of one MLP from its device masks and their host copies (`_mlp_masks`)."""
    rows_alive = host["rows_alive"]
    rows = [r for r, a in enumerate(rows_alive) if a]
    drop = len(rows) < len(rows_alive) and 1 - len(rows) / len(rows_alive) >= rule.min_row_fraction
    removable = masks["removable"]
    kept = sum(not r for r in host["removable"])
    return MLPPlan(unit, removable, masks["constant"], host["adds_bias"][0], rows if drop else None,
                   [i for i, d in enumerate(host["dead"]) if d], (id(removable), removable._version, kept))


def to_host(tensors: list[torch.Tensor], dtype: torch.dtype = torch.bool) -> list[list[Any]]:
    """Tensors (any devices, any shapes) as flat host lists of `dtype`, read back with one copy
    for all of them (one host-device synchronisation instead of one per tensor)."""
    if not tensors:
        return []
    device = tensors[0].device
    flat = torch.cat([t.detach().reshape(-1).to(device=device, dtype=dtype) for t in tensors]).tolist()
    out, start = [], 0
    for t in tensors:
        out.append(flat[start:start + t.numel()])
        start += t.numel()
    return out


@torch.no_grad()
def plan_blocks(attention: list[AttentionUnit], mlps: list[MLPUnit],
                rule: CompactionRule) -> tuple[list[AttentionPlan], list[MLPPlan]]:
    """The plans of the given blocks, decided on the device and read back in one copy."""
    attention_masks = [_attention_masks(u) for u in attention]
    mlp_masks = [_mlp_masks(u, rule) for u in mlps]
    names = ("dead", "removable", "adds_bias", "rows_alive")
    host = iter(to_host([t for pair in attention_masks for t in pair]
                         + [m[name] for m in mlp_masks for name in names]))
    attention_plans = [_attention_plan(u, next(host), next(host), rule) for u in attention]
    mlp_plans = [_mlp_plan(u, m, {name: next(host) for name in names}, rule)
                 for u, m in zip(mlps, mlp_masks)]
    return attention_plans, mlp_plans


def plan_attention(unit: AttentionUnit, rule: CompactionRule) -> AttentionPlan:
    """Dead groups (all their query heads' output-projection columns zero), then the input
    dimensions that are zero in every q/k/v row of the groups that stay."""
    return plan_blocks([unit], [], rule)[0][0]


def plan_mlp(unit: MLPUnit, rule: CompactionRule) -> MLPPlan:
    """Removable neurons (rounded to `rule.multiple_of` kept), then the contract rows that are
    zero over the neurons that stay."""
    return plan_blocks([], [unit], rule)[1][0]


@dataclass
class CompactionPlan:
    """What `compact(index, rule=rule)` would remove from every block, decided by the same
    functions it uses (`neuroprune.model.flops` counts FLOPs and parameters from it)."""

    attention: list[AttentionPlan]
    mlps: list[MLPPlan]


def plan(index: ModelIndex, rule: CompactionRule | None = None) -> CompactionPlan:
    """The compaction plan of every block of `index`, without changing the model (one host copy
    for the whole model: `plan_blocks`)."""
    return CompactionPlan(*plan_blocks(index.attention, index.mlps, rule or CompactionRule()))


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
    `multiple` (at least one is kept, never a zero-width matmul). On the device, no host copy:
    an entry stays removable when its rank among the removable ones exceeds the number to un-remove."""
    kept = (~removable).sum()
    target = (torch.div(kept + multiple - 1, multiple, rounding_mode="floor") * multiple).clamp(
        min=multiple).clamp(max=removable.numel())
    return removable & (removable.cumsum(0) > target - kept)


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


# --- uniform compaction: a smaller model its family's stock config describes -----------------

@dataclass
class UniformResult:
    """What `compact_uniform` kept: the key/value groups and neurons per block (the same in every
    block), what the non-uniform compaction would have kept, and the config fields it changed."""

    index: ModelIndex
    groups: int
    neurons: int
    min_groups_needed: list[int]
    min_neurons_needed: list[int]
    config_changes: dict[str, int]


@torch.no_grad()
def _pad_groups(unit: AttentionUnit, target: int) -> None:
    """Give a block whose heads were already removed `target` key/value groups again: the removed
    groups come back with zero Q, K, V rows (and biases) and zero output-projection columns, so
    they add exactly nothing."""
    modules = [unit.q, unit.k, unit.v, unit.o]
    if unit.qkv is not None or any(not isinstance(m, nn.Linear) for m in modules):
        raise UnsupportedArchitectureError(
            f"{unit.name}: uniform compaction re-adds removed heads only to separate q/k/v Linear "
            "projections (Llama / Qwen2 / Mistral style)."
        )
    removed = [g for g in range(unit.original_groups) if g not in unit.kept_groups]
    back = removed[: target - unit.num_kv_heads]
    groups = sorted(unit.kept_groups + back)
    old = [groups.index(g) for g in unit.kept_groups]  # positions of the present groups
    size = unit.group_size
    shared_kv = () if unit.multi_query else ((unit.k, 1, 0), (unit.v, 1, 0))  # multi-query: K/V stay
    for module, per_group, dim in ((unit.q, size, 0), *shared_kv, (unit.o, size, 1)):
        rows = head_rows([p * per_group + t for p in old for t in range(per_group)], unit.head_dim)
        for name in ("weight", "bias"):
            param = getattr(module, name)
            if param is None or (name == "bias" and dim == 1):
                continue
            shape = list(param.shape)
            shape[dim] = len(groups) * per_group * unit.head_dim
            grown = param.new_zeros(shape)
            grown.index_copy_(dim, rows.to(param.device), param.detach())
            setattr(module, name, nn.Parameter(grown, requires_grad=param.requires_grad))
        if dim == 0:
            module.out_features = module.weight.shape[0]
        else:
            module.in_features = module.weight.shape[1]
    unit.kept_groups = groups
    unit._sync_attributes()


def _stock_model(model: nn.Module, changes: dict[str, int]) -> tuple[Any, nn.Module]:
    """The model's config with `changes`, and the stock model it describes (on the meta device);
    refused where the family's config or model class does not accept the numbers."""
    import copy

    from huggingface_hub.errors import StrictDataclassError  # transformers 5 validates configs with it

    config = copy.deepcopy(model.config)
    try:
        for key, value in changes.items():
            setattr(config, key, value)
        with torch.device("meta"):
            return config, type(model)._from_config(config)
    except (ValueError, TypeError, StrictDataclassError) as err:
        raise UnsupportedArchitectureError(_refusal(model, f"its config refuses {changes} ({err})")) from None


def _refusal(model: nn.Module, why: str) -> str:
    return (f"uniform compaction: {type(model).__name__} cannot describe a uniformly narrower model, {why}. "
            "Save the non-uniform compaction instead (neuroprune.load, or the Auto classes with "
            "trust_remote_code=True).")


def _check_names(model: nn.Module, stock: nn.Module) -> None:
    """Refuse, before any surgery, a model whose parameters the stock class does not name alike
    (e.g. a bias removed by hand, or one the config cannot express): otherwise the refusal would
    come from `_check_shapes` with the model already narrowed."""
    own, built = model.state_dict().keys(), stock.state_dict().keys()
    wrong = sorted(own ^ built)
    if wrong:
        raise UnsupportedArchitectureError(_refusal(model, f"its stock model differs at {wrong[:3]}"))


def _check_widths(index: ModelIndex, stock: nn.Module, groups: int, neurons: int) -> None:
    """Refuse, before any surgery, a family whose stock model does not take the widths the new
    config was given (e.g. OPT keeps its MLP width in `ffn_dim`, not `intermediate_size`): the
    stock model's output projections must read `groups` heads' worth of columns and its contract
    projections `neurons` inputs."""
    names = {id(m): n for n, m in index.model.named_modules()}
    wanted = [(u.o, groups * u.group_size * u.head_dim) for u in index.attention]
    wanted += [(u.down, neurons) for u in index.mlps]
    for module, width in wanted:
        name = names[id(module)]
        built = in_features(stock.get_submodule(name))
        if built != width:
            raise UnsupportedArchitectureError(_refusal(
                index.model, f"its stock model built from the new config keeps {name} at {built} inputs, "
                f"not {width}: the config field this family reads for that width is not the one set"))


def _check_shapes(model: nn.Module, stock: nn.Module) -> None:
    own, built = model.state_dict(), stock.state_dict()
    wrong = sorted(k for k in own.keys() | built.keys()
                   if k not in own or k not in built or own[k].shape != built[k].shape)
    if wrong:
        raise UnsupportedArchitectureError(_refusal(model, f"its stock model differs at {wrong[:3]}"))


def _head_fields(unit: AttentionUnit, groups: int) -> dict[str, int]:
    """The config fields of `groups` key/value groups of `unit`'s shape in every layer."""
    return {"num_attention_heads": groups * unit.group_size,
            "num_key_value_heads": 1 if unit.multi_query else groups,
            "head_dim": unit.head_dim}


def _accepted_groups(index: ModelIndex, groups: int) -> int:
    """The fewest key/value groups >= `groups` that the family's config accepts: transformers'
    `LlamaConfig` refuses a hidden size that is not a multiple of the head count even when
    `head_dim` is given, so a few more (dead, exact) groups may have to stay."""
    if not index.attention:
        return groups
    from huggingface_hub.errors import StrictDataclassError  # transformers 5 validates configs with it

    unit, config = index.attention[0], index.model.config
    for candidate in range(groups, unit.original_groups + 1):
        try:
            type(config).from_dict({**config.to_dict(), **_head_fields(unit, candidate)})
        except (ValueError, TypeError, StrictDataclassError):
            continue
        return candidate
    return groups


@torch.no_grad()
def compact_uniform(model_or_index: nn.Module | ModelIndex | Any, config: Any = None,
                    rule: CompactionRule | None = None) -> UniformResult:
    """Compact so that every block keeps the same number of key/value groups and of MLP neurons,
    and rewrite the model's config to those numbers: the result loads with the family's stock
    class (serving engines), no remote code, no gathers or scatters.

    Exact (outputs unchanged up to float rounding): each block keeps the most any block needs
    (`rule.multiple_of` applies to neurons; groups are raised to a head count the config accepts);
    where a block needs fewer it keeps some of its dead groups / neurons (they add exactly zero),
    and blocks whose heads were already removed during training get zero groups back. Neurons
    whose constant activation would have to be folded into a contract bias the config does not
    have are kept. Returns the index of the re-based model (its structure is empty: the config
    now describes it).
    """
    index = _index_of(model_or_index, config)
    rule = rule or CompactionRule()
    base = plan(index, CompactionRule(1.0, 1.0, rule.multiple_of))
    needed_groups = [p.unit.num_kv_heads if p.keep_groups is None else len(p.keep_groups)
                     for p in base.attention]
    groups = _accepted_groups(index, max(needed_groups, default=0))
    for p in base.mlps:
        if p.adds_bias:  # would need a bias the config lacks: keep the neurons that need it
            down = weight_matrix(p.unit.down).detach()
            p.removable &= ~(down.ne(0).any(0) & p.constant.ne(0))
        p.keep_rows = None
    needed_neurons = [int((~p.removable).sum()) for p in base.mlps]
    neurons = max(needed_neurons, default=0)
    short = [p.unit.name for p in base.mlps if p.removable.numel() < neurons]
    if short:
        raise ConfigError(
            f"{short[0]} has fewer than the {neurons} neurons another block keeps: the model was "
            "compacted before. Run uniform compaction on the uncompacted model."
        )
    changes = {**(_head_fields(index.attention[0], groups) if index.attention else {}),
               **({"intermediate_size": neurons} if index.mlps else {})}
    new_config, stock = _stock_model(index.model, changes)  # refuses before anything changes
    _check_names(index.model, stock)  # so does this: parameters the stock class lacks or adds
    _check_widths(index, stock, groups, neurons)  # and this: widths the new config does not set
    for p in base.attention:
        _uniform_groups(p, groups)
    for p in base.mlps:
        kept = int((~p.removable).sum())
        if kept < neurons:  # the strongest removable neurons stay (exact: a kept neuron is exact)
            strength = weight_matrix(p.unit.down).detach().abs().sum(0)
            spare = p.removable.nonzero().flatten()
            p.removable[spare[strength[spare].argsort(descending=True)][: neurons - kept]] = False
        apply_mlp_plan(p)
    _check_shapes(index.model, stock)
    index.model.config = new_config
    fresh = ModelIndex(index.model, index.discovery)
    return UniformResult(fresh, groups, neurons, needed_groups, needed_neurons, changes)


def _uniform_groups(p: AttentionPlan, groups: int) -> None:
    """Give one block exactly `groups` key/value groups: its live ones, then its strongest dead
    ones (any would be exact), or zero groups where training already removed more."""
    unit = p.unit
    if unit.num_kv_heads < groups:
        _pad_groups(unit, groups)
        return
    keep = p.keep_groups if p.keep_groups is not None else list(range(unit.num_kv_heads))
    if len(keep) < groups:
        norms = unit.group_blocks().norm(dim=1)
        spare = sorted(set(range(unit.num_kv_heads)) - set(keep), key=lambda g: -float(norms[g]))
        keep = sorted(keep + spare[: groups - len(keep)])
    if len(keep) < unit.num_kv_heads:
        unit.keep_groups(keep)
