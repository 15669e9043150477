"""`--target-flops` on every family of tests/tiny.py, with NeuroPrune and with structured magnitude:
the run lands within 2 points of the target, the removed units are held at exact zero after
optimiser steps (fused [gate | up] halves and fused [q | k | v] rows included), `compact` removes
what the plan said, and the compacted model computes what the masked model computed."""

from __future__ import annotations

import copy

import pytest
import torch

from neuroprune.compaction import compact, flop_count
from neuroprune.config import NeuroPruneConfig
from neuroprune.methods import build_method
from neuroprune.methods.steering import SparsityTarget
from neuroprune.methods.structural import Removed, StructureMasks
from neuroprune.model.flops import current_flops
from neuroprune.model.index import ModelIndex
from neuroprune.model.surgery import head_rows, weight_matrix

from tiny import (
    DECODERS,
    FAMILIES,
    NEW_DECODERS,
    NEW_FAMILIES,
    main_output,
    tiny_inputs,
    tiny_model,
    train_with_hooks,
)

SEQ = 16
TARGET = 0.5
STEPS = 8


def _train(model, method, family: str, steps: int) -> None:
    """lr 1e-2 and a loss away from zero: units move enough in a few steps to be scored apart."""
    train_with_hooks(model, method, family, steps, lr=1e-2, offset=1.0)


def _method(name: str, model):
    target = SparsityTarget(flops=TARGET, seq_len=SEQ)
    if name == "structured":
        return build_method("structured", model, None, target)
    return build_method("neuroprune", model, NeuroPruneConfig(alpha=1e-3, beta=1e-3), target)


@torch.no_grad()
def _assert_held_at_zero(index, removed) -> None:
    """Every removed unit's weights are exact zeros: a neuron's rows in every expand matrix (both
    halves of a fused gate/up projection) and its contract column; a group's output-projection
    columns and its Q rows (and its own K / V rows unless they are shared: multi-query) in the
    projection that holds them (fused included); an input dim's q/k/v columns."""
    for b, positions in removed.neurons.items():
        unit = index.mlps[b]
        for matrix in unit.expand_matrices():
            assert not matrix[positions].any(), (unit.name, "expand rows")
        if unit.fused:  # the fused projection itself: rows i and n + i
            n = weight_matrix(unit.up).shape[0] // 2
            rows = torch.tensor(positions)
            assert not weight_matrix(unit.up)[torch.cat([rows, rows + n])].any(), unit.name
        assert not weight_matrix(unit.down)[:, positions].any(), (unit.name, "contract columns")
    for b, positions in removed.groups.items():
        unit = index.attention[b]
        q_rows = unit.query_rows(positions)
        assert not weight_matrix(unit.o)[:, q_rows].any(), (unit.name, "output columns")
        kv = None if unit.multi_query else head_rows(positions, unit.head_dim)
        if unit.qkv is not None:
            fq, fk, fv = unit.fused_rows()
            rows = fq[q_rows] if kv is None else torch.cat([fq[q_rows], fk[kv], fv[kv]])
            assert not weight_matrix(unit.qkv)[rows].any(), (unit.name, "fused q/k/v rows")
            if kv is None:  # multi-query: the shared key/value head stays
                assert weight_matrix(unit.qkv)[fk].any() and weight_matrix(unit.qkv)[fv].any()
        else:
            assert not weight_matrix(unit.q)[q_rows].any(), (unit.name, "q rows")
            if kv is not None:
                assert not weight_matrix(unit.k)[kv].any() and not weight_matrix(unit.v)[kv].any()
            else:  # multi-query: the shared key/value head stays
                assert weight_matrix(unit.k).any() and weight_matrix(unit.v).any()
    for b, positions in removed.inputs.items():
        q, k, v = index.attention[b].qkv_matrices()
        assert not torch.cat([q, k, v])[:, positions].any(), "input columns"


@pytest.mark.parametrize("name", ["neuroprune", "structured"])
@pytest.mark.parametrize("family", FAMILIES + NEW_FAMILIES)
def test_flop_target_lands_holds_and_compacts_exactly(family, name):
    torch.manual_seed(0)
    model = tiny_model(family)
    method = _method(name, model)
    _train(model, method, family, STEPS)
    removed = method.structural.removed
    assert removed.neurons, "no neuron went"
    _assert_held_at_zero(method.index, removed)
    count = flop_count(method, seq_len=SEQ)
    assert abs(count.fraction - TARGET) <= 0.02, count
    _assert_compacts_exactly(family, model, method.index, removed, count)


def _assert_compacts_exactly(family, model, index, removed, count) -> None:
    """`compact` leaves the FLOPs and parameters the plan (`count`) said, the removed groups are
    gone, and the compacted model computes what the masked one did (decoders: same tokens)."""
    masked = copy.deepcopy(model)
    inputs = tiny_inputs(family)
    compact(index)
    assert current_flops(index, SEQ) == count.compacted
    for b, positions in removed.groups.items():  # no surgery during training: positions = originals
        assert not set(positions) & set(index.attention[b].kept_groups)
    assert sum(p.numel() for p in model.parameters()) == count.params_compacted < count.params_dense
    torch.testing.assert_close(main_output(model, inputs), main_output(masked, inputs), atol=1e-4, rtol=1e-4)
    if family in DECODERS + NEW_DECODERS:
        settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        want = masked.generate(input_ids=ids, attention_mask=mask, **settings)
        got = model.generate(input_ids=ids, attention_mask=mask, **settings)
        assert torch.equal(got, want)


@pytest.mark.parametrize("family", FAMILIES + NEW_FAMILIES)
def test_masks_of_every_kind_hold_and_compact_exactly(family):
    """Whatever the scores pick: one group of every block (the second: offsets in fused and
    interleaved layouts), every third neuron, every other input dim, held by the masks through
    optimiser steps, then compacted exactly. Covers the layouts the scored runs above happen not
    to remove a group in (fused [q | k | v] with grouped-query attention: Phi-3, Falcon)."""
    torch.manual_seed(0)
    model = tiny_model(family)
    index = ModelIndex(model)
    removed = Removed()
    for b, unit in enumerate(index.attention):
        removed.add("groups", b, [1])
        removed.add("inputs", b, list(range(0, unit.qkv_matrices()[0].shape[1], 2)))
    for b, unit in enumerate(index.mlps):
        removed.add("neurons", b, list(range(0, unit.original_neurons, 3)))
    masks = StructureMasks(index)
    masks.build(removed)
    masks.apply()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    inputs = tiny_inputs(family)
    model.train()
    for _ in range(3):
        out = model(**inputs)
        hidden = out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state
        (hidden - 1.0).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        masks.apply()
    model.eval()
    _assert_held_at_zero(index, removed)
    count = flop_count(index, seq_len=SEQ)
    _assert_compacts_exactly(family, model, index, removed, count)
