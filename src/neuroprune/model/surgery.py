"""Low-level surgery on projection modules (`nn.Linear` and HF's transposed `Conv1D`).

Everything above this module sees a projection as a matrix in `nn.Linear` layout
``(out_features, in_features)``; only here do we care that GPT-2's `Conv1D` stores the transpose.
Surgery replaces parameters with new, smaller ones and reports what it did as `ParamChange`s,
so an optimiser's state can follow (see `neuroprune.model.optim`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

try:  # transformers' GPT-2 style projection: weight is (in, out)
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a hard dependency
    Conv1D = ()  # type: ignore[assignment]


@dataclass
class ParamChange:
    """`new` is `old.index_select(dim, index)`: optimiser state of `old` can be sliced the same way."""

    old: nn.Parameter
    new: nn.Parameter
    dim: int
    index: torch.Tensor


def is_projection(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D))


def is_transposed(module: nn.Module) -> bool:
    return isinstance(module, Conv1D)


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The weight as ``(out, in)``, a differentiable view of the parameter."""
    return module.weight.t() if is_transposed(module) else module.weight


def in_features(module: nn.Module) -> int:
    return weight_matrix(module).shape[1]


def out_features(module: nn.Module) -> int:
    return weight_matrix(module).shape[0]


def _replace(module: nn.Module, name: str, dim: int, index: torch.Tensor) -> ParamChange | None:
    old = getattr(module, name, None)
    if old is None:
        return None
    new = nn.Parameter(old.detach().index_select(dim, index).clone(), requires_grad=old.requires_grad)
    setattr(module, name, new)
    return ParamChange(old, new, dim, index)


def select_outputs(module: nn.Module, index: torch.Tensor) -> list[ParamChange]:
    """Keep only the output features `index` (rows in `(out, in)` layout), bias included."""
    index = index.to(module.weight.device, torch.long)
    changes = [_replace(module, "weight", 1 if is_transposed(module) else 0, index)]
    changes.append(_replace(module, "bias", 0, index))
    if is_transposed(module):
        module.nf = len(index)
    else:
        module.out_features = len(index)
    return [c for c in changes if c is not None]


def select_inputs(module: nn.Module, index: torch.Tensor) -> list[ParamChange]:
    """Keep only the input features `index` (columns in `(out, in)` layout)."""
    index = index.to(module.weight.device, torch.long)
    change = _replace(module, "weight", 0 if is_transposed(module) else 1, index)
    if not is_transposed(module):
        module.in_features = len(index)
    return [change] if change is not None else []


def head_rows(heads: torch.Tensor | list[int], head_dim: int) -> torch.Tensor:
    """Row indices of the given heads in a head-major projection (head h owns rows h*d..h*d+d-1)."""
    heads = torch.as_tensor(heads, dtype=torch.long)
    return (heads[:, None] * head_dim + torch.arange(head_dim)[None, :]).reshape(-1)
