"""Uniform widths during training (`SparsityTarget(flops=F, uniform=True)`, `--uniform-widths`):
every layer loses the same number of neurons and key/value groups, the run still lands within 2
points of F, and `compact --uniform` then saves the same model as plain `compact`, with no
padding, loadable by the stock class; families whose stock config cannot say it are refused."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import textdata
from neuroprune import cli
from neuroprune.compaction import compact, compact_uniform, flop_count
from neuroprune.config import NeuroPruneConfig
from neuroprune.errors import ConfigError
from neuroprune.methods import build_method
from neuroprune.methods.steering import SparsityTarget
from neuroprune.methods.structural import Removed, select_to_budget
from neuroprune.training.settings import TrainSettings

from tiny import main_output, tiny_config, tiny_inputs, tiny_model, train_with_hooks

SEQ = 16
FFN = 256  # tests/tiny.py's Llama with a wider MLP: a slice of 8 neurons per layer is ~3% of the FLOPs


def _model(family: str) -> torch.nn.Module:
    if family != "llama":
        return tiny_model(family)
    torch.manual_seed(0)
    config = tiny_config("llama")
    config.intermediate_size = FFN
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()


def _method(name: str, flops: float, uniform: bool = True, family: str = "llama", **options):
    model = _model(family)
    target = SparsityTarget(flops=flops, seq_len=SEQ, uniform=uniform, **options)
    config = NeuroPruneConfig(alpha=1e-3, beta=1e-3) if name == "neuroprune" else None
    return model, build_method(name, model, config, target)


def _widths(removed: Removed, kind: str, blocks: int) -> list[int]:
    return [len(getattr(removed, kind).get(b, [])) for b in range(blocks)]


@pytest.mark.parametrize("name", ["neuroprune", "structured"])
@pytest.mark.parametrize("flops", [0.7, 0.45])
def test_uniform_run_lands_and_compacts_uniformly_without_padding(name, flops, tmp_path):
    model, method = _method(name, flops)
    train_with_hooks(model, method, "llama", steps=30)
    assert method.structural.removed.neurons[0]
    _check_uniform_compaction(name, model, method, flops, tmp_path)


@pytest.mark.parametrize("name", ["neuroprune", "structured"])
def test_uniform_heads_go_one_group_per_layer(name, tmp_path):
    """Heads only, at the least reachable target: one of the two key/value groups of every layer."""
    least = _method(name, 0.9, kinds=("heads",))[1].structural.smallest_fraction()
    model, method = _method(name, least, kinds=("heads",))
    train_with_hooks(model, method, "llama", steps=30)
    assert _widths(method.structural.removed, "groups", len(method.index.attention)) == [1, 1]
    result = _check_uniform_compaction(name, model, method, least, tmp_path)
    assert result.groups == 1 and result.config_changes["num_key_value_heads"] == 1


def _check_uniform_compaction(name, model, method, flops, tmp_path):
    """Landed, equal widths, and `compact_uniform` = plain `compact` = the masked model = stock."""
    index, removed = method.index, method.structural.removed
    count = flop_count(method, seq_len=SEQ)
    assert abs(count.fraction - flops) <= 0.02, count
    assert not removed.inputs  # stock configs cannot describe gathered inputs
    neurons = _widths(removed, "neurons", len(index.mlps))
    groups = _widths(removed, "groups", len(index.attention))
    assert len(set(neurons)) == 1, neurons
    assert len(set(groups)) == 1, groups
    x = tiny_inputs("llama")
    model.eval()
    with torch.no_grad():
        masked = main_output(model, x)

    twin = _method(name, flops)[0]  # same start; the trained weights copied in
    twin.load_state_dict(model.state_dict())
    twin_method = build_method(name, twin, method.config, method.target)
    compact(twin_method)
    plain_params = sum(p.numel() for p in twin.parameters())

    result = compact_uniform(method)
    assert result.min_neurons_needed == [result.neurons] * len(index.mlps)  # nothing padded
    assert result.min_groups_needed == [result.groups] * len(index.attention)
    assert sum(p.numel() for p in model.parameters()) == plain_params < count.params_dense
    with torch.no_grad():
        torch.testing.assert_close(main_output(model, x), masked, atol=1e-4, rtol=0)
    result.index.save_pretrained(tmp_path / "u")
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "u").eval()  # stock class, no remote code
    assert type(stock).__name__ == "LlamaForCausalLM"
    with torch.no_grad():
        torch.testing.assert_close(main_output(stock, x), masked, atol=1e-4, rtol=0)
    return result


def test_uniform_selection_takes_rank_slices():
    """One selection, scores chosen so the non-uniform pick would empty layer 0 first: uniform
    takes each layer's own lowest neurons, the same number everywhere."""
    model, method = _method("structured", 0.8)
    index = method.index
    scores = method.structural.scorer(Removed())
    scores.neurons[0] = torch.arange(FFN, dtype=torch.float64) * 1e-3  # layer 0 far weaker
    scores.neurons[1] = 1 + torch.arange(FFN, dtype=torch.float64).flip(0)  # lowest at the end
    dense = method.structural.dense
    rule, kinds = method.structural.rule, method.structural.kinds
    free = select_to_budget(index, scores, int(0.9 * dense), SEQ, rule, ("neurons",), Removed())
    assert len(free.neurons.get(0, [])) != len(free.neurons.get(1, []))  # the case uniform must fix
    chosen = select_to_budget(index, scores, int(0.9 * dense), SEQ, rule, kinds, Removed(), uniform=True)
    assert len(chosen.neurons[0]) == len(chosen.neurons[1]) > 0
    r = len(chosen.neurons[0])
    assert chosen.neurons[0] == list(range(r))  # each layer's own lowest
    assert chosen.neurons[1] == list(range(FFN - r, FFN))
    assert not chosen.inputs


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_families_whose_stock_config_cannot_say_it_are_refused(family):
    with pytest.raises(ConfigError, match="uniform widths .*trust_remote_code=True"):
        _method("structured", 0.6, family=family)


def test_uniform_needs_a_flop_target_and_round_trips():
    with pytest.raises(ConfigError, match="--target-flops"):
        SparsityTarget(sparsity=0.5, uniform=True)
    with pytest.raises(ConfigError, match="uniform must be true or false"):
        SparsityTarget(flops=0.5, uniform="yes")
    with pytest.raises(ConfigError, match="target_flops"):
        TrainSettings(uniform_widths=True).validate()
    target = SparsityTarget(flops=0.5, uniform=True)
    assert SparsityTarget(**dataclasses.asdict(target)) == target  # as checkpoints store it
    settings = TrainSettings(target_flops=0.5, uniform_widths=True)
    assert settings.flop_target() == target


def test_cli_flag_reaches_the_selection_and_refuses_bert(tmp_path, capsys):
    rows = textdata.splits(tmp_path / "data", textdata.sentiment_rows, sizes=(32, 8))
    common = ["--train-file", str(rows["train"]), "--epochs", "2", "--batch-size", "4", "--learning-rate",
              "1e-3", "--max-length", "16", "--report-to", "none", "--seed", "3", "--target-flops", "0.6",
              "--uniform-widths"]
    llama = textdata.model_folder(tmp_path / "llama", "llama")
    assert cli.main(["train", "--model", str(llama), "--output-dir", str(tmp_path / "u"), *common]) == 0
    # (FFN 48 in 2 layers: one slice of 8 neurons per layer is ~9% of the FLOPs, too coarse to
    # land on 0.6 here; landing is tested above on the wider MLP)
    assert json.loads((tmp_path / "u" / "sparsity.json").read_text())["flops_fraction"] < 0.9
    assert json.loads((tmp_path / "u" / "run_config.json").read_text())["uniform_widths"] is True
    assert cli.main(["compact", str(tmp_path / "u"), "--uniform", "-o", str(tmp_path / "out")]) == 0
    meta = json.loads((tmp_path / "out" / "neuroprune.json").read_text())["compaction"]["uniform"]
    assert len(set(meta["groups_needed"])) == 1 and len(set(meta["neurons_needed"])) == 1, meta  # no padding
    bert = textdata.model_folder(tmp_path / "bert", "bert")
    capsys.readouterr()
    assert cli.main(["train", "--model", str(bert), "--output-dir", str(tmp_path / "b"), *common]) == 2
    assert "uniform widths (--uniform-widths) are refused" in capsys.readouterr().err
