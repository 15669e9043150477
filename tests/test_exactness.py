"""Exactness on the silent paths, checked against hand computations (plain torch on cloned
weights), not against the helpers under test:

- second and third head-removal passes for every family (positions != original indices);
- compaction of dead heads and of wholly / partly dead key-value groups (GQA);
- the `neuroprune compact` refusal when compaction would move the outputs.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import neuroprune
from neuroprune import CompactionRule, NeuroPrune, NeuroPruneConfig
from neuroprune.cli import main as cli_main
from neuroprune.model.surgery import weight_matrix

from tiny import COMMON, CONFIGS, FAMILIES, duplicate_group, main_output, tiny_inputs, tiny_model

GQA = ("llama", "qwen2")


def model_with_four_groups(family: str, seed: int = 0) -> torch.nn.Module:
    """The tiny model, but with 4 key/value groups per block so that three passes can each remove
    one: GQA families get 8 query heads over 4 key/value heads (2 query heads per group)."""
    if family not in GQA:
        return tiny_model(family, seed)
    torch.manual_seed(seed)
    config = AutoConfig.for_model(family, **COMMON, **{**CONFIGS[family], "num_attention_heads": 8,
                                                       "num_key_value_heads": 4})
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()


@torch.no_grad()
def randomize_biases(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-zero biases everywhere (most families start them at 0, which would hide a bias that is
    left behind or not copied)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("bias") and "norm" not in name.lower() and p.dim() == 1:
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


@torch.no_grad()
def make_identical(model: torch.nn.Module, unit, src: int, dst: int) -> None:
    """Group at current position `dst` becomes a copy of the one at `src` (Q/K/V weights and
    biases); a shared per-head relative position bias (T5, MPNet) is never sliced, so its columns
    are copied by *original* head index."""
    biases = {n: m.weight.detach().clone() for n, m in model.named_modules()
              if n.endswith("relative_attention_bias")}
    duplicate_group(model, unit, src, dst)
    gs = unit.group_size
    src_heads = [unit.kept_groups[src] * gs + t for t in range(gs)]
    dst_heads = [unit.kept_groups[dst] * gs + t for t in range(gs)]
    for name, module in model.named_modules():
        if name in biases:
            module.weight.copy_(biases[name])
            module.weight[:, dst_heads] = biases[name][:, src_heads]


def o_columns(unit, group_original: int, original_o: torch.Tensor) -> torch.Tensor:
    """Columns of the ORIGINAL output projection belonging to an original key/value group."""
    width = unit.group_size * unit.head_dim
    return original_o[:, group_original * width:(group_original + 1) * width]


@pytest.mark.parametrize("family", FAMILIES)
def test_second_and_third_removal_passes_are_exact(family):
    """Pass 1: group 0 := group 1, so 0 goes into 1. Pass 2: position 0 (original 1) := position 1
    (original 2). Pass 3: position 0 (original 2) := position 1 (original 3). In the end original
    group 3 is alone, with its own Q/K/V and the sum of all four groups' O columns; every pass
    leaves the outputs unchanged. A merge at original indices instead of current positions moves
    the outputs in pass 2 (it adds group 2's O slice into group 3's)."""
    model = model_with_four_groups(family)
    randomize_biases(model)
    pruner = NeuroPrune(model, NeuroPruneConfig(theta=1e-6))
    x = tiny_inputs(family)
    gs = pruner.index.attention[0].group_size
    assert all(u.num_kv_heads == 4 for u in pruner.index.attention)
    originals = {}
    for step, dropped in enumerate((0, 1, 2)):
        for unit in pruner.index.attention:
            make_identical(model, unit, src=1, dst=0)
        if step == 0:  # after the first copy: the O slices and Q/K/V the hand computation uses
            originals = {u.name: ([m.detach().clone() for m in u.qkv_matrices()],
                                  weight_matrix(u.o).detach().clone()) for u in pruner.index.attention}
        before = main_output(model, x)
        removed = pruner.prune_redundant_heads(theta=1e-6)
        after = main_output(model, x)
        heads = [dropped * gs + t for t in range(gs)]
        assert removed == {u.name: heads for u in pruner.index.attention}, (step, removed)
        kept = [g * gs + t for g in range(dropped + 1, 4) for t in range(gs)]
        assert all(u.kept_heads == kept for u in pruner.index.attention), step
        assert all(u.num_heads == len(kept) and u.num_kv_heads == 3 - step for u in pruner.index.attention)
        torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-4)

    for unit in pruner.index.attention:
        (q0, k0, v0), o0 = originals[unit.name]
        q, k, v = unit.qkv_matrices()
        h = unit.head_dim
        torch.testing.assert_close(q, q0[3 * gs * h:4 * gs * h], atol=0, rtol=0)  # group 3, untouched
        torch.testing.assert_close(k, k0[3 * h:4 * h], atol=0, rtol=0)  # key/value head 3
        torch.testing.assert_close(v, v0[3 * h:4 * h], atol=0, rtol=0)
        by_hand = sum(o_columns(unit, g, o0) for g in range(4))
        torch.testing.assert_close(weight_matrix(unit.o).detach(), by_hand, atol=1e-6, rtol=0)
        assert weight_matrix(unit.o).shape == (o0.shape[0], gs * h)


# --- compaction of dead heads and dead key/value groups -----------------------------------------

@torch.no_grad()
def kill_query_heads(unit, heads: list[int]) -> None:
    """Zero the O columns and Q rows of query heads at current positions `heads` (what finalize
    leaves of a head the penalties removed)."""
    h = unit.head_dim
    q = unit.qkv_matrices()[0]
    o = weight_matrix(unit.o)
    for head in heads:
        o[:, head * h:(head + 1) * h] = 0
        q[head * h:(head + 1) * h] = 0


@torch.no_grad()
def kill_kv_rows(unit, group: int) -> None:
    h = unit.head_dim
    _, k, v = unit.qkv_matrices()
    k[group * h:(group + 1) * h] = 0
    v[group * h:(group + 1) * h] = 0


def count(model) -> int:
    return sum(p.numel() for p in model.parameters())


HEADS_ONLY = CompactionRule(min_input_fraction=1.0, min_row_fraction=1.0, multiple_of=1)


@pytest.mark.parametrize("family", GQA)
def test_wholly_dead_key_value_group_is_removed_exactly(family):
    """4 query heads over 2 key/value heads: group 1 (query heads 2 and 3, key/value head 1) dead
    in Q, K, V and O is removed: q 32 -> 16 rows, k and v 16 -> 8, o 32 -> 16 columns."""
    model = tiny_model(family)
    randomize_biases(model)
    pruner = NeuroPrune(model)
    for unit in pruner.index.attention:
        kill_query_heads(unit, [2, 3])
        kill_kv_rows(unit, 1)
    x = tiny_inputs(family)
    expected = main_output(model, x)
    params = count(model)
    neuroprune.compact(pruner, rule=HEADS_ONLY)
    torch.testing.assert_close(main_output(model, x), expected, atol=1e-5, rtol=0)
    h, d = 8, 32
    per_block = 2 * h * d + 2 * (h * d) + d * 2 * h  # q rows, k + v rows, o columns
    if model.model.layers[0].self_attn.q_proj.bias is not None:  # qwen2: q/k/v biases
        per_block += 2 * h + 2 * h
    assert count(model) == params - len(pruner.index.attention) * per_block
    for layer, unit in zip(model.model.layers, pruner.index.attention):
        attn = layer.self_attn
        assert (attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features,
                attn.o_proj.in_features) == (16, 8, 8, 16)
        assert unit.kept_heads == [0, 1] and unit.kept_groups == [0]


@pytest.mark.parametrize("family", GQA)
def test_partly_dead_key_value_group_is_kept(family):
    """Query head 1 is dead but head 0 shares its key/value head: nothing can go. (A judge that
    reads query head g instead of group g would remove group 1, whose heads are alive.)"""
    model = tiny_model(family)
    randomize_biases(model)
    pruner = NeuroPrune(model)
    for unit in pruner.index.attention:
        kill_query_heads(unit, [1])
    x = tiny_inputs(family)
    expected = main_output(model, x)
    params = count(model)
    neuroprune.compact(pruner, rule=HEADS_ONLY)
    torch.testing.assert_close(main_output(model, x), expected, atol=1e-5, rtol=0)
    assert count(model) == params
    assert all(u.kept_heads == [0, 1, 2, 3] and u.num_kv_heads == 2 for u in pruner.index.attention)


@pytest.mark.parametrize("family", GQA)
def test_dead_query_heads_of_both_groups_keep_both(family):
    """One dead query head in each group (0 and 3): neither group is wholly dead."""
    model = tiny_model(family)
    pruner = NeuroPrune(model)
    for unit in pruner.index.attention:
        kill_query_heads(unit, [0, 3])
    x = tiny_inputs(family)
    expected = main_output(model, x)
    neuroprune.compact(pruner, rule=HEADS_ONLY)
    torch.testing.assert_close(main_output(model, x), expected, atol=1e-5, rtol=0)
    assert all(u.num_kv_heads == 2 for u in pruner.index.attention)


@pytest.mark.parametrize("family", ["bert", "gpt2", "gpt_neox", "t5", "bart", "mpnet"])
def test_dead_heads_after_a_removal_pass_are_compacted_at_their_positions(family):
    """Head 0 is removed by a pass (kept: 1, 2, 3 at positions 0, 1, 2); then original head 2
    (position 1) dies: compaction removes it, leaving original heads 1 and 3, outputs unchanged and
    exactly one head's Q/K/V rows (and biases) and O columns fewer per block."""
    model = tiny_model(family)
    randomize_biases(model)
    pruner = NeuroPrune(model, NeuroPruneConfig(theta=1e-6))
    for unit in pruner.index.attention:
        make_identical(model, unit, src=1, dst=0)
    assert pruner.prune_redundant_heads()
    for unit in pruner.index.attention:
        kill_query_heads(unit, [1])
    x = tiny_inputs(family)
    expected = main_output(model, x)
    o_before = {u.name: weight_matrix(u.o).detach().clone() for u in pruner.index.attention}
    params = count(model)
    neuroprune.compact(pruner, rule=HEADS_ONLY)
    torch.testing.assert_close(main_output(model, x), expected, atol=1e-5, rtol=0)
    h = pruner.index.attention[0].head_dim
    removed = 0
    for unit in pruner.index.attention:
        assert unit.kept_heads == [1, 3] and unit.num_heads == 2
        o = o_before[unit.name]
        by_hand = torch.cat([o[:, 0:h], o[:, 2 * h:3 * h]], dim=1)  # positions 0 and 2 survive
        torch.testing.assert_close(weight_matrix(unit.o).detach(), by_hand, atol=0, rtol=0)
        d_in = weight_matrix(unit.o).shape[0]
        has_bias = (unit.qkv if unit.qkv is not None else unit.q).bias is not None
        removed += 3 * h * d_in + d_in * h + (3 * h if has_bias else 0)
    assert count(model) == params - removed


# --- the compact command refuses a compaction that moves the outputs --------------------------

def test_cli_compact_refuses_when_outputs_move(tmp_path, capsys, monkeypatch):
    import neuroprune.compaction as compaction

    pruner = NeuroPrune(tiny_model("bert"), NeuroPruneConfig(theta=1e-6))
    for unit in pruner.index.attention:
        kill_query_heads(unit, [2])
    run = tmp_path / "run"
    pruner.save_pretrained(run / "model")
    real = compaction.compact

    def perturbing(*args, **kwargs):
        result = real(*args, **kwargs)
        with torch.no_grad():
            weight_matrix(result.mlps[0].down)[0, 0] += 0.5  # a compaction bug
        return result

    monkeypatch.setattr(compaction, "compact", perturbing)
    assert cli_main(["compact", str(run)]) == 2
    err = capsys.readouterr().err
    assert "compaction changed the outputs by" in err and "nothing was saved" in err
    assert not (run / "compact").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert sorted(p.name for p in run.iterdir()) == ["model"]

    monkeypatch.setattr(compaction, "compact", real)  # the same folder compacts fine unperturbed
    assert cli_main(["compact", str(run)]) == 0
    meta = json.loads((run / "compact" / "neuroprune.json").read_text())
    h, d = 8, 32  # one dead head per block: 3 * 8 rows (+ biases) of Q/K/V, 8 columns of O
    assert meta["compaction"]["parameters_before"] - meta["compaction"]["parameters_after"] == (
        len(pruner.index.attention) * (3 * h * d + 3 * h + d * h)
    )
