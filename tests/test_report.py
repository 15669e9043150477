"""`neuroprune report` on a tiny run directory written per the run-directory contract."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import numpy as np
import powerlaw
import pytest
import torch
from safetensors.torch import load_file

from neuroprune import NeuroPrune, NeuroPruneConfig
from neuroprune.analysis.report import build_report
from neuroprune.analysis.runs import analyse_run
from neuroprune.cli import main
from neuroprune.errors import ReportError

from tiny import duplicate_group, tiny_model


def hand_degree_counts(model_dir: Path, eps: float = 1e-4) -> tuple[np.ndarray, int]:
    """Per MLP neuron of a saved tiny BERT, how many entries of its up row are >= eps in
    magnitude (BERT's MLP is not gated: the up row is the neuron's whole fan-in), read from the
    safetensors file without neuroprune; and the row length."""
    weights = load_file(model_dir / "model.safetensors")
    ups = [w for k, w in sorted(weights.items()) if k.endswith("intermediate.dense.weight")]
    assert len(ups) == 2
    counts = np.concatenate([(w.abs() >= eps).sum(1).numpy() for w in ups])
    return counts, ups[0].shape[1]


def make_run(root: Path, seed: int = 0, keep: float = 0.5, start_model: bool = True) -> Path:
    """A finished run of a tiny BERT: MLP rows thinned to heavy-tailed degrees, some attention
    input dimensions cut off, duplicated heads removed by a pruning pass, then finalised."""
    run = root / f"run{seed}"
    model = tiny_model("bert", seed=seed)
    config = {"model": "tiny-bert-not-on-disk"}
    if start_model:
        model.save_pretrained(root / f"start{seed}")
        config = {"model": str(root / f"start{seed}")}
    pruner = NeuroPrune(model, NeuroPruneConfig())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for unit in pruner.index.mlps:
            w = unit.expand_matrices()[0]
            share = (torch.rand(w.shape[0], generator=g) ** 3) * keep * 2  # most neurons sparse
            w.mul_((torch.rand(w.shape, generator=g) < share[:, None]).float())
            w[:3] = 0.0  # three dead neurons
        for unit in pruner.index.attention:
            for m in unit.qkv_matrices():
                m[:, :4] = 0.0  # input dimensions 0..3 cut off from attention
        duplicate_group(model, pruner.index.attention[0], 0, 1)
        duplicate_group(model, pruner.index.attention[0], 0, 2)
        duplicate_group(model, pruner.index.attention[1], 3, 2)
    removed = pruner.prune_redundant_heads(theta=1e-6)  # only exact copies
    assert removed, "the duplicated heads must be removed"
    pruner.finalize()
    report = pruner.sparsity_report()
    run.mkdir(parents=True)
    pruner.save_pretrained(run / "model")
    (run / "run_config.json").write_text(json.dumps({**config, "alpha": 1e-4, "seed": seed}))
    (run / "versions.json").write_text(json.dumps({"torch": torch.__version__}))
    (run / "sparsity.json").write_text(json.dumps(report.to_dict()))
    (run / "metrics.json").write_text(json.dumps([
        {"epoch": 1, "step": 10, "eval_accuracy": 0.5 + seed / 10, "sparsity": report.sparsity,
         "heads_kept": report.heads_kept, "heads_total": report.heads_total},
    ]))
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("runs")
    return make_run(root, 0), make_run(root, 1, keep=0.2, start_model=False)


def test_report_command_on_one_run(runs: tuple[Path, Path], tmp_path: Path, capsys) -> None:
    out = tmp_path / "rep"
    assert main(["report", str(runs[0]), "--output", str(out)]) == 0
    assert "report.html" in capsys.readouterr().out
    page = (out / "report.html").read_text()
    stats = json.loads((out / "stats.json").read_text())
    pngs = sorted(p.name for p in out.glob("*.png"))
    for name in ("degree_histogram.png", "degree_ccdf.png", "sd_per_layer.png", "sd_vs_sparsity.png",
                 "head_importance.png", "heads_removed.png", "similarity_graph.png"):
        assert name in pngs
    assert len([p for p in pngs if p.startswith("pattern_")]) == 2  # one per layer
    assert page.count("data:image/png;base64,") == len(pngs)
    run = stats["runs"][0]
    # heads 0, 1, 2 of block 0 are copies: ties go to the later head, so 2 absorbs 0 and 1
    assert run["heads"]["removed"] == {"encoder.layer.0.attention": [0, 1], "encoder.layer.1.attention": [2]}
    assert run["heads"]["removed_per_index"] == [1, 1, 1, 0]
    graph = run["similarity_graph"]
    assert graph["layer"] == "encoder.layer.0.attention"  # the block that lost most heads
    assert sorted(graph["dominating"]) == [2, 3] and graph["is_dominating_set"]
    assert graph["theta"] == 1e-6  # the pass's own theta, from the history
    assert {tuple(e) for e in graph["edges"]} == {(0, 1), (0, 2), (1, 2)}
    assert len(run["head_importance"]["removed"]["values"]) == 3
    assert run["heavy_tail"]["pooled"]["testable"]
    # the fits redone here from the saved weights: the report must test these degrees (every MLP's
    # up rows, |w| >= eps, row length as the bound), and report R and p of each alternative as is
    counts, length = hand_degree_counts(runs[0] / "model")
    alternatives = ("exponential", "lognormal")
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        fit = powerlaw.Fit(counts[counts > 0], discrete=True, xmax=length, verbose=False,
                           parameter_ranges={"alpha": (1.0, 20.0)})
        expected = [float(v) for alt in alternatives for v in fit.distribution_compare("power_law", alt)]
    comparisons = run["heavy_tail"]["pooled"]["comparisons"]
    assert [c["alternative"] for c in comparisons] == list(alternatives)
    reported = [c[k] for c in comparisons for k in ("loglikelihood_ratio", "p_value")]
    assert reported == pytest.approx(expected, rel=1e-9)
    assert run["heavy_tail"]["pooled"]["xmin"] == fit.xmin
    # the starting model was on disk, so the dense reference is its (fully connected) degrees
    assert run["dense_reference"]["label"].startswith("dense reference: starting model")
    assert run["dense_reference"]["pooled_sd_percent"] < 1.0
    assert run["neuron_degree"]["pooled"]["dead"] >= 6
    sparsity = json.loads((runs[0] / "sparsity.json").read_text())
    assert run["sparsity"]["sparsity"] == pytest.approx(sparsity["sparsity"])


@pytest.fixture(scope="module")
def compared(runs: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The report comparing both runs (built once: drawing is the slow part)."""
    return build_report(list(runs), tmp_path_factory.mktemp("cmp")).parent


def test_html_references_only_embedded_images(compared: Path) -> None:
    page = (compared / "report.html").read_text()
    refs = re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)["']""", page, flags=re.I)
    assert refs, "the page must have images"
    for ref in refs:
        assert ref.startswith("data:image/png;base64,") or ref.startswith("#"), ref[:80]
    assert not re.search(r"https?://|file:|<script|<link|@import|url\(", page, flags=re.I)


def test_several_runs_compared(compared: Path) -> None:
    out = compared
    stats = json.loads((out / "stats.json").read_text())
    assert [r["name"] for r in stats["runs"]] == ["run0", "run1"]
    assert stats["runs"][1]["dense_reference"]["label"].startswith("dense reference: ideal spike at 1.0")
    sds = [r["neuron_degree"]["pooled"]["sd_percent"] for r in stats["runs"]]
    # population SD (in %) of every neuron's fraction of surviving fan-in, from the saved weights
    by_hand = []
    for run in ("run0", "run1"):
        counts, length = hand_degree_counts(Path(stats["runs"][int(run[-1])]["path"]) / "model")
        by_hand.append(float(np.std(counts / length)) * 100)
    assert sds == pytest.approx(by_hand, rel=1e-9)
    assert sds[1] != pytest.approx(sds[0], rel=1e-3)  # the runs differ (keep 0.5 vs 0.2)
    assert (out / "run0_heads_removed.png").exists() and (out / "run1_heads_removed.png").exists()
    assert not list(out.glob(".*tmp*"))  # no temporary files left behind


def test_layer_option_and_errors(runs: tuple[Path, Path], tmp_path: Path, capsys) -> None:
    out = tmp_path / "one"
    graph = analyse_run(runs[0], "run0", "layer.1.", {}).graph
    assert graph.layer == "encoder.layer.1.attention" and graph.dominating == [0, 1, 3]
    with pytest.raises(ReportError, match="matches 2 attention blocks"):
        build_report([runs[0]], out, layer="attention")
    assert main(["report", str(runs[0]), "--layer", "nope", "-o", str(out)]) == 2
    assert "is not an attention block" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "no model/ folder" in capsys.readouterr().err
    assert not out.exists()  # nothing written for a failed report


def test_every_figure_is_labelled(runs: tuple[Path, Path]) -> None:
    from neuroprune.analysis.figures import figure_specs

    analysed = [analyse_run(p, p.name, None, {}) for p in runs]
    for _section, title, caption, _file, draw in figure_specs(analysed):
        fig = draw()
        assert fig.get_suptitle() or any(ax.get_title() for ax in fig.axes), title
        for ax in fig.axes:
            if ax.axison:  # the graph drawing has no axes to label
                assert ax.get_xlabel() and ax.get_ylabel(), (title, ax.get_title())
        assert caption
