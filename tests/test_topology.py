"""Topology statistics on hand-made matrices, graphs and histories."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest
import torch

from neuroprune import NeuroPrune, NeuroPruneConfig
from neuroprune.analysis.plots import short_names
from neuroprune.analysis.topology import (
    ccdf,
    graph_from_event,
    graph_from_weights,
    head_importance,
    heavy_tail_test,
    mlp_degrees,
    pooled_stats,
    removed_heads,
    removed_per_index,
)

from tiny import duplicate_group, tiny_model


@pytest.fixture
def pruner() -> NeuroPrune:
    return NeuroPrune(tiny_model("bert"), NeuroPruneConfig(eps=1e-3))


def test_degree_and_sd_in_percent_of_a_hand_made_matrix(pruner: NeuroPrune) -> None:
    unit = pruner.index.mlps[0]
    w = unit.expand_matrices()[0]  # 48 neurons x 32 inputs
    with torch.no_grad():
        w.zero_()
        for i in range(48):
            w[i, : i % 33] = 0.5  # neuron i is connected to i % 33 inputs
        w[5, 10:20] = 1e-4  # below eps: does not count
        pruner.index.mlps[1].expand_matrices()[0].fill_(0.5)  # fully connected: the dense spike
    layers = mlp_degrees(pruner.index.mlps, pruner.config.eps)
    expected = [(i % 33) / 32 for i in range(48)]
    assert layers[0].row_length == 32
    assert layers[0].degrees.tolist() == pytest.approx(expected)
    assert layers[0].counts.tolist() == [i % 33 for i in range(48)]
    stats = layers[0].stats
    assert stats.mean == pytest.approx(statistics.fmean(expected))
    assert stats.sd_percent == pytest.approx(statistics.pstdev(expected) * 100)
    assert stats.dead == 2  # neurons 0 and 33
    assert layers[1].stats.sd_percent == 0.0 and layers[1].stats.mean == 1.0
    both = expected + layers[1].degrees.tolist()
    assert pooled_stats(layers).sd_percent == pytest.approx(statistics.pstdev(both) * 100)


def test_ccdf() -> None:
    x, p = ccdf(np.array([3, 1, 2, 1]))
    assert x.tolist() == [1, 2, 3] and p.tolist() == [1.0, 0.5, 0.25]


def test_heavy_tail_test_tells_power_law_from_exponential() -> None:
    rng = np.random.default_rng(0)
    heavy = heavy_tail_test(np.minimum(rng.zipf(2.2, 3000), 10_000))
    assert heavy.testable and heavy.alpha == pytest.approx(2.2, abs=0.3)
    exp = {c.alternative: c for c in heavy.comparisons}["exponential"]
    assert exp.loglikelihood_ratio > 0 and exp.p_value < 0.1 and exp.favoured == "power law"
    light = heavy_tail_test(rng.geometric(0.2, 3000))
    exp = {c.alternative: c for c in light.comparisons}["exponential"]
    assert exp.loglikelihood_ratio < 0 and exp.favoured == "exponential"
    for test in (heavy, light):  # Vuong's test by hand from the per-degree log-likelihoods of the tail
        tail = test.fit.data[test.fit.data >= test.xmin]
        for c in test.comparisons:
            alternative = getattr(test.fit, c.alternative)
            d = test.fit.power_law.loglikelihoods(tail) - alternative.loglikelihoods(tail)
            assert c.loglikelihood_ratio == pytest.approx(d.sum(), rel=1e-9)
            p = math.erfc(abs(d.sum()) / math.sqrt(2 * d.size * d.var()))
            assert c.p_value == pytest.approx(p, rel=1e-9, abs=1e-300)
    crowded = heavy_tail_test(385 - rng.geometric(0.3, 3000), bound=384)  # nearly dense neurons
    assert not crowded.testable and "not finite" in crowded.reason and crowded.alpha > 1
    spike = heavy_tail_test(np.full(500, 32))
    assert not spike.testable and "spike" in spike.reason and spike.alpha is None
    assert not heavy_tail_test(np.arange(1, 20)).testable
    assert "not testable" in spike.summary() and "vs exponential" in heavy.summary()


def test_graph_from_recorded_event_with_non_transitive_similarity() -> None:
    # groups 0-1 and 1-2 similar, 0-2 not; FIND_DOMINATING keeps 1, which absorbs 0 and 2
    event = {
        "pass": 0, "layer": "l", "groups": [0, 1, 2, 3],
        "similarity": [[1, 1, 0, 0], [1, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 1]],
        "absorbed_by": {"0": 1, "2": 1}, "removed_heads": [0, 2],
        "importance": {"0": 1.0, "1": 2.0, "2": 3.0, "3": 4.0},
    }
    graph = graph_from_event(event, theta=0.15)
    assert graph.theta == 0.15  # this event predates recording theta: the config's is used
    assert graph.edges == [(0, 1), (1, 2)]
    assert graph.dominating == [1, 3] and graph.absorbed_by == {0: 1, 2: 1}
    assert graph.is_dominating_set
    assert graph.to_networkx().nodes[0]["importance"] == 1.0
    importance = head_importance([event], [])
    assert sorted(importance.removed) == [1.0, 3.0] and sorted(importance.kept_same_pass) == [2.0, 4.0]


def test_graph_from_weights_matches_pruning(pruner: NeuroPrune) -> None:
    unit = pruner.index.attention[0]
    duplicate_group(pruner.model, unit, 1, 3)
    before = graph_from_weights(unit, theta=1e-6)
    assert before.edges == [(1, 3)] and before.absorbed_by == {1: 3}
    assert before.source.startswith("final weights")
    pruner.prune_redundant_heads(theta=1e-6)
    after = removed_heads(pruner.index.attention)
    assert after == {unit.name: [1], pruner.index.attention[1].name: []}
    assert removed_per_index(after, 4) == [0, 1, 0, 0]
    importance = head_importance(pruner.index.history, pruner.index.attention)
    assert len(importance.removed) == 1 and len(importance.kept_final) == 7


def test_short_names() -> None:
    assert short_names(["bert.encoder.layer.0.attention", "bert.encoder.layer.11.attention"]) == ["0", "11"]
    names = ["encoder.block.0.layer.0.SelfAttention", "decoder.block.0.layer.0.SelfAttention",
             "decoder.block.0.layer.1.EncDecAttention"]
    assert short_names(names) == names  # nothing shared at either end
    assert short_names(["only.one"]) == ["one"]
