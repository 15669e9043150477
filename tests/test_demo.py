"""`neuroprune demo`: the flags reach the two runs, bad settings are refused, and the whole demo
(train dense and NeuroPrune to a FLOP target, compact, time both) runs end to end on a tiny random
model with the real Rotten Tomatoes snippets. The full-size demo takes minutes and is not run
here; docs/training.md has its numbers."""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import pytest

import textdata
from neuroprune import load
from neuroprune.cli import demo as demo_cli
from neuroprune.compaction import flop_count
from neuroprune.errors import NeuroPruneError
from neuroprune.model.index import ModelIndex
from neuroprune.training.demo import TRAINING, DemoSettings, run_demo, settings_for


def parse(*flags: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    demo_cli.register(parser.add_subparsers())
    return parser.parse_args(["demo", *flags])


def test_flags_reach_the_training_settings_of_both_runs(monkeypatch, tmp_path: Path) -> None:
    seen = []
    monkeypatch.setattr("neuroprune.training.demo.run_demo", seen.append)
    args = parse("--epochs", "1", "--alpha", "0.01", "--train-size", "10", "--seed", "3",
                 "--target-flops", "0.4", "--latency-repeats", "7", "--output-dir", str(tmp_path))
    assert "training" not in vars(args)  # the dict is not a flag; its keys are
    assert args.func(args) == 0
    (d,) = seen
    assert d.train_size == 10 and d.seed == 3 and d.training == {**TRAINING, "epochs": 1.0, "alpha": 0.01}
    assert d.target_flops == 0.4 and d.latency_repeats == 7 and d.model == "minilm"
    paths = {split: tmp_path / f"{split}.jsonl" for split in ("train", "validation", "test")}
    for method, target in (("dense", None), ("neuroprune", 0.4)):
        s = settings_for(d, method, paths)
        assert (s.method, s.epochs, s.alpha, s.theta, s.seed) == (method, 1.0, 0.01, TRAINING["theta"], 3)
        assert s.target_flops == target  # only the NeuroPrune run is steered
        assert (s.train_file, s.test_file) == (str(paths["train"]), str(paths["test"]))
        assert s.output_dir == str(tmp_path / method)


@pytest.mark.parametrize("kwargs, message", [
    (dict(training={"alfa": 1.0}), r"\['alfa'\] are not TrainSettings fields"),
    (dict(training={"target_flops": 0.5}), r"as DemoSettings fields"),
    (dict(target_flops=50), r"target_flops=50 is out of range"),
    (dict(target_flops=0.0), r"out of range"),
    (dict(latency_repeats=0), r"must be at least 1"),
])
def test_bad_demo_settings_are_refused(kwargs, message) -> None:
    with pytest.raises(NeuroPruneError, match=message):
        DemoSettings(**kwargs)


def test_the_demo_compacts_times_and_reports_on_a_tiny_model(tmp_path: Path, capsys) -> None:
    model = textdata.model_folder(tmp_path / "tiny", "bert")
    d = DemoSettings(output_dir=str(tmp_path / "demo"), train_size=48, validation_size=8, test_size=16,
                     target_flops=0.5, latency_batch=4, latency_repeats=5, model=str(model),
                     training={"max_length": 16, "epochs": 2.0, "batch_size": 4, "learning_rate": 1e-3,
                               "alpha": 1e-3, "beta": 1e-3, "theta": 0.43})
    summary = run_demo(d)
    saved = json.loads((tmp_path / "demo" / "demo.json").read_text())
    assert saved["settings"]["target_flops"] == 0.5 and saved["settings"]["training"] == d.training
    dense, pruned = saved["results"]["dense"], saved["results"]["neuroprune"]

    # the compacted model is saved where neuroprune.load reads it, and it is really smaller
    compacted = load(tmp_path / "demo" / "neuroprune" / "compact")
    assert pruned["compact_dir"] == str(tmp_path / "demo" / "neuroprune" / "compact")
    assert sum(p.numel() for p in compacted.parameters()) == pruned["params"] == pruned["params_compacted"]
    assert pruned["params"] < dense["params"] == pruned["params_dense"]
    shipped = ModelIndex.from_pretrained(tmp_path / "demo" / "neuroprune" / "compact")
    assert sum(u.num_heads for u in shipped.attention) == pruned["heads_kept"] == pruned["heads_compacted"]

    # its FLOP fraction is what flop_count plans for the trained model, and what the run steered
    planned = flop_count(ModelIndex.from_pretrained(tmp_path / "demo" / "neuroprune" / "model"))
    assert pruned["flops_fraction"] == pytest.approx(planned.fraction, abs=1e-9)
    steered = json.loads((tmp_path / "demo" / "neuroprune" / "sparsity.json").read_text())["flops_fraction"]
    assert pruned["flops_fraction"] == pytest.approx(steered, abs=1e-9)
    assert abs(pruned["flops_fraction"] - 0.5) <= 0.02 and dense["flops_fraction"] == 1.0
    assert dense["heads_kept"] == dense["heads_total"] and dense["sparsity"] == 0.0

    # the speed-up is the ratio of the medians of the measured, interleaved timings
    speed = saved["latency"]
    times = speed["times_s"]
    assert len(times["dense"]) == len(times["compacted"]) == 5 and speed["batch_shape"] == [4, 16]
    medians = {k: statistics.median(v) for k, v in times.items()}
    assert speed["median_s"] == pytest.approx(medians)
    assert speed["speedup"] == pytest.approx(medians["dense"] / medians["compacted"])
    rounds = [a / b for a, b in zip(times["dense"], times["compacted"])]
    assert speed["speedup_rounds_median"] == pytest.approx(statistics.median(rounds))
    assert summary["latency"]["speedup"] == speed["speedup"]

    out = capsys.readouterr().out
    assert "NeuroPrune, compacted" in out and f"{speed['speedup']:.2f}x faster" in out
    assert f"{pruned['params'] / 1e6:.2f}M" in out and "neuroprune/compact" in out
