"""FLOP and parameter accounting (`neuroprune.model.flops`, `compaction.flop_count`): a hand count
on hand-made structures, and equality with the shapes `compact` actually leaves."""

from __future__ import annotations

import pytest
import torch

from neuroprune.compaction import CompactionRule, compact, flop_count
from neuroprune.errors import ConfigError
from neuroprune.model.flops import current_flops
from neuroprune.model.index import ModelIndex
from neuroprune.model.structure import projections
from neuroprune.model.surgery import weight_matrix

from tiny import tiny_model

T = 16  # sequence length of the hand counts
EXACT = CompactionRule(multiple_of=1)


def attention(d_in: int, q_rows: int, kv_rows: int, d_out: int) -> int:
    """By hand: q/k/v/o projections (2 FLOPs per multiply-add per token) + scores and context."""
    projections_ = 2 * T * d_in * q_rows + 2 * 2 * T * d_in * kv_rows + 2 * T * q_rows * d_out
    return projections_ + 2 * 2 * T * T * q_rows


def mlp(d_in: int, neurons: int, expand: int, rows: int) -> int:
    return 2 * T * (expand * d_in * neurons + neurons * rows)


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def test_hand_count_bert():
    model = tiny_model("bert")  # d 32, 4 heads of 8, 48 neurons, 2 layers, biases everywhere
    index = ModelIndex(model)
    a0, a1 = index.attention
    m0, m1 = index.mlps
    weight_matrix(a0.o)[:, 8:16] = 0  # head 1 of layer 0 writes nothing
    weight_matrix(m0.down)[:, :10] = 0  # neurons 0..9 of layer 0 write nothing
    for module in projections(a1):
        weight_matrix(module)[:, :10] = 0  # input dims 0..9 of layer 1 (31% >= 25%)
    weight_matrix(m1.down)[:12] = 0  # contract rows 0..11 of layer 1 (37.5%)
    count = flop_count(index, seq_len=T, rule=EXACT)
    dense = 2 * (attention(32, 32, 32, 32) + mlp(32, 48, 1, 32))
    compacted = (attention(32, 24, 24, 32) + mlp(32, 38, 1, 32)
                 + attention(22, 32, 32, 32) + mlp(32, 48, 1, 20))
    assert (count.dense, count.compacted) == (dense, compacted)
    assert count.fraction == pytest.approx(compacted / dense)
    removed = (3 * (8 * 32 + 8) + 32 * 8  # head: q/k/v rows with biases, o columns
               + 10 * (32 + 1) + 10 * 32  # neurons: up rows with biases, down columns
               + 3 * 32 * 10  # input columns of q, k, v
               + 12 * 48 + 12)  # contract rows with their biases
    assert count.params_compacted == _params(model) - removed
    assert count.params_dense == _params(model)


@torch.no_grad()
def test_hand_count_llama_gqa():
    model = tiny_model("llama")  # d 32, 4 query heads of 8 in 2 key/value groups, gated MLP of 48
    index = ModelIndex(model)
    a0, a1 = index.attention
    m0, _ = index.mlps
    weight_matrix(a0.o)[:, 16:32] = 0  # group 1 (query heads 2, 3) of layer 0
    weight_matrix(m0.gate)[:8] = 0  # silu(0) * up = 0: neurons 0..7 are constant zero
    weight_matrix(m0.down)[:, 8:10] = 0  # neurons 8, 9 write nothing
    for module in projections(a1):
        weight_matrix(module)[:, :8] = 0  # 8 of 32 input dims of layer 1: exactly 25%
    count = flop_count(model, seq_len=T, rule=EXACT)
    dense = 2 * (attention(32, 32, 16, 32) + mlp(32, 48, 2, 32))
    compacted = attention(32, 16, 8, 32) + mlp(32, 38, 2, 32) + attention(24, 32, 16, 32) + mlp(32, 48, 2, 32)
    assert (count.dense, count.compacted) == (dense, compacted)
    removed = (16 * 32 + 2 * 8 * 32 + 32 * 16  # group: q rows of 2 heads, k and v rows, o columns
               + 3 * 10 * 32  # neurons: gate, up rows and down columns, no biases
               + 8 * (32 + 16 + 16))  # input columns of q, k, v
    assert count.params_compacted == _params(model) - removed


@torch.no_grad()
def test_rounding_and_thresholds_are_the_ones_compact_uses():
    model = tiny_model("bert")
    index = ModelIndex(model)
    weight_matrix(index.mlps[0].down)[:, :10] = 0
    for module in projections(index.attention[1]):
        weight_matrix(module)[:, :7] = 0  # 22% of the inputs: below the 25% threshold
    count = flop_count(index, seq_len=T)  # default rule: 38 neurons kept are rounded up to 40
    expected = (attention(32, 32, 32, 32) + mlp(32, 40, 1, 32)
                + attention(32, 32, 32, 32) + mlp(32, 48, 1, 32))
    assert count.compacted == expected
    dense = ModelIndex(tiny_model("bert"))
    assert flop_count(dense, seq_len=T).fraction == 1.0


def _kill_structure(index: ModelIndex, seed: int) -> None:
    """Zero a few groups, neurons (by contract column and by expand row), input dims and contract
    rows in every block, through the canonical (out, in) views."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for unit in index.attention:
            if unit.num_kv_heads > 1:
                group = int(torch.randint(unit.num_kv_heads, (1,), generator=g))
                weight_matrix(unit.o)[:, unit.query_rows([group])] = 0
            width = weight_matrix(projections(unit)[0]).shape[1]
            cols = torch.randperm(width, generator=g)[: width // 3]
            for module in projections(unit):
                weight_matrix(module)[:, cols] = 0
        for mlp_unit in index.mlps:
            n = weight_matrix(mlp_unit.up).shape[0]
            order = torch.randperm(n, generator=g)
            weight_matrix(mlp_unit.down)[:, order[: n // 4]] = 0
            for m in mlp_unit.expand_matrices():
                m[order[n // 4: n // 3]] = 0
            rows = weight_matrix(mlp_unit.down).shape[0]
            weight_matrix(mlp_unit.down)[torch.randperm(rows, generator=g)[: rows // 3]] = 0


@pytest.mark.parametrize("family", ["bert", "distilbert", "gpt2", "llama", "gpt_neox", "t5-gated", "bart"])
@pytest.mark.parametrize("rule", [CompactionRule(), EXACT], ids=["default", "exact"])
def test_planned_count_equals_the_compacted_shapes(family, rule):
    model = tiny_model(family)
    index = ModelIndex(model)
    _kill_structure(index, seed=3)
    planned = flop_count(index, seq_len=40, rule=rule)
    compact(index, rule=rule)
    assert planned.compacted < planned.dense
    assert current_flops(index, 40) == planned.compacted
    assert _params(model) == planned.params_compacted
    after = flop_count(index, seq_len=40, rule=rule)  # nothing left to remove: the same figures
    assert (after.dense, after.compacted, after.params_compacted) == (
        planned.dense, planned.compacted, planned.params_compacted)


def test_bad_sequence_length_is_refused():
    with pytest.raises(ConfigError, match="seq_len"):
        flop_count(tiny_model("bert"), seq_len=0)
