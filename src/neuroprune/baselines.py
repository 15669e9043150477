"""Mechanics of the baselines NeuroPrune is compared with, on exactly the matrices it counts
(method.md section 5: Q, K, V, O and the MLP matrices of every block, found by the same
architecture discovery), so sparsity and compaction numbers are comparable:

- plain l1 (the paper's baseline for T5 and OPT): sum of |w|, no preferential attachment, no
  group structure, no head removal;
- gradual magnitude pruning (Zhu & Gupta 2017, "To prune, or not to prune"): unstructured,
  every matrix pruned to the same sparsity by weight magnitude, the sparsity following the cubic
  schedule, masks re-applied after every optimiser step so pruned weights stay exactly zero.

Orchestration (when these run inside training) lives in `neuroprune.methods`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .controller import cubic_schedule

if TYPE_CHECKING:
    from .pruner import NeuroPrune


def counted_matrices(pruner: NeuroPrune) -> list[torch.Tensor]:
    """Every matrix of the section 5 measure, as live `(out, in)` views of the parameters."""
    return [m for unit in [*pruner.attention, *pruner.mlps] for m in unit.matrices().values()]


def l1_penalty(pruner: NeuroPrune) -> torch.Tensor:
    """sum |w| over the counted matrices (differentiable, unweighted)."""
    return sum(m.abs().sum() for m in counted_matrices(pruner))


@torch.no_grad()
def magnitude_mask(mat: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Boolean keep-mask zeroing the `round(sparsity * numel)` smallest-magnitude entries of `mat`
    (entries already zero go first, so a mask never un-prunes)."""
    n_prune = int(round(sparsity * mat.numel()))
    keep = torch.ones_like(mat, dtype=torch.bool)
    if n_prune > 0:
        smallest = mat.abs().flatten().topk(n_prune, largest=False).indices
        keep.view(-1)[smallest] = False
    return keep


class GradualMagnitudePruning:
    """Zhu & Gupta's gradual pruning: every `interval` steps inside the ramp, recompute the masks
    at the scheduled sparsity; after every optimiser step, re-apply them.

    The schedule is `controller.cubic_schedule` with initial sparsity 0: the same ramp the
    target-sparsity controller uses, so the two see the same target trajectory."""

    def __init__(
        self,
        pruner: NeuroPrune,
        final_sparsity: float,
        ramp_begin: float = 0.0,
        ramp_end: float = 0.7,
        interval: int = 10,
    ) -> None:
        self.pruner = pruner
        self.final_sparsity = final_sparsity
        self.ramp_begin, self.ramp_end, self.interval = ramp_begin, ramp_end, max(1, interval)
        self.current = 0.0
        self.masks: list[torch.Tensor] | None = None

    def sparsity_at(self, step: int, total_steps: int) -> float:
        return cubic_schedule(step, total_steps, self.final_sparsity, 0.0, self.ramp_begin, self.ramp_end)

    @torch.no_grad()
    def step(self, step: int, total_steps: int) -> float:
        """Call after each optimiser step (`step` counts from 1): update masks when due (and
        always at the last step, so the run ends exactly at the final sparsity), then apply them."""
        due = step % self.interval == 0 or step >= total_steps
        target = self.sparsity_at(step, total_steps)
        if due and target != self.current:
            self.current = target
            self.masks = [magnitude_mask(m, target) for m in counted_matrices(self.pruner)]
        self.apply()
        return self.current

    @torch.no_grad()
    def apply(self) -> None:
        if self.masks is None:
            return
        for mat, keep in zip(counted_matrices(self.pruner), self.masks):
            mat.masked_fill_(~keep, 0.0)

    def restore(self, sparsity: float) -> None:
        """After a resume: the zeros in the weights are the masks."""
        self.current = sparsity
        self.masks = [m != 0 for m in counted_matrices(self.pruner)] if sparsity > 0 else None
