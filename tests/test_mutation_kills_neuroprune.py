"""Tests written to kill the mutants of `methods/neuroprune.py` that survived the first mutation
pass (scripts/mutation.py, docs/testing.md, issue 18): each checks values worked out by hand from
the raw weights of a tiny model (or hand-traced greedy / bisection runs on hand-placed heads), not
through the helpers under test. Every test is fast (tiny modules, no training)."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from transformers import AutoConfig, AutoModel

from neuroprune import distributed
from neuroprune.config import NeuroPruneConfig
from neuroprune.errors import ConfigError, DistributedError, NeuroPruneError
from neuroprune.methods.neuroprune import NeuroPrune
from neuroprune.methods.penalty import Part
from neuroprune.methods.steering import SparsityTarget
from neuroprune.methods.structural import Removed
from neuroprune.model.index import ATTENTION_KINDS

from tiny import duplicate_group, tiny_model

# the tests read penalty values off the graph tensors the method returns for the loss
pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad=True to a scalar")

EPS = 1e-3
TINY = 1e-10
FLOPS = dict(flops=0.5, seq_len=16)

_MODELS: dict[str, torch.nn.Module] = {}


def _cached(family: str) -> torch.nn.Module:
    if family not in _MODELS:
        _MODELS[family] = tiny_model(family)
    return copy.deepcopy(_MODELS[family])


def _bert() -> torch.nn.Module:
    """Tiny BERT (2 layers, 4 heads of 8, 48 neurons) in float64 with ~30% exact zeros and ~10%
    entries far below EPS in every matrix, so that degrees differ from row to row."""
    model = _cached("bert").double()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                r = torch.rand(p.shape, generator=g, dtype=p.dtype)
                p.mul_(torch.where(r < 0.3, 0.0, torch.where(r < 0.4, 1e-4, 1.0)))
    return model


def _layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    return list(model.encoder.layer)


def _pa(rows: torch.Tensor) -> float:
    """Preferential-attachment l1 of a matrix's rows by hand: sum_r |row|_1 / max(deg_r, 1/len)."""
    rows = rows.detach()
    return float((rows.abs().sum(1) / _degree(rows).clamp(min=1 / rows.shape[1])).sum())


def _degree(rows: torch.Tensor) -> torch.Tensor:
    return (rows.detach().abs() >= EPS).sum(1).double() / rows.shape[1]


def _by_hand(model: torch.nn.Module) -> tuple[float, float, float]:
    """Unweighted sums over a BERT's layers of R_MLP (rows of the up matrix, (48, 32), and of the
    down matrix, (32, 48)), R_attn (sqrt of every input column's l1 over [Q; K; V] plus tiny) and R_O (rows
    of W^O)."""
    mlp = attn = out = 0.0
    for layer in _layers(model):
        mlp += _pa(layer.intermediate.dense.weight) + _pa(layer.output.dense.weight)
        s = layer.attention.self
        col = sum(m.weight.detach().abs().sum(0) for m in (s.query, s.key, s.value))
        attn += float(torch.sqrt(col + TINY).sum())
        out += _pa(layer.attention.output.dense.weight)
    return mlp, attn, out


# --- penalties -------------------------------------------------------------------------------------

def test_weighted_penalties_by_hand():
    model = _bert()
    mlp, attn, out = _by_hand(model)
    cfg = dict(eps=EPS, tiny=TINY)
    method = NeuroPrune(model, NeuroPruneConfig(alpha=0.5, beta=2.0, output_penalty=True, **cfg))
    got = method.weighted_penalties()
    assert set(got) == {"alpha", "beta"}
    assert float(got["alpha"]) == pytest.approx(0.5 * (mlp + out), rel=1e-12)
    assert float(got["beta"]) == pytest.approx(2.0 * attn, rel=1e-12)
    assert got["alpha"].requires_grad and got["beta"].requires_grad
    only = method.weighted_penalties(("beta",))  # only the weights asked for
    assert set(only) == {"beta"} and float(only["beta"]) == pytest.approx(2.0 * attn, rel=1e-12)
    only = method.weighted_penalties(("alpha",))
    assert set(only) == {"alpha"} and float(only["alpha"]) == pytest.approx(0.5 * (mlp + out), rel=1e-12)
    plain = NeuroPrune(model, NeuroPruneConfig(alpha=0.5, beta=2.0, **cfg))  # no R_O without output_penalty
    assert float(plain.weighted_penalties()["alpha"]) == pytest.approx(0.5 * mlp, rel=1e-12)
    # a weight that is 0 is left out, even when asked for
    for alpha, beta, left in ((0.0, 2.0, {"beta"}), (0.5, 0.0, {"alpha"})):
        one = NeuroPrune(model, NeuroPruneConfig(alpha=alpha, beta=beta, **cfg))
        assert set(one.weighted_penalties()) == left


def test_part_penalty_of_each_part_by_hand():
    model = _bert()
    mlp, attn, out = _by_hand(model)
    method = NeuroPrune(model, NeuroPruneConfig(alpha=0.5, beta=2.0, eps=EPS, tiny=TINY, output_penalty=True))
    parts = {p.name: p for p in method.parts}
    assert float(method.part_penalty([parts["mlp"]])) == pytest.approx(0.5 * (mlp + out), rel=1e-12)
    assert float(method.part_penalty([parts["attention"]])) == pytest.approx(2.0 * attn, rel=1e-12)
    both = 0.5 * (mlp + out) + 2.0 * attn
    assert float(method.part_penalty(method.parts)) == pytest.approx(both, rel=1e-12)
    # a part whose weight is 0: a zero scalar tensor, not None
    mlp_only = NeuroPrune(model, NeuroPruneConfig(alpha=0.5, beta=0.0, eps=EPS, tiny=TINY))
    zero = mlp_only.part_penalty([Part("attention", "beta", ATTENTION_KINDS)])
    assert isinstance(zero, torch.Tensor) and zero.shape == () and float(zero) == 0.0


@pytest.mark.parametrize("excluded", ["self_attn", "mlp"])
def test_penalties_of_a_model_without_attention_or_mlp_blocks_are_zero_tensors(excluded):
    """tiny llama with its attention (or MLP) blocks left out of the index: that sum is over no
    block, and is still a 0-d tensor (the method's documented return type), not the int 0."""
    method = NeuroPrune(_cached("llama"), NeuroPruneConfig(exclude_modules=excluded, output_penalty=True))
    values = method.penalties()
    assert set(values) == {"mlp", "attention", "output"}
    empty = ["attention", "output"] if excluded == "self_attn" else ["mlp"]
    for key in empty:
        assert isinstance(values[key], torch.Tensor) and values[key].shape == () and float(values[key]) == 0.0
    for key in set(values) - set(empty):
        assert float(values[key]) > 0


# --- cached preferential-attachment row weights ------------------------------------------------------

def _row_weights(rows: torch.Tensor) -> torch.Tensor:
    return 1.0 / _degree(rows).clamp(min=1 / rows.shape[1])


def _terms(model: torch.nn.Module) -> list[list[torch.Tensor]]:
    return [t for layer in _layers(model)
            for t in ([layer.intermediate.dense.weight], [layer.output.dense.weight])]


def _assert_row_weights(got: list[torch.Tensor], terms: list[list[torch.Tensor]]) -> None:
    assert len(got) == len(terms)
    for w, (m,) in zip(got, terms):
        torch.testing.assert_close(w, _row_weights(m), rtol=0, atol=0)


def test_degree_weights_are_cached_between_refreshes_and_refreshed_when_the_terms_change():
    model = _bert()
    method = NeuroPrune(model, NeuroPruneConfig(alpha=0.5, beta=0.5, eps=EPS))
    method.degree_every_steps = 2
    method.on_train_begin(10)
    assert method.degree_every == 2
    terms = _terms(model)
    first = method.degree_weights(terms)
    _assert_row_weights(first, terms)
    assert method.degree_weights(terms) is first  # reused between refreshes
    fewer = method.degree_weights(terms[:-1])  # a term less: recomputed
    _assert_row_weights(fewer, terms[:-1])
    narrower = [[terms[0][0][:5]], *terms[1:3]]  # a term with fewer rows: recomputed
    _assert_row_weights(method.degree_weights(narrower), narrower)


def test_degree_weights_at_period_one_are_recomputed_on_every_call():
    model = _bert()
    method = NeuroPrune(model, NeuroPruneConfig(alpha=0.5, beta=0.5, eps=EPS))
    assert method.degree_every_steps is None and method.degree_every == 1  # before on_train_begin too
    terms = _terms(model)
    _assert_row_weights(method.degree_weights(terms), terms)
    with torch.no_grad():
        terms[0][0][:3] = 0.0  # three rows die
    _assert_row_weights(method.degree_weights(terms), terms)
    # nothing is kept at period 1: a longer period set afterwards starts from the weights as they are
    with torch.no_grad():
        terms[2][0][:2] = 0.0
    method.degree_every = 2
    _assert_row_weights(method.degree_weights(terms), terms)
    method.degree_every = 1
    # a cache left from a longer period is not read once the period is 1
    method.degree_every = 2
    cached = method.degree_weights(terms)
    method.degree_every = 1
    with torch.no_grad():
        terms[1][0][:4] = 0.0
    fresh = method.degree_weights(terms)
    assert fresh is not cached
    _assert_row_weights(fresh, terms)


def test_degree_cache_drops_on_its_period_not_between():
    """FLOP target, selections every 50 steps, degrees every 3: steps 1 and 2 keep the cached row
    weights, step 3 drops them (no selection happens at any of the three)."""
    model = _bert()
    method = NeuroPrune(model, NeuroPruneConfig(alpha=0.5, beta=0.5, eps=EPS), SparsityTarget(**FLOPS),
                        prune_every_steps=50)
    method.degree_every_steps = 3
    method.on_train_begin(100)
    assert (method.degree_every, method.structural.every) == (3, 50)
    terms = _terms(model)
    cached = method.degree_weights(terms)
    for step in (1, 2):
        assert method.on_step_end(step) == []
        assert method.degree_weights(terms) is cached
    method.on_step_end(3)
    assert method.structural.last_selection is None
    assert method.degree_weights(terms) is not cached


# --- construction ----------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [-1, 2.5, True, "3"])
def test_prune_every_steps_must_be_a_whole_number(bad):
    with pytest.raises(NeuroPruneError, match="prune_every_steps must be a whole number >= 0"):
        NeuroPrune(_cached("bert"), prune_every_steps=bad)


def test_fresh_state_and_the_proximal_choice():
    model = _cached("bert")
    method = NeuroPrune(model)
    assert method.prune_every_steps == 0 and method.last_changes == []
    assert method.state_dict()["pruned_at"] is None
    target = SparsityTarget(0.5)
    assert NeuroPrune(model, target=target).proximal is True  # default with a sparsity target
    assert NeuroPrune(model, target=target, proximal=False).proximal is False
    assert NeuroPrune(model).proximal is False
    assert NeuroPrune(model, proximal=True).proximal is True


def test_flop_target_takes_prune_every_steps_as_its_selection_period():
    method = NeuroPrune(_cached("bert"), target=SparsityTarget(**FLOPS), prune_every_steps=3)
    assert method.target.select_every == 3 and method.structural.target.select_every == 3
    assert method.structural.every == 3
    assert method.structural.choose_groups == method._choose_groups  # groups go by redundancy


def _dup_bert() -> torch.nn.Module:
    """Tiny BERT whose head 1 of layer 0 is an exact copy of head 0."""
    model = _cached("bert")
    method = NeuroPrune(model)
    duplicate_group(model, method.index.attention[0], 0, 1)
    return model


def _heads(model: torch.nn.Module) -> list[int]:
    return [layer.attention.self.query.weight.shape[0] // 8 for layer in _layers(model)]


def test_head_passes_run_at_epoch_ends_only_by_default():
    model = _dup_bert()
    method = NeuroPrune(model, NeuroPruneConfig(theta=1e-6))
    method.on_train_begin(4)
    assert method.prune_every_steps == 0
    assert method.on_step_end(1) == [] and _heads(model) == [4, 4]
    assert method.on_epoch_end(0) and _heads(model) == [3, 4]  # the copy goes at the epoch end
    assert method.state_dict()["pruned_at"] == 1  # the step of the last pass, saved


def test_head_passes_every_k_steps():
    model = _dup_bert()
    method = NeuroPrune(model, NeuroPruneConfig(theta=1e-6), prune_every_steps=2)
    method.on_train_begin(10)
    assert method.on_step_end(1) == [] and _heads(model) == [4, 4]
    assert method.on_step_end(2) and _heads(model) == [3, 4]
    assert method.state_dict()["pruned_at"] == 2
    assert method.on_epoch_end(0) == []  # at most one pass per step


def test_no_head_pass_at_epoch_ends_under_a_flop_target():
    model = _dup_bert()
    method = NeuroPrune(model, NeuroPruneConfig(theta=1e-6), SparsityTarget(**FLOPS), prune_every_steps=50)
    method.on_train_begin(100)
    assert method.on_epoch_end(0) == [] and _heads(model) == [4, 4]


# --- head targets ----------------------------------------------------------------------------------

def _attention_and_counted(model: torch.nn.Module) -> tuple[int, int]:
    attention = counted = 0
    for layer in _layers(model):
        s = layer.attention
        attention += sum(m.weight.numel() for m in (s.self.query, s.self.key, s.self.value, s.output.dense))
        counted += layer.intermediate.dense.weight.numel() + layer.output.dense.weight.numel()
    return attention, attention + counted


def test_head_target_range_and_implied_sparsity_boundaries():
    """BERT: 8 heads in 2 blocks; keeping 4 removes half of the attention weights, i.e.
    (1 - 4/8) * 8192 / 14336 of the counted ones, allowed up to the target sparsity + 0.02."""
    model = _cached("bert")
    assert NeuroPrune(model, target=SparsityTarget(0.5, heads=8)).target.heads == 8  # all heads: allowed
    assert NeuroPrune(model, target=SparsityTarget(0.5, heads=2)).target.heads == 2  # one per block
    attention, counted = _attention_and_counted(model)
    assert (attention, counted) == (8192, 14336)
    implied = (1 - 4 / 8) * attention / counted
    s = implied - 0.02
    while s + 0.02 > implied:
        s = math.nextafter(s, 0.0)
    while s + 0.02 < implied:
        s = math.nextafter(s, 1.0)
    assert s + 0.02 == implied  # exactly at the limit: allowed
    NeuroPrune(model, target=SparsityTarget(s, heads=4))
    below = math.nextafter(s, 0.0)
    assert below + 0.02 < implied
    with pytest.raises(ConfigError, match="removes 28.6% of the counted weights"):
        NeuroPrune(model, target=SparsityTarget(below, heads=4))


def test_heads_target_and_the_automatic_pass_period_by_hand():
    """Ramp 0.2-0.6 of 100 steps, 8 heads to 4: the head ramp ends halfway through the sparsity
    ramp, at step 40; at step 30 (progress 0.5) 4 + 4 * 0.5^3 = 4.5 heads, rounded up."""
    model = _cached("bert")
    target = SparsityTarget(0.5, ramp_begin=0.2, ramp_end=0.6, heads=4)
    method = NeuroPrune(model, target=target)
    method.on_train_begin(100)
    assert [method.heads_target(s) for s in (20, 30, 35, 40, 90)] == [8, 5, 5, 4, 4]  # 35: 4 + 4/64
    # passes: ~10 inside the head ramp, 0.5 * (0.6 - 0.2) * total steps long
    assert method.prune_every_steps == 2 and method.degree_every == 1
    method = NeuroPrune(model, target=target)
    method.on_train_begin(1000)
    assert method.prune_every_steps == 20
    method = NeuroPrune(model, target=target)
    method.on_train_begin(10)  # 0.2 passes' worth of steps: every step
    assert method.prune_every_steps == 1
    method = NeuroPrune(model, target=target, prune_every_steps=5)
    method.on_train_begin(1000)
    assert method.prune_every_steps == 5  # given: kept


def _placed(points: list[tuple[float, ...]], layers: int = 2) -> torch.nn.Module:
    """Tiny BERT (4 heads of 8) whose block-0 Q, K, V are zero except Q[8 g + c, 0] = points[g][c]:
    the l_inf distance of heads i and j is max_c |points[i][c] - points[j][c]|."""
    if layers == 2:
        model = _cached("bert")
    else:
        torch.manual_seed(0)
        config = AutoConfig.for_model("bert", vocab_size=99, hidden_size=32, num_hidden_layers=layers,
                                      num_attention_heads=4, intermediate_size=48)
        model = AutoModel.from_config(config, attn_implementation="eager").eval()
    s = model.encoder.layer[0].attention.self
    with torch.no_grad():
        for m in (s.query, s.key, s.value):
            m.weight.zero_()
        for g, point in enumerate(points):
            for c, x in enumerate(point):
                s.query.weight[8 * g + c, 0] = x
    return model


def test_theta_for_heads_follows_the_bisection_on_a_greedy_that_breaks_the_order():
    """One block, heads at (4,0,1), (5,1,0), (5,4,5), (3,5,3): distances 1 (0-1), 2 (2-3),
    4 (0-2, 1-3), 5 (0-3, 1-2). Heads kept by one pass at each candidate theta, traced by hand
    through FIND_DOMINATING: 0: 4; 1: 3 (0 -> 1); 2: 2 (and 2 -> 3); 4: the 4-cycle 0-1-3-2,
    whose neighbourhoods contain one another nowhere, 4; 5: 1. Bisection (mid rounded up) over
    [0, 1, 2, 4, 5]: for 3 heads, mid 2 keeps 2 < 3, then mid 1 keeps 3: theta 1; for 2 heads,
    mid 2 keeps 2, mid 3 keeps 4, mid 4 keeps 1: theta 4."""
    method = NeuroPrune(_placed([(4, 0, 1), (5, 1, 0), (5, 4, 5), (3, 5, 3)], layers=1))
    assert [method.theta_for_heads(h) for h in (1, 2, 3, 4)] == [5.0, 4.0, 1.0, 0.0]
    assert method.theta_for_heads(5) is None


def test_theta_for_heads_counts_query_heads_of_grouped_query_attention():
    """tiny llama: 2 layers of 2 key/value groups of 2 query heads; a pass at theta >= d_l (the
    l_inf distance of the two groups' Q, K, V rows in layer l) leaves one group (2 heads) there."""
    model = _cached("llama")
    method = NeuroPrune(model)
    d = []
    for layer in model.model.layers:
        a = layer.self_attn
        q, k, v = a.q_proj.weight, a.k_proj.weight, a.v_proj.weight
        d.append(max(float((q[:16] - q[16:]).abs().max()), float((k[:8] - k[8:]).abs().max()),
                     float((v[:8] - v[8:]).abs().max())))
    lo, hi = sorted(d)
    assert method.theta_for_heads(8) == 0.0
    assert method.theta_for_heads(7) == pytest.approx(0.0)  # 8 >= 7; one group less is 6
    assert method.theta_for_heads(6) == pytest.approx(lo, rel=1e-6)
    assert method.theta_for_heads(4) == pytest.approx(hi, rel=1e-6)
    assert method.theta_for_heads(2) == pytest.approx(hi, rel=1e-6)  # at most 2 groups go
    assert method.theta_for_heads(9) is None


def test_theta_for_heads_of_a_model_without_attention_blocks():
    method = NeuroPrune(_cached("llama"), NeuroPruneConfig(exclude_modules="self_attn"))
    assert method.theta_for_heads(0) == 0.0
    assert method.theta_for_heads(1) is None


# --- groups chosen by redundancy under a FLOP target ----------------------------------------------

SCORES = torch.tensor([0.4, 0.3, 0.1, 0.2])  # lowest first: 2, 3, 1, 0


def _chooser(points, cfg: NeuroPruneConfig | None = None, **target) -> tuple[NeuroPrune, torch.nn.Module]:
    model = _placed(points)
    method = NeuroPrune(model, cfg or NeuroPruneConfig(theta=1.0), SparsityTarget(**FLOPS, **target))
    method.theta = 0.125
    return method, model


def test_choose_groups_by_redundancy_on_heads_on_a_line():
    """Heads at 0, 1, 2, 3 on one coordinate: distances 1, 2, 3. Passes by hand: theta 1 removes
    0 (-> 1) and 3 (-> 2), theta 2 removes 0, 1, 3 (-> 2), theta 3 removes 0, 1, 2 (-> 3).
    One group: no theta removes only one, so the lowest score goes and theta stays; two: theta 1,
    both merged into their survivor (distance 1 <= configured theta 1); three: theta 3."""
    method, model = _chooser([(0,), (1,), (2,), (3,)])
    o = model.encoder.layer[0].attention.output.dense.weight
    assert method._choose_groups(0, [1], SCORES, Removed()) == [2]
    assert method.theta == 0.125
    before = o.detach().clone()
    assert method._choose_groups(0, [1, 2], SCORES, Removed()) == [0, 3]
    assert method.theta == 1.0
    cols = [before[:, 8 * h:8 * h + 8] for h in range(4)]
    expected = torch.cat([cols[0], cols[1] + cols[0], cols[2] + cols[3], cols[3]], dim=1)
    torch.testing.assert_close(o.detach(), expected, rtol=0, atol=0)
    assert method._choose_groups(0, [1, 2, 3], SCORES, Removed()) == [0, 1, 2]
    assert method.theta == 3.0
    assert method._choose_groups(0, [], SCORES, Removed()) == []


def test_choose_groups_skips_removed_groups_and_fills_up_by_score():
    # head 1 removed before: 0, 2, 3 at 0, 2, 3; theta 1 removes 2 (-> 3), theta 2 two of them
    method, _ = _chooser([(0,), (1,), (2,), (3,)])
    assert method._choose_groups(0, [3], SCORES, Removed(groups={0: [1]})) == [2]
    assert method.theta == 1.0
    # heads at 0, 0, 5, 10: theta 0 removes 0 (-> 1), theta 5 three; the second of two by score
    method, _ = _chooser([(0,), (0,), (5,), (10,)])
    assert method._choose_groups(0, [1, 3], SCORES, Removed()) == [0, 2]
    assert method.theta == 0.0


def test_choose_groups_keeps_the_pick_without_redundancy():
    points = [(0,), (1,), (2,), (3,)]
    method, _ = _chooser(points, heads_by="importance")
    assert method._choose_groups(0, [1], SCORES, Removed()) == [1]
    method, _ = _chooser(points, NeuroPruneConfig(theta=1.0, prune_heads=False))
    assert method._choose_groups(0, [1], SCORES, Removed()) == [1]
    assert method.theta == 0.125


# --- structural scores -----------------------------------------------------------------------------

def test_unit_scores_by_hand():
    model = _bert()
    method = NeuroPrune(model, NeuroPruneConfig(eps=EPS))
    scores = method.unit_scores(Removed(groups={0: [1, 3]}))
    for b, layer in enumerate(_layers(model)):
        up, down = layer.intermediate.dense.weight.detach(), layer.output.dense.weight.detach()
        fan_in, fan_out = up.abs().sum(1), down.abs().sum(0)
        torch.testing.assert_close(scores.neurons[b], _degree(up) * torch.sqrt(fan_in * fan_out))
        s = layer.attention.self
        q, k, v = (m.weight.detach().abs() for m in (s.query, s.key, s.value))
        alive = [0, 2] if b == 0 else [0, 1, 2, 3]
        rows = torch.cat([torch.arange(8 * g, 8 * g + 8) for g in alive])
        torch.testing.assert_close(scores.inputs[b], (q[rows] + k[rows] + v[rows]).sum(0) / (3 * len(rows)))
        o = layer.attention.output.dense.weight.detach().abs()
        groups = torch.stack([torch.sqrt(o[:, 8 * g:8 * g + 8].sum() * (q[8 * g:8 * g + 8].sum()
                                          + k[8 * g:8 * g + 8].sum() + v[8 * g:8 * g + 8].sum()))
                              for g in range(4)])
        torch.testing.assert_close(scores.groups[b], groups)


# --- distributed head passes (collectives replaced by recorders) -----------------------------------

def test_head_pass_broadcasts_the_model_first_and_compares_the_heads_left(monkeypatch):
    model = _dup_bert()
    method = NeuroPrune(model, NeuroPruneConfig(theta=1e-6))
    calls = []
    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    monkeypatch.setattr(distributed, "broadcast_parameters", lambda m: calls.append(("broadcast", m)))
    monkeypatch.setattr(distributed, "same_on_all_ranks", lambda value: calls.append(("same", value)) or True)
    assert method.prune_redundant_heads() == {"encoder.layer.0.attention": [0]}
    left = {"encoder.layer.0.attention": [1, 2, 3], "encoder.layer.1.attention": [0, 1, 2, 3]}
    assert calls == [("broadcast", model), ("same", left)]
    monkeypatch.setattr(distributed, "same_on_all_ranks", lambda value: False)
    with pytest.raises(DistributedError, match="ranks disagree on the heads left"):
        method.prune_redundant_heads()


# --- logs, summary, state --------------------------------------------------------------------------

def test_log_values_by_hand():
    model = _bert()
    mlp, attn, _ = _by_hand(model)
    method = NeuroPrune(model, NeuroPruneConfig(alpha=0.5, beta=2.0, eps=EPS, tiny=TINY))
    method.theta = 0.375
    values = method.log_values()
    assert values["penalty_mlp"] == pytest.approx(mlp, rel=1e-12)  # unweighted
    assert values["penalty_attention"] == pytest.approx(attn, rel=1e-12)
    assert values["theta"] == 0.375
    assert "target_heads_now" not in values and "target_flops_now" not in values
    assert not any(k.startswith("sparsity/") for k in values)  # per-layer values only when detailed
    detailed = method.log_values(detailed=True)
    blocks = ["encoder.layer.0", "encoder.layer.0.attention", "encoder.layer.1", "encoder.layer.1.attention"]
    assert sorted(k for k in detailed if k.startswith("sparsity/")) == [f"sparsity/{b}" for b in blocks]
    assert "penalty_mlp" not in NeuroPrune(model, NeuroPruneConfig(alpha=0.0, beta=0.0)).log_values()


def test_log_values_of_head_and_flop_targets():
    model = _cached("bert")
    heads = NeuroPrune(model, target=SparsityTarget(0.5, ramp_begin=0.2, ramp_end=0.6, heads=4))
    heads.on_train_begin(100)
    heads.step = 30
    assert heads.log_values()["target_heads_now"] == 5  # as in the heads_target test
    flops = NeuroPrune(model, target=SparsityTarget(**FLOPS))
    flops.structural.scheduled, flops.structural.planned = 0.8, 0.75
    flops.structural.removed.add("groups", 0, [1])  # held at zero, not yet cut: 8 heads in the model
    values = flops.log_values()
    assert (values["target_flops_now"], values["flops_fraction_now"], values["heads_kept"]) == (0.8, 0.75, 7)
    assert "target_heads_now" not in values


def test_summary_names_theta_and_the_flop_target_only_with_one():
    model = _cached("bert")
    method = NeuroPrune(model, target=SparsityTarget(**FLOPS))
    method.theta = 0.625
    out = method.summary()
    assert out["theta"] == 0.625 and out["target_flops"] == 0.5
    out = NeuroPrune(model, target=SparsityTarget(0.5)).summary()
    assert "target_flops" not in out and out["theta"] == NeuroPruneConfig().theta


def test_state_round_trip_into_a_fresh_method():
    """Values set by hand on one method, saved through JSON and loaded into another built on a
    fresh model: each comes back; a state without the optional keys (older checkpoints) keeps the
    method's own values, and a structural state is ignored by a method without a FLOP target."""
    cfg = NeuroPruneConfig()
    saved = NeuroPrune(_cached("bert"), cfg, SparsityTarget(**FLOPS), prune_every_steps=7)
    saved.theta, saved._pruned_at = 0.25, 12
    saved.structural.removed.add("groups", 1, [2])
    saved.structural.last_selection, saved.structural.scheduled, saved.structural.planned = 40, 0.8, 0.78
    state = json.loads(json.dumps(saved.state_dict()))
    assert (state["theta"], state["pruned_at"], state["prune_every_steps"]) == (0.25, 12, 7)
    assert state["structural"] == {"removed": {"neurons": {}, "groups": {"1": [2]}, "inputs": {}},
                                   "last_selection": 40, "every": 7, "scheduled": 0.8, "planned": 0.78}
    loaded = NeuroPrune(_cached("bert"), cfg, SparsityTarget(**FLOPS))
    loaded.load_state_dict(state)
    assert (loaded.theta, loaded.prune_every_steps) == (0.25, 7)
    assert loaded.state_dict()["pruned_at"] == 12
    s = loaded.structural
    assert (s.removed.groups, s.last_selection, s.every) == ({1: [2]}, 40, 7)
    assert (s.scheduled, s.planned) == (0.8, 0.78)
    old = {k: v for k, v in state.items() if k not in ("theta", "prune_every_steps", "structural")}
    kept = NeuroPrune(_cached("bert"), NeuroPruneConfig(theta=0.5), SparsityTarget(**FLOPS),
                      prune_every_steps=4)
    kept.load_state_dict(old)
    assert (kept.theta, kept.prune_every_steps, kept.structural.removed.groups) == (0.5, 4, {})
    plain = NeuroPrune(_cached("bert"), cfg)
    plain.load_state_dict(state)
    assert plain.structural is None and plain.theta == 0.25
