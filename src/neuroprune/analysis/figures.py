"""The figures of a topology report: what each shows (section, title, caption, file name) and how
to draw it, rendered to compact PNGs."""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from neuroprune.analysis import plots
from neuroprune.analysis.runs import RunAnalysis
from neuroprune.analysis.topology import pooled, pooled_stats
from neuroprune.model.index import same_layer
from neuroprune.model.units import AttentionUnit


@dataclass
class FigureEntry:
    section: str
    title: str
    caption: str
    file: str
    png: bytes


def _png(fig: Figure, dpi: int = 110) -> bytes:
    """PNG with a 64-colour palette: sparsity patterns are pixel noise that true-colour PNG
    compresses badly (2.5 MB vs 0.7 MB for a MiniLM layer), and the figures use few colours."""
    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    buf.seek(0)
    out = io.BytesIO()
    # octree keeps small accents (labels, separators) that median cut merges into the greys; no
    # dithering, which would draw dots that are not in the matrix
    palette = Image.open(buf).convert("RGB").quantize(
        colors=64, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE
    )
    palette.save(out, format="PNG", optimize=True)
    return out.getvalue()


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "run"


def figure_specs(runs: list[RunAnalysis]) -> list[tuple[str, str, str, str, Any]]:
    """(section, title, caption, file name, thunk drawing the figure) for every figure."""
    first = runs[0]
    dense = first.dense
    multi = len(runs) > 1
    specs: list[tuple[str, str, str, str, Any]] = [
        ("Neuron connectivity", "Fractional neuron degree", (
            "Share of each MLP neuron's inputs still connected (|w| >= eps), all layers pooled, as a "
            "fraction of neurons (log scale). Standard fine-tuning leaves a spike at 1.0; NeuroPrune "
            f"spreads it out. Grey: {dense.label}."),
         "degree_histogram.png",
         lambda: plots.degree_histogram(
             {r.name: pooled(r.degrees) for r in runs}, dense.degrees, dense.label)),
        ("Neuron connectivity", "Heavy tail: complementary CDF, log-log", (
            "P(degree >= x) of the integer neuron degree (neurons with at least one input). Lines: "
            "maximum-likelihood power-law, exponential and log-normal fits above the power law's "
            "xmin (powerlaw package). The likelihood-ratio tests below the plot say which fits "
            "better and how significantly."),
         "degree_ccdf.png",
         lambda: plots.degree_ccdf({r.name: (np.concatenate([d.counts for d in r.degrees]), r.heavy_tail)
                                    for r in runs if r.degrees})),
        ("Neuron connectivity", "Standard deviation of neuron connectivity per layer", (
            "sd of the fractional neuron degree in percent, per MLP block (the numbers of the "
            "paper's Fig. 1: 0.13% for standard fine-tuning of BERT-base, 12.12% at ~50% sparsity)."),
         "sd_per_layer.png",
         lambda: plots.sd_per_layer(
             {r.name: {d.name: d.stats.sd_percent for d in r.degrees} for r in runs},
             {d.name: d.stats.sd_percent for d in dense.layers} if dense.layers else None)),
        ("Neuron connectivity", "Connectivity spread vs sparsity", (
            "Model-wide sd of neuron degree against sparsity, one point per run; grey squares are "
            "the paper's BERT-base / SST-2 numbers."),
         "sd_vs_sparsity.png",
         lambda: plots.sd_vs_sparsity(
             {r.name: (r.sparsity.sparsity, pooled_stats(r.degrees).sd_percent) for r in runs if r.degrees},
             (0.0, dense.sd_percent))),
        ("Heads", "Importance of removed vs kept heads", (
            "Summed |W_O| over each head's slice of the output projection: removed heads just "
            "before their removal, heads kept in the same pruning pass at the same moment, and the "
            "heads of the final model (which absorbed the removed heads' slices). Heads go for "
            "redundancy, not low importance."),
         "head_importance.png",
         lambda: plots.head_importance({r.name: r.importance for r in runs})),
    ]
    for run in runs:
        prefix = f"{slug(run.name)}_" if multi else ""
        heads = {u.name: u.original_heads for u in run.index.attention}
        specs.append(("Heads", f"Heads removed: {run.name}", (
            "Left: every attention block (rows) by head index (columns), kept or removed. Middle: "
            "heads removed per block (paper Fig. 3). Right: how many blocks removed each head index "
            "(paper Fig. 7 right)."),
            f"{prefix}heads_removed.png",
            lambda run=run, heads=heads: plots.heads_removed(run.removed, heads, run.name)))
        if run.graph is not None:
            specs.append(("Heads", f"Head-similarity graph: {run.name}", (
                f"Heads of {run.graph.layer} (source: {run.graph.source}). An edge joins two heads "
                "whose [Q, K, V] blocks are within theta in l_inf; blue heads are the dominating "
                "set FIND_DOMINATING kept, red heads were merged into the head their arrow points "
                f"to. Kept heads form a dominating set: {run.graph.is_dominating_set}. Choose the "
                "block with --layer."),
                f"{prefix}similarity_graph.png",
                lambda run=run: plots.similarity_graph(run.graph)))
        layers: dict[str, list[AttentionUnit]] = {m.name: [] for m in run.index.mlps}
        alone = []
        for unit in run.index.attention:
            mlp = same_layer(unit.name, run.index.mlps)
            (layers[mlp.name] if mlp is not None else alone).append(unit)
        mlps = {m.name: m for m in run.index.mlps}
        labels = dict(zip(layers, plots.short_names(list(layers))))
        for mlp_name, units in layers.items():
            specs.append((f"Sparsity patterns: {run.name}", f"Layer {labels[mlp_name]}", (
                "Black = non-zero weight, white = exactly zero, red = removed head. [Q, K, V] and "
                "L_in: one row per input dimension, so an input dimension cut off by the group "
                "penalty is a white row; L_in and L_out (transposed): one column per neuron, so a "
                "dead neuron is a white column in both (paper Fig. 1)."),
                f"{prefix}pattern_{slug(labels[mlp_name])}.png",
                lambda units=units, m=mlps[mlp_name], t=labels[mlp_name]:
                    plots.sparsity_pattern(t, units, m)))
        for unit in alone:
            specs.append((f"Sparsity patterns: {run.name}", unit.name, "Black = non-zero, white = zero.",
                          f"{prefix}pattern_{slug(unit.name)}.png",
                          lambda unit=unit: plots.sparsity_pattern(unit.name, [unit], None)))
    return specs


def render_figures(runs: list[RunAnalysis]) -> list[FigureEntry]:
    entries = []
    for section, title, caption, file, draw in tqdm(figure_specs(runs), desc="figures", unit="fig"):
        fig = draw()
        entries.append(FigureEntry(section, title, caption, file, _png(fig)))
        fig.clear()
    return entries
