"""Redundant-head pruning (method.md section 4): the greedy dominating set step for step, exact
function preservation for every family, and a model that keeps training and generating."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from neuroprune import NeuroPrune, NeuroPruneConfig, remap_optimizer
from neuroprune.methods.heads import find_dominating, redundant_groups, similarity_graph
from neuroprune.model.surgery import head_rows

from tiny import DECODERS, FAMILIES, SEQ2SEQ, duplicate_group, main_output, tiny_inputs, tiny_model


def _s(rows):
    return torch.tensor(rows)


def test_non_transitive_similarity_keeps_the_hub():
    # 0 ~ 1 ~ 2 but not 0 ~ 2: head 1's neighbourhood strictly contains both others'
    sim = _s([[1, 1, 0], [1, 1, 1], [0, 1, 1]])
    assert find_dominating(sim) == [1, 1, 1]


def test_ties_go_to_the_later_head():
    assert find_dominating(torch.ones(3, 3, dtype=torch.int64)) == [2, 2, 2]
    assert find_dominating(_s([[1, 1, 0], [1, 1, 0], [0, 0, 1]])) == [1, 1, 2]


def test_greedy_walk_is_the_papers_not_a_global_optimum():
    # N(0)={0,1}, N(1)={0,1,2}, N(2)={1,2,3}, N(3)={2,3}: from 0 the walk reaches 1 and stops,
    # because N(2) does not contain N(1) even though 2 has as many neighbours.
    sim = _s([[1, 1, 0, 0], [1, 1, 1, 0], [0, 1, 1, 1], [0, 0, 1, 1]])
    assert find_dominating(sim) == [1, 1, 2, 2]


def test_identity_means_nothing_to_do():
    assert find_dominating(torch.eye(4, dtype=torch.int64)) == [0, 1, 2, 3]
    assert redundant_groups(torch.eye(4, dtype=torch.int64)) == {}


@st.composite
def similarity_graphs(draw):
    k = draw(st.integers(1, 10))
    upper = draw(st.lists(st.booleans(), min_size=k * (k - 1) // 2, max_size=k * (k - 1) // 2))
    sim = torch.eye(k, dtype=torch.int64)
    pairs = [(a, b) for a in range(k) for b in range(a + 1, k)]
    for (a, b), edge in zip(pairs, upper):
        sim[a, b] = sim[b, a] = int(edge)
    return sim


@settings(max_examples=300, deadline=None, derandomize=True)
@given(sim=similarity_graphs())
def test_no_replacement_is_itself_replaced(sim):
    """FIND_DOMINATING's j* always replaces itself (proof in `redundant_groups`), so each removed
    head is merged once, straight into a survivor that is its neighbour and whose neighbourhood
    contains its own."""
    replacement = find_dominating(sim)
    assert all(replacement[j] == j for j in replacement)
    absorbed = redundant_groups(sim)
    assert absorbed == {i: j for i, j in enumerate(replacement) if j != i}
    assert set(absorbed).isdisjoint(absorbed.values())
    rows = sim.tolist()
    for i, j in absorbed.items():
        assert all(b >= a for a, b in zip(rows[i], rows[j])) and rows[i][j] == 1


def test_similarity_is_l_inf_within_theta():
    blocks = torch.tensor([[0.0, 0.0], [0.1, -0.15], [0.3, 0.0]])
    sim = similarity_graph(blocks, theta=0.15)
    assert sim.tolist() == [[1, 1, 0], [1, 1, 0], [0, 0, 1]]  # |0.3 - 0.1| = 0.2 > 0.15
    assert similarity_graph(blocks, theta=0.25).tolist() == [[1, 1, 0], [1, 1, 1], [0, 1, 1]]


def _prune_copies(family):
    model = tiny_model(family)
    pruner = NeuroPrune(model, NeuroPruneConfig(theta=1e-6))
    for unit in pruner.index.attention:
        duplicate_group(model, unit, 0, unit.num_kv_heads - 1)
    return model, pruner


@pytest.mark.parametrize("family", FAMILIES)
def test_removing_an_exact_copy_preserves_the_function(family):
    model, pruner = _prune_copies(family)
    inputs = tiny_inputs(family)
    before = main_output(model, inputs)
    removed = pruner.prune_redundant_heads()
    after = main_output(model, inputs)
    # the earlier of two identical heads goes (ties favour later heads); GQA: its whole group
    group = pruner.index.attention[0].group_size
    assert removed == {u.name: list(range(group)) for u in pruner.index.attention}
    assert all(u.num_heads == u.original_heads - group for u in pruner.index.attention)
    assert torch.allclose(before, after, atol=1e-5, rtol=0), float((before - after).abs().max())


@pytest.mark.parametrize("family", DECODERS + SEQ2SEQ)
def test_generate_with_kv_cache_gives_the_same_tokens(family):
    model, pruner = _prune_copies(family)
    inputs = tiny_inputs(family)
    kwargs = dict(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                  max_new_tokens=6, min_new_tokens=6, do_sample=False, use_cache=True)
    before = model.generate(**kwargs)
    pruner.prune_redundant_heads()
    assert torch.equal(model.generate(**kwargs), before)


@pytest.mark.parametrize("family", FAMILIES)
def test_training_continues_after_removal(family):
    model, pruner = _prune_copies(family)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    inputs = tiny_inputs(family)

    def step():
        optimizer.zero_grad()
        loss = _loss(model, inputs)
        (loss + pruner.regularization_loss()).backward()
        optimizer.step()
        return loss

    step()
    separate = [u for u in pruner.index.attention if isinstance(u.q, torch.nn.Linear)]
    moments = [{k: v.clone() for k, v in optimizer.state[u.q.weight].items()} for u in separate]
    # one AdamW step moved each weight by at most ~lr: the copies are 2e-3 apart, other heads ~0.1
    groups = [u.num_kv_heads for u in pruner.index.attention]
    pruner.prune_redundant_heads(theta=1e-2)
    assert [u.num_kv_heads for u in pruner.index.attention] == [g - 1 for g in groups]  # the copies only
    remap_optimizer(optimizer, pruner.last_changes)
    params = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert params == {id(p) for p in model.parameters()}
    # the moments of the Q rows of the heads kept are those rows' moments from before the removal
    for unit, before in zip(separate, moments):
        rows = head_rows(unit.kept_heads, unit.head_dim)
        state = optimizer.state[unit.q.weight]
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(state[key], before[key][rows])
    # and the next step is AdamW's by hand on the remapped moments
    optimizer.zero_grad()
    (_loss(model, inputs) + pruner.regularization_loss()).backward()
    group = optimizer.param_groups[0]
    lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    expected = {}
    for p in model.parameters():
        if p.grad is None:
            continue
        state = optimizer.state.get(p, {})
        t = int(state["step"]) + 1 if "step" in state else 1
        m = b1 * state.get("exp_avg", 0.0) + (1 - b1) * p.grad
        v = b2 * state.get("exp_avg_sq", 0.0) + (1 - b2) * p.grad**2
        update = (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
        expected[p] = p.detach() * (1 - lr * wd) - lr * update
    optimizer.step()
    for p, value in expected.items():
        assert torch.allclose(p.detach(), value, atol=1e-7, rtol=1e-5)


def _loss(model, inputs):
    out = model(**inputs)
    value = out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state
    return value.pow(2).mean()


def test_gqa_rule_removes_whole_key_value_groups():
    """Llama-style attention with 4 query heads over 2 key/value heads: query heads that share
    a key/value head stay or go together, so every layer keeps num_heads // num_kv_heads query
    heads per key/value head and the stock forward (repeat_kv) keeps working."""
    model = tiny_model("llama")
    pruner = NeuroPrune(model, NeuroPruneConfig(theta=1e-6))
    unit = pruner.index.attention[0]
    with torch.no_grad():  # two query heads of one group identical is not enough: K/V differ
        q, _, _ = unit.qkv_matrices()
        q[unit.query_rows([1])] = q[unit.query_rows([0])]
    assert pruner.prune_redundant_heads() == {}
    duplicate_group(model, unit, 0, 1)
    assert pruner.prune_redundant_heads() == {unit.name: [0, 1]}
    assert (unit.num_heads, unit.num_kv_heads, unit.kept_heads) == (2, 1, [2, 3])
    assert unit.module.q_proj.out_features == 16 and unit.module.k_proj.out_features == 8


def test_merge_modes():
    inputs = tiny_inputs("bert")
    results = {}
    for merge in ("output", "none", "mlp_input"):
        model = tiny_model("bert")
        pruner = NeuroPrune(model, NeuroPruneConfig(theta=1e-6, merge=merge))
        unit = pruner.index.attention[0]
        duplicate_group(model, unit, 0, 3)
        o_before = unit.o.weight.detach().clone()
        lin_before = model.encoder.layer[0].intermediate.dense.weight.detach().clone()
        pruner.prune_redundant_heads()
        results[merge] = main_output(model, inputs)
        o_after = unit.o.weight.detach()
        lin_after = model.encoder.layer[0].intermediate.dense.weight.detach()
        if merge == "output":  # head 0's O columns were added into head 3's (now last) slice
            assert torch.allclose(o_after[:, 16:24], o_before[:, 24:32] + o_before[:, 0:8])
        else:
            assert torch.equal(o_after[:, 16:24], o_before[:, 24:32])
        if merge == "mlp_input":  # the paper's literal wording: L_in slice of head 0 into head 3's
            assert torch.allclose(lin_after[:, 24:32], lin_before[:, 24:32] + lin_before[:, 0:8])
        else:
            assert torch.equal(lin_after, lin_before)
    assert not torch.allclose(results["output"], results["none"], atol=1e-5)


def test_history_records_graph_merges_and_importance():
    model, pruner = _prune_copies("bert")
    o_proj = model.encoder.layer[0].attention.output.dense
    importance_before = float(o_proj.weight[:, 0:8].detach().abs().sum())
    pruner.prune_redundant_heads()
    event = pruner.index.history[0]
    assert event["layer"] == "encoder.layer.0.attention" and event["pass"] == 0
    assert event["absorbed_by"] == {0: 3} and event["removed_heads"] == [0]
    assert event["similarity"][0] == [1, 0, 0, 1]
    assert event["importance"][0] == pytest.approx(importance_before)
    assert pruner.prune_redundant_heads() == {} and pruner.index.passes == 2


def test_prune_heads_switch():
    model, _ = _prune_copies("bert")
    pruner = NeuroPrune(model, NeuroPruneConfig(theta=1e-6, prune_heads=False))
    assert pruner.prune_redundant_heads() == {}
    assert all(u.num_heads == 4 for u in pruner.index.attention)
