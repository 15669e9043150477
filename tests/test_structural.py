"""`--target-flops`: structural selection to a FLOP budget (`neuroprune.methods.structural`) and
NeuroPrune under it. The run lands within 2 points of the target, what it removes compacts, the
survivors are not shrunk, and bad requests are refused with a clear message."""

from __future__ import annotations

import json

import pytest
import torch

import textdata
from neuroprune import cli
from neuroprune.compaction import CompactionRule, compact, flop_count
from neuroprune.config import NeuroPruneConfig
from neuroprune.errors import ConfigError
from neuroprune.methods import build_method, check_method
from neuroprune.methods.steering import SparsityTarget
from neuroprune.methods.structural import Removed, normalise, select_to_budget
from neuroprune.methods.structured import magnitude_scores
from neuroprune.model.flops import current_flops
from neuroprune.model.index import ModelIndex
from neuroprune.training.settings import TrainSettings
from neuroprune.training.train import train_run

from tiny import tiny_model, train_with_hooks


@pytest.mark.parametrize("family", ["bert", "llama", "gpt2"])
@pytest.mark.parametrize("flops", [0.7, 0.45])
def test_plain_loop_lands_within_two_points_and_compacts_to_it(family, flops):
    torch.manual_seed(0)
    model = tiny_model(family)
    target = SparsityTarget(flops=flops, seq_len=16)
    method = build_method("neuroprune", model, NeuroPruneConfig(alpha=1e-3, beta=1e-3), target)
    train_with_hooks(model, method, family, steps=30)
    count = flop_count(method, seq_len=16)
    assert abs(count.fraction - flops) <= 0.02, count
    assert method.structural.removed.neurons  # neurons went
    logged_heads = method.log_values()["heads_kept"]  # the held groups are not counted as kept
    compact(method)
    assert current_flops(method.index, 16) == count.compacted  # what was steered is what compacts
    assert logged_heads == count.heads_compacted == sum(u.num_heads for u in method.index.attention)
    assert sum(p.numel() for p in model.parameters()) == count.params_compacted < count.params_dense


@torch.no_grad()
def test_survivors_are_not_shrunk_and_removed_units_are_whole():
    """No penalty and no learning (lr 0): every weight ends either untouched or zero, and the
    zeros are whole units: neurons (expand row and contract column), groups (O columns), inputs."""
    torch.manual_seed(0)
    model = tiny_model("bert")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = NeuroPruneConfig(alpha=0.0, beta=0.0, merge="none")
    method = build_method("neuroprune", model, cfg, SparsityTarget(flops=0.5, seq_len=16))
    with torch.enable_grad():
        train_with_hooks(model, method, "bert", steps=12, lr=0.0)
    after = model.state_dict()
    for key, value in after.items():
        same_or_zero = (value == before[key]) | (value == 0)
        assert bool(same_or_zero.all()), key
    removed = method.structural.removed
    assert removed.neurons and removed.groups
    for b, positions in removed.neurons.items():
        unit = method.index.mlps[b]
        assert not unit.up.weight[positions].any() and not unit.down.weight[:, positions].any()
    for b, positions in removed.groups.items():
        unit = method.index.attention[b]
        assert not unit.o.weight[:, unit.query_rows(positions)].any()
    assert abs(flop_count(method, seq_len=16).fraction - 0.5) <= 0.02


@torch.no_grad()
def test_selection_takes_lowest_scores_first_and_respects_the_budget():
    model = tiny_model("bert")
    index = ModelIndex(model)
    scores = magnitude_scores(index)
    scores.neurons[0][:5] = 0.0  # the five weakest units of the model
    rule = CompactionRule(multiple_of=1)
    dense = flop_count(index, seq_len=16, rule=rule).dense
    neuron_cost = 2 * 16 * (32 + 32)
    chosen = select_to_budget(index, normalise(scores, Removed()), dense - 5 * neuron_cost, 16, rule,
                              ("neurons", "heads", "inputs"), Removed())
    assert chosen.neurons == {0: [0, 1, 2, 3, 4]} and not chosen.groups and not chosen.inputs
    # already at the budget: nothing
    assert not select_to_budget(index, scores, dense, 16, rule, ("neurons",), Removed()).neurons


def test_head_removal_fires_on_pretrained_minilm_at_default_settings():
    """No forward pass needed: the selections alone, on the packaged MiniLM's pretrained weights."""
    from transformers import AutoModel

    from neuroprune.model.packaged import resolve_model_path

    model = AutoModel.from_pretrained(resolve_model_path("minilm"))
    method = build_method("neuroprune", model, target_flops=0.5)
    method.on_train_begin(40, None)
    for step in range(1, 41):
        method.on_step_end(step)
    removed = method.structural.removed
    assert sum(len(v) for v in removed.groups.values()) >= 3
    count = flop_count(method)
    assert abs(count.fraction - 0.5) <= 0.02
    heads_after = sum(len(p) for p in removed.groups.values())
    compact(method)
    assert sum(u.num_heads for u in method.index.attention) == 72 - heads_after


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("flops_runs")
    model = textdata.model_folder(root / "model", "bert")
    files = textdata.splits(root / "data", textdata.sentiment_rows, sizes=(32, 8))
    return dict(model=str(model), train_file=str(files["train"]), validation_file=str(files["validation"]),
                epochs=2, batch_size=4, learning_rate=1e-3, max_length=16, logging_steps=100,
                report_to="none", seed=3)


def test_train_run_and_cli_land_within_two_points(data, tmp_path, capsys):
    result = train_run(TrainSettings(**data, output_dir=str(tmp_path / "py"), target_flops=0.5), quiet=True)
    saved = json.loads((result.run_dir / "sparsity.json").read_text())
    assert abs(saved["flops_fraction"] - 0.5) <= 0.02
    assert saved["target_flops"] == 0.5 and saved["params_compacted"] < saved["params_dense"]
    argv = ["train", "--output-dir", str(tmp_path / "cli"), "--target-flops", "0.6"]
    for key, value in data.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    capsys.readouterr()
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    printed = json.loads(out[out.index("{\n"):])
    saved = json.loads((tmp_path / "cli" / "sparsity.json").read_text())
    assert abs(saved["flops_fraction"] - 0.6) <= 0.02
    assert printed["flops_fraction"] == pytest.approx(saved["flops_fraction"], abs=1e-4)
    assert printed["params_compacted"] == saved["params_compacted"]


@pytest.mark.parametrize("kwargs, message", [
    (dict(flops=0.0), "in \\(0, 1\\]"),
    (dict(flops=1.5), "in \\(0, 1\\]"),
    (dict(flops=True), "in \\(0, 1\\]"),
    (dict(flops=0.5, sparsity=0.5), "exactly one target"),
    (dict(), "exactly one target"),
    (dict(flops=0.5, heads=4), "drop --target-heads"),
    (dict(flops=0.5, kinds=("neurons", "layers")), "kinds"),
    (dict(flops=0.5, heads_by="random"), "heads_by"),
    (dict(flops=0.5, seq_len=0), "seq_len"),
])
def test_bad_flop_targets_are_refused(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        SparsityTarget(**kwargs)


def test_no_prune_heads_keeps_every_head_under_a_flop_target():
    torch.manual_seed(0)
    model = tiny_model("bert")
    method = build_method("neuroprune", model, NeuroPruneConfig(prune_heads=False),
                          SparsityTarget(flops=0.6, seq_len=16))
    train_with_hooks(model, method, "bert", steps=10)
    assert not method.structural.removed.groups
    assert abs(flop_count(method, seq_len=16).fraction - 0.6) <= 0.02


def test_a_target_below_what_the_model_can_reach_is_refused():
    """Tiny BERT at 128 tokens: attention scores dominate, and every block keeps one of 4 heads."""
    method = build_method("neuroprune", tiny_model("bert"), target_flops=0.1)
    with pytest.raises(ConfigError, match="out of reach for this model.*below 18.5%.*ask for at least 0.19"):
        method.on_train_begin(10, None)
    fine = build_method("neuroprune", tiny_model("bert"), target_flops=0.25)
    fine.on_train_begin(10, None)


def test_bad_flop_settings_are_refused_before_any_model_loads(data, tmp_path, capsys):
    with pytest.raises(ConfigError, match="not both"):
        check_method("neuroprune", 0.5, None, 0.5)
    with pytest.raises(ConfigError, match="--method gmp has none"):
        check_method("gmp", None, None, 0.5)
    with pytest.raises(ConfigError, match="in \\(0, 1\\]"):
        TrainSettings(target_flops=50).validate()
    argv = ["train", "--output-dir", str(tmp_path / "bad"), "--target-flops", "50", "--train-file",
            data["train_file"]]
    assert cli.main(argv) == 2
    assert "target FLOPs must be a fraction" in capsys.readouterr().err
    assert not (tmp_path / "bad" / "sparsity.json").exists()
