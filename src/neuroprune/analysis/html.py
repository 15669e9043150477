"""The page of a topology report: one self-contained HTML file (style inline, figures embedded as
base64 data URIs, so it opens offline), with the summary and per-block tables."""

from __future__ import annotations

import base64
import html
import re
from typing import Any

from neuroprune.analysis.figures import FigureEntry, slug
from neuroprune.analysis.runs import RunAnalysis
from neuroprune.version import __version__

# the page's whole style sheet, inlined so that the page is one file
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
        cfg = run.config
        deg = s["neuron_degree"]["pooled"] or {}
        rows.append([
            run.name, s["model"] or "", f"{run.sparsity.sparsity:.2%}", f"{run.sparsity.model_sparsity:.2%}",
            f"{run.sparsity.heads_kept}/{run.sparsity.heads_total}",
            *(getattr(cfg, k, "") for k in ("alpha", "beta", "theta")),  # what the run's method has
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
        f"with |w| &ge; eps (eps = {_e(runs[0].config.eps)}). Sparsity = share of exact zeros "
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
            parts.append(f"<h2 id='{slug(section)}'>{_e(section)}</h2>")
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
        parts += [f"<h2 id='layers-{slug(run.name)}'>Per-block statistics: {_e(run.name)}</h2>",
                  _layer_table(run)]
    parts.append("</body></html>")
    return "".join(parts)
