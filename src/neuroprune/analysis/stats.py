"""The statistics of a topology report: every number it shows for a run, JSON-ready (stats.json)."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from neuroprune.analysis.runs import RunAnalysis, model_name
from neuroprune.analysis.topology import pooled_stats, removed_per_index


def run_stats(run: RunAnalysis) -> dict[str, Any]:
    """Every number the report shows for one run, JSON-ready."""
    final = run.metrics[-1] if run.metrics else {}
    heads = {u.name: u.original_heads for u in run.index.attention}
    return {
        "name": run.name,
        "path": str(run.path),
        "model": model_name(run.run_config),
        "neuroprune_config": run.config.to_dict(),
        "final_metrics": final,
        "sparsity": run.sparsity.to_dict(),
        "neuron_degree": {
            "eps": run.config.eps,
            "pooled": dataclasses.asdict(pooled_stats(run.degrees)) if run.degrees else None,
            "layers": {d.name: dataclasses.asdict(d.stats) for d in run.degrees},
        },
        "heavy_tail": {
            "pooled": run.heavy_tail.to_dict(),
            "layers": {n: t.to_dict() for n, t in run.heavy_tail_layers.items()},
        },
        "heads": {
            "total": sum(heads.values()),
            "kept": sum(u.num_heads for u in run.index.attention),
            "per_block": heads,
            "removed": run.removed,
            "removed_per_index": removed_per_index(run.removed, max(heads.values(), default=0)),
            "pruning_passes": run.index.passes,
        },
        "similarity_graph": run.graph.to_dict() if run.graph is not None else None,
        "head_importance": run.importance.to_dict(),
        "dense_reference": {
            "label": run.dense.label,
            "pooled_sd_percent": run.dense.sd_percent,
            "layers_sd_percent": {d.name: d.stats.sd_percent for d in run.dense.layers or []},
        },
    }


def plain(value: Any) -> Any:
    """JSON-ready copy: numpy scalars and arrays as Python values, NaN and infinities as null
    (strict JSON has no NaN; a p-value a fit could not compute is missing, not a number)."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [plain(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value
