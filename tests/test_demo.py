"""`neuroprune demo`'s settings: the flags reach the two runs (the demo itself takes minutes and
is not run here; docs/training.md has its numbers)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from neuroprune.cli import demo as demo_cli
from neuroprune.errors import NeuroPruneError
from neuroprune.training.demo import TRAINING, DemoSettings, settings_for


def parse(*flags: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    demo_cli.register(parser.add_subparsers())
    return parser.parse_args(["demo", *flags])


def test_flags_reach_the_training_settings_of_both_runs(monkeypatch, tmp_path: Path) -> None:
    seen = []
    monkeypatch.setattr("neuroprune.training.demo.run_demo", seen.append)
    args = parse("--epochs", "1", "--alpha", "0.01", "--train-size", "10", "--seed", "3",
                 "--output-dir", str(tmp_path))
    assert "training" not in vars(args)  # the dict is not a flag; its keys are
    assert args.func(args) == 0
    (d,) = seen
    assert d.train_size == 10 and d.seed == 3 and d.training == {**TRAINING, "epochs": 1.0, "alpha": 0.01}
    paths = {split: tmp_path / f"{split}.jsonl" for split in ("train", "validation", "test")}
    for method in ("dense", "neuroprune"):
        s = settings_for(d, method, paths)
        assert (s.method, s.epochs, s.alpha, s.theta, s.seed) == (method, 1.0, 0.01, TRAINING["theta"], 3)
        assert (s.train_file, s.test_file) == (str(paths["train"]), str(paths["test"]))
        assert s.output_dir == str(tmp_path / method)


def test_a_training_value_that_is_no_train_setting_is_refused() -> None:
    with pytest.raises(NeuroPruneError, match=r"\['alfa'\] are not TrainSettings fields"):
        DemoSettings(training={"alfa": 1.0})
