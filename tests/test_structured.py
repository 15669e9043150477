"""`--method structured`: structured magnitude pruning to a FLOP budget. Its scores are the norms
a hand computation gives, it removes the lowest-norm units first (planted models), it lands within
2 points of the FLOP target and compacts to it, survivors are untouched, and requests it cannot
serve are refused with a message."""

from __future__ import annotations

import json

import pytest
import torch

import textdata
from neuroprune.compaction import compact, flop_count
from neuroprune.errors import ConfigError
from neuroprune.methods import StructuredConfig, StructuredMagnitude, build_method
from neuroprune.methods.steering import SparsityTarget
from neuroprune.methods.structural import Removed
from neuroprune.model.flops import current_flops
from neuroprune.model.surgery import weight_matrix
from neuroprune.training.settings import TrainSettings
from neuroprune.training.train import train_run

from tiny import tiny_model, train_with_hooks


@pytest.mark.parametrize("family", ["bert", "llama"])
@pytest.mark.parametrize("flops", [0.6, 0.35])
def test_lands_within_two_points_of_the_flop_target_and_compacts_to_it(family, flops):
    torch.manual_seed(0)
    model = tiny_model(family)
    # at 16 tokens: at 128 one key/value group of a 32-wide model is ~20% of its FLOPs (too coarse)
    method = build_method("structured", model, None, SparsityTarget(flops=flops, seq_len=16))
    train_with_hooks(model, method, family, steps=30)
    count = flop_count(method, seq_len=16)
    assert abs(count.fraction - flops) <= 0.02, count
    removed = method.structural.removed
    assert removed.neurons  # the cheapest units by norm: neurons always take part
    assert method.regularization_loss().item() == 0  # no penalty in the loss
    logged_heads = method.log_values()["heads_kept"]  # the held groups are not counted as kept
    compact(method)
    assert current_flops(method.index, 16) == count.compacted
    assert logged_heads == sum(u.num_heads for u in method.index.attention)
    assert sum(p.numel() for p in model.parameters()) == count.params_compacted < count.params_dense
    assert method.summary()["target_flops"] == flops


@torch.no_grad()
def test_scores_are_the_hand_computed_norms():
    torch.manual_seed(1)
    model = tiny_model("bert")
    method = StructuredMagnitude(model, StructuredConfig(), SparsityTarget(flops=0.5))
    scores = method.unit_scores(Removed())
    layer = model.encoder.layer[1]
    up, down = layer.intermediate.dense.weight, layer.output.dense.weight
    assert torch.allclose(scores.neurons[1], up.pow(2).sum(1).sqrt())
    att = layer.attention
    q, k, v, o = att.self.query.weight, att.self.key.weight, att.self.value.weight, att.output.dense.weight
    head = slice(8, 16)  # head 1 of 4, head size 8
    hand = sum(m[head].pow(2).sum() for m in (q, k, v)) + o[:, head].pow(2).sum()
    hand = hand.sqrt()
    assert scores.groups[1][1].item() == pytest.approx(hand.item(), rel=1e-5)
    assert torch.allclose(scores.inputs[1], torch.cat([q, k, v]).pow(2).sum(0).sqrt())
    # l1 and fan-out variants
    l1 = StructuredMagnitude(model, StructuredConfig(norm=1, neuron_fan_out=True), SparsityTarget(flops=0.5))
    expected = up.abs().sum(1) * down.abs().sum(0)
    assert torch.allclose(l1.unit_scores(Removed()).neurons[1], expected)


@torch.no_grad()
def _plant_neuron_norms(model) -> dict[tuple[int, int], float]:
    """Every MLP neuron's fan-in row rescaled to a distinct, known norm: layer 0 neuron i gets
    1 + i, layer 1 neuron i gets 1.5 + i."""
    norms = {}
    for b, layer in enumerate(model.encoder.layer):
        w = layer.intermediate.dense.weight
        for i in range(w.shape[0]):
            norm = 1.0 + 0.5 * b + i
            w[i] *= norm / w[i].norm()
            norms[(b, i)] = norm
    return norms


def test_removes_the_lowest_norm_neurons_first_on_a_planted_model():
    torch.manual_seed(2)
    model = tiny_model("bert")
    norms = _plant_neuron_norms(model)
    target = SparsityTarget(flops=0.8, kinds=("neurons",), seq_len=16)
    method = build_method("structured", model, None, target)
    train_with_hooks(model, method, "bert", steps=10, lr=0.0)  # lr 0: the planted norms stay as planted
    removed = {(b, i) for b, positions in method.structural.removed.neurons.items() for i in positions}
    assert removed and not method.structural.removed.groups and not method.structural.removed.inputs
    kept = set(norms) - removed
    # by hand: the removed ones are exactly the len(removed) smallest planted norms
    smallest = set(sorted(norms, key=norms.get)[: len(removed)])
    assert removed == smallest
    assert max(norms[u] for u in removed) < min(norms[u] for u in kept)
    # and they are whole zero units: expand rows and contract columns
    for b, i in removed:
        layer = model.encoder.layer[b]
        assert not layer.intermediate.dense.weight[i].any() and not layer.output.dense.weight[:, i].any()
    assert abs(flop_count(method, seq_len=16).fraction - 0.8) <= 0.02


def test_a_planted_weak_head_goes_first():
    torch.manual_seed(3)
    model = tiny_model("bert")
    with torch.no_grad():
        att = model.encoder.layer[0].attention
        for m in (att.self.query, att.self.key, att.self.value):
            m.weight[16:24] *= 0.01  # head 2 of layer 0: a hundredth of its weights
        att.output.dense.weight[:, 16:24] *= 0.01
    before_o = [layer.attention.output.dense.weight.detach().clone() for layer in model.encoder.layer]
    target = SparsityTarget(flops=0.85, kinds=("heads",), seq_len=16)
    method = build_method("structured", model, None, target)
    train_with_hooks(model, method, "bert", steps=4, lr=0.0)
    removed = {(b, g) for b, groups in method.structural.removed.groups.items() for g in groups}
    assert (0, 2) in removed
    assert not weight_matrix(att.output.dense)[:, 16:24].any()
    # by hand: the removed heads are the lowest by the norm of their Q, K, V rows and O columns
    hand = {}
    with torch.no_grad():
        for b, layer in enumerate(model.encoder.layer):
            mats = [layer.attention.self.query, layer.attention.self.key, layer.attention.self.value]
            for g in range(4):
                rows = slice(8 * g, 8 * g + 8)
                total = sum(m.weight[rows].pow(2).sum() for m in mats)
                hand[(b, g)] = float(total + before_o[b][:, rows].pow(2).sum())
    assert removed == set(sorted(hand, key=hand.get)[: len(removed)])


def test_survivors_are_not_shrunk():
    torch.manual_seed(4)
    model = tiny_model("bert")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    method = build_method("structured", model, target_flops=0.5)
    train_with_hooks(model, method, "bert", steps=12, lr=0.0)
    for key, value in model.state_dict().items():
        assert bool(((value == before[key]) | (value == 0)).all()), key


def test_requests_it_cannot_serve_are_refused():
    model = tiny_model("bert")
    with pytest.raises(ConfigError, match="give --target-flops"):
        build_method("structured", model, target_sparsity=0.5)
    with pytest.raises(ConfigError, match="give --target-flops"):
        build_method("structured", model)
    with pytest.raises(ConfigError, match="give --target-flops"):
        TrainSettings(method="structured", target_sparsity=0.5).validate()
    with pytest.raises(ConfigError, match="norm=3 must be 1 or 2"):
        StructuredConfig(norm=3)
    TrainSettings(method="structured", target_flops=0.5).validate()  # the right request passes


def test_cli_run_lands_on_the_target_and_records_it(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = textdata.model_folder(tmp_path / "model", "bert")
        files = textdata.splits(tmp_path / "data", textdata.sentiment_rows, sizes=(24, 8))
        run = train_run(TrainSettings(model=str(model), train_file=str(files["train"]),
                                      validation_file=str(files["validation"]), method="structured",
                                      target_flops=0.5, epochs=2, batch_size=4, max_length=16,
                                      learning_rate=1e-3, report_to="none",
                                      output_dir=str(tmp_path / "run")), quiet=True)
    finally:
        torch.set_num_threads(threads)
    sparsity = json.loads((run.run_dir / "sparsity.json").read_text())
    assert sparsity["method"] == "structured" and sparsity["target_flops"] == 0.5
    from neuroprune.model.index import ModelIndex

    index = ModelIndex.from_pretrained(run.run_dir / "model")
    assert abs(flop_count(index).fraction - 0.5) <= 0.02
