"""Sparsity accounting (method.md section 5) and neuron-degree statistics (section 6).

Zeros are counted against the original dense shapes, so removed heads and neurons count as zeros.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from neuroprune.model.units import AttentionUnit, MLPUnit

HISTOGRAM_BINS = 20


@torch.no_grad()
def row_degree(mats: list[torch.Tensor], eps: float) -> torch.Tensor:
    """Fractional connectivity of each row shared by `mats` (rows concatenated along dim 1):
    the fraction of its entries with |w| >= eps."""
    return degree_of_sizes([m.detach().abs() for m in mats], eps)


@torch.no_grad()
def degree_of_sizes(sizes: list[torch.Tensor], eps: float) -> torch.Tensor:
    """`row_degree` from the matrices' absolute values, for a caller that has them already (the
    penalty needs |w| for its l1 too: one pass over the weights fewer per step)."""
    length = sum(m.shape[1] for m in sizes)
    count = sum((m >= eps).sum(1) for m in sizes)
    return count.to(sizes[0].dtype) / length


@dataclass
class DegreeStats:
    """Distribution of fractional neuron degree over a layer's (original) MLP neurons."""

    mean: float
    sd_percent: float
    histogram: list[int]
    bin_edges: list[float]
    dead: int

    @classmethod
    def of(cls, degrees: torch.Tensor) -> DegreeStats:
        d = degrees.double()
        counts = torch.histc(d, bins=HISTOGRAM_BINS, min=0.0, max=1.0)
        return cls(
            mean=float(d.mean()),
            sd_percent=float(d.std(unbiased=False) * 100),
            histogram=[int(c) for c in counts],
            bin_edges=torch.linspace(0, 1, HISTOGRAM_BINS + 1).tolist(),
            dead=int((d == 0).sum()),
        )


@dataclass
class LayerSparsity:
    name: str
    kind: str  # "attention" or "mlp"
    zeros: int
    total: int
    matrices: dict[str, float]  # per-matrix sparsity against the original shape
    heads_kept: int | None = None
    heads_total: int | None = None
    kept_heads: list[int] | None = None
    degree: DegreeStats | None = None

    @property
    def sparsity(self) -> float:
        return self.zeros / self.total if self.total else 0.0


@dataclass
class SparsityReport:
    """Global and per-layer sparsity, heads kept and neuron-degree statistics."""

    sparsity: float  # regularised matrices of all blocks, against dense shapes
    model_sparsity: float  # every parameter of the model, against the dense model
    zeros: int
    total: int
    heads_kept: int
    heads_total: int
    layers: list[LayerSparsity] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for layer, row in zip(self.layers, out["layers"]):
            row["sparsity"] = layer.sparsity
        return out

    def to_markdown(self) -> str:
        lines = [
            f"sparsity (blocks): {self.sparsity:.2%}  whole model: {self.model_sparsity:.2%}  "
            f"heads kept: {self.heads_kept}/{self.heads_total}",
            "",
            "| layer | kind | sparsity | heads | neuron degree mean | sd (%) | dead neurons |",
            "|---|---|---|---|---|---|---|",
        ]
        for layer in self.layers:
            heads = f"{layer.heads_kept}/{layer.heads_total}" if layer.heads_total else ""
            deg = layer.degree
            stats = f"{deg.mean:.3f} | {deg.sd_percent:.2f} | {deg.dead}" if deg else " | | "
            lines.append(f"| {layer.name} | {layer.kind} | {layer.sparsity:.2%} | {heads} | {stats} |")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_markdown()


def _count(mats: dict[str, torch.Tensor], original: dict[str, int]) -> tuple[int, int, dict[str, float]]:
    zeros = total = 0
    per = {}
    for key, mat in mats.items():
        nz = int(torch.count_nonzero(mat.detach()))
        z = original[key] - nz
        per[key] = z / original[key]
        zeros, total = zeros + z, total + original[key]
    return zeros, total, per


def attention_sparsity(unit: AttentionUnit) -> LayerSparsity:
    zeros, total, per = _count(unit.matrices(), unit.original_numel)
    return LayerSparsity(
        unit.name, "attention", zeros, total, per,
        heads_kept=unit.num_heads, heads_total=unit.original_heads, kept_heads=unit.kept_heads,
    )


def neuron_degrees(unit: MLPUnit, eps: float) -> torch.Tensor:
    """Degree of every original neuron; neurons already removed count as degree 0."""
    present = row_degree(unit.expand_matrices(), eps)
    missing = unit.original_neurons - present.numel()
    return torch.cat([present, present.new_zeros(missing)])


def mlp_sparsity(unit: MLPUnit, eps: float) -> LayerSparsity:
    zeros, total, per = _count(unit.matrices(), unit.original_numel)
    degree = DegreeStats.of(neuron_degrees(unit, eps))
    return LayerSparsity(unit.name, "mlp", zeros, total, per, degree=degree)


def report(
    model: torch.nn.Module,
    attention: list[AttentionUnit],
    mlps: list[MLPUnit],
    eps: float,
    original_parameters: int,
) -> SparsityReport:
    layers = [attention_sparsity(u) for u in attention] + [mlp_sparsity(u, eps) for u in mlps]
    zeros = sum(layer.zeros for layer in layers)
    total = sum(layer.total for layer in layers)
    nonzero = sum(int(torch.count_nonzero(p.detach())) for p in model.parameters())
    return SparsityReport(
        sparsity=zeros / total if total else 0.0,
        model_sparsity=1.0 - nonzero / original_parameters,
        zeros=zeros,
        total=total,
        heads_kept=sum(u.num_heads for u in attention),
        heads_total=sum(u.original_heads for u in attention),
        layers=layers,
    )
