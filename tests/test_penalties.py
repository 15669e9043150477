"""The regularisers against hand computation and autograd (method.md sections 1-2)."""

import math

import pytest
import torch

from neuroprune import NeuroPrune, NeuroPruneConfig
from neuroprune.methods.penalties import (
    attention_penalty,
    group_l1_half,
    mlp_penalty,
    output_penalty,
    preferential_attachment_l1,
    row_degree,
)

from tiny import tiny_model


def test_preferential_attachment_by_hand():
    w = torch.tensor([[1.0, 0.0, -2.0], [0.5, 0.0, 0.0], [0.0, 0.0, 0.0]])
    # degrees 2/3, 1/3, 0 (guarded to 1/3): 3 / (2/3) + 0.5 / (1/3) + 0
    assert torch.allclose(row_degree([w], 1e-4), torch.tensor([2 / 3, 1 / 3, 0.0]))
    assert preferential_attachment_l1([w], 1e-4).item() == pytest.approx(6.0)


def test_eps_decides_what_counts_as_a_connection():
    w = torch.tensor([[1.0, 5e-5, 2e-4, -1e-4]])  # |w| >= eps counts, 5e-5 does not
    assert row_degree([w], 1e-4).item() == pytest.approx(3 / 4)


def test_gated_rows_share_one_degree():
    gate = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    up = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    # neuron 0: degree 1/4, l1 1 -> 4; neuron 1: degree 2/4, l1 7 -> 14
    assert preferential_attachment_l1([gate, up], 1e-4).item() == pytest.approx(18.0)


def test_group_penalty_by_hand():
    a = torch.tensor([[3.0, 0.0], [-1.0, 0.0], [0.0, 0.0]])  # column l1: 4 and 0
    assert group_l1_half(a.abs().sum(0), 0.0).item() == pytest.approx(2.0)
    # the dead column costs sqrt(1e-12) = 1e-6: a tolerance below that effect
    assert group_l1_half(a.abs().sum(0), 1e-12).item() == pytest.approx(2.0 + 1e-6, abs=2e-7, rel=0)


def test_degree_is_a_constant_for_autograd():
    w = torch.tensor([[1.0, -2.0, 0.0], [0.5, 0.0, 0.0]], requires_grad=True)
    preferential_attachment_l1([w], 1e-4).backward()
    expected = torch.tensor([[1.5, -1.5, 0.0], [3.0, 0.0, 0.0]])  # sign(w) / degree, sign(0) = 0
    assert torch.allclose(w.grad, expected)


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(0)
    w = (torch.rand(5, 7, generator=g, dtype=torch.float64) + 0.1) * torch.tensor([1.0, -1.0]).repeat(4)[:7]
    w[2, :4] = 0.0  # a sparse row: its degree stays fixed while we perturb
    w.requires_grad_(True)
    mask = (w.detach() != 0).double()  # |x| has no derivative at 0: keep the zeros out of the check

    def pa(x):
        return preferential_attachment_l1([x * mask], 1e-4)

    assert torch.autograd.gradcheck(pa, (w,), eps=1e-6, atol=1e-5)
    cols = (torch.rand(9, 4, generator=g, dtype=torch.float64) + 0.1).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a: group_l1_half(a.abs().sum(0), 1e-12), (cols,), eps=1e-6)


@pytest.mark.parametrize("family", ["bert", "gpt2", "gpt_neox", "llama"])
def test_block_penalties_match_the_formula(family):
    """Whatever the storage (separate, fused, interleaved, Conv1D), R_attn groups the input
    dimensions of [Q, K, V] and R_MLP reads neuron rows of expand and contract."""
    pruner = NeuroPrune(tiny_model(family).double())
    unit, mlp = pruner.index.attention[0], pruner.index.mlps[0]
    a = torch.cat(unit.qkv_matrices(), dim=0).detach()  # (3d or q+2kv, d_in)
    expected = sum(math.sqrt(float(c) + 1e-12) for c in a.abs().sum(0))
    assert attention_penalty(unit, 1e-12).item() == pytest.approx(expected, rel=1e-9)
    expand = torch.cat(mlp.expand_matrices(), dim=1).detach()
    by_hand = 0.0
    for mat in (expand, mlp.contract_matrix().detach()):
        deg = ((mat.abs() >= 1e-4).sum(1).double() / mat.shape[1]).clamp(min=1 / mat.shape[1])
        by_hand += float((mat.abs().sum(1) / deg).sum())
    assert mlp_penalty(mlp, 1e-4).item() == pytest.approx(by_hand, rel=1e-9)


def test_regularization_loss_weights_and_gradients():
    model = tiny_model("bert")
    pruner = NeuroPrune(model, NeuroPruneConfig(alpha=0.5, beta=2.0))
    parts = pruner.penalties()
    loss = pruner.regularization_loss()
    assert loss.item() == pytest.approx(0.5 * parts["mlp"].item() + 2.0 * parts["attention"].item(), rel=1e-6)
    loss.backward()
    # by hand on the raw weights: dR_attn/dw = sign(w) / (2 sqrt(column l1 of [Q; K; V] + tiny)),
    # dR_MLP/dw = sign(w) / degree of its row (expand: the neuron's row; no row is sparse here)
    layer = model.encoder.layer[0]
    qkv = [layer.attention.self.query, layer.attention.self.key, layer.attention.self.value]
    col = sum(m.weight.detach().abs().sum(0) for m in qkv)
    for m in qkv:
        expected = 2.0 * torch.sign(m.weight.detach()) / (2 * torch.sqrt(col + 1e-12))
        torch.testing.assert_close(m.weight.grad, expected, rtol=1e-5, atol=1e-7)
    up = layer.intermediate.dense.weight.detach()
    degree = (up.abs() >= 1e-4).float().mean(1, keepdim=True)
    torch.testing.assert_close(layer.intermediate.dense.weight.grad, 0.5 * torch.sign(up) / degree,
                               rtol=1e-5, atol=1e-7)
    assert model.embeddings.word_embeddings.weight.grad is None  # embeddings are not regularised
    assert model.encoder.layer[0].attention.output.dense.weight.grad is None  # paper: W^O untouched


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_output_penalty_is_opt_in_and_reads_rows_of_w_o(family):
    model = tiny_model(family).double()
    pruner = NeuroPrune(model, NeuroPruneConfig(alpha=0.5, beta=2.0, output_penalty=True))
    o = pruner.index.attention[0].matrices()["o"].detach()  # (out, in), also for GPT-2's Conv1D
    deg = ((o.abs() >= 1e-4).sum(1).double() / o.shape[1]).clamp(min=1 / o.shape[1])
    assert output_penalty(pruner.index.attention[0], 1e-4).item() == pytest.approx(
        float((o.abs().sum(1) / deg).sum()), rel=1e-9)
    parts = pruner.penalties()
    loss = pruner.regularization_loss()
    expected = 0.5 * (parts["mlp"] + parts["output"]) + 2.0 * parts["attention"]
    assert loss.item() == pytest.approx(expected.item(), rel=1e-9)
    loss.backward()
    for u in pruner.index.attention:  # alpha * sign(w) / degree of its W^O row, on the raw weight
        w = u.o.weight.detach()
        rows = w if family == "bert" else w.t()  # GPT-2's Conv1D stores W^O transposed
        degree = (rows.abs() >= 1e-4).double().mean(1, keepdim=True).clamp(min=1 / rows.shape[1])
        expected = 0.5 * torch.sign(rows) / degree
        torch.testing.assert_close(u.o.weight.grad, expected if family == "bert" else expected.t())


def test_zero_weights_skip_the_computation():
    pruner = NeuroPrune(tiny_model("bert"), NeuroPruneConfig(alpha=0.0, beta=0.0))
    loss = pruner.regularization_loss()
    assert loss.item() == 0.0 and not loss.requires_grad
