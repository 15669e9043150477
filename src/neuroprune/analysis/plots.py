"""Figures of a sparsified model's topology, after the paper's Figs. 1, 2, 3 and 7. Every function
returns a matplotlib `Figure` drawn on the Agg canvas (no pyplot, no display, no global state), so
reports can be built on headless machines and from threads."""

from __future__ import annotations

import math
from collections.abc import Sequence

import networkx as nx
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import LogFormatter, MaxNLocator

from neuroprune.analysis.topology import HeadGraph, HeadImportance, HeavyTailTest, ccdf
from neuroprune.model.surgery import head_rows
from neuroprune.model.units import AttentionUnit, MLPUnit

MAX_PIXELS = 1600  # larger matrices are block-averaged so a dead row stays visible as a light line
REMOVED = "#e8837c"  # removed heads / neurons
KEPT = "#2b6cb0"
DENSE = "#9a9a9a"
# Paper (BERT-base, SST-2): sd of MLP neuron connectivity in percent at a given sparsity (method.md 6).
PAPER_SD = ((0.0, 0.13, "standard fine-tuning"), (0.5, 12.12, "~50% sparse"), (0.9, 4.16, "~90% sparse"))


def new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def run_colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def short_names(names: Sequence[str]) -> list[str]:
    """Drop the dotted components all names share at the start and at the end
    (`encoder.layer.3.attention` -> `3`), keeping names distinct."""
    if len(names) < 2:
        return [n.split(".")[-1] if n else n for n in names]
    parts = [n.split(".") for n in names]
    lead = 0
    while all(len(p) > lead + 1 for p in parts) and len({p[lead] for p in parts}) == 1:
        lead += 1
    trail = 0
    while all(len(p) > lead + trail + 1 for p in parts) and len({p[-1 - trail] for p in parts}) == 1:
        trail += 1
    return [".".join(p[lead:len(p) - trail]) for p in parts]


# --- Fig. 1: sparsity patterns ----------------------------------------------------------------------
def _pool(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Block-average a 0/1 matrix down to at most MAX_PIXELS per side."""
    f = max(1, math.ceil(max(mask.shape) / MAX_PIXELS))
    if f == 1:
        return mask.astype(float), 1
    rows, cols = (math.ceil(s / f) * f for s in mask.shape)
    padded = np.zeros((rows, cols))
    padded[: mask.shape[0], : mask.shape[1]] = mask
    return padded.reshape(rows // f, f, cols // f, f).mean(axis=(1, 3)), f


def _show(ax, nonzero: np.ndarray, removed_cols: np.ndarray, title: str, xlabel: str, ylabel: str,
          separators: Sequence[int] = (), blocks: Sequence[str] = ()) -> None:
    """nonzero: (rows, cols) 0/1; removed_cols: bool per column (drawn in the removed colour)."""
    density, f = _pool(nonzero)
    ax.imshow(density, cmap="Greys", vmin=0, vmax=1, aspect="auto", interpolation="antialiased")
    if removed_cols.any():
        cols, _ = _pool(np.broadcast_to(removed_cols[None, :], nonzero.shape))
        overlay = np.ma.masked_where(cols < 0.5, np.ones_like(cols))
        ax.imshow(overlay, cmap=ListedColormap([REMOVED]), vmin=0, vmax=1, aspect="auto",
                  interpolation="nearest")
    for x in separators:
        ax.axvline(x / f - 0.5, color="#3182ce", linewidth=1.2)
    edges = [0, *separators, nonzero.shape[1]]
    for name, left, right in zip(blocks, edges, edges[1:]):
        ax.text((left + right) / 2 / f, 1.005, name, transform=ax.get_xaxis_transform(), ha="center",
                va="bottom", fontsize=10, fontweight="bold", color="#3182ce")
    zero_rows = int((nonzero.sum(1) == 0).sum())
    live_cols = ~removed_cols
    zero_cols = int(((nonzero.sum(0) == 0) & live_cols).sum())
    pooled = f" [{f}x{f} blocks averaged]" if f > 1 else ""
    ax.set_title(f"{title}: {1 - nonzero.mean():.1%} zero, {zero_rows} zero rows, "
                 f"{zero_cols} zero columns{pooled}", fontsize=10, pad=16 if blocks else 6)
    ax.set_xlabel(xlabel, fontsize=9)
    ax.set_ylabel(ylabel, fontsize=9)
    ax.tick_params(labelsize=8)


def _attention_panel(ax, unit: AttentionUnit) -> None:
    """A = [Q, K, V] in the paper's layout: row i = input dimension i, so an input dimension the
    group penalty cut off is a white row; removed heads' columns are drawn in the removed colour."""
    d_in = unit.qkv_matrices()[0].shape[1]
    blocks, removed, separators, width = [], [], [], 0
    for mat, heads, per in zip(
        unit.qkv_matrices(),
        (unit.kept_heads, unit.kept_kv_heads, unit.kept_kv_heads),
        (unit.original_heads, unit.original_kv_heads, unit.original_kv_heads),
    ):
        full = torch.zeros(per * unit.head_dim, d_in)
        full[head_rows(heads, unit.head_dim)] = (mat.detach() != 0).float().cpu()
        gone = torch.ones(per * unit.head_dim, dtype=torch.bool)
        gone[head_rows(heads, unit.head_dim)] = False
        blocks.append(full.T.numpy())
        removed.append(gone.numpy())
        width += full.shape[0]
        separators.append(width)
    _show(ax, np.concatenate(blocks, 1), np.concatenate(removed), f"[Q, K, V] of {unit.name}",
          "output column (Q | K | V, head-major; red = removed head)", "input dimension",
          separators[:-1], ("Q", "K", "V"))


def _mlp_panels(ax_in, ax_out, unit: MLPUnit) -> None:
    """L_in (inputs x neurons, gate rows stacked above up rows) and L_out transposed (outputs x
    neurons): one column per neuron in both, so a dead neuron is a white column in both."""
    n = unit.original_neurons
    expand = torch.cat([m.detach() for m in unit.expand_matrices()], 1)  # (neurons, inputs)
    present = expand.shape[0]
    gone = np.arange(n) >= present

    def columns(mat: torch.Tensor) -> np.ndarray:  # (present neurons, x) -> (x, n) nonzero mask
        full = np.zeros((mat.shape[1], n))
        full[:, :present] = (mat != 0).float().cpu().numpy().T
        return full

    gated = " (gate rows above up rows)" if unit.gate is not None else ""
    _show(ax_in, columns(expand), gone, f"L_in of {unit.name}", "neuron", f"input dimension{gated}")
    _show(ax_out, columns(unit.contract_matrix().detach().T), gone, f"L_out (transposed) of {unit.name}",
          "neuron", "output dimension")


def sparsity_pattern(title: str, attention: Sequence[AttentionUnit], mlp: MLPUnit | None) -> Figure:
    """Paper Fig. 1 for one layer: black = non-zero weight, white = exactly zero."""
    rows = len(attention) + (2 if mlp is not None else 0)
    fig = new_figure(13, 2.9 * rows + 0.6)
    axes = fig.subplots(rows, 1, squeeze=False)[:, 0]
    for ax, unit in zip(axes, attention):
        _attention_panel(ax, unit)
    if mlp is not None:
        _mlp_panels(axes[-2], axes[-1], mlp)
    fig.suptitle(f"Sparsity pattern, layer {title} (black = non-zero, white = zero)", fontsize=12)
    return fig


# --- Fig. 2: neuron degree ----------------------------------------------------------------------
def degree_histogram(runs: dict[str, np.ndarray], dense: np.ndarray | None, dense_label: str) -> Figure:
    """Fractional neuron degree of every MLP neuron, each run against the dense reference."""
    fig = new_figure(9, 4.8)
    ax = fig.subplots()
    bins = np.linspace(0, 1, 41)
    if dense is None:
        ax.bar([1.0], [1.0], width=bins[1], color=DENSE, alpha=0.6, label=dense_label, align="edge")
    else:
        w = np.full(dense.size, 1 / max(dense.size, 1))
        ax.hist(dense, bins=bins, weights=w, color=DENSE, alpha=0.6, label=dense_label)
    for (name, deg), color in zip(runs.items(), run_colors(len(runs))):
        w = np.full(deg.size, 1 / max(deg.size, 1))
        ax.hist(deg, bins=bins, weights=w, histtype="step", linewidth=2, color=color,
                label=f"{name} (sd {deg.std() * 100:.2f}%)")
    ax.set_yscale("log")
    ax.set_xlim(-0.01, 1.04)
    ax.set_xlabel("fractional neuron degree (share of a neuron's inputs with |w| >= eps)")
    ax.set_ylabel("fraction of MLP neurons (log scale)")
    ax.set_title("Neuron degree distribution: dense spike vs sparsified (paper Fig. 2 left)")
    ax.legend(fontsize=9, loc="upper center")
    return fig


def sd_per_layer(runs: dict[str, dict[str, float]], dense: dict[str, float] | None) -> Figure:
    """sd of neuron connectivity in percent per MLP layer, one bar per run (paper Fig. 1 numbers)."""
    layers = list(dict.fromkeys(name for sd in runs.values() for name in sd))  # union, in order
    labels = short_names(layers)
    fig = new_figure(max(7.0, 0.6 * len(layers) * max(1, len(runs)) + 3), 4.5)
    ax = fig.subplots()
    width = 0.8 / max(1, len(runs) + (dense is not None))
    x = np.arange(len(layers))
    series = ([("dense reference", dense, DENSE)] if dense else []) + [
        (name, sd, c) for (name, sd), c in zip(runs.items(), run_colors(len(runs)))
    ]
    for i, (name, sd, color) in enumerate(series):
        bars = ax.bar(x + i * width - 0.4 + width / 2, [sd.get(layer, np.nan) for layer in layers],
                      width=width, color=color, label=name)
        if len(layers) * len(series) <= 48:  # small values stay readable next to large ones
            ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=1)
    ax.set_xticks(x, labels, rotation=30 if max(map(len, labels), default=0) > 4 else 0, ha="right"
                  if max(map(len, labels), default=0) > 4 else "center")
    ax.set_xlabel("MLP layer")
    ax.set_ylabel("sd of neuron degree (%)")
    ax.set_title("Spread of neuron connectivity per layer")
    ax.legend(fontsize=9)
    return fig


def sd_vs_sparsity(points: dict[str, tuple[float, float]], dense: tuple[float, float] | None) -> Figure:
    """Model-wide sd of neuron connectivity against sparsity, one point per run, with the paper's
    BERT-base / SST-2 numbers for reference (paper Fig. 2 right)."""
    fig = new_figure(8, 4.8)
    ax = fig.subplots()
    ax.plot([s * 100 for s, _, _ in PAPER_SD], [v for _, v, _ in PAPER_SD], "s--", color=DENSE,
            label="paper, BERT-base SST-2")
    for s, v, text in PAPER_SD:
        ax.annotate(text, (s * 100, v), textcoords="offset points", xytext=(4, 6), fontsize=8, color="#555")
    if dense is not None:
        ax.plot([dense[0] * 100], [dense[1]], "D", color="black", markersize=8, label="dense reference")
    for (name, (s, v)), color in zip(points.items(), run_colors(len(points))):
        ax.plot([s * 100], [v], "o", color=color, markersize=9, label=name)
        ax.annotate(f"{v:.2f}%", (s * 100, v), textcoords="offset points", xytext=(6, -12), fontsize=8)
    ax.set_xlim(-3, 103)
    ax.set_xlabel("sparsity of the regularised matrices (%)")
    ax.set_ylabel("sd of neuron degree, all MLP neurons (%)")
    ax.set_title("Connectivity spread vs sparsity (paper Fig. 2 right)")
    ax.legend(fontsize=9)
    return fig


def degree_ccdf(runs: dict[str, tuple[np.ndarray, HeavyTailTest]]) -> Figure:
    """Complementary CDF of integer neuron degree on log-log axes with the fitted power law
    (dashed), exponential (dotted) and log-normal (dash-dot) tails, scaled to the data at xmin."""
    fig = new_figure(9, 5.5)
    ax = fig.subplots()
    notes, lowest = [], 1.0
    for (name, (counts, test)), color in zip(runs.items(), run_colors(len(runs))):
        data = counts[counts > 0]
        if data.size == 0:
            notes.append(f"{name}: no connected neurons")
            continue
        x, p = ccdf(data)
        lowest = min(lowest, float(p[-1]))
        ax.loglog(x, p, ".", color=color, markersize=4, label=f"{name} (data)")
        if test.testable and test.fit is not None:
            grid = np.arange(int(test.xmin), int(data.max()) + 1)
            share = test.n_tail / test.n  # the fits describe the tail; scale them onto the data
            for dist, style in (("power_law", "--"), ("exponential", ":"), ("lognormal", "-.")):
                ax.loglog(grid, getattr(test.fit, dist).ccdf(grid) * share, style, color=color,
                          linewidth=1.4)
        notes.append(f"{name}: {test.summary()}")
    ax.set_ylim(lowest / 3, 1.5)  # fitted tails may fall far below the data: keep the data in view
    handles, labels = ax.get_legend_handles_labels()
    handles += [Line2D([], [], color="black", linestyle=s) for s in ("--", ":", "-.")]
    labels += ["power-law fit", "exponential fit", "log-normal fit"]
    ax.legend(handles, labels, fontsize=8, loc="lower left")
    for axis in (ax.xaxis, ax.yaxis):  # plain numbers, not 2.6x10^2
        axis.set_major_formatter(LogFormatter())
        axis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(1, 0.5)))
    ax.set_xlabel("neuron degree (connected inputs, log scale)")
    ax.set_ylabel("P(degree >= x) (log scale)")
    ax.set_title("Complementary CDF of neuron degree and fitted tails")
    fig.text(0.01, -0.01, "\n".join(_wrap(n, 150) for n in notes), fontsize=8, va="top", family="monospace")
    return fig


def _wrap(text: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width, subsequent_indent="    "))


# --- Figs. 3 and 7: heads ---------------------------------------------------------------------------
def heads_removed(removed: dict[str, list[int]], heads: dict[str, int], title: str) -> Figure:
    """Which heads each block lost (map), how many per block, and how often each head index went
    (paper Figs. 3 and 7 right)."""
    names = list(removed)
    labels = short_names(names)
    width = max(heads.values(), default=1)
    grid = np.full((len(names), width), np.nan)
    for row, name in enumerate(names):
        grid[row, : heads[name]] = 1.0
        grid[row, removed[name]] = 0.0
    fig = new_figure(13, max(3.8, 0.32 * len(names) + 2.2))
    ax_map, ax_layer, ax_index = fig.subplots(1, 3, width_ratios=[1.3, 1, 1])
    ax_map.imshow(grid, cmap=ListedColormap([REMOVED, KEPT]), vmin=0, vmax=1, aspect="auto",
                  interpolation="nearest")
    ax_map.set_yticks(range(len(names)), labels, fontsize=8)
    ax_map.set_xticks(range(width), [str(i) for i in range(width)], fontsize=7)
    ax_map.set_xlabel("head index")
    ax_map.set_ylabel("attention block")
    ax_map.set_title("kept (blue) / removed (red)", fontsize=10)
    counts = [len(removed[n]) for n in names]
    ax_layer.barh(range(len(names)), counts, color=REMOVED)
    ax_layer.set_yticks(range(len(names)), labels, fontsize=8)
    ax_layer.invert_yaxis()
    ax_layer.set_xlabel("heads removed")
    ax_layer.set_ylabel("attention block")
    ax_layer.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_layer.set_xlim(0, max(1, *counts) * 1.05)
    ax_layer.set_title(f"per block (total {sum(counts)} of {sum(heads.values())})", fontsize=10)
    per_index = [sum(i in removed[n] for n in names) for i in range(width)]
    ax_index.bar(range(width), per_index, color=REMOVED)
    ax_index.set_xticks(range(width), [str(i) for i in range(width)], fontsize=7)
    ax_index.set_xlabel("head index")
    ax_index.set_ylabel("blocks that removed it")
    ax_index.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax_index.set_ylim(0, max(1, *per_index) * 1.05)
    ax_index.set_title("per head index", fontsize=10)
    fig.suptitle(f"Heads removed: {title}", fontsize=12)
    return fig


def similarity_graph(graph: HeadGraph) -> Figure:
    """Nodes = heads (key/value groups); an edge joins heads within theta in l_inf. Blue nodes are
    the dominating set FIND_DOMINATING kept; red ones were merged into the head the arrow points to."""
    fig = new_figure(7.5, 7)
    ax = fig.subplots()
    g = graph.to_networkx()
    pos = nx.circular_layout(g)
    nx.draw_networkx_edges(g, pos, ax=ax, edge_color="#bbbbbb", width=1.2)
    merges = nx.DiGraph(list(graph.absorbed_by.items()))
    nx.draw_networkx_edges(merges, pos, ax=ax, edge_color=REMOVED, width=2, arrows=True,
                           arrowstyle="-|>", arrowsize=18, style="dashed", node_size=700)
    colors = [KEPT if n in graph.dominating else REMOVED for n in g.nodes]
    nx.draw_networkx_nodes(g, pos, ax=ax, node_color=colors, node_size=700, edgecolors="black")
    nx.draw_networkx_labels(g, pos, ax=ax, font_color="white", font_weight="bold")
    ax.legend(
        handles=[
            Patch(color=KEPT, label=f"dominating set, kept ({len(graph.dominating)})"),
            Patch(color=REMOVED, label=f"removed ({len(graph.absorbed_by)})"),
            Line2D([], [], color="#bbbbbb", label="similar (l_inf <= theta)"),
            Line2D([], [], color=REMOVED, linestyle="--", label="merged into"),
        ],
        fontsize=9, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=2, frameon=False,
    )
    ax.set_axis_off()
    ax.set_title(f"Head-similarity graph of {graph.layer}\n{graph.source}; theta={graph.theta:g}, "
                 f"{len(graph.edges)} edges", fontsize=10)
    return fig


def head_importance(runs: dict[str, HeadImportance]) -> Figure:
    """Summed |W_O| of removed heads (just before removal) vs heads kept in the same pass and in the
    final model (paper Fig. 7 left): redundancy, not low importance, decides removal."""
    fig = new_figure(max(6.5, 4.2 * len(runs)), 4.8)
    axes = fig.subplots(1, max(1, len(runs)), squeeze=False)[0]
    rng = np.random.default_rng(0)
    for ax, (name, imp) in zip(axes, runs.items()):
        groups = [("removed", imp.removed, REMOVED), ("kept\nsame pass", imp.kept_same_pass, KEPT),
                  ("kept\nfinal model", imp.kept_final, "#63b3ed")]
        present = [(label, v, c) for label, v, c in groups if v]
        if present:
            ax.boxplot([v for _, v, _ in present], widths=0.5, showfliers=False)
            for i, (_, values, color) in enumerate(present, start=1):
                ax.scatter(i + rng.uniform(-0.15, 0.15, len(values)), values, s=14, color=color,
                           alpha=0.8, zorder=3)
            ax.set_xticks(range(1, len(present) + 1),
                          [f"{label}\n(n={len(v)})" for label, v, _ in present], fontsize=9)
        else:
            ax.text(0.5, 0.5, "no heads", ha="center", transform=ax.transAxes)
        ax.set_xlabel("heads")
        ax.set_ylabel("head importance: sum |W_O| of its output slice")
        ax.set_title(name, fontsize=10)
    fig.suptitle("Importance of removed vs kept heads (paper Fig. 7 left)", fontsize=12)
    return fig
