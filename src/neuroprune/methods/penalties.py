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


# --- the per-step path: one autograd node, multi-tensor backward (issue 15) --------------------

class _SignScaled(torch.autograd.Function):
    """`value` (computed by the caller without a graph) whose gradient with respect to matrix
    `mats[m]` is ``sign(mats[m]) * scales[m] * g``: the form of every l1-type penalty here, whose
    gradient is |w|'s sign times a per-row or per-column factor. One node instead of ~10 per
    matrix, and a backward of two multi-tensor calls (`torch._foreach_*`)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, value: torch.Tensor, scales: list[torch.Tensor],
                *mats: torch.Tensor) -> torch.Tensor:
        ctx.scales = scales  # small vectors made without a graph
        ctx.save_for_backward(*mats)
        return value.clone()

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx,
                 g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        mats = list(ctx.saved_tensors)
        grads = torch._foreach_sign(mats)  # sign(0) = 0, as abs' own gradient
        torch._foreach_mul_(grads, torch._foreach_mul(ctx.scales, g))
        return (None, None, *grads)


@torch.no_grad()
def row_weights(mats: list[torch.Tensor], eps: float) -> torch.Tensor:
    """1 / max(degree, 1/row_length) of the rows `mats` share: the preferential-attachment weight
    of `preferential_attachment_l1`, computed the same way (a constant of the penalty)."""
    length = sum(m.shape[1] for m in mats)
    return 1.0 / degree_of_sizes([m.abs() for m in mats], eps).clamp(min=1.0 / length)


def fused_penalty(pa_terms: list[tuple[list[torch.Tensor], torch.Tensor]], alpha: float,
                  groups: list[tuple[list[torch.Tensor], torch.Tensor]], beta: float,
                  tiny: float) -> torch.Tensor | None:
    """alpha * sum of the preferential-attachment terms (matrices sharing rows, with their row
    weights from `row_weights`) + beta * sum of the l_{1,0.5} terms (matrices sharing input
    columns, with their column l1 from `AttentionUnit.input_l1`), as one autograd node whose
    gradients equal those of `preferential_attachment_l1` / `group_l1_half` with the same row
    weights (same floating-point products when the loss' gradient is 1). None: no term."""
    mats: list[torch.Tensor] = []
    scales: list[torch.Tensor] = []
    values: list[torch.Tensor] = []
    with torch.no_grad():
        if alpha and pa_terms:
            l1s, ws = [], []
            for term, weight in pa_terms:
                l1 = term[0].abs().sum(1)  # (vector_norm(ord=1) is 6x slower on CPU)
                for m in term[1:]:
                    l1 = l1 + m.abs().sum(1)
                l1s.append(l1)
                ws.append(weight)
                scale = (weight * alpha)[:, None]
                for m in term:
                    mats.append(m)
                    scales.append(scale)
            values.append(alpha * torch.dot(torch.cat(l1s), torch.cat(ws)))
        if beta and groups:
            roots = torch.sqrt(torch.cat([l1 for _, l1 in groups]) + tiny)
            values.append(beta * roots.sum())
            col = torch.full_like(roots, beta).div_(2 * roots).split(  # as sqrt's backward
                [l1.numel() for _, l1 in groups])
            for (term, _), scale in zip(groups, col):
                for m in term:
                    mats.append(m)
                    scales.append(scale[None, :])
        if not mats:
            return None
        value = values[0] if len(values) == 1 else values[0] + values[1]
    return _SignScaled.apply(value, scales, *mats)
