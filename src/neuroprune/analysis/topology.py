"""Topology of a sparsified model (method.md section 6; paper Figs. 1-3 and 7): neuron degrees and
their spread, a heavy-tail test, head-similarity graphs with their dominating set, and the
importance of removed versus kept heads. Statistics only: reading runs is `report.py`'s job and
drawing is `plots.py`'s."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import numpy as np
import torch

from neuroprune.methods.heads import output_importance, redundant_groups, similarity_graph
from neuroprune.model.sparsity import DegreeStats, neuron_degrees
from neuroprune.model.units import AttentionUnit, MLPUnit

SIGNIFICANCE = 0.1  # p-value below which a likelihood-ratio comparison picks a side (Clauset et al.)
ALTERNATIVES = ("exponential", "lognormal")
ALPHA_RANGE = (1.0, 20.0)  # powerlaw's default stops at 3, which steep degree tails exceed


# --- neuron degree ------------------------------------------------------------------------------
@dataclass
class LayerDegrees:
    """Fractional degree of every original neuron of one MLP (removed neurons count as 0)."""

    name: str
    degrees: np.ndarray
    row_length: int  # entries per neuron fan-in (gate and up rows together)

    @property
    def stats(self) -> DegreeStats:
        return DegreeStats.of(torch.from_numpy(self.degrees))

    @property
    def counts(self) -> np.ndarray:
        """Integer degree: how many inputs each neuron is still connected to."""
        return np.rint(self.degrees * self.row_length).astype(np.int64)


def mlp_degrees(mlps: list[MLPUnit], eps: float) -> list[LayerDegrees]:
    return [
        LayerDegrees(
            unit.name,
            neuron_degrees(unit, eps).double().numpy(),
            sum(m.shape[1] for m in unit.expand_matrices()),
        )
        for unit in mlps
    ]


def pooled(layers: list[LayerDegrees]) -> np.ndarray:
    """All neurons of all layers in one vector (the paper's Fig. 2 is model-wide)."""
    return np.concatenate([layer.degrees for layer in layers]) if layers else np.zeros(0)


def pooled_stats(layers: list[LayerDegrees]) -> DegreeStats:
    return DegreeStats.of(torch.from_numpy(pooled(layers)))


def ccdf(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Empirical complementary CDF: the distinct values x and P(X >= x)."""
    v = np.sort(np.asarray(values, dtype=float))
    x, first = np.unique(v, return_index=True)
    return x, 1.0 - first / max(v.size, 1)


# --- heavy tail -----------------------------------------------------------------------------------
@dataclass
class Comparison:
    """Vuong likelihood-ratio test of a power law against one alternative over the fitted tail.
    R > 0 favours the power law; p is the probability of |R| this large if both fit equally."""

    alternative: str
    loglikelihood_ratio: float
    p_value: float

    @property
    def favoured(self) -> str:
        if not (math.isfinite(self.loglikelihood_ratio) and math.isfinite(self.p_value)):
            return "undetermined"
        if self.p_value >= SIGNIFICANCE:
            return "neither (not significant)"
        return "power law" if self.loglikelihood_ratio > 0 else self.alternative


@dataclass
class HeavyTailTest:
    """Is the neuron degree distribution heavy tailed? Fitted with the `powerlaw` package
    (Alstott et al. 2014, the method of Clauset, Shalizi and Newman 2009) on the integer degrees
    of the neurons that are still connected; xmin is chosen by minimising the KS distance."""

    n: int
    testable: bool
    reason: str = ""
    alpha: float | None = None
    xmin: float | None = None
    n_tail: int = 0
    ks_distance: float | None = None
    comparisons: list[Comparison] = field(default_factory=list)
    fit: Any = field(default=None, repr=False, compare=False)  # the powerlaw.Fit, for plotting

    def to_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "testable": self.testable,
            "reason": self.reason,
            "alpha": self.alpha,
            "xmin": self.xmin,
            "n_tail": self.n_tail,
            "ks_distance": self.ks_distance,
            "comparisons": [
                {
                    "alternative": c.alternative,
                    "loglikelihood_ratio": c.loglikelihood_ratio,
                    "p_value": c.p_value,
                    "favoured": c.favoured,
                }
                for c in self.comparisons
            ],
        }

    def summary(self) -> str:
        if not self.testable:
            return f"not testable: {self.reason}"
        parts = [f"power-law alpha={self.alpha:.2f} for degree >= {self.xmin:g} ({self.n_tail} of {self.n})"]
        for c in self.comparisons:
            parts.append(
                f"vs {c.alternative}: R={c.loglikelihood_ratio:.1f}, p={c.p_value:.2g} -> {c.favoured}"
            )
        return "; ".join(parts)


def heavy_tail_test(counts: np.ndarray, bound: int | None = None, min_neurons: int = 50,
                    min_distinct: int = 5) -> HeavyTailTest:
    """Fit a discrete power law to the positive integer degrees and compare it with exponential
    and log-normal fits. `bound` is the largest possible degree (the row length): every fit is
    truncated there. Dense models (every degree equal) are reported as not testable rather
    than given a meaningless fit."""
    import powerlaw

    data = np.asarray(counts, dtype=np.int64)
    data = data[data > 0]
    distinct = np.unique(data).size
    if data.size < min_neurons:
        return HeavyTailTest(data.size, False, f"only {data.size} connected neurons (need {min_neurons})")
    if distinct < min_distinct:
        return HeavyTailTest(
            data.size, False, f"a spike: only {distinct} distinct degree value(s)"
        )
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        fit = powerlaw.Fit(data, discrete=True, xmax=bound, verbose=False,
                           parameter_ranges={"alpha": ALPHA_RANGE})
        comparisons = [
            Comparison(alt, *(float(v) for v in fit.distribution_compare("power_law", alt)))
            for alt in ALTERNATIVES
        ]
    tail = int((data >= fit.xmin).sum())
    if not all(math.isfinite(c.loglikelihood_ratio) and math.isfinite(c.p_value) for c in comparisons):
        return HeavyTailTest(
            data.size, False, "nearly fully connected: degrees crowd at the maximum, likelihoods not finite",
            alpha=float(fit.power_law.alpha), xmin=float(fit.xmin), n_tail=tail,
        )
    return HeavyTailTest(
        n=int(data.size),
        testable=True,
        alpha=float(fit.power_law.alpha),
        xmin=float(fit.xmin),
        n_tail=tail,
        ks_distance=float(fit.power_law.D),
        comparisons=comparisons,
        fit=fit,
    )


# --- heads ----------------------------------------------------------------------------------------
def _int_keys(d: dict[Any, Any]) -> dict[int, Any]:
    """History read back from JSON has string keys; in memory they are ints."""
    return {int(k): v for k, v in d.items()}


@dataclass
class HeadGraph:
    """The head-similarity graph of one block (nodes: original key/value group indices) with the
    heads FIND_DOMINATING kept (`dominating`) and who absorbed whom."""

    layer: str
    source: str
    theta: float
    nodes: list[int]
    edges: list[tuple[int, int]]
    dominating: list[int]
    absorbed_by: dict[int, int]
    importance: dict[int, float]

    def to_networkx(self) -> nx.Graph:
        graph = nx.Graph()
        for node in self.nodes:
            graph.add_node(
                node,
                dominating=node in self.dominating,
                absorbed_by=self.absorbed_by.get(node),
                importance=self.importance.get(node),
            )
        graph.add_edges_from(self.edges)
        return graph

    @property
    def is_dominating_set(self) -> bool:
        """Whether the kept heads dominate the graph (every removed head is similar to a kept one).
        The greedy merges along chains, so this can fail on non-transitive similarity."""
        return bool(self.nodes) and nx.is_dominating_set(self.to_networkx(), self.dominating)

    def to_dict(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "source": self.source,
            "theta": self.theta,
            "nodes": self.nodes,
            "edges": [list(e) for e in self.edges],
            "dominating": self.dominating,
            "absorbed_by": {str(k): v for k, v in self.absorbed_by.items()},
            "importance": {str(k): v for k, v in self.importance.items()},
            "is_dominating_set": self.is_dominating_set,
        }


def _graph(layer: str, source: str, theta: float, groups: list[int], sim: list[list[int]],
           absorbed_by: dict[int, int], importance: dict[int, float]) -> HeadGraph:
    n = len(groups)
    edges = [(groups[i], groups[j]) for i in range(n) for j in range(i + 1, n) if sim[i][j] or sim[j][i]]
    return HeadGraph(
        layer=layer,
        source=source,
        theta=theta,
        nodes=list(groups),
        edges=edges,
        dominating=[g for g in groups if g not in absorbed_by],
        absorbed_by=absorbed_by,
        importance=importance,
    )


def graph_from_event(event: dict[str, Any], theta: float) -> HeadGraph:
    """The graph a recorded pruning pass saw (a `PruneEvent` as stored in `history`); `theta` is
    used where the history does not record the pass's own."""
    return _graph(
        event["layer"],
        f"recorded pruning pass {event.get('pass', '?')}",
        float(event.get("theta", theta)),
        [int(g) for g in event["groups"]],
        event["similarity"],
        {k: int(v) for k, v in _int_keys(event["absorbed_by"]).items()},
        {k: float(v) for k, v in _int_keys(event["importance"]).items()},
    )


def graph_from_weights(unit: AttentionUnit, theta: float) -> HeadGraph:
    """The graph of the heads a block has now, with what FIND_DOMINATING would keep (no surgery)."""
    sim = similarity_graph(unit.group_blocks(), theta)
    survivors = redundant_groups(sim)
    groups = list(unit.kept_groups)
    return _graph(
        unit.name,
        "final weights (what one more pruning pass would do)",
        theta,
        groups,
        sim.tolist(),
        {groups[s]: groups[d] for s, d in survivors.items()},
        output_importance(unit),
    )


def layer_graph(history: list[dict[str, Any]], unit: AttentionUnit, theta: float) -> HeadGraph:
    """The recorded pass of this block that removed most heads, else the graph of its final weights."""
    events = [e for e in history if e["layer"] == unit.name]
    if not events:
        return graph_from_weights(unit, theta)
    return graph_from_event(max(events, key=lambda e: (len(e["absorbed_by"]), -e.get("pass", 0))), theta)


def removed_heads(attention: list[AttentionUnit]) -> dict[str, list[int]]:
    """Original indices of the query heads each block lost."""
    return {u.name: sorted(set(range(u.original_heads)) - set(u.kept_heads)) for u in attention}


def removed_per_index(removed: dict[str, list[int]], heads: int) -> list[int]:
    """How many blocks lost head i, for every head index i (paper Fig. 7 right)."""
    counts = [0] * heads
    for lost in removed.values():
        for head in lost:
            counts[head] += 1
    return counts


@dataclass
class HeadImportance:
    """Summed |W_O| of heads (paper Fig. 7 left): removed heads just before their removal, heads
    kept in the same pass at the same moment, and the heads of the final model."""

    removed: list[float]
    kept_same_pass: list[float]
    kept_final: list[float]

    def to_dict(self) -> dict[str, Any]:
        def describe(v: list[float]) -> dict[str, Any]:
            return {"n": len(v), "mean": float(np.mean(v)) if v else None,
                    "median": float(np.median(v)) if v else None, "values": v}

        return {
            "removed": describe(self.removed),
            "kept_same_pass": describe(self.kept_same_pass),
            "kept_final": describe(self.kept_final),
        }


def head_importance(history: list[dict[str, Any]], attention: list[AttentionUnit]) -> HeadImportance:
    removed, kept = [], []
    for event in history:
        absorbed = _int_keys(event["absorbed_by"])
        for group, value in _int_keys(event["importance"]).items():
            (removed if group in absorbed else kept).append(float(value))
    final = [v for unit in attention for v in output_importance(unit).values()]
    return HeadImportance(removed, kept, final)
