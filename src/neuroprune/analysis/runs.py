"""Reading the runs a topology report is about: each run folder's final model, settings and
metrics, analysed (neuron degrees, heavy-tail tests, heads removed, head-similarity graph), beside
the dense model it started from.

A run directory is the one `neuroprune train` writes (`neuroprune.run_folder`): the final model in
`model/` (its `neuroprune.json` holds the head-pruning history), plus `run_config.json`,
`metrics.json` and `sparsity.json`. Only `model/` is required."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from neuroprune.analysis.topology import (
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
)
from neuroprune.config import MethodConfig, NeuroPruneConfig
from neuroprune.errors import NeuroPruneError, ReportError
from neuroprune.methods.registry import saved_config
from neuroprune.model.checkpoint import read_meta
from neuroprune.model.index import ModelIndex
from neuroprune.model.packaged import resolve_model_path
from neuroprune.model.sparsity import SparsityReport
from neuroprune.model.units import AttentionUnit
from neuroprune.run_folder import RunDir

MODEL_KEYS = ("model", "model_name_or_path", "model_name", "base_model")  # run_config.json keys


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
    index: ModelIndex
    config: MethodConfig  # the config the run was trained with (its method's class: eps, theta, ...)
    sparsity: SparsityReport
    degrees: list[LayerDegrees]
    heavy_tail: HeavyTailTest
    heavy_tail_layers: dict[str, HeavyTailTest]
    removed: dict[str, list[int]]
    graph: HeadGraph | None
    importance: HeadImportance
    dense: DenseReference


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


def dense_reference(run_config: dict[str, Any], config: MethodConfig, mlp_names: list[str],
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
        model = AutoModel.from_pretrained(resolve_model_path(name), local_files_only=True)
        start = ModelIndex(model, config)
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
    run_dir = RunDir(path)
    path = run_dir.path
    if not path.is_dir():
        raise ReportError(
            f"run directory {path} does not exist; pass the --output-dir of a `neuroprune train` run."
        )
    if not run_dir.model.is_dir():
        raise ReportError(
            f"{path} has no model/ folder, so it is not a finished run directory (the final model is "
            "written to RUN_DIR/model when training ends)."
        )
    run_config = run_dir.settings()
    metrics = run_dir.metrics()
    index = ModelIndex.from_pretrained(run_dir.model)
    cfg = saved_config(read_meta(run_dir.model))
    theta = getattr(cfg, "theta", NeuroPruneConfig.theta)  # other methods: similarity at the default
    degrees = mlp_degrees(index.mlps, cfg.eps)
    removed = removed_heads(index.attention)
    unit = pick_layer(index.attention, layer, removed)
    return RunAnalysis(
        name=name,
        path=path,
        run_config=run_config,
        metrics=metrics,
        index=index,
        config=cfg,
        sparsity=index.report(cfg.eps),
        degrees=degrees,
        heavy_tail=heavy_tail_test(np.concatenate([d.counts for d in degrees]) if degrees else np.zeros(0),
                                   max((d.row_length for d in degrees), default=None)),
        heavy_tail_layers={
            d.name: heavy_tail_test(d.counts, d.row_length)
            for d in tqdm(degrees, desc=f"heavy-tail fits of {name}", unit="layer", leave=False)
        },
        removed=removed,
        graph=layer_graph(index.history, unit, theta) if unit is not None else None,
        importance=head_importance(index.history, index.attention),
        dense=dense_reference(run_config, cfg, [d.name for d in degrees], cache),
    )


def run_names(paths: list[Path]) -> list[str]:
    """Folder names, made longer (parent/name) where two runs share one."""
    names = [p.resolve().name for p in paths]
    return [
        f"{p.resolve().parent.name}/{n}" if names.count(n) > 1 else n for p, n in zip(paths, names)
    ]
