"""FLOPs of the attention and MLP blocks, dense and as `compaction.compact` would leave them.

What a user buys from structured pruning is a cheaper forward pass, not zeros, so the FLOP target
(`SparsityTarget.flops`) and the reports count exactly what compaction removes: the count of a
model is taken from `compaction.plan` (entry point: `compaction.flop_count`), the same decisions
`compact` carries out (dead neurons, dead key/value groups, gathered attention inputs, dropped
contract rows, the rounding of kept widths), never from a second copy of those rules.

Convention: one multiply-add = 2 FLOPs; per token a projection of shape (out, in) costs 2 in out;
per query head, the scores Q K^T and the context A V cost 2 seq^2 head_dim each. Biases,
softmax, norms, activations and residual adds are left out (they are O(seq d), not O(seq d^2)).
Embeddings and task heads are not blocks and are not counted. Cross-attention is counted at the
same `seq_len` for queries and keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from neuroprune.errors import ConfigError
from neuroprune.model.structure import projections
from neuroprune.model.surgery import in_features, out_features
from neuroprune.model.units import AttentionUnit, MLPUnit

DEFAULT_SEQ_LEN = 128


@dataclass(frozen=True)
class AttentionShape:
    """The widths that set an attention block's cost: input dims the q/k/v projections read,
    query rows (query heads x head size), key/value rows, output-projection width."""

    d_in: int
    q_rows: int
    kv_rows: int
    d_out: int

    def flops(self, seq_len: int) -> int:
        projections_ = 2 * seq_len * (self.d_in * (self.q_rows + 2 * self.kv_rows) + self.q_rows * self.d_out)
        scores_and_context = 2 * 2 * seq_len * seq_len * self.q_rows
        return projections_ + scores_and_context


@dataclass(frozen=True)
class MLPShape:
    """The widths that set an MLP's cost: input dims, neurons, expand matrices (2 when gated),
    contract rows computed."""

    d_in: int
    neurons: int
    expand: int
    rows: int

    def flops(self, seq_len: int) -> int:
        return 2 * seq_len * self.neurons * (self.d_in * self.expand + self.rows)


# --- shapes: original, current, planned -------------------------------------------------------

def original_attention(unit: AttentionUnit) -> AttentionShape:
    q_rows = unit.original_heads * unit.head_dim
    kv_rows = unit.original_kv_heads * unit.head_dim
    numel = unit.original_numel
    d_in = numel["qkv"] // (q_rows + 2 * kv_rows) if "qkv" in numel else numel["q"] // q_rows
    return AttentionShape(d_in, q_rows, kv_rows, numel["o"] // q_rows)


def current_attention(unit: AttentionUnit) -> AttentionShape:
    return AttentionShape(in_features(projections(unit)[0]), unit.num_heads * unit.head_dim,
                          unit.kv_heads * unit.head_dim, out_features(unit.o))


def original_mlp(unit: MLPUnit) -> MLPShape:
    n = unit.original_neurons
    expand = len(unit.expand_matrices())
    expand_numel = sum(v for k, v in unit.original_numel.items() if k != "down")
    return MLPShape(expand_numel // (expand * n), n, expand, unit.original_numel["down"] // n)


def current_mlp(unit: MLPUnit) -> MLPShape:
    expand = unit.expand_matrices()
    return MLPShape(expand[0].shape[1], expand[0].shape[0], len(expand), out_features(unit.down))


def planned_attention(p: Any) -> AttentionShape:
    """The shape `compaction.apply_attention_plan(p)` leaves."""
    now = current_attention(p.unit)
    groups = p.unit.num_kv_heads if p.keep_groups is None else len(p.keep_groups)
    head = p.unit.head_dim
    return AttentionShape(now.d_in if p.keep_inputs is None else len(p.keep_inputs),
                          groups * p.unit.group_size * head,
                          (1 if p.unit.multi_query else groups) * head, now.d_out)


def planned_mlp(p: Any) -> MLPShape:
    """The shape `compaction.apply_mlp_plan(p)` leaves."""
    now = current_mlp(p.unit)
    return MLPShape(now.d_in, p.kept_count, now.expand,
                    now.rows if p.keep_rows is None else len(p.keep_rows))


# --- counts -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class FlopCount:
    """Block FLOPs (attention + MLP, at `seq_len`) of the dense model and of the compacted one,
    and the parameter counts of the whole model, dense and compacted."""

    seq_len: int
    dense: int
    compacted: int
    params_dense: int
    params_compacted: int
    heads_compacted: int | None = None  # query heads the compacted model keeps

    @property
    def fraction(self) -> float:
        """Compacted block FLOPs over dense block FLOPs (what `--target-flops` asks for)."""
        return self.compacted / self.dense if self.dense else 1.0

    def to_dict(self) -> dict[str, Any]:
        return {"flops_fraction": self.fraction, "block_flops_dense": self.dense,
                "block_flops_compacted": self.compacted, "flops_seq_len": self.seq_len,
                "params_dense": self.params_dense, "params_compacted": self.params_compacted,
                "heads_compacted": self.heads_compacted}


def dense_flops(index: Any, seq_len: int = DEFAULT_SEQ_LEN) -> int:
    """Block FLOPs at the original (dense) shapes."""
    return (sum(original_attention(u).flops(seq_len) for u in index.attention)
            + sum(original_mlp(u).flops(seq_len) for u in index.mlps))


def current_flops(index: Any, seq_len: int = DEFAULT_SEQ_LEN) -> int:
    """Block FLOPs at the shapes the modules have now (after `compact`: the compacted model)."""
    return (sum(current_attention(u).flops(seq_len) for u in index.attention)
            + sum(current_mlp(u).flops(seq_len) for u in index.mlps))


def planned_flops(plan: Any, seq_len: int = DEFAULT_SEQ_LEN) -> int:
    """Block FLOPs of the model a `compaction.CompactionPlan` describes."""
    return (sum(planned_attention(p).flops(seq_len) for p in plan.attention)
            + sum(planned_mlp(p).flops(seq_len) for p in plan.mlps))


def _numel(module: nn.Module | None) -> tuple[int, int]:
    if module is None:
        return 0, 0
    bias = getattr(module, "bias", None)
    return module.weight.numel(), 0 if bias is None else bias.numel()


def removed_parameters(plan: Any) -> int:
    """Parameters `compact` removes when it carries out `plan` (net of a contract bias it adds)."""
    removed = 0
    for p in plan.attention:
        unit, now, after = p.unit, current_attention(p.unit), planned_attention(p)
        for module in projections(unit):
            rows = out_features(module)
            rows_after = {id(unit.q): after.q_rows, id(unit.k): after.kv_rows, id(unit.v): after.kv_rows}.get(
                id(module), after.q_rows + 2 * after.kv_rows)  # the fused qkv holds all three
            weight, bias = _numel(module)
            removed += weight - rows_after * after.d_in  # all q/k/v projections read the same inputs
            removed += (rows - rows_after) if bias else 0
        removed += now.d_out * (now.q_rows - after.q_rows)
        for module in unit.head_projections:  # per-head rows besides q/k/v (DeBERTa positional)
            weight, bias = _numel(module)
            removed += (now.q_rows - after.q_rows) * (weight // out_features(module) + (1 if bias else 0))
    for p in plan.mlps:
        unit, now, after = p.unit, current_mlp(p.unit), planned_mlp(p)
        for module in (unit.gate, unit.up):
            if module is not None:
                weight, bias = _numel(module)
                halves = 2 if unit.fused and module is unit.up else 1  # fused [gate | up]: 2 rows a neuron
                removed += halves * (now.neurons - after.neurons) * (now.d_in + (1 if bias else 0))
        _, bias = _numel(unit.down)
        removed += now.neurons * now.rows - after.neurons * after.rows
        removed += (now.rows - after.rows) if bias else 0
        removed -= after.rows if p.adds_bias else 0
    return removed


def count(index: Any, plan: Any, seq_len: int = DEFAULT_SEQ_LEN) -> FlopCount:
    """Dense and compacted block FLOPs and parameters of the model of `index` as carrying out
    `plan` (`compaction.plan(index, rule)`) would leave it; `compaction.flop_count` is the usual
    entry point. The model is not changed."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ConfigError(f"seq_len must be a positive whole number of tokens, got {seq_len!r}.")
    params_now = sum(t.numel() for t in index.model.parameters())
    heads = sum(p.unit.num_heads if p.keep_groups is None else len(p.keep_groups) * p.unit.group_size
                for p in plan.attention)
    return FlopCount(seq_len, dense_flops(index, seq_len), planned_flops(plan, seq_len),
                     index.original_parameters, params_now - removed_parameters(plan), heads)
