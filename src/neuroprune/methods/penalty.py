"""`PenaltyMethod`: a penalty weighted by alpha (and beta), optionally steered to a target
sparsity by a feedback controller per part of the model (`..controller`), applied through the loss
(the paper) or as a proximal step after each optimiser step. NeuroPrune and plain l1 are both
penalty methods; they differ in the penalty and in what the parts are."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import nn

from neuroprune.config import MethodConfig
from neuroprune.errors import ConfigError
from neuroprune.methods.base import SparsityMethod
from neuroprune.methods.steering import SparsityTarget, TargetController, count_of, fraction
from neuroprune.model.index import ModelIndex
from neuroprune.model.surgery import ParamChange

# A part this close below its share of the schedule holds: the limited step approaches the share
# from below and would otherwise keep taking ever shorter steps without pausing.
AT_TARGET = 1e-3
# The target path's work (measure, controller update, proximal step) runs every `period` steps,
# the proximal step then carrying the learning rate of all steps since the last one; only
# re-imposing the held zeros runs every step. Automatic period: one per STEPS_PER_PERIOD steps of
# the run, at most MAX_PERIOD, so the controller still updates ~25 times in a run of any length
# and a run shorter than 2 * STEPS_PER_PERIOD steps works every step.
STEPS_PER_PERIOD = 25
MAX_PERIOD = 8


def work_period(total_steps: int) -> int:
    """The automatic period of the target path's work for a run of `total_steps` steps."""
    return max(1, min(MAX_PERIOD, total_steps // STEPS_PER_PERIOD))


@dataclasses.dataclass(frozen=True)
class Part:
    """A group of matrices one penalty weight acts on: `weight` ("alpha" or "beta") is steered
    from the sparsity of the matrix kinds `kinds` alone."""

    name: str
    weight: str
    kinds: frozenset[str]


class PenaltyMethod(SparsityMethod):
    """A penalty weighted by alpha (and beta), optionally steered to a target sparsity.

    `proximal=False` adds the penalty to the loss, as the paper does. `proximal=True` (the
    default when a target is given) applies the penalty's gradient as a separate plain-SGD step
    after each optimiser step, setting to exactly zero any weight it would push across zero (the
    proximal operator of the linearised penalty). Why: Adam normalises every update to about `lr`,
    so through the loss no penalty weight can move a weight by more than ~lr per step, and a short
    fine-tuning run (a few hundred steps at lr 5e-5 on weights of ~0.05) cannot reach 90%.
    Decoupled, the step is `lr * alpha * dR/dw`, which the controller can scale; the weights it
    removes are exact zeros, so finalize() cuts nothing that training did not already remove.

    With a target, every `Part` (for NeuroPrune: the MLPs under alpha, Q/K/V under beta) has its
    own controller and is steered to the same share of the target, so that one penalty cannot
    reach the overall number by wiping out its matrices while the other barely acts (measured:
    one loop on the overall value left MiniLM's MLPs 100% dead and Q/K/V 70% at a 90% target).

    Runtime state: `weights` (the current alpha and beta: the user's values times the
    controllers' scales), the controllers, and the counts measured at the last step.
    """

    def __init__(self, model: nn.Module | ModelIndex, config: MethodConfig | None = None,
                 target: SparsityTarget | None = None, proximal: bool | None = None) -> None:
        super().__init__(model, config)
        self.target = target
        # the user's penalty weights; a weight the method's config lacks (l1 has no beta) is off
        self.base = {w: getattr(self.config, w, 0.0) for w in ("alpha", "beta")}
        self.weights = dict(self.base)
        self.parts = [p for p in self.define_parts() if self.base[p.weight] > 0]
        steered = target is not None and target.sparsity is not None  # a FLOP target is structural
        if steered and not self.parts:
            raise ConfigError("a target sparsity needs alpha or beta > 0: the controller scales them.")
        self.controllers = {p.name: TargetController(target) for p in self.parts} if steered else {}
        self.proximal = steered if proximal is None else proximal
        self.scales = {p.name: 1.0 for p in self.parts}
        self.counts: dict[str, tuple[int, int]] | None = None  # near-zero counts at the last step
        self.zeros = ZeroMasks(self.index)
        self.work_every: int | None = None  # the period of the target path's work; None: work_period()
        self.period = 1
        self.worked_at = 0  # the last step whose target-path work ran

    @property
    def alpha(self) -> float:
        return self.weights["alpha"]

    @property
    def beta(self) -> float:
        return self.weights["beta"]

    @property
    def finalize_kinds(self) -> frozenset[str]:  # type: ignore[override]
        return frozenset().union(*(p.kinds for p in self.parts))  # what is penalised

    def define_parts(self) -> list[Part]:
        """The parts of the model the penalty weights act on (overridden by each method)."""
        raise NotImplementedError

    def part_penalty(self, parts: list[Part]) -> torch.Tensor:
        """The weighted penalty of `parts` only (current weights applied)."""
        raise NotImplementedError

    def penalty(self) -> torch.Tensor:
        """The weighted penalty of the whole model."""
        return self.part_penalty(self.parts) if self.parts else torch.zeros((), device=self.device)

    def regularization_loss(self) -> torch.Tensor:
        if self.proximal or not self.parts:
            return super().regularization_loss()
        return self.penalty()

    # --- steering ------------------------------------------------------------------------------
    @property
    def measured(self) -> float | None:
        """The section 5 sparsity measured after the last step (None before the first)."""
        return None if self.counts is None else fraction(self.counts)

    @property
    def holding(self) -> bool:
        return self.target is not None and self.target.sparsity is not None and self.target.hold

    def overall_target(self, step: int) -> float:
        """The scheduled section 5 sparsity for `step`."""
        return next(iter(self.controllers.values())).target_at(step, self.total_steps)

    def part_target(self, step: int, counts: dict[str, tuple[int, int]], part: Part | None = None) -> float:
        """The sparsity `part` must reach for the whole to be at the scheduled target (without
        `part`: the common share). Matrices no penalty touches (W^O for NeuroPrune by default)
        contribute only what removed heads took from them; a part above the common share (a
        head-pruning pass can put it there, and held zeros do not come back) counts as it is, and
        the other parts' goals drop by its excess."""
        steered = set().union(*(p.kinds for p in self.parts))
        free_zeros, _ = count_of(counts, set(counts) - steered)
        _, total = count_of(counts)
        needed = self.overall_target(step) * total - free_zeros
        share = needed / max(count_of(counts, steered)[1], 1)
        goal = share
        if part is not None:
            for other in self.parts:
                if other is not part:
                    z, t = count_of(counts, other.kinds)
                    needed -= max(z, share * t)
            goal = needed / max(count_of(counts, part.kinds)[1], 1)
        return min(0.999, max(0.0, goal))

    def on_train_begin(self, total_steps: int, optimizer: torch.optim.Optimizer | None = None) -> None:
        super().on_train_begin(total_steps, optimizer)
        self.period = self.work_every or work_period(total_steps)
        if self.holding:
            self.zeros.record()  # after a resume: the zeros the loaded weights already have

    def on_step_end(self, step: int) -> list[ParamChange]:
        if self.target is not None and not self.total_steps:
            raise ConfigError("a target sparsity needs on_train_begin(total_steps, optimizer) first.")
        super().on_step_end(step)
        if self.holding:
            self.zeros.apply()
        due = self.period <= 1 or step % self.period == 0 or step >= self.total_steps
        if due:
            if self.proximal:
                self.proximal_steps(step)
            if self.controllers:
                self.counts = self.near_zero_by_kind()
                for part in self.parts:
                    measured = fraction(self.counts, part.kinds)
                    goal = self.part_target(step, self.counts, part)
                    loop = self.controllers[part.name]
                    steps = max(1, min(self.period, step - self.worked_at))
                    self.scales[part.name] = loop.update(step, self.total_steps, measured, goal, steps)
                self.apply_scales()
            self.worked_at = step
        changes = self.structural_step(step)
        if self.holding and (due or changes):  # between work steps only the optimiser ran: no new zeros
            self.zeros.record()
        return changes

    def structural_step(self, step: int) -> list[ParamChange]:
        """Structure changes after step `step`'s penalty work (none by default)."""
        return []

    def proximal_steps(self, step: int) -> None:
        """One proximal step per part still below its share of the schedule (all parts without
        a target), each no longer than that share allows (`SparsityTarget.limit_step`)."""
        active = self.parts
        if self.holding and self.counts is not None:  # pause the parts at target after the last step
            active = [p for p in self.parts
                      if fraction(self.counts, p.kinds) < self.part_target(step, self.counts, p) - AT_TARGET]
        lr = self.optimizer.param_groups[0]["lr"] if self.optimizer is not None else 1.0
        lr *= max(1, min(self.period, step - self.worked_at))  # every step's since the last work
        hard = self.target is not None and self.target.step == "hard"
        limit = self.target is not None and self.target.limit_step
        now = self.near_zero_by_kind() if limit else None
        for part in active:
            room = None
            if now is not None:  # entries this part may still lose this step
                zeros, total = count_of(now, part.kinds)
                room = max(0, math.floor(self.part_target(step, now, part) * total) - zeros)
            params = self.index.counted_weights(part.kinds)
            proximal_step(self.part_penalty([part]), params, lr, hard, room, self.config.eps)

    def near_zero_by_kind(self) -> dict[str, tuple[int, int]]:
        """Per matrix kind, the zeros `finalize()` would leave now (the controller's measure)."""
        return self.index.near_zero_by_kind(self.config.eps, self.finalize_kinds)

    def apply_scales(self) -> None:
        for part in self.parts:
            self.weights[part.weight] = self.base[part.weight] * self.scales[part.name]

    def on_epoch_end(self, epoch: int) -> list[ParamChange]:
        changes = super().on_epoch_end(epoch)
        if self.holding:
            self.zeros.record()
        return changes

    # --- logs and state ------------------------------------------------------------------------
    def log_values(self, detailed: bool = False) -> dict[str, float]:
        values = {**super().log_values(detailed), "alpha": self.alpha, "beta": self.beta}
        if self.target is not None and self.counts is not None:
            values["target_sparsity_now"] = self.overall_target(self.step)
            values["near_zero_sparsity"] = self.measured
            for part in self.parts:
                values[f"near_zero_sparsity_{part.name}"] = fraction(self.counts, part.kinds)
        return values

    def summary(self) -> dict[str, Any]:
        return {**super().summary(), "alpha": self.alpha, "beta": self.beta, "proximal": self.proximal}

    def state_dict(self) -> dict[str, Any]:
        counts = None if self.counts is None else {k: list(v) for k, v in self.counts.items()}
        return {**super().state_dict(), "weights": dict(self.weights), "scales": dict(self.scales),
                "counts": counts, "worked_at": self.worked_at,
                "controllers": {name: c.state_dict() for name, c in self.controllers.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.scales.update(state.get("scales", {}))
        self.weights.update(state.get("weights", {}))
        saved = state.get("counts")
        self.counts = None if saved is None else {k: (int(z), int(t)) for k, (z, t) in saved.items()}
        self.worked_at = int(state.get("worked_at", self.step))
        for name, saved_loop in state.get("controllers", {}).items():
            self.controllers[name] = TargetController.from_state_dict(saved_loop)


class ZeroMasks:
    """The exact zeros of the counted matrices, re-imposed after each optimiser step: a weight the
    proximal step has removed stays removed (AdamW's momentum would otherwise revive it and the
    penalty would have to fight it, and so shrink every surviving weight, for the rest of the run).

    Kept as keep-masks (True: non-zero) and re-imposed by one multi-tensor multiply, which costs a
    fifth of a `masked_fill_` per matrix on CPU; a weight it zeroes may become -0.0, equal to 0."""

    def __init__(self, index: ModelIndex) -> None:
        self.index = index
        self.keep: list[torch.Tensor] = []

    @property
    def masks(self) -> list[torch.Tensor]:
        """True where a counted weight was exactly zero when last recorded."""
        return [~k for k in self.keep]

    @torch.no_grad()
    def record(self) -> None:
        self.keep = [p != 0 for p in self.index.counted_weights()]

    @torch.no_grad()
    def apply(self) -> None:
        pairs = [(p, k) for p, k in zip(self.index.counted_weights(), self.keep) if p.shape == k.shape]
        if pairs:
            torch._foreach_mul_([p for p, _ in pairs], [k for _, k in pairs])


def proximal_step(
    penalty: torch.Tensor,
    params: list[nn.Parameter],
    lr: float,
    hard: bool = False,
    room: int | None = None,
    eps: float = 0.0,
) -> float:
    """w <- w - lr * dR/dw, and exactly 0 where that step would cross zero (prox of l1-type R).
    `hard`: zero the weights that step would take across zero and leave the others untouched, so
    the penalty decides *which* weights go without shrinking the ones that stay.
    `room`: at most this many entries may newly fall below `eps`; a longer step is shortened to
    lr * c (`step_factor`). Returns c (1.0: the full step; 0.0: no step was taken).
    Per-step cost: masks by multiplication, no boolean indexing (which costs a host-device
    synchronisation per matrix on a GPU and is slow on CPU), temporaries of one matrix at a time
    (peak memory); a zeroed weight may be -0.0."""
    if not penalty.requires_grad:
        return 0.0
    grads = torch.autograd.grad(penalty, params, allow_unused=True)
    pairs = [(p, g) for p, g in zip(params, grads) if g is not None]
    c = 1.0 if room is None else step_factor(pairs, lr, hard, room, eps)
    with torch.no_grad():
        for param, grad in pairs:
            new = param - (lr * c) * grad
            keep = new * param > 0  # not crossing zero
            if hard:
                param.mul_(keep)
            else:
                param.copy_(new.mul_(keep))
    return c


@torch.no_grad()
def step_factor(pairs: list[tuple[torch.Tensor, torch.Tensor]], lr: float, hard: bool, room: int,
                eps: float) -> float:
    """The largest c <= 1 for which a proximal step of lr * c puts at most `room` more entries
    below `eps`. An entry moving towards zero gets there at c = (|w| - eps) / (lr |g|) (soft step;
    |w| / (lr |g|) for the hard one, which only zeroes what crosses): c stops just short of the
    (room + 1)-th smallest of these. One synchronisation when the full step fits (the count); only
    when it does not, the candidates are gathered (boolean indexing) for their kth value."""
    reach, within = [], []
    for param, grad in pairs:
        size = param.abs()
        moving = (param * grad > 0) & (size >= eps)
        t = (size if hard else size.sub_(eps)).div_(grad.abs().mul_(lr))
        t = torch.where(moving, t, math.inf)
        reach.append(t)
        within.append((t <= 1).sum())
    if not within or int(torch.stack(within).sum()) <= room:
        return 1.0
    candidates = torch.cat([t[t <= 1] for t in reach])
    return float(torch.kthvalue(candidates, room + 1).values) * (1 - 1e-6)
