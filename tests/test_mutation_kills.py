"""Tests written to kill the mutants that survived the first mutation run (scripts/mutation.py,
docs/testing.md): each checks a value worked out by hand, not through the helper under test.
Every test is fast (tiny modules, no training)."""

from __future__ import annotations

import copy
import json
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from neuroprune import (
    CheckpointError,
    CompactionRule,
    ConfigError,
    NeuroPruneConfig,
    NeuroPruneError,
    UnsupportedArchitectureError,
    build_method,
    remap_optimizer,
)
from neuroprune.compaction import compact_attention, compact_mlp, neuron_constants
from neuroprune.methods.heads import group_distances, merge_into_mlp_input, prune_unit, similarity_graph
from neuroprune.methods.steering import (
    SparsityTarget,
    TargetController,
    count_of,
    cubic_schedule,
    fraction,
)
from neuroprune.model.architectures import AttentionLayout, Found, MLPLayout, discover
from neuroprune.model.index import ModelIndex
from neuroprune.model.sparsity import DegreeStats, LayerSparsity, SparsityReport, attention_sparsity, report
from neuroprune.model.structure import (
    SharedGather,
    compaction_structure,
    drop_output_rows,
    gather_inputs,
    kept_inputs,
    kept_outputs,
    restore_compaction,
)
from neuroprune.model.surgery import head_rows, select_inputs, select_outputs, weight_matrix
from neuroprune.model.units import AttentionUnit, MLPUnit

from tiny import duplicate_group, main_output, tiny_inputs, tiny_model


def units_of(model: nn.Module) -> tuple[list[AttentionUnit], list[MLPUnit]]:
    attention, mlps = discover(model)
    return [AttentionUnit(f, model.config) for f in attention], [MLPUnit(f) for f in mlps]


# --- controller -----------------------------------------------------------------------------------

def test_cubic_schedule_by_hand():
    # ramp from step 25 to step 75 of 100; initial 0.1, final 0.7
    assert cubic_schedule(25, 100, 0.7, 0.1, 0.25, 0.75) == 0.1  # exactly `initial` at the start
    assert cubic_schedule(75, 100, 0.7, 0.1, 0.25, 0.75) == 0.7
    # step 35: progress (35 - 25) / (75 - 25) = 0.2 -> 0.7 + (0.1 - 0.7) * 0.8^3
    assert cubic_schedule(35, 100, 0.7, 0.1, 0.25, 0.75) == pytest.approx(0.7 - 0.6 * 0.512, abs=1e-12)


def test_target_at_uses_the_settings_ramp_end():
    c = TargetController(SparsityTarget(0.8, ramp_begin=0.0, ramp_end=0.5))
    # step 25 of 100: progress 25 / 50 = 0.5 -> 0.8 * (1 - 0.5^3)
    assert c.target_at(25, 100) == pytest.approx(0.8 * (1 - 0.125), abs=1e-12)
    assert c.target_at(50, 100) == 0.8


def test_controller_update_formula_by_hand():
    c = TargetController(SparsityTarget(0.5, kp=2.0, ki=20.0, max_rate=0.5))
    scale = c.update(3, 10, measured=0.29, target=0.3)  # error 0.01
    assert c.log_scale == pytest.approx(0.2, abs=1e-12)  # ki * e = 0.2 < max_rate
    assert scale == pytest.approx(math.exp(0.2 + 2.0 * 0.01), rel=1e-12)  # + kp * e (proportional)
    assert c.history == [{"step": 3, "target": 0.3, "measured": 0.29, "scale": scale}]


def test_controller_state_round_trip_keeps_history():
    c = TargetController(SparsityTarget(0.5))
    c.update(1, 10, measured=0.0, target=0.1)
    state = json.loads(json.dumps(c.state_dict()))
    assert set(state) == {"settings", "log_scale", "history"}
    back = TargetController.from_state_dict(state)
    assert back.history == c.history and back.log_scale == c.log_scale
    del state["history"]  # older checkpoints: no history
    assert TargetController.from_state_dict(state).history == []


def test_fraction_of_nothing_is_zero():
    assert fraction({}) == 0.0
    assert count_of({"q": (3, 4), "o": (1, 4)}, {"q"}) == (3, 4)
    assert fraction({"q": (3, 4), "o": (1, 4)}) == 0.5


def test_near_zero_counts_entries_strictly_below_eps():
    unit = MLPUnit(Found("mlp", _mlp(2, 2), _MLP_LAYOUT))
    with torch.no_grad():
        unit.up.weight.copy_(torch.tensor([[0.5, 0.25], [1.0, -0.5]]))  # |w| == eps is not below
        unit.down.weight.copy_(torch.tensor([[0.0, 2.0], [0.49, 3.0]]))
    index = SimpleNamespace(attention=[], mlps=[unit])
    assert ModelIndex.near_zero_by_kind(index, 0.5) == {"up": (1, 4), "down": (2, 4)}


@pytest.mark.parametrize(
    "kwargs",
    [dict(sparsity=0.0), dict(sparsity=0.5, ramp_end=1.0), dict(sparsity=0.5, heads=1),
     dict(sparsity=0.5, step="hard"), dict(sparsity=0.5, kp=0.0), dict(sparsity=0.5, kp=0.5),
     dict(sparsity=0.5, ki=0.5)],
)
def test_sparsity_target_accepts_the_boundaries(kwargs):
    target = SparsityTarget(**kwargs)
    assert all(getattr(target, k) == v for k, v in kwargs.items())


@pytest.mark.parametrize(
    "kwargs",
    [dict(ramp_end=1.5), dict(heads=0), dict(heads=1.5), dict(heads=True), dict(kp=-1.0),
     dict(ki=0.0), dict(max_rate=0.0), dict(min_scale=0.0), dict(min_scale=10.0, max_scale=10.0),
     dict(min_scale=10.0, max_scale=1.0)],
)
def test_sparsity_target_refuses_just_outside(kwargs):
    with pytest.raises(ConfigError):
        SparsityTarget(0.5, **kwargs)


@pytest.mark.parametrize(
    "kwargs", [dict(min_input_fraction=True), dict(min_row_fraction="0.5"), dict(multiple_of=True)]
)
def test_compaction_rule_refuses_non_numbers(kwargs):
    with pytest.raises(ConfigError):
        CompactionRule(**kwargs)


def test_compaction_rule_accepts_multiple_of_one():
    assert CompactionRule(multiple_of=1).multiple_of == 1


# --- sparsity accounting --------------------------------------------------------------------------

def test_degree_stats_by_hand():
    degrees = (0.0, 0.025, 0.525, 0.275)  # max < 1: bins must span [0, 1], not the data's range
    stats = DegreeStats.of(torch.tensor(degrees))
    hist = [0] * 20
    hist[0], hist[5], hist[10] = 2, 1, 1  # 20 bins of width 0.05 over [0, 1]
    assert stats.histogram == hist
    assert stats.bin_edges == pytest.approx([i / 20 for i in range(21)], abs=1e-7)
    assert stats.dead == 1
    mean = sum(degrees) / 4
    assert stats.mean == pytest.approx(mean)
    sd = math.sqrt(sum((x - mean) ** 2 for x in degrees) / 4)
    assert stats.sd_percent == pytest.approx(100 * sd)


def test_layer_sparsity_property_and_report_dict():
    assert LayerSparsity("a", "mlp", 3, 4, {}).sparsity == 0.75
    assert LayerSparsity("a", "mlp", 0, 0, {}).sparsity == 0.0
    r = SparsityReport(0.75, 0.5, 3, 4, 2, 4, [LayerSparsity("a", "mlp", 3, 4, {"up": 0.75})])
    assert r.to_dict()["layers"][0]["sparsity"] == 0.75


def test_report_markdown_exactly():
    deg = DegreeStats(mean=0.5, sd_percent=12.25, histogram=[], bin_edges=[], dead=2)
    r = SparsityReport(
        0.25, 0.125, 1, 4, 3, 4,
        [LayerSparsity("l0.attn", "attention", 1, 4, {}, heads_kept=3, heads_total=4),
         LayerSparsity("l0.mlp", "mlp", 2, 8, {}, degree=deg)],
    )
    assert r.to_markdown() == (
        "sparsity (blocks): 25.00%  whole model: 12.50%  heads kept: 3/4\n"
        "\n"
        "| layer | kind | sparsity | heads | neuron degree mean | sd (%) | dead neurons |\n"
        "|---|---|---|---|---|---|---|\n"
        "| l0.attn | attention | 25.00% | 3/4 |  | |  |\n"
        "| l0.mlp | mlp | 25.00% |  | 0.500 | 12.25 | 2 |"
    )
    assert str(r) == r.to_markdown()


def test_report_of_no_blocks_is_zero():
    model = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.0, 1.0], [2.0, 3.0]]))
    r = report(model, [], [], 1e-3, original_parameters=4)
    assert (r.sparsity, r.zeros, r.total, r.model_sparsity) == (0.0, 0, 0, 0.25)


def test_attention_sparsity_fields():
    model = tiny_model("bert")
    unit = units_of(model)[0][0]
    unit.keep_groups([0, 2, 3])
    layer = attention_sparsity(unit)
    assert (layer.name, layer.kind) == (unit.name, "attention")
    assert (layer.heads_kept, layer.heads_total, layer.kept_heads) == (3, 4, [0, 2, 3])


# --- surgery --------------------------------------------------------------------------------------

def test_select_keeps_frozen_parameters_frozen_and_long_indices():
    lin = nn.Linear(3, 4)
    lin.weight.requires_grad_(False)
    changes = select_outputs(lin, torch.tensor([0, 2], dtype=torch.int32))
    assert not lin.weight.requires_grad and lin.bias.requires_grad
    assert [c.index.dtype for c in changes] == [torch.long, torch.long]
    changes = select_inputs(lin, torch.tensor([1], dtype=torch.int32))
    assert [c.index.dtype for c in changes] == [torch.long] and lin.in_features == 1


def test_head_rows_of_no_heads_is_an_empty_long_index():
    rows = head_rows([], 4)
    assert rows.dtype == torch.long and rows.numel() == 0
    assert head_rows([2, 0], 2).tolist() == [4, 5, 0, 1]


# --- heads ----------------------------------------------------------------------------------------

def test_group_distances_of_half_precision_blocks():
    blocks = torch.tensor([[0.0, 1.0], [0.5, -1.0]], dtype=torch.float16)
    d = group_distances(blocks)
    assert d.dtype == torch.float32 and d.tolist() == [[0.0, 2.0], [2.0, 0.0]]


def test_similarity_graph_is_integer_so_history_stays_numeric():
    sim = similarity_graph(torch.tensor([[0.0], [1.0]]), theta=0.5)
    assert json.dumps(sim.tolist()) == "[[1, 0], [0, 1]]"


def _fake_unit(head_dim: int = 4):
    return SimpleNamespace(name="blk", query_rows=lambda groups: head_rows(groups, head_dim))


@pytest.mark.parametrize("src, dst", [(1, 0), (0, 1)])
def test_mlp_input_merge_refuses_an_mlp_narrower_than_the_heads(src, dst):
    # head 1 owns columns 4..7; the MLP reads 7 inputs: column 7 does not exist
    mlp = SimpleNamespace(expand_matrices=lambda: [torch.zeros(5, 7)])
    with pytest.raises(ConfigError):
        merge_into_mlp_input(_fake_unit(), mlp, src, dst)


def test_mlp_input_merge_by_hand():
    w = torch.arange(16.0).reshape(2, 8)
    expected = w.clone()
    expected[:, 0:4] += w[:, 4:8]
    mlp = SimpleNamespace(expand_matrices=lambda: [w])
    merge_into_mlp_input(_fake_unit(), mlp, src=1, dst=0)
    assert torch.equal(w, expected)


def test_prune_event_records_the_groups_it_saw():
    model = tiny_model("bert")
    unit = units_of(model)[0][0]
    duplicate_group(model, unit, 0, 3)
    event, changes = prune_unit(unit, theta=1e-6, merge="output")
    assert event.groups == [0, 1, 2, 3] and event.removed_heads == [0] and event.absorbed_by == {0: 3}
    assert changes


# --- units ----------------------------------------------------------------------------------------

class _Attn(nn.Module):
    def __init__(self, d: int, q: int, kv: int) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = nn.Linear(d, q), nn.Linear(d, kv), nn.Linear(d, kv), nn.Linear(q, d)


class _Fused(nn.Module):
    def __init__(self, d: int, q: int, kv: int) -> None:
        super().__init__()
        self.qkv, self.o = nn.Linear(d, q + 2 * kv), nn.Linear(q, d)


_ATTN_LAYOUT = AttentionLayout(q="q", k="k", v="v", o="o")
_MLP_LAYOUT_KW = dict(up="up", down="down")


def _mlp(d: int, n: int, gated: bool = False) -> nn.Module:
    m = nn.Module()
    m.up, m.down = nn.Linear(d, n), nn.Linear(n, d)
    if gated:
        m.gate = nn.Linear(d, n)
    return m


_MLP_LAYOUT = MLPLayout(**_MLP_LAYOUT_KW)


def test_head_size_from_the_model_config_and_multi_query_attention():
    unit = AttentionUnit(Found("blk", _Attn(8, 8, 4), _ATTN_LAYOUT), SimpleNamespace(head_dim=4))
    # one key/value head shared by both query heads: multi-query, each query head a removal group
    assert (unit.head_dim, unit.original_heads, unit.original_kv_heads, unit.group_size) == (4, 2, 1, 1)
    assert unit.multi_query and unit.num_kv_heads == 2
    unit = AttentionUnit(Found("blk", _Attn(8, 8, 4), _ATTN_LAYOUT), SimpleNamespace(num_attention_heads=2))
    assert unit.head_dim == 4


def test_fused_concat_projection_with_grouped_query_attention():
    layout = AttentionLayout(qkv="qkv", fused="concat", o="o")
    unit = AttentionUnit(Found("blk", _Fused(8, 8, 4), layout), SimpleNamespace(head_dim=4))
    assert (unit.original_heads, unit.original_kv_heads) == (2, 1)
    assert set(unit.matrices()) == {"qkv", "o"}


@pytest.mark.parametrize("kv", [6, 0])
@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")  # kv = 0 builds one on purpose
def test_unsplittable_key_value_widths_are_refused(kv):
    with pytest.raises(UnsupportedArchitectureError):
        AttentionUnit(Found("blk", _Attn(8, 8, kv), _ATTN_LAYOUT), SimpleNamespace(head_dim=4))


def test_head_removal_updates_the_attention_module_it_runs_in():
    model = tiny_model("bert")
    unit = units_of(model)[0][0]
    core = model.encoder.layer[0].attention.self
    assert unit.core is core
    unit.keep_groups([1, 3])
    assert core.num_attention_heads == 2 and core.all_head_size == 2 * unit.head_dim
    assert not core._forward_pre_hooks and not core._forward_hooks  # no per-head bias: no hooks


@pytest.mark.parametrize("family, expected", [("bert", 7), ("gpt2", 3), ("gpt_neox", 3)])
def test_keep_groups_reports_every_replaced_parameter(family, expected):
    model = tiny_model(family)
    unit = units_of(model)[0][0]
    changes = unit.keep_groups([0, 2])
    current = {id(p) for p in model.parameters()}
    assert len(changes) == expected and all(id(c.new) in current for c in changes)


def test_keep_neurons_reports_gate_up_and_down():
    model = tiny_model("t5-gated")
    unit = units_of(model)[1][0]
    changes = unit.keep_neurons([0, 5, 7])
    assert {id(c.new) for c in changes} == {id(unit.gate.weight), id(unit.up.weight), id(unit.down.weight)}
    assert unit.expand_matrices()[0] is unit.gate.weight and set(unit.matrices()) == {"gate", "up", "down"}
    assert unit.added_contract_bias is False


def test_t5_bias_is_sliced_per_layer_and_handed_on_whole():
    """Different heads removed in every T5 layer: the shared relative position bias must be sliced
    to each layer's own heads and passed on unsliced. Reference: the unpruned model with the
    removed heads' output-projection columns zeroed (a head with zero O columns adds nothing)."""
    model = tiny_model("t5")
    reference = copy.deepcopy(model)
    x = tiny_inputs("t5")
    for i, (unit, ref) in enumerate(zip(units_of(model)[0], units_of(reference)[0])):
        drop = i % 4
        with torch.no_grad():
            weight_matrix(ref.o)[:, ref.query_rows([drop])] = 0
        unit.keep_groups([g for g in range(4) if g != drop])
    torch.testing.assert_close(main_output(model, x), main_output(reference, x), atol=1e-5, rtol=1e-4)


# --- compaction -----------------------------------------------------------------------------------

def test_shared_gather_reuses_then_releases():
    x, idx = torch.randn(2, 3, 5), torch.tensor([0, 3])
    g = SharedGather(3)
    a = g(x, idx)
    assert g(x, idx) is a and g(x, idx) is a and torch.equal(a, x[..., [0, 3]])
    assert g.source is None and g.value is None  # released after the last user
    assert g(x, idx) is not a
    two = SharedGather(2)
    assert two(x, idx) is two(x, idx)
    one = SharedGather(1)
    one(x, idx)
    assert one.source is None and one.value is None  # a single user keeps nothing


def test_gathered_projection_by_hand():
    lin = nn.Linear(5, 3)
    w, b = lin.weight.detach().clone(), lin.bias.detach().clone()
    x = torch.randn(2, 4, 5)
    gather_inputs(lin, [1, 4])
    torch.testing.assert_close(lin(x), x[..., [1, 4]] @ w[:, [1, 4]].T + b)
    assert kept_inputs(lin) == [1, 4] and "neuroprune_input_index" not in lin.state_dict()
    gather_inputs(lin, [4])  # a second gather, by original indices
    torch.testing.assert_close(lin(x), x[..., [4]] @ w[:, [4]].T + b)
    with pytest.raises(CheckpointError, match="input dimensions of Linear"):
        gather_inputs(lin, [1])
    gather_inputs(lin, [])  # nothing read: the bias
    torch.testing.assert_close(lin(x), b.expand(2, 4, 3))


def test_dropped_output_rows_by_hand():
    lin = nn.Linear(3, 6)
    w, b = lin.weight.detach().clone(), lin.bias.detach().clone()
    x = torch.randn(2, 3)

    def by_hand(rows):
        full = b.expand(2, 6).clone()
        full[:, rows] = x @ w[rows].T + b[rows]
        return full

    drop_output_rows(lin, [0, 2, 3, 5])
    torch.testing.assert_close(lin(x), by_hand([0, 2, 3, 5]))
    state = lin.state_dict()
    assert "neuroprune_output_index" not in state and "neuroprune_output_fill" in state
    drop_output_rows(lin, [0, 5])  # a second drop, by original indices
    assert kept_outputs(lin) == [0, 5]
    torch.testing.assert_close(lin(x), by_hand([0, 5]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lin(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), by_hand([0, 5]), atol=0.05, rtol=0.05)
    with pytest.raises(CheckpointError, match="output rows of Linear"):
        drop_output_rows(lin, [2])
    drop_output_rows(lin, [])
    torch.testing.assert_close(lin(x), b.expand(2, 6))


def _bert_layer0():
    model = tiny_model("bert")
    attention, mlps = units_of(model)
    return model, attention[0], mlps[0]


def _qkv_weights(unit):
    return [weight_matrix(m) for m in (unit.q, unit.k, unit.v)]


@pytest.mark.parametrize(
    "alive, rule, kept",
    [([], CompactionRule(), [0]),  # all dead: one (zero) column stays
     ([5], CompactionRule(), [5]),
     (list(range(8, 32)), CompactionRule(min_input_fraction=0.25), list(range(8, 32))),  # 8/32 = 0.25
     (list(range(32)), CompactionRule(min_input_fraction=0.0), None)],  # nothing dead: no gather
)
def test_attention_input_gather_by_hand(alive, rule, kept):
    model, unit, _ = _bert_layer0()
    with torch.no_grad():
        for m in _qkv_weights(unit):
            m[:, [d for d in range(32) if d not in alive]] = 0
    x = tiny_inputs("bert")
    before = main_output(model, x)
    compact_attention(unit, rule)
    assert kept_inputs(unit.q) == kept and kept_inputs(unit.v) == kept
    torch.testing.assert_close(main_output(model, x), before, atol=1e-5, rtol=1e-4)


def test_contract_rows_at_the_threshold_and_twice():
    model, _, mlp = _bert_layer0()
    x = tiny_inputs("bert")
    rule = CompactionRule(min_row_fraction=0.25, multiple_of=1)
    with torch.no_grad():
        weight_matrix(mlp.down)[:8] = 0  # 8 of 32 rows: exactly the threshold
    before = main_output(model, x)
    compact_mlp(mlp, rule)
    assert kept_outputs(mlp.down) == list(range(8, 32))
    torch.testing.assert_close(main_output(model, x), before, atol=1e-5, rtol=1e-4)
    with torch.no_grad():  # rows 8..15 (positions 0..7 of the compacted matrix) die too
        weight_matrix(mlp.down)[:8] = 0
    before = main_output(model, x)
    compact_mlp(mlp, rule)
    assert kept_outputs(mlp.down) == list(range(16, 32))
    torch.testing.assert_close(main_output(model, x), before, atol=1e-5, rtol=1e-4)


def test_no_zero_rows_no_row_compaction():
    _, _, mlp = _bert_layer0()
    compact_mlp(mlp, CompactionRule(min_row_fraction=0.0, multiple_of=1))
    assert kept_outputs(mlp.down) is None


def test_dead_neurons_with_zero_constant_add_no_bias():
    model = tiny_model("t5")
    mlp = units_of(model)[1][0]
    with torch.no_grad():
        weight_matrix(mlp.up)[:6] = 0  # relu(0) = 0: nothing to fold
    compact_mlp(mlp, CompactionRule(multiple_of=1))
    assert len(mlp.kept_neurons) == 42 and mlp.down.bias is None and mlp.added_contract_bias is False


def _gelu_new(x: float) -> float:
    return 0.5 * x * (1 + math.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def _gated_with_biases():
    model = tiny_model("t5-gated")
    mlp = units_of(model)[1][0]
    n = mlp.original_neurons
    b_gate, b_up = torch.zeros(n), torch.zeros(n)
    b_gate[0], b_gate[3], b_up[3] = 1.0, 1.0, 2.0
    mlp.gate.bias, mlp.up.bias = nn.Parameter(b_gate), nn.Parameter(b_up)
    with torch.no_grad():
        weight_matrix(mlp.gate)[[0, 2, 3]] = 0  # 0: gate zero, act(1) != 0; 2: gate zero, act(0) = 0
        weight_matrix(mlp.up)[[1, 3]] = 0  # 1: up zero and no up bias; 3: both zero
    return mlp


def test_gated_neuron_constants_by_hand():
    removable, constant = neuron_constants(_gated_with_biases())
    assert removable[:5].tolist() == [False, True, True, True, False]
    assert not removable[4:].any()
    assert constant[1] == 0 and constant[2] == 0
    assert float(constant[3]) == pytest.approx(_gelu_new(1.0) * 2.0, rel=1e-5)


def test_gated_neurons_with_unknown_activation():
    mlp = _gated_with_biases()
    mlp.module.act = None  # no activation to be found: act(gate) is unknown
    removable, constant = neuron_constants(mlp)
    assert removable[:5].tolist() == [False, True, False, False, False]
    assert constant[1] == 0


def test_activation_is_looked_up_next_to_a_nested_expand_projection():
    from neuroprune.model.architectures import activation_of

    m = nn.Module()
    m.inner = nn.Module()
    m.inner.block = nn.Module()
    m.inner.block.up, m.inner.block.act, m.down = nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2)
    unit = MLPUnit(Found("mlp", m, MLPLayout(up="inner.block.up", down="down")))
    assert activation_of(unit.module, unit.layout.up) is m.inner.block.act


def _t5_with_up_bias(seed: int = 0):
    model = tiny_model("t5", seed)
    g = torch.Generator().manual_seed(seed)
    for mlp in units_of(model)[1]:
        mlp.up.bias = nn.Parameter(torch.randn(mlp.original_neurons, generator=g))
    return model


def test_compaction_structure_restores_every_kind():
    model = _t5_with_up_bias()
    attention, mlps = units_of(model)
    assert compaction_structure(SimpleNamespace(attention=attention, mlps=mlps)) == {}
    x = tiny_inputs("t5")
    with torch.no_grad():
        for unit in attention:
            for m in _qkv_weights(unit):
                m[:, :12] = 0  # 12 of 32 input dims dead
        for mlp in mlps:
            weight_matrix(mlp.up)[:10] = 0  # constant relu(b_up): folded into a new contract bias
            weight_matrix(mlp.down)[:, 10:16] = 0  # dead outputs
            weight_matrix(mlp.down)[:12] = 0  # zero contract rows
    before = main_output(model, x)
    rule = CompactionRule(multiple_of=1)
    for unit in attention:
        compact_attention(unit, rule)
    for mlp in mlps:
        compact_mlp(mlp, rule)
    torch.testing.assert_close(main_output(model, x), before, atol=1e-5, rtol=1e-4)
    structure = compaction_structure(SimpleNamespace(attention=attention, mlps=mlps))
    assert set(structure) == {"mlp_neurons", "attention_inputs", "contract_rows", "contract_biases"}

    fresh = _t5_with_up_bias()
    f_attention, f_mlps = units_of(fresh)
    restore_compaction(SimpleNamespace(attention=f_attention, mlps=f_mlps), structure)
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(main_output(fresh, x), before, atol=1e-5, rtol=1e-4)
    assert compaction_structure(SimpleNamespace(attention=f_attention, mlps=f_mlps)) == structure


@pytest.mark.parametrize(
    "structure, message",
    [({"attention_inputs": {"nope": [0]}}, "names attention blocks this"),
     ({"contract_rows": {"nope": [0]}}, "names MLP blocks this"),
     ({"mlp_neurons": {"nope": [0]}}, "names MLP blocks this"),
     ({"contract_biases": ["nope"]}, "names MLP blocks this")],
)
def test_restore_names_what_it_does_not_know(structure, message):
    attention, mlps = units_of(tiny_model("t5"))
    with pytest.raises(CheckpointError, match=message):
        restore_compaction(SimpleNamespace(attention=attention, mlps=mlps), structure)


def test_restore_names_the_block_whose_neurons_are_gone():
    attention, mlps = units_of(tiny_model("t5"))
    with pytest.raises(CheckpointError, match=f"neurons of {mlps[0].name}"):
        restore_compaction(
            SimpleNamespace(attention=attention, mlps=mlps), {"mlp_neurons": {mlps[0].name: [99]}}
        )


def test_compact_a_plain_model_honours_its_config():
    from neuroprune import NeuroPruneConfig, compact

    model = tiny_model("bert")
    _, mlps = units_of(model)
    with torch.no_grad():
        for mlp in mlps:
            weight_matrix(mlp.down)[:, :24] = 0  # half the neurons dead in both layers
    pruner = compact(model, NeuroPruneConfig(exclude_modules=r"layer\.1"), CompactionRule(multiple_of=1))
    widths = [weight_matrix(layer.intermediate.dense).shape[0] for layer in model.encoder.layer]
    assert widths == [24, 48] and len(pruner.mlps) == 1


class _BiasCore(nn.Module):
    """A custom attention block that takes a per-head bias and hands it on (like T5), but has no
    bias factory: when no bias comes in, none goes out."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(8, 8) for _ in range(4))

    as_tuple = True

    def forward(self, hidden_states, position_bias=None):
        self.received = position_bias
        out = self.o(self.q(hidden_states))
        return (out, position_bias) if self.as_tuple else out


def test_custom_per_head_bias_layout_without_factory():
    layout = AttentionLayout(q="q", k="k", v="v", o="o", head_bias_arg="position_bias", head_bias_output=1)
    block = _BiasCore()
    unit = AttentionUnit(Found("blk", block, layout), SimpleNamespace(head_dim=4))
    unit.keep_groups([1])
    x = torch.randn(1, 3, 8)
    assert block(x)[1] is None  # no bias in, none out
    bias = torch.randn(1, 2, 3, 3)
    assert block(x, position_bias=bias)[1] is bias  # handed on whole
    torch.testing.assert_close(block.received, bias[:, [1]])  # the layer saw its own head only
    shared = torch.randn(1, 1, 3, 3)  # one bias broadcast over the heads: nothing to slice
    assert block(x, position_bias=shared)[1] is shared and block.received is shared
    block.as_tuple = False  # an output with no slot for the bias is left alone
    assert torch.equal(block(x, position_bias=bias), block.o(block.q(x)))


def _train_steps(method, model, optimizer, steps, inputs) -> None:
    for k in steps:
        optimizer.zero_grad()
        (model(**inputs).last_hidden_state.pow(2).mean() + method.regularization_loss()).backward()
        optimizer.step()
        remap_optimizer(optimizer, method.on_step_end(k))
        if k % 4 == 0:
            remap_optimizer(optimizer, method.on_epoch_end(k // 4 - 1))


@pytest.mark.parametrize(
    ("name", "target"),
    [("neuroprune", SparsityTarget(0.5, heads=6)), ("l1", SparsityTarget(0.4)), ("neuroprune", None)],
)
def test_method_state_round_trips_and_the_resumed_method_continues_the_same(name, target):
    """In-process resume (tests/test_resume_methods.py does it across SIGKILL, too slow to run per
    mutant): the state survives JSON, gives a fresh method on a fresh model the same state, logs
    and summary, and both then take the same steps (plain SGD: no optimiser state to carry)."""
    torch.manual_seed(0)
    config = NeuroPruneConfig(alpha=1e-2, beta=1e-2, theta=0.3)
    inputs = tiny_inputs("bert")
    base = tiny_model("bert")
    model = copy.deepcopy(base)
    method = build_method(name, model, config, target)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    method.on_train_begin(12, optimizer)
    _train_steps(method, model, optimizer, range(1, 7), inputs)
    state = json.loads(json.dumps(method.state_dict()))
    assert state["step"] == 6
    resumed_model = copy.deepcopy(base)
    resumed = build_method(name, resumed_model, config, target)
    resumed.load_state_dict(state)  # structure first, then the weights fit
    resumed_model.load_state_dict(model.state_dict())
    resumed_optimizer = torch.optim.SGD(resumed_model.parameters(), lr=0.05)
    resumed.on_train_begin(12, resumed_optimizer)
    assert json.loads(json.dumps(resumed.state_dict())) == state
    assert resumed.log_values(detailed=True) == pytest.approx(method.log_values(detailed=True))
    assert resumed.summary() == pytest.approx(method.summary())
    _train_steps(method, model, optimizer, range(7, 13), inputs)
    _train_steps(resumed, resumed_model, resumed_optimizer, range(7, 13), inputs)
    for a, b in zip(model.state_dict().values(), resumed_model.state_dict().values()):
        assert torch.equal(a, b)
    assert json.loads(json.dumps(resumed.state_dict())) == json.loads(json.dumps(method.state_dict()))


def test_load_passes_model_arguments_and_from_pretrained_uses_the_saved_discovery(tmp_path):
    from neuroprune import load

    model = tiny_model("bert")
    index = ModelIndex(model, {"exclude_modules": r"layer\.1\."})
    assert [u.name for u in index.attention] == ["encoder.layer.0.attention"]
    path = index.save_pretrained(tmp_path / "m")
    loaded = load(path, dtype=torch.float64)
    assert {p.dtype for p in loaded.parameters()} == {torch.float64}
    again = ModelIndex.from_pretrained(path)
    assert [u.name for u in again.attention] == ["encoder.layer.0.attention"]
    assert again.discovery == index.discovery
    # folders written before the index existed: the options sit in the method's config
    meta_file = path / "neuroprune.json"
    meta = json.loads(meta_file.read_text())
    meta["neuroprune_config"] = {"alpha": 1.0, "exclude_modules": r"layer\.1\."}
    del meta["discovery"]
    meta_file.write_text(json.dumps(meta))
    legacy = ModelIndex.from_pretrained(path)
    assert [u.name for u in legacy.attention] == ["encoder.layer.0.attention"]


def test_restoring_a_head_structure_refuses_unknown_blocks_and_removed_groups():
    index = ModelIndex(tiny_model("bert"))
    with pytest.raises(NeuroPruneError, match=r"does not have: \['encoder.layer.9.attention'\]"):
        index.restore_head_structure({"encoder.layer.9.attention": [0]})
    unit = index.attention[0]
    unit.keep_groups([1, 2, 3])  # group 0 is gone
    with pytest.raises(NeuroPruneError, match=r"keeps groups \[0\] already removed"):
        index.restore_head_structure({unit.name: [0, 1]})
    index.restore_head_structure({unit.name: [1, 3]})
    assert unit.kept_groups == [1, 3]


def test_flop_schedule_and_bounds_by_hand():
    target = SparsityTarget(flops=0.4, ramp_begin=0.0, ramp_end=0.5)
    # p = 3 / (0.5 * 10) = 0.6: 0.4 + (1 - 0.4) * 0.4^3
    assert target.flops_at(3, 10) == pytest.approx(0.4 + 0.6 * 0.4**3, abs=1e-12)
    assert target.flops_at(0, 10) == 1.0 and target.flops_at(5, 10) == 0.4
    assert SparsityTarget(flops=1.0).flops == 1.0  # "1: nothing removed" is allowed
    assert SparsityTarget(flops=0.5, seq_len=1).seq_len == 1
    with pytest.raises(ConfigError, match="seq_len must be a whole number >= 1"):
        SparsityTarget(flops=0.5, seq_len=0)


def test_restoring_a_structure_without_optional_keys_resets_passes_and_history():
    index = ModelIndex(tiny_model("bert"))
    index.passes, index.history = 3, [{"pass": 0}]
    index.restore_structure({})
    assert index.passes == 0 and index.history == []
    assert [u.kept_groups for u in index.attention] == [[0, 1, 2, 3]] * 2


def test_flop_target_settings_must_be_whole_numbers():
    for bad in (True, 2.5):
        with pytest.raises(ConfigError, match="seq_len must be a whole number"):
            SparsityTarget(flops=0.5, seq_len=bad)


def test_near_zero_counts_only_exact_zeros_in_kinds_not_finalized():
    index = ModelIndex(tiny_model("bert"))
    with torch.no_grad():
        for unit in index.attention:
            unit.o.weight.fill_(0.5)
        o = index.attention[0].o.weight  # (32, 32)
        o[0] = 0.0  # 32 exact zeros
        o[1] = 1e-9  # below eps but not zero: not finalized, so not counted
        o[2, :5] = 1.0
    counts = index.near_zero_by_kind(1e-4, finalized=frozenset({"q", "k", "v", "up", "down"}))
    assert counts["o"] == (32, 2 * 32 * 32)
    assert index.near_zero_by_kind(1e-4)["o"] == (64, 2 * 32 * 32)  # all finalized: |w| < eps
    assert ModelIndex(tiny_model("bert"), {"exclude_modules": "."}).near_zero_by_kind(1e-4) == {}


def test_counted_weights_of_some_kinds_are_those_parameters_only():
    model = tiny_model("llama")
    index = ModelIndex(model)
    o = index.counted_weights({"o"})
    assert [id(p) for p in o] == [id(layer.self_attn.o_proj.weight) for layer in model.model.layers]
    mlp = index.counted_weights({"gate", "up", "down"})
    assert [id(p) for p in mlp] == [id(getattr(layer.mlp, f"{k}_proj").weight)
                                    for layer in model.model.layers for k in ("gate", "up", "down")]
    assert len(index.counted_weights()) == 2 * 7


def test_save_pretrained_writes_the_tokenizer_the_discovery_and_the_remote_code(tmp_path):
    import textdata

    model = tiny_model("bert")
    index = ModelIndex(model, {"mlp_modules": "layer"})
    index.attention[0].keep_groups([0, 2, 3])  # head-pruned: stock classes cannot load it alone
    path = index.save_pretrained(tmp_path / "m", tokenizer=textdata.tokenizer())
    assert (path / "tokenizer.json").exists()
    meta = json.loads((path / "neuroprune.json").read_text())
    assert meta["discovery"] == index.discovery and meta["discovery"]["mlp_modules"] == "layer"
    config = json.loads((path / "config.json").read_text())
    assert "auto_map" in config  # loads with trust_remote_code=True
    assert not list((tmp_path / "m").parent.glob(".*tmp*"))


def test_finalize_zeroes_strictly_below_eps_and_counts_the_changes():
    index = ModelIndex(tiny_model("bert"))
    with torch.no_grad():
        for p in index.counted_weights():
            p.fill_(1.0)
        up = index.mlps[0].up.weight
        up[0, :3] = 0.25  # exactly eps: present ("|w| < eps is absent")
        up[1, :4] = 0.125  # below: zeroed
        up[2, :2] = 0.0  # already zero: not counted as changed
    assert index.finalize(0.25) == 4
    assert up[0, :3].tolist() == [0.25] * 3 and up[1, :4].tolist() == [0.0] * 4
    assert index.finalize(0.25) == 0


def test_same_layer_is_the_mlp_with_the_longest_shared_dotted_prefix():
    from neuroprune.model.index import same_layer

    mlps = [SimpleNamespace(name=f"model.layers.{i}.mlp") for i in (0, 1, 10)]
    assert same_layer("model.layers.1.self_attn", mlps) is mlps[1]
    assert same_layer("model.layers.10.self_attn", mlps) is mlps[2]
    assert same_layer("model.layers.1.self_attn", []) is None


def test_discovery_defaults_and_options_read_from_any_object():
    layer = tiny_model("bert").encoder.layer[0]
    del layer.attention
    mlp_only = nn.ModuleList([layer])  # no `config` attribute, no attention block
    with pytest.raises(UnsupportedArchitectureError, match="no attention block was found"):
        ModelIndex(mlp_only)  # default: a model without attention is refused
    index = ModelIndex(mlp_only, SimpleNamespace(allow_missing_attention=True))  # other options absent
    assert (len(index.attention), len(index.mlps)) == (0, 1)
    assert index.discovery == {"attention_layouts": [], "mlp_layouts": [], "attention_modules": None,
                               "mlp_modules": None, "exclude_modules": None, "allow_missing_attention": True}


# --- units: per-head terms and key/value bookkeeping (survivors of the units.py run, issue 18) ---

def test_slice_heads_cuts_each_layout_by_hand():
    """Every head layout `slice_heads` knows, against hand-picked rows of an arange tensor (4
    heads, keep 1 and 3); anything it cannot place is handed back untouched (the same object)."""
    from neuroprune.model.units import slice_heads

    kept = (1, 3)
    heads = torch.arange(12.0).reshape(4, 3)  # ALiBi-style (heads, ...)
    torch.testing.assert_close(slice_heads(heads, "heads", 4, kept), torch.tensor([[3.0, 4, 5], [9, 10, 11]]))
    flat = torch.arange(16.0).reshape(8, 1, 2)  # (batch * heads, q, k), batch 2, rows b * 4 + h
    out = slice_heads(flat, "batch*heads", 4, kept)
    assert out.shape == (4, 1, 2)
    torch.testing.assert_close(out[:, 0, 0], torch.tensor([2.0, 6, 10, 14]))
    one_dim = slice_heads(torch.arange(8.0), "batch*heads", 4, kept)
    torch.testing.assert_close(one_dim, torch.tensor([1.0, 3, 5, 7]))
    falcon = torch.arange(16.0).reshape(2, 4, 1, 2)  # Falcon hands it over unflattened
    out = slice_heads(falcon, "batch*heads", 4, kept)
    assert out.shape == (2, 2, 1, 2)
    torch.testing.assert_close(out[:, :, 0, 0], torch.tensor([[2.0, 6], [10, 14]]))
    mask = torch.arange(16.0).reshape(2, 4, 2)  # (batch, heads, ...)
    out = slice_heads(mask, "batch,heads", 4, kept)
    torch.testing.assert_close(out[:, :, 0], torch.tensor([[2.0, 6], [10, 14]]))
    torch.testing.assert_close(
        slice_heads(torch.arange(8.0).reshape(2, 4), "batch,heads", 4, kept), torch.tensor([[1.0, 3], [5, 7]])
    )
    untouched = [
        (torch.arange(8.0).reshape(2, 4), "heads", 4),  # heads not first
        (torch.arange(6.0).reshape(6, 1), "batch*heads", 4),  # 6 rows: not batch * 4 heads
        (torch.tensor(1.0), "batch*heads", 4),  # a scalar
        (torch.arange(8.0).reshape(4, 2), "batch,heads", 4),  # heads not second
        (torch.arange(8.0), "batch,heads", 4),  # one dimension
        (torch.arange(12.0).reshape(4, 3), "unknown", 4),
        (torch.arange(16.0).reshape(2, 4, 1, 2), "unknown", 4),  # 4-d is unflattened only for batch*heads
    ]
    for tensor, dims, original in untouched:
        assert slice_heads(tensor, dims, original, kept) is tensor, (tensor.shape, dims)
    assert slice_heads(heads, "heads", 4, (0, 1, 2, 3)) is heads  # every head kept: nothing to cut
    assert slice_heads(None, "heads", 4, kept) is None and slice_heads(2.5, "heads", 4, kept) == 2.5


def test_kept_kv_heads_of_grouped_and_multi_query_attention():
    """Original key/value head indices after removals: the kept groups themselves, except under
    multi-query attention, where the one shared key/value head (index 0) always stays."""
    unit = units_of(tiny_model("llama"))[0][0]  # grouped-query: 4 query heads over 2 kv heads
    assert (unit.original_heads, unit.original_kv_heads) == (4, 2)
    unit.keep_groups([1])
    assert unit.kept_kv_heads == [1] and unit.kept_heads == [2, 3]
    mq = AttentionUnit(Found("blk", _Attn(8, 8, 4), _ATTN_LAYOUT), SimpleNamespace(head_dim=4))
    assert mq.multi_query and mq.kept_kv_heads == [0]
    mq.keep_groups([1])
    assert mq.kept_kv_heads == [0] and mq.kept_heads == [1]


class _MaskCore(nn.Module):
    """An attention block whose additive mask may carry a per-head dimension (Falcon folds its
    ALiBi into it); it records the mask it was handed."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(8, 8) for _ in range(4))

    def forward(self, hidden_states, attention_mask=None):
        self.received = attention_mask
        return (self.o(self.q(hidden_states)),)


def test_per_head_mask_is_cut_to_the_kept_heads():
    layout = AttentionLayout(q="q", k="k", v="v", o="o", head_mask_arg="attention_mask")
    block = _MaskCore()
    unit = AttentionUnit(Found("blk", block, layout), SimpleNamespace(head_dim=4))  # 2 heads
    unit.keep_groups([1])
    x = torch.randn(2, 3, 8)
    block(x)  # no mask in: none handed on, and the output hook finds no full bias to pass on
    assert block.received is None
    mask = torch.arange(36.0).reshape(2, 2, 3, 3)
    block(x, attention_mask=mask)
    torch.testing.assert_close(block.received, torch.stack([mask[0, 1:2], mask[1, 1:2]]))  # head 1
    shared = torch.zeros(2, 1, 3, 3)  # no per-head dimension: handed over as it is
    block(x, attention_mask=shared)
    assert block.received is shared


def test_fused_gate_up_halves_and_their_biases():
    """[gate | up] rows of one fused projection: the first half is the gate, the second the up
    rows, biases likewise; a plain MLP has no gate bias even when `up` has a bias."""
    m = nn.Module()
    m.gate_up, m.down = nn.Linear(4, 6), nn.Linear(3, 4)
    unit = MLPUnit(Found("mlp", m, MLPLayout(gate_up="gate_up", down="down")))
    assert unit.fused and unit.gated and unit.original_neurons == 3
    w, b = m.gate_up.weight.detach().clone(), m.gate_up.bias.detach().clone()
    assert torch.equal(unit.gate_bias(), b[:3]) and torch.equal(unit.up_bias(), b[3:])
    assert torch.equal(unit.gate_matrix(), w[:3]) and torch.equal(unit.up_matrix(), w[3:])
    plain = MLPUnit(Found("mlp", _mlp(4, 3), _MLP_LAYOUT))
    assert plain.gate_bias() is None and plain.gate_matrix() is None
    assert torch.equal(plain.up_bias(), plain.up.bias)
    # removing neuron 1 keeps gate rows 0, 2 and up rows 3, 5 of the fused projection
    changes = unit.keep_neurons([0, 2])
    assert {id(c.new) for c in changes} == {id(m.gate_up.weight), id(m.gate_up.bias), id(m.down.weight)}
    assert torch.equal(m.gate_up.weight, w[[0, 2, 3, 5]]) and torch.equal(m.gate_up.bias, b[[0, 2, 3, 5]])
    assert unit.kept_neurons == [0, 2] and unit.gate_matrix().shape == (2, 4)


def test_fused_gate_up_without_biases_has_none():
    m = nn.Module()
    m.gate_up, m.down = nn.Linear(4, 6, bias=False), nn.Linear(3, 4, bias=False)
    unit = MLPUnit(Found("mlp", m, MLPLayout(gate_up="gate_up", down="down")))
    assert unit.gate_bias() is None and unit.up_bias() is None


def test_head_counts_read_from_the_attention_config_follow_removal_in_one_layer_only():
    """Phi-3's attention reads its head counts from `self.config`: removing a head in layer 0
    must rewrite them on a config of that layer's own, leave the model's (shared, saved) config
    and layer 1 dense, and give the reference output (removed head's O columns zeroed)."""
    model = tiny_model("phi3")
    reference = copy.deepcopy(model)
    x = tiny_inputs("phi3")
    unit, ref = units_of(model)[0][0], units_of(reference)[0][0]
    heads, kv = model.config.num_attention_heads, model.config.num_key_value_heads
    drop = 1
    with torch.no_grad():
        weight_matrix(ref.o)[:, ref.query_rows([drop])] = 0
    unit.keep_groups([g for g in range(unit.num_kv_heads) if g != drop])
    torch.testing.assert_close(main_output(model, x), main_output(reference, x), atol=1e-5, rtol=1e-4)
    own = unit.core.config
    assert own is not model.config
    assert (own.num_attention_heads, own.num_key_value_heads) == (heads - heads // kv, kv - 1)
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (heads, kv)
    other = units_of(model)[0][1].core.config
    assert (other.num_attention_heads, other.num_key_value_heads) == (heads, kv)
    unit.keep_groups([0])  # a second removal keeps the same own config
    assert unit.core.config is own and own.num_key_value_heads == 1


def test_a_config_without_head_counts_stays_shared():
    """An attention config that holds no head count has nothing to rewrite: the block keeps
    reading the shared object (no private copy that later edits of the model's config miss)."""
    block = _Attn(8, 8, 8)
    block.config = shared = SimpleNamespace(hidden_act="gelu")
    unit = AttentionUnit(Found("blk", block, _ATTN_LAYOUT), SimpleNamespace(head_dim=4))
    unit.keep_groups([0])
    assert block.config is shared and not unit._own_config


def test_head_removal_cuts_deberta_position_projections():
    """DeBERTa-v2 without shared attention keys has per-head position projections: removing a head
    drops their rows too, reports them as replaced, and gives the reference output (the removed
    head's O columns zeroed in the unpruned model)."""
    from transformers import AutoModel

    from tiny import tiny_config

    config = tiny_config("deberta-v2")
    config.share_att_key = False
    torch.manual_seed(0)
    model = AutoModel.from_config(config, attn_implementation="eager").eval()
    reference = copy.deepcopy(model)
    x = tiny_inputs("deberta-v2")
    unit, ref = units_of(model)[0][0], units_of(reference)[0][0]
    assert len(unit.head_projections) == 2
    pos_key = unit.head_projections[0].weight.detach().clone()
    with torch.no_grad():
        weight_matrix(ref.o)[:, ref.query_rows([2])] = 0
    changes = unit.keep_groups([0, 1, 3])
    replaced = {id(c.new) for c in changes}
    assert all(id(m.weight) in replaced and id(m.bias) in replaced for m in unit.head_projections)
    assert id(unit.q.weight) in replaced and id(unit.o.weight) in replaced
    h = unit.head_dim
    kept_rows = torch.cat([pos_key[: 2 * h], pos_key[3 * h:]])
    torch.testing.assert_close(unit.head_projections[0].weight, kept_rows)
    torch.testing.assert_close(main_output(model, x), main_output(reference, x), atol=1e-5, rtol=1e-4)


def test_a_refused_family_may_keep_every_head():
    """Where head removal is refused (a per-head term the layout cannot cut), keeping every group
    is still allowed (nothing is removed); keeping fewer is refused."""

    class _Alibi(_Attn):
        def forward(self, hidden_states, alibi=None):
            return self.o(self.q(hidden_states))

    unit = AttentionUnit(Found("blk", _Alibi(8, 8, 8), _ATTN_LAYOUT), SimpleNamespace(head_dim=4))
    assert "alibi" in unit.head_removal_refused
    unit.keep_groups([0, 1])
    assert unit.kept_groups == [0, 1]
    with pytest.raises(UnsupportedArchitectureError, match="alibi"):
        unit.keep_groups([1])


def test_interleaved_grouped_query_projection_by_hand():
    """A fused projection interleaved per key/value group, [q0 q1 | k | v] (two query heads per
    key/value head): row r of the weight holds r, so the Q, K and V rows are read off by hand."""
    layout = AttentionLayout(qkv="qkv", fused="interleaved", o="o")
    block = _Fused(8, 8, 4)
    with torch.no_grad():
        block.qkv.weight.copy_(torch.arange(16.0)[:, None].expand(16, 8))
    unit = AttentionUnit(Found("blk", block, layout), SimpleNamespace(head_dim=2))
    assert (unit.original_heads, unit.original_kv_heads, unit.group_size) == (4, 2, 2)
    q, k, v = (m[:, 0].tolist() for m in unit.qkv_matrices())
    assert q == [0, 1, 2, 3, 8, 9, 10, 11] and k == [4, 5, 12, 13] and v == [6, 7, 14, 15]
    unit.keep_groups([1])
    assert block.qkv.weight[:, 0].tolist() == list(range(8, 16))


def test_multi_query_fused_projection_keeps_the_shared_key_value_rows():
    """Multi-query attention in a fused [Q | K | V] projection (Falcon-style): removing query
    head 0 keeps query rows 4..7 and the one shared key / value head (rows 8..15)."""
    layout = AttentionLayout(qkv="qkv", fused="concat", o="o")
    block = _Fused(8, 8, 4)
    with torch.no_grad():
        block.qkv.weight.copy_(torch.arange(16.0)[:, None].expand(16, 8))
    unit = AttentionUnit(Found("blk", block, layout), SimpleNamespace(head_dim=4))
    assert unit.multi_query and unit.kv_rows([1]).tolist() == [0, 1, 2, 3]
    unit.keep_groups([1])
    assert block.qkv.weight[:, 0].tolist() == list(range(4, 16))


def test_refusal_names_the_family_the_module_and_the_fix():
    """The refusal text, exactly: it names the model type (or the attention class without one),
    the block, the argument, and both ways out."""

    class _Alibi(_Attn):
        def forward(self, hidden_states, alibi=None):
            return self.o(self.q(hidden_states))

    def refusal(family: str) -> str:
        return (
            f"model type {family!r}: head removal is not supported: the attention blk (_Alibi) takes "
            "'alibi', a per-head term the model builds for all its heads, and its layout does not say "
            "how to cut it to the heads a layer keeps (removing a head would break the forward pass or "
            "shift the remaining heads' terms). Name it in an attention layout: {..., 'head_bias_arg': "
            "'alibi', 'head_bias_dims': 'batch,heads' | 'batch*heads' | 'heads'}, or train with "
            "prune_heads=False (penalties and MLP pruning work)."
        )

    found = Found("blk", _Alibi(8, 8, 8), _ATTN_LAYOUT)
    named = AttentionUnit(found, SimpleNamespace(head_dim=4, model_type="bloom"))
    assert named.head_removal_refused == refusal("bloom")
    assert AttentionUnit(found, SimpleNamespace(head_dim=4)).head_removal_refused == refusal("_Alibi")
    block = _Attn(8, 8, 8)
    block.forward = min  # a forward without a signature: nothing to check, nothing refused
    unsigned = AttentionUnit(Found("blk", block, _ATTN_LAYOUT), SimpleNamespace(head_dim=4))
    assert unsigned.head_removal_refused == ""


def test_fused_gate_up_with_an_odd_row_count_is_refused():
    m = nn.Module()
    m.gate_up, m.down = nn.Linear(4, 9), nn.Linear(4, 4)  # 9 rows cannot be [gate | up] halves
    with pytest.raises(UnsupportedArchitectureError, match="odd number of rows"):
        MLPUnit(Found("mlp", m, MLPLayout(gate_up="gate_up", down="down")))


# --- compaction: uniform widths (survivors of the compaction.py run, issue 18) ----------------------

def _rows_marked(block: nn.Module) -> None:
    """Row r of every q/k/v weight and bias holds r + 1, column c of o holds c + 1 (0 = padding)."""
    with torch.no_grad():
        for m in (block.q, block.k, block.v):
            rows = torch.arange(1.0, m.out_features + 1)
            m.weight.copy_(rows[:, None].expand_as(m.weight))
            m.bias.copy_(rows)
        block.o.weight.copy_(torch.arange(1.0, block.o.in_features + 1)[None, :].expand_as(block.o.weight))


def test_pad_groups_puts_a_grouped_query_block_back_in_place_by_hand():
    """4 query heads over 2 key/value heads (head size 2), group 0 removed during training: padding
    back to 2 groups gives zero rows 0..3 of Q (rows 0, 1 of K, V) and zero O columns 0..3, the
    kept group's rows at their original places, O's own bias untouched, the shape attributes and
    the frozen flag kept."""
    from neuroprune.compaction import _pad_groups

    block = _Attn(8, 8, 4)
    _rows_marked(block)
    o_bias = block.o.bias.detach().clone()
    unit = AttentionUnit(Found("blk", block, _ATTN_LAYOUT), SimpleNamespace(head_dim=2))
    assert unit.group_size == 2
    unit.keep_groups([1])
    block.q.weight.requires_grad_(False)
    _pad_groups(unit, 2)
    assert block.q.weight[:, 0].tolist() == [0, 0, 0, 0, 5, 6, 7, 8]
    assert block.q.bias.tolist() == [0, 0, 0, 0, 5, 6, 7, 8]
    assert block.k.weight[:, 0].tolist() == [0, 0, 3, 4] and block.v.bias.tolist() == [0, 0, 3, 4]
    assert block.o.weight[0].tolist() == [0, 0, 0, 0, 5, 6, 7, 8] and torch.equal(block.o.bias, o_bias)
    assert (block.q.out_features, block.k.out_features, block.o.in_features) == (8, 4, 8)
    assert not block.q.weight.requires_grad and block.k.weight.requires_grad
    assert unit.kept_groups == [0, 1] and unit.num_heads == 4


def test_pad_groups_of_multi_query_attention_leaves_the_shared_key_value_alone():
    from neuroprune.compaction import _pad_groups

    block = _Attn(8, 8, 4)
    _rows_marked(block)
    unit = AttentionUnit(Found("blk", block, _ATTN_LAYOUT), SimpleNamespace(head_dim=4))
    assert unit.multi_query
    unit.keep_groups([1])
    _pad_groups(unit, 2)
    assert block.q.weight[:, 0].tolist() == [0, 0, 0, 0, 5, 6, 7, 8]
    assert block.k.weight[:, 0].tolist() == [1, 2, 3, 4] and block.v.bias.tolist() == [1, 2, 3, 4]


def test_pad_groups_refuses_separate_projections_that_are_not_linear():
    from transformers.pytorch_utils import Conv1D

    from neuroprune.compaction import _pad_groups

    block = nn.Module()
    block.q, block.k, block.v, block.o = Conv1D(8, 8), Conv1D(8, 8), Conv1D(8, 8), Conv1D(8, 8)
    unit = AttentionUnit(Found("blk", block, _ATTN_LAYOUT), SimpleNamespace(head_dim=4))
    unit.keep_groups([1])
    with pytest.raises(UnsupportedArchitectureError, match="separate q/k/v Linear"):
        _pad_groups(unit, 2)


def test_check_shapes_names_every_differing_or_missing_entry():
    from neuroprune.compaction import _check_shapes

    def refusal(keys: list[str]) -> str:
        return ("uniform compaction: Sequential cannot describe a uniformly narrower model, its stock model "
                f"differs at {keys}. Save the non-uniform compaction instead (neuroprune.load, or the Auto "
                "classes with trust_remote_code=True).")

    own = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    _check_shapes(own, nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1)))  # same shapes: accepted
    cases = [
        (nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 2)), ["1.bias", "1.weight"]),  # a shape differs
        (nn.Sequential(nn.Linear(2, 3)), ["1.bias", "1.weight"]),  # missing from the stock model
        (nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1), nn.Linear(1, 1)), ["2.bias", "2.weight"]),  # extra
    ]
    for stock, keys in cases:
        with pytest.raises(UnsupportedArchitectureError) as err:
            _check_shapes(own, stock)
        assert str(err.value) == refusal(keys)


def test_head_fields_of_multi_query_attention_keep_one_key_value_head():
    from neuroprune.compaction import _head_fields

    mq = AttentionUnit(Found("blk", _Attn(8, 8, 4), _ATTN_LAYOUT), SimpleNamespace(head_dim=4))
    assert _head_fields(mq, 2) == {"num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 4}
    gqa = AttentionUnit(Found("blk", _Attn(8, 8, 4), _ATTN_LAYOUT), SimpleNamespace(head_dim=2))
    assert _head_fields(gqa, 1) == {"num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 2}


@pytest.mark.parametrize("family", ["gpt2", "bloom"])
def test_uniform_compaction_of_a_dense_fused_model_changes_nothing(family):
    """Nothing dead: every block keeps all its groups, so the fused projections (which cannot be
    padded) are never padded, and the outputs stay the same."""
    from neuroprune.compaction import compact_uniform

    model = tiny_model(family)
    x = tiny_inputs(family)
    expected = main_output(model, x)
    heads = [u.num_kv_heads for u in units_of(model)[0]]
    result = compact_uniform(model)
    assert result.groups == heads[0] and [u.num_kv_heads for u in result.index.attention] == heads
    torch.testing.assert_close(main_output(model, x), expected, atol=0, rtol=0)


def test_uniform_compaction_keeps_the_neurons_whose_constant_needs_a_bias_the_config_lacks():
    """StarCoder2 without biases (`use_bias=False`) and with a sigmoid MLP: a neuron whose c_fc
    row is zero outputs sigmoid(0) = 0.5, which only a contract bias could carry, and the stock
    config has none. Per layer neurons 0-9 get a zero row; 0-4 also a zero c_proj column (they add
    nothing: removed), 5-9 keep theirs (kept; 5's is all ones): 43 of 48 neurons, rows 5-47, no bias,
    same outputs (this branch, `if p.adds_bias`, is reached by a stock config)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from neuroprune.compaction import compact_uniform

    from tiny import COMMON, CONFIGS

    torch.manual_seed(0)
    config = AutoConfig.for_model("starcoder2", **COMMON,
                                  **dict(CONFIGS["starcoder2"], use_bias=False, hidden_act="sigmoid"))
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    x = tiny_inputs("starcoder2")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.c_fc.weight[:10] = 0.0
            layer.mlp.c_proj.weight[:, :5] = 0.0
            layer.mlp.c_proj.weight[:, 5] = 1.0  # non-zero, though no entry differs from 1
    expected = main_output(model, x)
    rows = [layer.mlp.c_fc.weight[5:].detach().clone() for layer in model.model.layers]
    columns = [layer.mlp.c_proj.weight[:, 5:].detach().clone() for layer in model.model.layers]
    result = compact_uniform(model, rule=CompactionRule(multiple_of=1))
    assert result.neurons == 43 and result.min_neurons_needed == [43, 43]
    assert model.config.intermediate_size == 43
    for layer, row, column in zip(model.model.layers, rows, columns):
        assert torch.equal(layer.mlp.c_fc.weight, row) and torch.equal(layer.mlp.c_proj.weight, column)
        assert layer.mlp.c_fc.bias is None and layer.mlp.c_proj.bias is None
    torch.testing.assert_close(main_output(model, x), expected, atol=1e-5, rtol=0)


def test_uniform_compaction_keeps_the_strongest_dead_groups():
    """Layer 0 has one live group, layer 1 needs two: layer 0 keeps its live group 0 plus its dead
    group with the largest [Q, K, V] norm (group 3, scaled up; group 1 scaled down)."""
    from neuroprune.compaction import compact_uniform
    from test_uniform import uneven_llama

    pruner = uneven_llama(dead_groups=([1, 2, 3], [2, 3]))
    unit = pruner.index.attention[0]
    with torch.no_grad():
        for group, scale in ((3, 10.0), (1, 0.1)):
            rows = unit.query_rows([group])
            unit.q.weight[rows] *= scale
            unit.k.weight[unit.kv_rows([group])] *= scale
            unit.v.weight[unit.kv_rows([group])] *= scale
    x = tiny_inputs("llama")
    expected = main_output(pruner.model, x)
    result = compact_uniform(pruner)
    assert result.groups == 2 and result.min_groups_needed[:2] == [1, 2]
    assert pruner.index.attention[0].kept_groups == [0, 3]
    torch.testing.assert_close(main_output(pruner.model, x), expected, atol=1e-5, rtol=0)


def test_uniform_compaction_rounds_neurons_to_the_rule_and_keeps_the_strongest_spare_ones():
    """uneven_llama's live neurons are 24 / 48 / 8; with multiple_of=16 each block needs 32 / 48 / 16
    and all keep 48. Layer 0's 40 removable neurons are made removable by a zero gate row (their
    product is 0) with their contract columns left non-zero: 24 of them scaled up by 100 are the
    strongest, so those are the ones kept beyond the live 24."""
    from neuroprune.compaction import compact_uniform
    from test_uniform import uneven_llama

    pruner = uneven_llama()
    unit = pruner.index.mlps[0]
    dead = (~unit.down.weight.ne(0).any(0)).nonzero().flatten()
    assert len(dead) == 40
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        unit.down.weight[:, dead] = torch.randn(unit.down.weight.shape[0], 40, generator=g)
        unit.down.weight[:, dead[:24]] *= 100
        unit.gate.weight[dead] = 0
    x = tiny_inputs("llama")
    expected = main_output(pruner.model, x)
    result = compact_uniform(pruner, rule=CompactionRule(multiple_of=16))
    assert result.min_neurons_needed == [32, 48, 16] and result.neurons == 48
    live = sorted(set(range(64)) - set(dead.tolist()))
    assert unit.kept_neurons == sorted(live + dead[:24].tolist())
    torch.testing.assert_close(main_output(pruner.model, x), expected, atol=1e-5, rtol=0)


def test_uniform_compaction_of_a_one_layer_model():
    """One block: the head fields and the accepted head count come from the only attention block."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from neuroprune.compaction import compact_uniform

    from tiny import VOCAB

    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", vocab_size=VOCAB, hidden_size=32, num_attention_heads=4,
                                  num_key_value_heads=2, intermediate_size=32, num_hidden_layers=1)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    unit = units_of(model)[0][0]
    with torch.no_grad():
        weight_matrix(unit.o)[:, unit.query_rows([1])] = 0  # group 1 dead
    x = tiny_inputs("llama")
    expected = main_output(model, x)
    result = compact_uniform(model)
    assert result.groups == 1 and result.config_changes["num_key_value_heads"] == 1
    assert model.config.num_attention_heads == 2
    torch.testing.assert_close(main_output(model, x), expected, atol=1e-5, rtol=0)


def test_uniform_compaction_refuses_a_model_compacted_before():
    from neuroprune import compact
    from neuroprune.compaction import compact_uniform
    from test_uniform import uneven_llama

    pruner = uneven_llama()
    compact(pruner, rule=CompactionRule(1.0, 1.0, 8))
    with pytest.raises(ConfigError, match="compacted before"):
        compact_uniform(pruner)


def test_planned_parameter_count_includes_the_contract_biases_compaction_adds():
    """T5 (ReLU, no contract bias) with an up bias: neurons with a zero up row fold relu(b) into a
    contract bias that `compact` must add. The plan's parameter count must equal the count of the
    model `compact` then leaves (the added biases included), and the plan must say so."""
    from neuroprune import compact
    from neuroprune.compaction import flop_count, plan

    model = _t5_with_up_bias()
    with torch.no_grad():
        for mlp in units_of(model)[1]:
            mlp.up.weight[:5] = 0
            mlp.up.bias[:5] = torch.tensor([1.0, 2.0, -1.0, 0.5, 3.0])  # relu: 4 non-zero constants
    index, rule = ModelIndex(model), CompactionRule(multiple_of=1)
    assert all(p.adds_bias is True for p in plan(index, rule).mlps)
    planned = flop_count(index, rule=rule).params_compacted
    compact(index, rule=rule)
    assert all(u.down.bias is not None for u in index.mlps)
    assert planned == sum(p.numel() for p in model.parameters())


def test_flop_count_and_uniform_compaction_of_a_plain_model_honour_its_config():
    """A plain model is indexed with the discovery options of `config`: the planned parameter count
    matches what `compact` with the same config leaves, and uniform compaction of a model whose
    layer-0 MLP is excluded (so kept at full width) is refused, not compacted as if included."""
    from neuroprune import NeuroPruneConfig, compact
    from neuroprune.compaction import compact_uniform, flop_count

    config, rule = NeuroPruneConfig(exclude_modules=r"layer\.1"), CompactionRule(multiple_of=1)
    model = tiny_model("bert")
    with torch.no_grad():
        for mlp in units_of(model)[1]:
            weight_matrix(mlp.down)[:, :24] = 0
    planned = flop_count(model, rule=rule, config=config).params_compacted
    compact(model, config, rule)
    assert planned == sum(p.numel() for p in model.parameters())

    llama = tiny_model("llama")
    with torch.no_grad():
        weight_matrix(units_of(llama)[1][1].down)[:, :16] = 0  # layer 1 needs fewer neurons
    with pytest.raises(UnsupportedArchitectureError, match="stock model differs"):
        compact_uniform(llama, NeuroPruneConfig(exclude_modules=r"layers\.0\.mlp"))


def test_an_input_read_by_one_of_q_k_v_only_stays():
    """Input dims 0..15 dead except dim 3 (read by K only), dim 5 (V only), dim 7 (Q only): each of
    them is still read, so the gather keeps 3, 5, 7 and 16..31, and the output is unchanged."""
    from neuroprune.compaction import plan_attention

    model, unit, _ = _bert_layer0()
    q, k, v = _qkv_weights(unit)
    with torch.no_grad():
        for m in (q, k, v):
            m[:, :16] = 0
        k[:, 3], v[:, 5], q[:, 7] = 1.0, -1.0, 0.5
    kept = [3, 5, 7, *range(16, 32)]
    assert plan_attention(unit, CompactionRule()).keep_inputs == kept
    x = tiny_inputs("bert")
    before = main_output(model, x)
    compact_attention(unit, CompactionRule())
    assert kept_inputs(unit.k) == kept
    torch.testing.assert_close(main_output(model, x), before, atol=1e-5, rtol=1e-4)


def test_a_single_dead_group_is_kept_not_indexed_past():
    """All groups dead in a one-head block: the plan keeps that one group (no removal, no index
    past the only group)."""
    from neuroprune.compaction import plan_attention

    block = _Attn(8, 4, 4)
    with torch.no_grad():
        block.o.weight.zero_()
    unit = AttentionUnit(Found("blk", block, _ATTN_LAYOUT), SimpleNamespace(head_dim=4))
    p = plan_attention(unit, CompactionRule())
    assert p.keep_groups is None and p.keep_inputs is None


@pytest.mark.parametrize(
    "excluded, groups, neurons, changes",
    [("self_attn", 0, 48, {"intermediate_size": 48}),  # no attention block indexed: no head fields
     ("mlp", 2, 0, {"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8})],  # no MLP
)
def test_uniform_compaction_with_no_attention_or_no_mlp_indexed(excluded, groups, neurons, changes):
    """tiny llama: 4 heads over 2 key/value groups of head size 8, 48 neurons; blocks excluded from
    the index are neither counted nor written into the config."""
    from neuroprune import NeuroPruneConfig
    from neuroprune.compaction import compact_uniform

    model = tiny_model("llama")
    x = tiny_inputs("llama")
    expected = main_output(model, x)
    result = compact_uniform(model, NeuroPruneConfig(exclude_modules=excluded))
    assert (result.groups, result.neurons, result.config_changes) == (groups, neurons, changes)
    torch.testing.assert_close(main_output(model, x), expected, atol=0, rtol=0)
    # the returned index is built with the same discovery options: the excluded blocks stay out
    blocks = (0, 2) if excluded == "self_attn" else (2, 0)
    assert (len(result.index.attention), len(result.index.mlps)) == blocks


# --- penalties: the fused penalty (survivors of the penalties.py re-run, issue 18) -------------------

def test_row_weights_by_hand():
    """Rows shared by a 2x3 and a 2x2 matrix (length 5): an all-zero row has degree 0, clamped to
    1/5, so weight 5; a row with 3 entries >= eps has degree 3/5, weight 5/3."""
    from neuroprune.methods.penalties import row_weights

    a = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, -2.0]])
    b = torch.tensor([[0.0, 0.0], [0.0, 0.5]])
    torch.testing.assert_close(row_weights([a, b], 1e-3), torch.tensor([5.0, 5.0 / 3.0]))


def test_fused_penalty_value_of_a_term_over_two_matrices_by_hand():
    """One preferential-attachment term over two matrices sharing rows: alpha * sum_r w_r * (|A_r|_1 +
    |B_r|_1); alpha = 0 (or no term at all) gives no penalty rather than a zero one."""
    from neuroprune.methods.penalties import fused_penalty

    a = torch.tensor([[1.0, -2.0], [0.0, 3.0]], requires_grad=True)
    b = torch.tensor([[4.0], [-1.0]], requires_grad=True)
    w = torch.tensor([0.5, 2.0])
    value = fused_penalty([([a, b], w)], 0.1, [], 0.0, 1e-12)
    torch.testing.assert_close(value, torch.tensor(0.1 * (0.5 * (1 + 2 + 4) + 2.0 * (3 + 1))))
    value.backward()
    torch.testing.assert_close(b.grad, torch.tensor([[0.1 * 0.5], [-0.1 * 2.0]]))
    assert fused_penalty([([a, b], w)], 0.0, [], 0.0, 1e-12) is None


def test_uniform_widths_need_a_flop_target():
    assert SparsityTarget(flops=0.5, uniform=True).uniform is True
    with pytest.raises(ConfigError, match="give --target-flops F instead of --target-sparsity"):
        SparsityTarget(sparsity=0.9, uniform=True)


class _AlibiAttn(_Attn):
    """A block with a per-head ALiBi argument: its heads cannot be removed."""

    def forward(self, hidden_states, alibi=None):
        return self.o(self.q(hidden_states))


def test_dead_groups_by_hand_and_none_where_heads_cannot_go():
    """Llama layer 0 (4 query heads of 8 over 2 key/value groups): zero O columns 16..31 are
    query heads 2, 3, i.e. group 1. In a block whose heads cannot be removed nothing is dead, and
    the plan keeps every group."""
    from neuroprune.compaction import dead_groups, plan_attention

    unit = units_of(tiny_model("llama"))[0][0]
    with torch.no_grad():
        unit.o.weight[:, 16:] = 0.0
    assert dead_groups(unit) == [1]
    block = _AlibiAttn(8, 8, 8)
    with torch.no_grad():
        block.o.weight[:, 4:] = 0.0  # head 1 writes nothing
    refused = AttentionUnit(Found("blk", block, _ATTN_LAYOUT), SimpleNamespace(head_dim=4))
    assert refused.head_removal_refused and refused.num_kv_heads == 2
    assert dead_groups(refused) == []
    assert plan_attention(refused, CompactionRule(min_input_fraction=1.0)).keep_groups is None


def test_multi_query_inputs_read_by_the_shared_key_value_head_stay():
    """Multi-query block (2 query heads of 4, one shared key/value head); group 1 is dead (O
    columns 4..7 zero). Input dims 0..3 are zero in the kept group 0's Q rows (group 1's Q rows
    read them, which does not count) and in K and V, except dim 1 (read by K) and dim 2 (by V):
    kept inputs 1, 2, 4..7."""
    from neuroprune.compaction import plan_attention

    block = _Attn(8, 8, 4)
    with torch.no_grad():
        block.o.weight[:, 4:] = 0.0
        block.q.weight[:4, :4] = 0.0
        block.k.weight[:, :4] = 0.0
        block.v.weight[:, :4] = 0.0
        block.k.weight[:, 1] = 1.0
        block.v.weight[:, 2] = -1.0
    unit = AttentionUnit(Found("blk", block, _ATTN_LAYOUT), SimpleNamespace(head_dim=4))
    assert unit.multi_query
    plan = plan_attention(unit, CompactionRule(min_input_fraction=0.0))
    assert plan.keep_groups == [0] and plan.keep_inputs == [1, 2, 4, 5, 6, 7]


def test_mlp_plan_kept_count_follows_its_removable_mask():
    """BERT layer 0's MLP (48 neurons), neurons 0..9 with zero rows and biases (gelu(0) = 0):
    38 kept. The count follows a replaced mask and one changed in place; a plan built without
    the cached count counts it."""
    from neuroprune.compaction import MLPPlan, plan_mlp

    mlp = units_of(tiny_model("bert"))[1][0]
    with torch.no_grad():
        mlp.up.weight[:10] = 0.0
        mlp.up.bias[:10] = 0.0
    p = plan_mlp(mlp, CompactionRule(multiple_of=1))
    assert p.kept_count == 38
    replaced = torch.zeros(48, dtype=torch.bool)  # a new mask with the old one's _version
    while replaced._version < p.removable._version:
        replaced[0] = False
    p.removable = replaced
    assert p.kept_count == 48
    p.removable[:5] = True  # in place
    assert p.kept_count == 43
    bare = MLPPlan(mlp, torch.tensor([True, False, False]), torch.zeros(3), False, None)
    assert bare.kept_count == 2


def test_to_host_reads_back_each_tensor_as_a_flat_list_of_the_dtype():
    from neuroprune.compaction import to_host

    assert to_host([]) == []
    assert to_host([torch.tensor([[0.5, 0.0], [0.0, -2.0]])]) == [[True, False, False, True]]
    assert to_host([torch.tensor([True, False]), torch.tensor([[3.0]])], torch.long) == [[1, 0], [3]]


def _activation_method(model: nn.Module):
    from neuroprune.methods import build_method as build

    config = NeuroPruneConfig(alpha=0.0, beta=0.0, scores="activations")
    return build("neuroprune", model, config, SparsityTarget(flops=0.5, seq_len=16))


def test_activation_scores_without_a_training_pass_warn_once_with_the_full_message(caplog):
    """No training pass since the last selection: one logged warning, with the full message."""
    import logging

    from neuroprune.methods.structural import Removed

    method = _activation_method(tiny_model("bert"))
    with caplog.at_level(logging.WARNING, logger="neuroprune.methods.neuroprune"):
        method.unit_scores(Removed())
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [(logging.WARNING,
        "scores='activations': no training pass reached every pruned unit since the last selection "
        "(is the model in training mode?); this selection uses the weight scores.")]


def test_activation_neuron_scores_are_the_output_energy_times_the_degree_in_float32():
    """A float64 BERT whose MLP neuron 3 lost half its fan-in (degree 0.5) and neuron 5 three
    quarters (0.25): neuron j scores sqrt(mean a_j^2 * sum_i W_down[i, j]^2) * degree_j, in
    float32 like every other score."""
    from neuroprune.methods.structural import Removed

    torch.manual_seed(0)
    model = tiny_model("bert").double()
    method = _activation_method(model)
    mlp = method.index.mlps[0]
    with torch.no_grad():
        mlp.up.weight[3, :16] = 0.0
        mlp.up.weight[5, :24] = 0.0
    method.activations.attach()
    model.train()
    with torch.no_grad():
        model(**tiny_inputs("bert"))
    scores = method.unit_scores(Removed())
    means = method.activations.means()["neurons"][0].double()
    down = mlp.down.weight.detach()
    degree = (mlp.up.weight.detach().abs() >= 1e-4).sum(1).double() / 32
    assert degree[3] == 0.5 and degree[5] == 0.25
    want = (means * down.pow(2).sum(0)).sqrt() * degree
    assert scores.neurons[0].dtype == torch.float32
    torch.testing.assert_close(scores.neurons[0].double(), want, rtol=1e-5, atol=0)


def test_activation_scores_pool_the_statistics_over_ranks_under_data_parallelism(monkeypatch):
    """Under torch.distributed the method hands `means` torch.distributed.all_reduce. Faked here as
    a second rank that saw one token whose squares are all 1 (every sum and count + 1): neuron j
    of MLP 0 then scores sqrt((s_j + 1) / (n + 1) * sum_i W_down[i, j]^2) * degree_j, s_j and n
    the sums and token count of this rank."""
    import torch.distributed as dist

    from neuroprune import distributed
    from neuroprune.methods.structural import Removed

    torch.manual_seed(0)
    model = tiny_model("bert")
    method = _activation_method(model)
    method.activations.attach()
    model.train()
    with torch.no_grad():
        model(**tiny_inputs("bert"))
    sums = method.activations.sums["neurons"][0].double().clone()
    tokens = method.activations.counts["neurons"][0]
    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    monkeypatch.setattr(dist, "all_reduce", lambda t: t.add_(1.0))
    scores = method.unit_scores(Removed())
    mlp = method.index.mlps[0]
    down = mlp.down.weight.detach().double()
    degree = (mlp.up.weight.detach().abs() >= 1e-4).sum(1).double() / 32
    want = ((sums + 1) / (tokens + 1) * down.pow(2).sum(0)).sqrt() * degree
    torch.testing.assert_close(scores.neurons[0].double(), want, rtol=1e-5, atol=0)


def test_uniform_compaction_checks_the_output_projection_width_before_any_surgery():
    """A Llama whose class builds W^O with `hidden_size` inputs whatever the head count (a family
    that does not read the head fields `compact_uniform` sets): after group 1 of every layer went
    (O columns 16..31 zero), the stock model would keep W^O at 32 inputs, not 16. Refused before
    anything changed: the model's tensors are the same and hold the same values afterwards."""
    from transformers import LlamaForCausalLM

    from neuroprune.compaction import compact_uniform

    from tiny import tiny_config

    class _FixedOLlama(LlamaForCausalLM):
        def __init__(self, config):
            super().__init__(config)
            for layer in self.model.layers:
                layer.self_attn.o_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    torch.manual_seed(0)
    model = _FixedOLlama._from_config(tiny_config("llama"), attn_implementation="eager").eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[:, 16:] = 0.0
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UnsupportedArchitectureError, match="o_proj at 32 inputs, not 16"):
        compact_uniform(model)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
