"""Activation-aware unit scores (`--scores activations`): the statistics are the mean squares of
the inputs the removed units would cut (checked against inputs captured independently), the
scores are the hand-computed output energies, evaluation passes never count, the hooks go once the
ramp is over, a resumed window equals the uninterrupted one, and the score ranks a load-bearing
unit with small weights above a weak one that weight norms prefer."""

from __future__ import annotations

import json

import pytest
import torch

from neuroprune.config import NeuroPruneConfig
from neuroprune.errors import ConfigError
from neuroprune.methods import build_method
from neuroprune.methods.activation_scores import activation_scores
from neuroprune.methods.steering import SparsityTarget
from neuroprune.methods.structural import Removed
from neuroprune.model.activations import ActivationStats
from neuroprune.model.index import ModelIndex

from tiny import tiny_inputs, tiny_model, train_with_hooks


def _captured(index: ModelIndex, model: torch.nn.Module, inputs: dict) -> dict[str, list[torch.Tensor]]:
    """The inputs of every down / o / q projection in one forward pass, flattened to (tokens, d),
    by plain hooks of this test (not the code under test)."""
    seen: dict[str, list[torch.Tensor]] = {"neurons": [], "heads": [], "inputs": []}
    handles = []
    found = (("neurons", [u.down for u in index.mlps]), ("heads", [u.o for u in index.attention]),
             ("inputs", [u.q if u.qkv is None else u.qkv for u in index.attention]))

    def keep(kind: str, x: torch.Tensor) -> None:
        seen[kind].append(x.detach().reshape(-1, x.shape[-1]))

    for kind, modules in found:
        for m in modules:
            handles.append(m.register_forward_pre_hook(lambda mod, args, kind=kind: keep(kind, args[0])))
    with torch.no_grad():
        model(**inputs)
    for h in handles:
        h.remove()
    return seen


@pytest.mark.parametrize("family", ["bert", "llama", "gpt2"])
def test_means_are_mean_squares_of_the_inputs_over_training_passes_only(family):
    torch.manual_seed(0)
    model = tiny_model(family)
    index = ModelIndex(model)
    inputs = tiny_inputs(family)
    model.eval()
    want = _captured(index, model, inputs)
    stats = ActivationStats(index)
    stats.attach()
    with torch.no_grad():
        model(**inputs)  # eval mode: not counted
    assert not stats.seen
    model.train()
    for m in model.modules():  # no dropout: the training pass sees what the captured eval pass saw
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    with torch.no_grad():
        model(**inputs)
        model(**inputs)  # twice: the mean over two equal passes is the mean over one
    stats.detach()
    with torch.no_grad():
        model(**inputs)  # detached: not counted
    means = stats.means()
    for kind in ("neurons", "heads", "inputs"):
        assert len(means[kind]) == len(want[kind])
        for got, x in zip(means[kind], want[kind]):
            torch.testing.assert_close(got, (x * x).mean(0), rtol=1e-5, atol=1e-7)
    assert stats.counts["neurons"][0] == 2 * want["neurons"][0].shape[0]


def test_scores_are_the_root_output_energy_by_hand():
    torch.manual_seed(0)
    model = tiny_model("llama")  # 4 query heads over 2 key/value groups: a group is 2 heads
    index = ModelIndex(model)
    unit, mlp = index.attention[0], index.mlps[0]
    d, n, hd = 32, 48, 8
    means = {"neurons": [torch.rand(n) for _ in index.mlps],
             "heads": [torch.rand(4 * hd) for _ in index.attention],
             "inputs": [torch.rand(d) for _ in index.attention]}
    scores = activation_scores(index, means, Removed(groups={0: [1]}))
    down = mlp.down.weight.detach()
    for j in (0, 7, 47):
        want = (float(means["neurons"][0][j]) * sum(float(down[i, j]) ** 2 for i in range(d))) ** 0.5
        assert float(scores.neurons[0][j]) == pytest.approx(want, rel=1e-5)
    o = unit.o.weight.detach()
    for g in (0, 1):  # group g = query heads 2g, 2g + 1 = O columns 16g .. 16g + 15
        cols = range(2 * hd * g, 2 * hd * (g + 1))
        want = sum(float(means["heads"][0][c]) * float((o[:, c] ** 2).sum()) for c in cols) ** 0.5
        assert float(scores.groups[0][g]) == pytest.approx(want, rel=1e-5)
    # inputs of block 0, group 1 removed: Q rows of heads 0, 1 and the K / V rows of kv head 0
    q, k, v = (m.weight.detach() for m in (unit.q, unit.k, unit.v))
    rows = torch.cat([q[: 2 * hd], k[:hd], v[:hd]])
    for i in (0, 5, 31):
        want = (float(means["inputs"][0][i]) * float((rows[:, i] ** 2).sum()) / rows.shape[0]) ** 0.5
        assert float(scores.inputs[0][i]) == pytest.approx(want, rel=1e-5)


def test_a_load_bearing_neuron_with_small_weights_outranks_a_weak_one(caplog):
    """Neuron 0: tiny fan-in and fan-out weights, but its input is scaled up so its output energy is
    large; neuron 1: large weights, input near zero. Weight scores rank 0 below 1; activation
    scores the other way round."""
    torch.manual_seed(0)
    model = tiny_model("bert")
    cfg = NeuroPruneConfig(alpha=0.0, beta=0.0, scores="activations")
    method = build_method("neuroprune", model, cfg, SparsityTarget(flops=0.5, seq_len=16))
    mlp = method.index.mlps[0]
    with torch.no_grad():
        up, down = mlp.up.weight, mlp.down.weight
        up[0] *= 0.05
        down[:, 0] *= 0.05
        up[1] *= 3.0
        down[:, 1] *= 3.0
        mlp.up.bias[0] = 50.0  # a large constant input to neuron 0 after the activation
        mlp.up.bias[1] = -50.0  # GELU(-50) ~ 0: neuron 1 is silent
    weight = method.unit_scores(Removed()).neurons[0]  # nothing seen yet: the weight scores, said so
    assert "no training pass reached every pruned unit" in caplog.text
    assert weight[0] < weight[1]
    method.activations.attach()
    model.train()
    with torch.no_grad():
        model(**tiny_inputs("bert"))
    act = method.unit_scores(Removed()).neurons[0]
    assert act[0] > 10 * act[1]


def test_training_with_activation_scores_lands_detaches_and_differs_from_weights():
    runs = {}
    for scores in ("weights", "activations"):
        torch.manual_seed(0)
        model = tiny_model("llama")
        cfg = NeuroPruneConfig(alpha=1e-3, beta=1e-3, scores=scores)
        method = build_method("neuroprune", model, cfg, SparsityTarget(flops=0.5, seq_len=16, ramp_end=0.5))
        train_with_hooks(model, method, "llama", steps=20)
        runs[scores] = method
    act = runs["activations"]
    assert act.activations._handles == []  # the ramp ended at step 10: no hooks left
    assert abs(act.structural.planned - 0.5) <= 0.02
    assert runs["weights"].activations is None
    assert act.structural.removed.to_dict() != runs["weights"].structural.removed.to_dict()


def test_state_round_trips_through_json_and_resumes_the_same_window():
    torch.manual_seed(0)
    model = tiny_model("bert")
    target = SparsityTarget(flops=0.5, seq_len=16)
    cfg = NeuroPruneConfig(scores="activations")
    method = build_method("neuroprune", model, cfg, target)
    method.activations.attach()
    model.train()
    with torch.no_grad():
        model(**tiny_inputs("bert"))
    state = json.loads(json.dumps(method.state_dict()))
    other = build_method("neuroprune", tiny_model("bert"), cfg, target)
    other.load_state_dict(state)
    assert other.activations.counts == method.activations.counts
    for kind in ("neurons", "heads", "inputs"):
        for a, b in zip(other.activations.means()[kind], method.activations.means()[kind]):
            assert torch.equal(a, b)
    with pytest.raises(ValueError, match="blocks"):  # a state from another model is refused
        bad = json.loads(json.dumps(state))
        bad["activations"]["sums"]["neurons"].append(None)
        other.load_state_dict(bad)


def test_bad_scores_are_refused():
    with pytest.raises(ConfigError, match="scores=.norms. is not one of auto, weights, activations"):
        NeuroPruneConfig(scores="norms").validate()


def test_means_before_any_training_pass_is_an_error():
    stats = ActivationStats(ModelIndex(tiny_model("bert")))
    with pytest.raises(RuntimeError, match="before every unit saw"):
        stats.means()


@pytest.mark.parametrize("family, scores", [("bert", "weights"), ("t5", "weights"), ("llama", "activations"),
                                            ("gpt2", "activations"), ("opt", "activations")])
def test_auto_takes_the_family_default_and_an_explicit_choice_wins(family, scores):
    target = SparsityTarget(flops=0.5, seq_len=16)
    method = build_method("neuroprune", tiny_model(family), NeuroPruneConfig(), target)
    assert method.scores == scores and (method.activations is not None) == (scores == "activations")
    other = "weights" if scores == "activations" else "activations"
    explicit = build_method("neuroprune", tiny_model(family), NeuroPruneConfig(scores=other), target)
    assert explicit.scores == other and (explicit.activations is not None) == (other == "activations")


def test_means_pool_ranks_through_the_all_reduce_given():
    """Data parallelism: sums and counts are pooled (one all-reduce per kind) before dividing; two
    ranks that saw the same rows give the one rank's means, a rank that saw other rows moves them."""
    torch.manual_seed(0)
    model = tiny_model("bert").train()
    stats = ActivationStats(ModelIndex(model))
    stats.attach()
    with torch.no_grad():
        model(**tiny_inputs("bert"))
    alone = stats.means()
    calls = []

    def same_rows_twice(flat: torch.Tensor) -> None:
        calls.append(flat.numel())
        flat.mul_(2)

    pooled = stats.means(same_rows_twice)
    assert len(calls) == 3
    for kind in ("neurons", "heads", "inputs"):
        for a, b in zip(alone[kind], pooled[kind]):
            torch.testing.assert_close(a, b)
    n = stats.counts["neurons"][0]

    def other_rank_saw_zeros(flat: torch.Tensor) -> None:  # its sums are 0, its counts equal ours
        k = len(stats.counts["neurons"])
        flat[-k:] *= 2

    halved = stats.means(other_rank_saw_zeros)
    torch.testing.assert_close(halved["neurons"][0], alone["neurons"][0] / 2)
    assert n > 0
