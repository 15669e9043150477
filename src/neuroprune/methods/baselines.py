"""The baselines NeuroPrune is compared with, on exactly the matrices it counts (method.md section
5: Q, K, V, O and the MLP matrices of every block, found by the same `ModelIndex`), so sparsity and
compaction numbers are comparable:

- `Dense`: plain fine-tuning, measured and reported like the others;
- `L1`: plain l1 (the paper's baseline for T5 and OPT), sum |w|, no preferential attachment, no
  groups, no head removal; steered to a target like NeuroPrune;
- `GMP`: gradual magnitude pruning (Zhu & Gupta 2017), unstructured, every matrix pruned to the
  same sparsity by weight magnitude on the cubic schedule, masks re-applied after every step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from neuroprune.config import MethodConfig, check_number
from neuroprune.errors import ConfigError
from neuroprune.methods.base import SparsityMethod
from neuroprune.methods.penalty import Part, PenaltyMethod
from neuroprune.methods.steering import SparsityTarget, cubic_schedule
from neuroprune.model.index import ALL_KINDS, ModelIndex
from neuroprune.model.surgery import ParamChange


@dataclass(frozen=True, kw_only=True)
class DenseConfig(MethodConfig):
    """Dense fine-tuning has no hyper-parameter of its own: only the options every method shares
    (`eps`, below which its reports count a weight as absent, and the discovery options)."""


@dataclass(frozen=True, kw_only=True)
class L1Config(MethodConfig):
    """Plain l1 (the shared options of `MethodConfig` plus):

    Attributes:
        alpha: weight of sum |w| over every counted matrix; the controller scales it when a target
            sparsity is given. 0 switches the penalty off.
    """

    alpha: float = 1e-4

    def validate(self) -> None:
        super().validate()
        check_number("alpha", self.alpha, lower=0.0, inclusive=True)


@dataclass(frozen=True, kw_only=True)
class GMPConfig(MethodConfig):
    """Gradual magnitude pruning (the shared options of `MethodConfig` plus; the sparsity to
    reach and its schedule are the method's `SparsityTarget`):

    Attributes:
        interval: steps between two mask updates inside the schedule's ramp (Zhu & Gupta's
            pruning frequency); the last step always updates, so the run ends at the target.
    """

    interval: int = 10

    def validate(self) -> None:
        super().validate()
        if isinstance(self.interval, bool) or not isinstance(self.interval, int) or self.interval < 1:
            raise ConfigError(f"GMP interval must be a whole number >= 1, got {self.interval!r}.")


class Dense(SparsityMethod):
    """Plain fine-tuning: no penalty, nothing finalised (a dense model stays dense)."""

    name = "dense"
    config_class = DenseConfig


class L1(PenaltyMethod):
    """Plain l1, alpha * sum |w|, on every counted matrix (W^O included)."""

    name = "l1"
    config_class = L1Config

    def define_parts(self) -> list[Part]:
        return [Part("all", "alpha", ALL_KINDS)]

    def part_penalty(self, parts: list[Part]) -> torch.Tensor:
        zero = torch.zeros((), device=self.device)
        return self.alpha * sum((m.abs().sum() for m in self.index.counted_matrices()), zero)


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


class GMP(SparsityMethod):
    """Zhu & Gupta's gradual pruning: every `interval` steps inside the ramp (and at the last
    step, so the run ends exactly at the target), recompute the masks at the scheduled sparsity;
    after every optimiser step, re-apply them. The masks are exact zeros, so nothing is finalised.

    Runtime state: `current`, the sparsity of the masks in force (saved in checkpoints); the masks
    themselves are the zeros of the weights, rebuilt from them in `on_train_begin` after a resume.
    """

    name = "gmp"
    config_class = GMPConfig
    config: GMPConfig

    def __init__(self, model: nn.Module | ModelIndex, config: GMPConfig | None = None,
                 target: SparsityTarget | float | None = None) -> None:
        super().__init__(model, config)
        if target is None:
            raise ConfigError("GMP needs a target sparsity (the sparsity to prune to).")
        self.target = target if isinstance(target, SparsityTarget) else SparsityTarget(target)
        self.interval = self.config.interval
        self.current = 0.0
        self._factors: list[torch.Tensor] | None = None  # keep-masks as 1.0 / 0.0 in each weight's dtype

    def sparsity_at(self, step: int) -> float:
        t = self.target
        return cubic_schedule(step, self.total_steps, t.sparsity, 0.0, t.ramp_begin, t.ramp_end)

    @property
    def masks(self) -> list[torch.Tensor] | None:
        """The keep-masks in force (True: the weight stays), one per counted matrix; None before
        the first pruning step."""
        return None if self._factors is None else [f != 0 for f in self._factors]

    def _set_masks(self, masks: list[torch.Tensor] | None) -> None:
        """Cache the keep-masks as 0/1 factors in each weight's dtype: re-imposed after every
        step by one multi-tensor multiply (`apply`), no per-matrix Python work; a same-dtype
        multiply is ~4x faster on CPU than a `masked_fill_` or a bool multiply (StructureMasks)."""
        mats = self.index.counted_matrices()
        self._factors = None if masks is None else [k.to(m.dtype) for k, m in zip(masks, mats)]

    @torch.no_grad()
    def on_train_begin(self, total_steps: int, optimizer: torch.optim.Optimizer | None = None) -> None:
        super().on_train_begin(total_steps, optimizer)
        # after a resume the checkpoint's weights are loaded by now: their zeros are the masks
        self._set_masks([m != 0 for m in self.index.counted_matrices()] if self.current > 0 else None)

    @torch.no_grad()
    def on_step_end(self, step: int) -> list[ParamChange]:
        super().on_step_end(step)
        due = step % self.interval == 0 or step >= self.total_steps
        target = self.sparsity_at(step)
        if due and target != self.current:
            self.current = target
            self._set_masks([magnitude_mask(m, target) for m in self.index.counted_matrices()])
        self.apply()
        return []

    @torch.no_grad()
    def apply(self) -> None:
        """Zero the pruned weights again (a pruned weight may become -0.0, which equals 0)."""
        if self._factors is None:
            return
        mats = self.index.counted_matrices()
        pairs = [(m, f) for m, f in zip(mats, self._factors) if m.shape == f.shape]
        if len(pairs) != len(mats):
            raise ConfigError("GMP masks no longer match the model's matrices (was the model changed by "
                              "surgery after the masks were made?); rebuild the method for the new model.")
        torch._foreach_mul_([m for m, _ in pairs], [f for _, f in pairs])

    def log_values(self, detailed: bool = False) -> dict[str, float]:
        return {**super().log_values(detailed), "target_sparsity_now": self.current}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "gmp_sparsity": self.current}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.current = float(state.get("gmp_sparsity", 0.0))
