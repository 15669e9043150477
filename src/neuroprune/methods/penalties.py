"""The two regularisers of NeuroPrune (method.md sections 1 and 2), as plain tensor functions."""

from __future__ import annotations

import torch

from neuroprune.model.sparsity import degree_of_sizes, row_degree  # noqa: F401 (row_degree: re-exported)
from neuroprune.model.surgery import weight_matrix
from neuroprune.model.units import AttentionUnit, MLPUnit


def preferential_attachment_l1(mats: list[torch.Tensor], eps: float) -> torch.Tensor:
    """R = sum_i |row_i|_1 / max(degree_i, 1/row_length): weakly connected rows pay more per unit
    of weight, so they die first. The degree is a constant (no gradient flows through it)."""
    length = sum(m.shape[1] for m in mats)
    sizes = [m.abs() for m in mats]  # shared by the l1 and the degree
    weight = 1.0 / degree_of_sizes([s.detach() for s in sizes], eps).clamp(min=1.0 / length)
    l1 = sum(s.sum(1) for s in sizes)
    return (l1 * weight).sum()


def group_l1_half(group_l1: torch.Tensor, tiny: float) -> torch.Tensor:
    """l_{1,0.5}: sum over groups of sqrt(group l1 + tiny); kills whole groups sharply."""
    return torch.sqrt(group_l1 + tiny).sum()


def mlp_penalty(unit: MLPUnit, eps: float) -> torch.Tensor:
    """R_MLP of one MLP: the expand matrix (gate and up rows together) plus the contract matrix."""
    return preferential_attachment_l1(unit.expand_matrices(), eps) + preferential_attachment_l1(
        [unit.contract_matrix()], eps
    )


def attention_penalty(unit: AttentionUnit, tiny: float) -> torch.Tensor:
    """R_attn of one block: groups are the input dimensions of [Q, K, V]."""
    return group_l1_half(unit.input_l1(), tiny)


def output_penalty(unit: AttentionUnit, eps: float) -> torch.Tensor:
    """The preferential-attachment penalty on the rows of the output projection W^O (opt-in,
    `NeuroPruneConfig.output_penalty`): treats W^O as the attention block's contract matrix."""
    return preferential_attachment_l1([weight_matrix(unit.o)], eps)
