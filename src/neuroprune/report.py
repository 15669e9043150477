"""A topology report of one or several training runs: one self-contained HTML page (figures
embedded as base64 data URIs, opens offline), the same figures as PNG files, and `stats.json`
with every statistic behind them.

A run directory is the one `neuroprune train` writes (see the run-directory contract): the final
model in `model/` (its `neuroprune.json` holds the head-pruning history), plus `run_config.json`,
`metrics.json` and `sparsity.json`. Only `model/` is required."""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from . import __version__, plots
from .checkpoint import from_pretrained
from .config import NeuroPruneConfig
from .errors import NeuroPruneError
from .pruner import NeuroPrune, _same_layer
from .sparsity import SparsityReport
from .topology import (
    HeadGraph,
    HeadImportance,
    HeavyTailTest,
    LayerDegrees,
    head_importance,
    heavy_tail_test,
    layer_graph,
    mlp_degrees,
    pooled,
    pooled_stats,
    removed_heads,
    removed_per_index,
)
from .units import AttentionUnit

MODEL_KEYS = ("model", "model_name_or_path", "model_name", "base_model")  # run_config.json keys


class ReportError(NeuroPruneError):
    """A run directory cannot be reported on (missing, not a run, unknown layer)."""


@dataclass
class DenseReference:
    """What a dense model's neuron degrees look like: the run's starting model if it can be
    loaded here, otherwise the ideal spike at 1.0 (every neuron fully connected)."""

    label: str
    layers: list[LayerDegrees] | None  # None: the spike at 1.0

    @property
    def degrees(self) -> np.ndarray | None:
        return None if self.layers is None else pooled(self.layers)

    @property
    def sd_percent(self) -> float:
        return 0.0 if self.layers is None else pooled_stats(self.layers).sd_percent


@dataclass
class RunAnalysis:
    name: str
    path: Path
    run_config: dict[str, Any]
    metrics: list[dict[str, Any]]
    pruner: NeuroPrune
    sparsity: SparsityReport
    degrees: list[LayerDegrees]
    heavy_tail: HeavyTailTest
    heavy_tail_layers: dict[str, HeavyTailTest]
    removed: dict[str, list[int]]
    graph: HeadGraph | None
    importance: HeadImportance
    dense: DenseReference


# --- reading runs ---------------------------------------------------------------------------------
def _read_json(path: Path, default: Any) -> Any:
    if not path.exists():
        return default
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ReportError(
            f"{path} is not valid JSON ({err}); was the run interrupted while writing it?"
        ) from None


def pick_layer(attention: list[AttentionUnit], name: str | None,
               removed: dict[str, list[int]]) -> AttentionUnit | None:
    """`name` exactly, or the one block whose name ends with / contains it; by default the block
    that lost most heads (the first block if none lost any)."""
    if not attention:
        return None
    if name is None:
        return max(attention, key=lambda u: len(removed.get(u.name, [])))
    for test in (lambda n: n == name, lambda n: n.endswith(name), lambda n: name in n):
        hits = [u for u in attention if test(u.name)]
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise ReportError(
                f"--layer {name!r} matches {len(hits)} attention blocks "
                f"({', '.join(u.name for u in hits[:4])}{', ...' if len(hits) > 4 else ''}); "
                "give more of the name."
            )
    raise ReportError(
        f"--layer {name!r} is not an attention block of this model; its blocks are: "
        f"{', '.join(u.name for u in attention)}."
    )


def model_name(run_config: dict[str, Any]) -> str | None:
    """The starting model a run names (`--model` of `neuroprune train`), if any."""
    return next((str(run_config[k]) for k in MODEL_KEYS if run_config.get(k)), None)


def _starting_model_path(name: str) -> str:
    """The folder or hub id `neuroprune train` loaded for `--model name` (aliases such as `minilm`
    name packaged models)."""
    from .runs import resolve_model_path  # imports the training stack: only when needed

    return resolve_model_path(name)


def dense_reference(run_config: dict[str, Any], config: NeuroPruneConfig, mlp_names: list[str],
                    cache: dict[str, DenseReference]) -> DenseReference:
    """Neuron degrees of the starting model named in run_config.json, matched to the run's MLP
    blocks by name suffix (the run may wrap the base model, e.g. `bert.encoder...`)."""
    name = model_name(run_config)
    if name is None:
        return DenseReference("dense reference: ideal spike at 1.0 (run_config.json names no model)", None)
    if name in cache:
        return cache[name]
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model = AutoModel.from_pretrained(_starting_model_path(name), local_files_only=True)
        start = NeuroPrune(model, dataclasses.replace(config, prune_heads=False))
    except (OSError, ValueError, KeyError, NeuroPruneError) as err:
        reason = ("it is not a folder, a model package or in the local Hugging Face cache"
                  if isinstance(err, OSError) else str(err).splitlines()[0][:160])
        ref = DenseReference(f"dense reference: ideal spike at 1.0 (starting model {name!r} not "
                             f"loadable here: {reason})", None)
    else:
        by_name = {layer.name: layer for layer in mlp_degrees(start.mlps, config.eps)}
        matched = []
        for run_name in mlp_names:
            hit = [d for n, d in by_name.items()
                   if n == run_name or run_name.endswith(f".{n}") or n.endswith(f".{run_name}")]
            if len(hit) == 1:
                matched.append(dataclasses.replace(hit[0], name=run_name))
        ref = (DenseReference(f"dense reference: starting model {name}", matched) if matched else
               DenseReference(f"dense reference: ideal spike at 1.0 (starting model {name!r} has no "
                              "MLP blocks matching the run's)", None))
    finally:
        hf_logging.set_verbosity(verbosity)
    cache[name] = ref
    return ref


def analyse_run(path: str | Path, name: str, layer: str | None,
                cache: dict[str, DenseReference]) -> RunAnalysis:
    path = Path(path)
    if not path.is_dir():
        raise ReportError(
            f"run directory {path} does not exist; pass the --output-dir of a `neuroprune train` run."
        )
    if not (path / "model").is_dir():
        raise ReportError(
            f"{path} has no model/ folder, so it is not a finished run directory (the final model is "
            "written to RUN_DIR/model when training ends)."
        )
    run_config = _read_json(path / "run_config.json", {})
    metrics = _read_json(path / "metrics.json", [])
    pruner = from_pretrained(path / "model")
    cfg = pruner.config
    degrees = mlp_degrees(pruner.mlps, cfg.eps)
    removed = removed_heads(pruner.attention)
    unit = pick_layer(pruner.attention, layer, removed)
    return RunAnalysis(
        name=name,
        path=path,
        run_config=run_config,
        metrics=metrics if isinstance(metrics, list) else [metrics],
        pruner=pruner,
        sparsity=pruner.sparsity_report(),
        degrees=degrees,
        heavy_tail=heavy_tail_test(np.concatenate([d.counts for d in degrees]) if degrees else np.zeros(0),
                                   max((d.row_length for d in degrees), default=None)),
        heavy_tail_layers={
            d.name: heavy_tail_test(d.counts, d.row_length)
            for d in tqdm(degrees, desc=f"heavy-tail fits of {name}", unit="layer", leave=False)
        },
        removed=removed,
        graph=layer_graph(pruner.history, unit, cfg.theta) if unit is not None else None,
        importance=head_importance(pruner.history, pruner.attention),
        dense=dense_reference(run_config, cfg, [d.name for d in degrees], cache),
    )


def run_names(paths: list[Path]) -> list[str]:
    """Folder names, made longer (parent/name) where two runs share one."""
    names = [p.resolve().name for p in paths]
    return [
        f"{p.resolve().parent.name}/{n}" if names.count(n) > 1 else n for p, n in zip(paths, names)
    ]


# --- statistics -----------------------------------------------------------------------------------
def run_stats(run: RunAnalysis) -> dict[str, Any]:
    """Every number the report shows for one run, JSON-ready."""
    final = run.metrics[-1] if run.metrics else {}
    heads = {u.name: u.original_heads for u in run.pruner.attention}
    return {
        "name": run.name,
        "path": str(run.path),
        "model": model_name(run.run_config),
        "neuroprune_config": run.pruner.config.to_dict(),
        "final_metrics": final,
        "sparsity": run.sparsity.to_dict(),
        "neuron_degree": {
            "eps": run.pruner.config.eps,
            "pooled": dataclasses.asdict(pooled_stats(run.degrees)) if run.degrees else None,
            "layers": {d.name: dataclasses.asdict(d.stats) for d in run.degrees},
        },
        "heavy_tail": {
            "pooled": run.heavy_tail.to_dict(),
            "layers": {n: t.to_dict() for n, t in run.heavy_tail_layers.items()},
        },
        "heads": {
            "total": sum(heads.values()),
            "kept": sum(u.num_heads for u in run.pruner.attention),
            "per_block": heads,
            "removed": run.removed,
            "removed_per_index": removed_per_index(run.removed, max(heads.values(), default=0)),
            "pruning_passes": run.pruner.passes,
        },
        "similarity_graph": run.graph.to_dict() if run.graph is not None else None,
        "head_importance": run.importance.to_dict(),
        "dense_reference": {
            "label": run.dense.label,
            "pooled_sd_percent": run.dense.sd_percent,
            "layers_sd_percent": {d.name: d.stats.sd_percent for d in run.dense.layers or []},
        },
    }


# --- figures ----------------------------------------------------------------------------------------
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


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "run"


def _figures(runs: list[RunAnalysis]) -> list[tuple[str, str, str, str, Any]]:
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
        prefix = f"{_slug(run.name)}_" if multi else ""
        heads = {u.name: u.original_heads for u in run.pruner.attention}
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
        layers: dict[str, list[AttentionUnit]] = {m.name: [] for m in run.pruner.mlps}
        alone = []
        for unit in run.pruner.attention:
            mlp = _same_layer(unit.name, run.pruner.mlps)
            (layers[mlp.name] if mlp is not None else alone).append(unit)
        mlps = {m.name: m for m in run.pruner.mlps}
        labels = dict(zip(layers, plots.short_names(list(layers))))
        for mlp_name, units in layers.items():
            specs.append((f"Sparsity patterns: {run.name}", f"Layer {labels[mlp_name]}", (
                "Black = non-zero weight, white = exactly zero, red = removed head. [Q, K, V] and "
                "L_in: one row per input dimension, so an input dimension cut off by the group "
                "penalty is a white row; L_in and L_out (transposed): one column per neuron, so a "
                "dead neuron is a white column in both (paper Fig. 1)."),
                f"{prefix}pattern_{_slug(labels[mlp_name])}.png",
                lambda units=units, m=mlps[mlp_name], t=labels[mlp_name]:
                    plots.sparsity_pattern(t, units, m)))
        for unit in alone:
            specs.append((f"Sparsity patterns: {run.name}", unit.name, "Black = non-zero, white = zero.",
                          f"{prefix}pattern_{_slug(unit.name)}.png",
                          lambda unit=unit: plots.sparsity_pattern(unit.name, [unit], None)))
    return specs


def render_figures(runs: list[RunAnalysis]) -> list[FigureEntry]:
    entries = []
    for section, title, caption, file, draw in tqdm(_figures(runs), desc="figures", unit="fig"):
        fig = draw()
        entries.append(FigureEntry(section, title, caption, file, _png(fig)))
        fig.clear()
    return entries


# --- HTML -----------------------------------------------------------------------------------------
CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;
max-width:1250px;padding:0 1em;color:#1a202c;line-height:1.45}
h1{margin-bottom:.2em} h2{border-bottom:2px solid #e2e8f0;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:1em 0;font-size:.9em} th,td{border:1px solid #cbd5e0;
padding:.3em .6em;text-align:left} th{background:#edf2f7} td.n{text-align:right;white-space:nowrap}
figure{margin:1.5em 0} figure img{max-width:100%;border:1px solid #e2e8f0}
figcaption{font-size:.9em;color:#4a5568;margin-top:.4em} .note{color:#4a5568;font-size:.9em}
.wide{overflow-x:auto} code{background:#edf2f7;padding:0 .25em;border-radius:3px}
summary{cursor:pointer;font-weight:600}
"""


def _e(value: Any) -> str:
    return html.escape(str(value))


NUMBER = re.compile(r"^[-+]?[\d.]+(e[-+]?\d+)?%?(/\d+)?$")


def _table(head: list[str], rows: list[list[Any]]) -> str:
    """Numbers right-aligned, text left-aligned."""
    out = ["<table><tr>", *(f"<th>{_e(h)}</th>" for h in head), "</tr>"]
    for row in rows:
        out.append("<tr>")
        out += [f"<td class='n'>{_e(c)}</td>" if NUMBER.match(str(c)) else f"<td>{_e(c)}</td>" for c in row]
        out.append("</tr>")
    out.append("</table>")
    return "".join(out)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def _summary(runs: list[RunAnalysis], stats: list[dict[str, Any]]) -> str:
    metric_keys = sorted({
        k for s in stats for k in s["final_metrics"]
        if k.startswith("eval_") and not k.endswith(("_runtime", "_per_second"))
    })
    head = ["run", "model", "sparsity", "whole model", "heads kept", "alpha", "beta", "theta",
            "neuron degree sd (%)", "dead neurons", *metric_keys]
    rows = []
    for run, s in zip(runs, stats):
        cfg = run.pruner.config
        deg = s["neuron_degree"]["pooled"] or {}
        rows.append([
            run.name, s["model"] or "", f"{run.sparsity.sparsity:.2%}", f"{run.sparsity.model_sparsity:.2%}",
            f"{run.sparsity.heads_kept}/{run.sparsity.heads_total}", cfg.alpha, cfg.beta, cfg.theta,
            f"{deg.get('sd_percent', 0):.2f}", deg.get("dead", ""),
            *(_fmt(s["final_metrics"].get(k)) for k in metric_keys),
        ])
    return _table(head, rows)


def _heavy_tail_table(runs: list[RunAnalysis], per_layer: bool) -> str:
    head = ["run", "layer", "neurons", "alpha", "xmin", "tail n", "R vs exponential", "p",
            "favoured", "R vs log-normal", "p", "favoured"]
    rows = []
    for run in runs:
        tests = list(run.heavy_tail_layers.items()) if per_layer else [("all MLP neurons", run.heavy_tail)]
        for layer, test in tests:
            fitted = [f"{test.alpha:.2f}", f"{test.xmin:g}", test.n_tail] if test.alpha else ["", "", ""]
            if not test.testable:
                rows.append([run.name, layer, test.n, *fitted, f"not testable: {test.reason}", *[""] * 5])
                continue
            cells = []
            for c in test.comparisons:
                cells += [f"{c.loglikelihood_ratio:.2f}", f"{c.p_value:.3g}", c.favoured]
            rows.append([run.name, layer, test.n, *fitted, *cells])
    return _table(head, rows)


def _layer_table(run: RunAnalysis) -> str:
    head = ["block", "kind", "sparsity", "heads kept", "neuron degree mean", "sd (%)", "dead neurons",
            "dense sd (%)"]
    dense = {d.name: d.stats.sd_percent for d in run.dense.layers or []}
    rows = []
    for layer in run.sparsity.layers:
        deg = layer.degree
        rows.append([
            layer.name, layer.kind, f"{layer.sparsity:.2%}",
            f"{layer.heads_kept}/{layer.heads_total}" if layer.heads_total else "",
            f"{deg.mean:.3f}" if deg else "", f"{deg.sd_percent:.2f}" if deg else "",
            deg.dead if deg else "", f"{dense[layer.name]:.2f}" if deg and layer.name in dense else "",
        ])
    return _table(head, rows)


def render_html(runs: list[RunAnalysis], stats: list[dict[str, Any]], figures: list[FigureEntry]) -> str:
    title = "NeuroPrune topology report: " + ", ".join(r.name for r in runs)
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{_e(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        f"<p class='note'>neuroprune {_e(__version__)}. Neuron degree = share of a neuron's inputs "
        f"with |w| &ge; eps (eps = {_e(runs[0].pruner.config.eps)}). Sparsity = share of exact zeros "
        "in the regularised matrices of all blocks, against their dense shapes. Every number here "
        "is in <code>stats.json</code> beside this page; every figure is also a PNG file.</p>",
        "<h2 id='summary'>Summary</h2>", f"<div class='wide'>{_summary(runs, stats)}</div>",
        "<p class='note'>", "<br>".join(f"{_e(r.name)}: {_e(r.dense.label)}" for r in runs), "</p>",
        "<h2 id='heavy-tail'>Is neuron connectivity heavy tailed?</h2>",
        "<p class='note'>Discrete power law fitted to the integer neuron degrees (connected inputs) "
        "above xmin (chosen by minimising the Kolmogorov-Smirnov distance), compared by Vuong's "
        "log-likelihood ratio R with exponential and log-normal fits over the same tail "
        "(Clauset, Shalizi &amp; Newman 2009, via the <code>powerlaw</code> package). R &gt; 0 "
        "favours the power law; a side is called only when p &lt; 0.1. Degrees are bounded by the "
        "row length, so a tail can be heavy without being a pure power law.</p>",
        _heavy_tail_table(runs, per_layer=False),
        "<details><summary>per layer</summary>", _heavy_tail_table(runs, per_layer=True), "</details>",
    ]
    section = None
    for fig in figures:
        if fig.section != section:
            if section is not None and section.startswith("Sparsity patterns"):
                parts.append("</details>")
            section = fig.section
            parts.append(f"<h2 id='{_slug(section)}'>{_e(section)}</h2>")
            if section.startswith("Sparsity patterns"):
                state = " open" if len(runs) == 1 else ""  # several runs: a long page, folded
                parts.append(f"<details{state}><summary>one figure per layer (click)</summary>")
        data = base64.b64encode(fig.png).decode("ascii")
        parts.append(
            f"<figure><img alt='{_e(fig.title)}' src='data:image/png;base64,{data}'>"
            f"<figcaption><b>{_e(fig.title)}.</b> {_e(fig.caption)} "
            f"(<code>{_e(fig.file)}</code>)</figcaption></figure>"
        )
    if section is not None and section.startswith("Sparsity patterns"):
        parts.append("</details>")
    for run in runs:
        parts += [f"<h2 id='layers-{_slug(run.name)}'>Per-block statistics: {_e(run.name)}</h2>",
                  _layer_table(run)]
    parts.append("</body></html>")
    return "".join(parts)


# --- writing ----------------------------------------------------------------------------------------
def _write(path: Path, data: bytes) -> None:
    """Write via a temporary file and rename, so no reader ever sees half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; a report is meant to be shared
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def build_report(run_dirs: list[str | Path], output: str | Path | None = None,
                 layer: str | None = None) -> Path:
    """Analyse the runs and write report.html, the PNGs and stats.json to `output` (default:
    RUN_DIR/report for one run, ./neuroprune-report for several). Returns the HTML path."""
    if not run_dirs:
        raise ReportError("give at least one run directory.")
    paths = [Path(p) for p in run_dirs]
    out = Path(output) if output is not None else (
        paths[0] / "report" if len(paths) == 1 else Path("neuroprune-report"))
    if out.exists() and not out.is_dir():
        raise ReportError(f"--output {out} exists and is not a folder.")
    cache: dict[str, DenseReference] = {}
    runs = [
        analyse_run(p, n, layer, cache)
        for p, n in tqdm(list(zip(paths, run_names(paths))), desc="analysing runs", unit="run")
    ]
    stats = [run_stats(r) for r in runs]
    figures = render_figures(runs)
    out.mkdir(parents=True, exist_ok=True)
    for fig in figures:
        _write(out / fig.file, fig.png)
    payload = {"neuroprune_version": __version__, "runs": stats,
               "figures": {f.file: f.title for f in figures}}
    _write(out / "stats.json", json.dumps(_plain(payload), indent=1, allow_nan=False).encode())
    page = out / "report.html"
    _write(page, render_html(runs, stats, figures).encode())
    return page


def _plain(value: Any) -> Any:
    """JSON-ready copy: numpy scalars and arrays as Python values, NaN and infinities as null
    (strict JSON has no NaN; a p-value a fit could not compute is missing, not a number)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value
