"""Sparsity accounting against the dense shapes (method.md section 5) and degree statistics."""

import pytest
import torch

from neuroprune import NeuroPrune, NeuroPruneConfig
from neuroprune.model.sparsity import DegreeStats

from tiny import duplicate_group, tiny_model


def test_removed_heads_and_zeros_count_against_dense_shapes():
    model = tiny_model("bert")
    pruner = NeuroPrune(model, NeuroPruneConfig(theta=1e-6))
    dense_total = sum(sum(u.original_numel.values()) for u in pruner.index.attention + pruner.index.mlps)
    assert pruner.sparsity_report().zeros == 0
    duplicate_group(model, pruner.index.attention[0], 0, 1)
    pruner.prune_redundant_heads()
    with torch.no_grad():
        model.encoder.layer[1].intermediate.dense.weight[:5] = 0.0  # 5 dead neurons x 32 inputs
    report = pruner.sparsity_report()
    head_params = 4 * 8 * 32  # Q, K, V rows and O columns of one 8-dim head
    assert report.total == dense_total
    assert report.zeros == head_params + 5 * 32
    assert report.sparsity == pytest.approx((head_params + 160) / dense_total)
    assert (report.heads_kept, report.heads_total) == (7, 8)
    layer0 = report.layers[0]
    assert layer0.matrices["q"] == pytest.approx(0.25) and layer0.kept_heads == [1, 2, 3]
    mlp1 = next(layer for layer in report.layers if layer.name == "encoder.layer.1")
    assert mlp1.degree.dead == 5 and mlp1.matrices["up"] == pytest.approx(5 / 48)
    # whole-model sparsity counts every parameter, including those the heads took with them
    assert 0 < report.model_sparsity < report.sparsity


def test_finalize_zeroes_small_weights_only_in_regularised_matrices():
    model = tiny_model("gpt2")
    pruner = NeuroPrune(model, NeuroPruneConfig(eps=1e-3))
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[0, :10] = 5e-4
        model.transformer.h[0].attn.c_attn.weight[0, :7] = -5e-4
        model.transformer.h[0].attn.c_proj.weight[0, :10] = 5e-4  # W^O: no penalty by default
        model.transformer.wte.weight[0, :10] = 5e-4
    regularised = [m.weight for i in range(2) for m in (model.transformer.h[i].mlp.c_fc,
                                                          model.transformer.h[i].mlp.c_proj,
                                                          model.transformer.h[i].attn.c_attn)]
    small = sum(int(((m.abs() < 1e-3) & (m != 0)).sum()) for m in regularised)
    assert pruner.finalize() == small >= 17
    assert float(model.transformer.h[0].mlp.c_fc.weight[0, :10].detach().abs().sum()) == 0.0
    assert float(model.transformer.h[0].attn.c_attn.weight[0, :7].detach().abs().sum()) == 0.0
    assert torch.all(model.transformer.h[0].attn.c_proj.weight[0, :10] == 5e-4)  # W^O untouched
    assert torch.all(model.transformer.wte.weight[0, :10] == 5e-4)  # embeddings untouched
    assert pruner.finalize() == 0
    # with the output penalty on, W^O is regularised and finalised too
    with_o = NeuroPrune(model, NeuroPruneConfig(eps=1e-3, output_penalty=True))
    assert with_o.finalize() >= 10
    assert float(model.transformer.h[0].attn.c_proj.weight[0, :10].detach().abs().sum()) == 0.0


def test_degree_stats_in_percent():
    stats = DegreeStats.of(torch.tensor([1.0, 1.0, 0.5, 0.0]))
    assert stats.mean == pytest.approx(0.625)
    assert stats.sd_percent == pytest.approx(41.4578, rel=1e-4)  # population sd x 100
    assert stats.dead == 1 and sum(stats.histogram) == 4 and stats.histogram[-1] == 2


def test_report_serialises():
    report = NeuroPrune(tiny_model("llama")).sparsity_report()
    data = report.to_dict()
    assert data["heads_total"] == 8 and len(data["layers"]) == 4
    assert "sparsity" in data["layers"][0]
    assert "| model.layers.0.mlp | mlp |" in report.to_markdown()
