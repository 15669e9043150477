"""The methods behind `--method`: NeuroPrune steered to a target sparsity, and the baselines it is
compared with (plain l1, gradual magnitude pruning, dense), as `trainer.PruningMethod`s, so the
Trainer, the CLI and the benchmarks run them all alike.

Every method is a `trainer.NeuroPruneMethod` underneath: the same `NeuroPrune` object finds the
same matrices, the same `finalize()` runs at the end, the same `SparsityReport` is written and the
same compaction (`neuroprune.compact`) follows, so every method's numbers are comparable. A plain
training loop drives them with the same hooks the Trainer calls::

    method = build_method("neuroprune", model, config, target_sparsity=0.9)
    method.on_train_begin(total_steps, optimizer)
    for step in 1..total_steps:
        loss = task_loss + (method.regularization_loss() or 0); ...; optimizer.step()
        remap_optimizer(optimizer, method.on_step_end(step))
    ...                                  # after every epoch:
    remap_optimizer(optimizer, method.on_epoch_end(epoch))
    method.on_train_end()               # finalize: |w| < eps -> 0
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from .baselines import GradualMagnitudePruning, l1_penalty
from .config import NeuroPruneConfig
from .controller import (
    SparsityTarget,
    TargetController,
    count_of,
    cubic_schedule,
    fraction,
    near_zero_by_kind,
)
from .errors import ConfigError
from .pruner import NeuroPrune
from .surgery import ParamChange
from .trainer import NeuroPruneMethod

METHODS: tuple[str, ...] = ("neuroprune", "l1", "gmp", "dense")


class ScheduledMethod(NeuroPruneMethod):
    """A method whose per-step behaviour depends on where training is (a schedule) and on the
    optimiser's learning rate: `on_train_begin` tells it both."""

    def __init__(self, pruner: NeuroPrune, prune_every_steps: int = 0, target: SparsityTarget | None = None):
        super().__init__(pruner, prune_every_steps)
        self.target = target
        self.total_steps = 0
        self.optimizer: torch.optim.Optimizer | None = None

    def on_train_begin(self, total_steps: int, optimizer: torch.optim.Optimizer | None) -> None:
        self.total_steps, self.optimizer = total_steps, optimizer

    def summary(self) -> dict[str, Any]:
        """Recorded beside the sparsity report: method, target and achieved sparsity."""
        return {
            "method": self.name,
            "target_sparsity": self.target.sparsity if self.target else None,
            "achieved_sparsity": self.pruner.sparsity_report().sparsity,
        }


class DenseMethod(ScheduledMethod):
    """Plain fine-tuning; still finalised and reported like the others."""

    name = "dense"


ATTENTION_KINDS = frozenset({"q", "k", "v", "qkv"})
MLP_KINDS = frozenset({"up", "gate", "down"})
ALL_KINDS = ATTENTION_KINDS | MLP_KINDS | {"o"}
# A part this close below its share of the schedule holds: the limited step approaches the share
# from below and would otherwise keep taking ever shorter steps without pausing.
AT_TARGET = 1e-3
# The head target is reached after this fraction of the sparsity ramp: zeros a head-pruning pass
# adds cannot be taken back, so the penalties must still have room to make up for them.
HEADS_RAMP = 0.5


@dataclasses.dataclass(frozen=True)
class Part:
    """A group of matrices one penalty weight acts on: `weight` ("alpha" or "beta") is steered
    from the sparsity of the matrix kinds `kinds` alone."""

    name: str
    weight: str
    kinds: frozenset[str]


class PenaltyMethod(ScheduledMethod):
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
    """

    def __init__(self, pruner: NeuroPrune, prune_every_steps: int = 0, target: SparsityTarget | None = None,
                 proximal: bool | None = None) -> None:
        super().__init__(pruner, prune_every_steps, target)
        cfg = pruner.config
        self.base = {"alpha": cfg.alpha, "beta": cfg.beta}
        self.parts = [p for p in self.define_parts() if self.base[p.weight] > 0]
        if target is not None and not self.parts:
            raise ConfigError("a target sparsity needs alpha or beta > 0: the controller scales them.")
        self.controllers = {p.name: TargetController(target) for p in self.parts} if target else {}
        self.proximal = target is not None if proximal is None else proximal
        self.scales = {p.name: 1.0 for p in self.parts}
        self.counts: dict[str, tuple[int, int]] | None = None  # near-zero counts at the last step
        self.zeros = ZeroMasks(pruner)

    def define_parts(self) -> list[Part]:
        kinds = MLP_KINDS | ({"o"} if self.pruner.config.output_penalty else set())
        return [Part("mlp", "alpha", frozenset(kinds)), Part("attention", "beta", ATTENTION_KINDS)]

    def part_penalty(self, parts: list[Part]) -> torch.Tensor:
        """The weighted penalty of `parts` only (current alpha / beta applied)."""
        return sum(self.pruner.weighted_penalties(tuple(p.weight for p in parts)).values())

    def penalty(self) -> torch.Tensor:
        """The weighted penalty of the whole model."""
        return self.pruner.regularization_loss()

    def regularization_loss(self) -> torch.Tensor | None:
        return None if self.proximal or not any(self.base.values()) else self.penalty()

    @property
    def measured(self) -> float | None:
        """The section 5 sparsity measured after the last step (None before the first)."""
        return None if self.counts is None else fraction(self.counts)

    @property
    def holding(self) -> bool:
        return self.target is not None and self.target.hold

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

    def on_step_end(self, step: int) -> list[ParamChange]:
        if self.target is not None and not self.total_steps:
            raise ConfigError("a target sparsity needs on_train_begin(total_steps, optimizer) first.")
        if self.holding:
            self.zeros.apply()
        if self.proximal:
            self.proximal_steps(step)
        if self.controllers:
            self.counts = near_zero_by_kind(self.pruner)
            for part in self.parts:
                measured = fraction(self.counts, part.kinds)
                goal = self.part_target(step, self.counts, part)
                loop = self.controllers[part.name]
                self.scales[part.name] = loop.update(step, self.total_steps, measured, goal)
            self.apply_scales()
        changes = super().on_step_end(step)
        if self.holding:
            self.zeros.record()
        return changes

    def proximal_steps(self, step: int) -> None:
        """One proximal step per part still below its share of the schedule (all parts without
        a target), each no longer than that share allows (`SparsityTarget.limit_step`)."""
        active = self.parts
        if self.holding and self.counts is not None:  # pause the parts at target after the last step
            active = [p for p in self.parts
                      if fraction(self.counts, p.kinds) < self.part_target(step, self.counts, p) - AT_TARGET]
        lr = self.optimizer.param_groups[0]["lr"] if self.optimizer is not None else 1.0
        hard = self.target is not None and self.target.step == "hard"
        now = near_zero_by_kind(self.pruner) if self.target is not None and self.target.limit_step else None
        for part in active:
            room = None
            if now is not None:  # entries this part may still lose this step
                zeros, total = count_of(now, part.kinds)
                room = max(0, math.floor(self.part_target(step, now, part) * total) - zeros)
            params = [p for kind, p in kind_parameters(self.pruner) if kind in part.kinds]
            proximal_step(self.part_penalty([part]), params, lr, hard, room, self.pruner.config.eps)

    def apply_scales(self) -> None:
        for part in self.parts:
            setattr(self.pruner.config, part.weight, self.base[part.weight] * self.scales[part.name])

    def on_epoch_end(self, epoch: int) -> list[ParamChange]:
        changes = super().on_epoch_end(epoch)
        if self.holding:
            self.zeros.record()
        return changes

    def on_train_begin(self, total_steps: int, optimizer: torch.optim.Optimizer | None) -> None:
        super().on_train_begin(total_steps, optimizer)
        if self.holding:
            self.zeros.record()  # after a resume: the zeros already made

    def log_values(self, detailed: bool = False) -> dict[str, float]:
        cfg = self.pruner.config
        values = {**super().log_values(detailed), "alpha": cfg.alpha, "beta": cfg.beta}
        if self.target is not None and self.counts is not None:
            values["target_sparsity_now"] = self.overall_target(self._step)
            values["near_zero_sparsity"] = self.measured
            for part in self.parts:
                values[f"near_zero_sparsity_{part.name}"] = fraction(self.counts, part.kinds)
        return values

    def summary(self) -> dict[str, Any]:
        return {**super().summary(), "alpha": self.pruner.config.alpha, "beta": self.pruner.config.beta,
                "proximal": self.proximal}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "scales": dict(self.scales), "base": dict(self.base),
                "controllers": {name: c.state_dict() for name, c in self.controllers.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.base = dict(state.get("base", self.base))
        self.scales.update(state.get("scales", {}))
        self.apply_scales()
        for name, saved in state.get("controllers", {}).items():
            self.controllers[name] = TargetController.from_state_dict(saved)


class TargetNeuroPrune(PenaltyMethod):
    """NeuroPrune (both regularisers, redundant heads removed every epoch / `prune_every_steps`),
    with alpha and beta steered to `target` when one is given, and theta steered to the target
    number of heads when the target has one (`SparsityTarget.heads`)."""

    name = "neuroprune"

    def __init__(self, pruner: NeuroPrune, prune_every_steps: int = 0, target: SparsityTarget | None = None,
                 proximal: bool | None = None) -> None:
        super().__init__(pruner, prune_every_steps, target, proximal)
        heads = target.heads if target is not None else None
        if heads is None:
            return
        if not pruner.config.prune_heads:
            raise ConfigError("a target number of heads needs head pruning: drop prune_heads=False.")
        fewest = sum(u.group_size for u in pruner.attention)  # one head (key/value group) per block
        most = sum(u.original_heads for u in pruner.attention)
        if not fewest <= heads <= most:
            raise ConfigError(
                f"target number of heads {heads} is out of range for this model: it has {most} heads "
                f"in {len(pruner.attention)} attention blocks, and every block keeps at least one "
                f"({fewest} in all)."
            )
        attention = sum(sum(u.original_numel.values()) for u in pruner.attention)
        counted = attention + sum(sum(m.original_numel.values()) for m in pruner.mlps)
        implied = (1 - heads / most) * attention / counted
        if implied > target.sparsity + 0.02:
            raise ConfigError(
                f"keeping {heads} of {most} heads removes {implied:.1%} of the counted weights by "
                f"itself, more than the target sparsity {target.sparsity:.1%}: ask for more heads "
                "or a higher sparsity."
            )

    def on_train_begin(self, total_steps: int, optimizer: torch.optim.Optimizer | None) -> None:
        super().on_train_begin(total_steps, optimizer)
        t = self.target
        if t is not None and t.heads is not None and not self.prune_every_steps:
            # passes at epoch ends only would fall after the head ramp: ~10 passes inside it
            ramp_steps = HEADS_RAMP * (t.ramp_end - t.ramp_begin) * total_steps
            self.prune_every_steps = max(1, round(ramp_steps / 10))

    def heads_target(self, step: int) -> int | None:
        """The scheduled number of heads for `step` (None without a head target)."""
        if self.target is None or self.target.heads is None:
            return None
        t = self.target
        total = sum(u.original_heads for u in self.pruner.attention)
        end = t.ramp_begin + HEADS_RAMP * (t.ramp_end - t.ramp_begin)
        scheduled = cubic_schedule(step, self.total_steps, t.heads, total, t.ramp_begin, end)
        return math.ceil(scheduled - 1e-9)

    def _prune(self) -> list[ParamChange]:
        goal = self.heads_target(self._step)
        if goal is not None:
            theta = self.pruner.theta_for_heads(goal)
            if theta is None:  # only identical heads could go, and even they are too many
                self._pruned_at = self._step
                return []
            self.pruner.config.theta = theta
        return super()._prune()

    def log_values(self, detailed: bool = False) -> dict[str, float]:
        values = super().log_values(detailed)
        goal = self.heads_target(self._step)
        if goal is not None:
            values.update(target_heads_now=goal, theta=self.pruner.config.theta)
        return values

    def summary(self) -> dict[str, Any]:
        out = super().summary()
        if self.target is not None and self.target.heads is not None:
            report = self.pruner.sparsity_report()
            out.update(target_heads=self.target.heads, heads_kept=report.heads_kept)
        return out


class L1Method(PenaltyMethod):
    """Plain l1, alpha * sum |w|, on every counted matrix: no degree weighting, no groups, no
    head removal (the pruner is built with prune_heads=False)."""

    name = "l1"

    def define_parts(self) -> list[Part]:
        return [Part("all", "alpha", ALL_KINDS)]

    def part_penalty(self, parts: list[Part]) -> torch.Tensor:
        return self.penalty()

    def penalty(self) -> torch.Tensor:
        return self.pruner.config.alpha * l1_penalty(self.pruner)


class GMPMethod(ScheduledMethod):
    """Gradual magnitude pruning to the target with the target's cubic ramp; masks re-applied
    after every optimiser step."""

    name = "gmp"

    def __init__(self, pruner: NeuroPrune, target: SparsityTarget, interval: int = 10) -> None:
        super().__init__(pruner, 0, target)
        self.gmp = GradualMagnitudePruning(
            pruner, target.sparsity, target.ramp_begin, target.ramp_end, interval
        )

    def on_step_end(self, step: int) -> list[ParamChange]:
        self.gmp.step(step, self.total_steps)
        return []

    def log_values(self, detailed: bool = False) -> dict[str, float]:
        return {**super().log_values(detailed), "target_sparsity_now": self.gmp.current}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "gmp_sparsity": self.gmp.current}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.gmp.restore(state.get("gmp_sparsity", 0.0))


class ScheduleCallback(TrainerCallback):
    """Tells a `ScheduledMethod` inside a `NeuroPruneTrainer` how long training is and which
    optimiser runs it (for the learning rate of the proximal step)."""

    def __init__(self, method: ScheduledMethod) -> None:
        self.method = method

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        self.method.on_train_begin(state.max_steps, getattr(optimizer, "optimizer", optimizer))


def check_method(name: str, target_sparsity: float | None, target_heads: int | None = None) -> None:
    """Validate `--method` / `--target-sparsity` / `--target-heads` before any model is loaded."""
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}.")
    if target_heads is not None:
        if name != "neuroprune":
            raise ConfigError(
                f"--target-heads steers NeuroPrune's head pruning; --method {name} removes no heads."
            )
        if target_sparsity is None:
            raise ConfigError("--target-heads needs --target-sparsity too (the heads ramp with it).")
    if target_sparsity is not None:
        SparsityTarget(target_sparsity, heads=target_heads)
    if name == "gmp" and target_sparsity is None:
        raise ConfigError("--method gmp needs --target-sparsity (the sparsity to prune to).")
    if name == "dense" and target_sparsity is not None:
        raise ConfigError("--method dense does not sparsify: drop --target-sparsity or pick another method.")


def build_method(
    name: str,
    model: nn.Module,
    config: NeuroPruneConfig | None = None,
    target_sparsity: float | SparsityTarget | None = None,
    prune_every_steps: int = 0,
    target_heads: int | None = None,
    **kwargs: Any,
) -> ScheduledMethod:
    """The method `name` (one of `METHODS`) on `model`. `target_sparsity` (a fraction, or a
    `SparsityTarget` with its schedule and gains) switches on the controller for neuroprune / l1
    and is required by gmp; `target_heads` (neuroprune) also steers theta to that number of
    heads. Extra keyword arguments go to the
    method (`proximal` for neuroprune / l1, `interval` for gmp). `config` is copied: the
    controller rewrites alpha, beta (and theta) as it goes."""
    settings = target_sparsity if isinstance(target_sparsity, SparsityTarget) else None
    level = settings.sparsity if settings is not None else target_sparsity
    if settings is not None and target_heads is not None:
        settings = dataclasses.replace(settings, heads=target_heads)
    heads = settings.heads if settings is not None else target_heads
    check_method(name, level, heads)
    config = dataclasses.replace(config or NeuroPruneConfig())
    target = settings or (SparsityTarget(level, heads=heads) if level is not None else None)
    if name == "neuroprune":
        return TargetNeuroPrune(NeuroPrune(model, config), prune_every_steps, target, **kwargs)
    if name == "l1":
        no_heads = dataclasses.replace(config, prune_heads=False)
        return L1Method(NeuroPrune(model, no_heads), 0, target, **kwargs)
    silent = dataclasses.replace(config, alpha=0.0, beta=0.0, prune_heads=False)
    if name == "gmp":
        return GMPMethod(NeuroPrune(model, silent), target, **kwargs)  # type: ignore[arg-type]
    return DenseMethod(NeuroPrune(model, silent))


def kind_parameters(pruner: NeuroPrune) -> list[tuple[str, nn.Parameter]]:
    """(matrix kind, weight parameter) behind every counted matrix (current objects: head
    removal replaces them)."""
    modules: list[tuple[str, nn.Module | None]] = []
    for unit in pruner.attention:
        fused = [("qkv", unit.qkv)] if unit.qkv is not None else [("q", unit.q), ("k", unit.k), ("v", unit.v)]
        modules += [*fused, ("o", unit.o)]
    for mlp in pruner.mlps:
        modules += [("gate", mlp.gate), ("up", mlp.up), ("down", mlp.down)]
    return [(kind, m.weight) for kind, m in modules if m is not None]


def matrix_parameters(pruner: NeuroPrune) -> list[nn.Parameter]:
    """The weight parameters behind the counted matrices."""
    return [p for _, p in kind_parameters(pruner)]


class ZeroMasks:
    """The exact zeros of the counted matrices, re-imposed after each optimiser step: a weight the
    proximal step has removed stays removed (AdamW's momentum would otherwise revive it and the
    penalty would have to fight it, and so shrink every surviving weight, for the rest of the run)."""

    def __init__(self, pruner: NeuroPrune) -> None:
        self.pruner = pruner
        self.masks: list[torch.Tensor] = []

    @torch.no_grad()
    def record(self) -> None:
        self.masks = [p == 0 for p in matrix_parameters(self.pruner)]

    @torch.no_grad()
    def apply(self) -> None:
        for param, zero in zip(matrix_parameters(self.pruner), self.masks):
            if param.shape == zero.shape:
                param.masked_fill_(zero, 0.0)


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
    lr * c (`step_factor`). Returns c (1.0: the full step; 0.0: no step was taken)."""
    if not penalty.requires_grad:
        return 0.0
    grads = torch.autograd.grad(penalty, params, allow_unused=True)
    pairs = [(p, g) for p, g in zip(params, grads) if g is not None]
    c = 1.0 if room is None else step_factor(pairs, lr, hard, room, eps)
    with torch.no_grad():
        for param, grad in pairs:
            new = param - (lr * c) * grad
            crossing = new * param <= 0
            if hard:
                param.masked_fill_(crossing, 0.0)
                continue
            new[crossing] = 0.0
            param.copy_(new)
    return c


@torch.no_grad()
def step_factor(pairs: list[tuple[torch.Tensor, torch.Tensor]], lr: float, hard: bool, room: int,
                eps: float) -> float:
    """The largest c <= 1 for which a proximal step of lr * c puts at most `room` more entries
    below `eps`. An entry moving towards zero gets there at c = (|w| - eps) / (lr |g|) (soft step;
    |w| / (lr |g|) for the hard one, which only zeroes what crosses): c stops just short of the
    (room + 1)-th smallest of these."""
    reach = []
    for param, grad in pairs:
        size = param.abs()
        moving = (param * grad > 0) & (size >= eps)
        distance = size[moving] if hard else size[moving] - eps
        t = distance / (lr * grad.abs()[moving])
        reach.append(t[t <= 1])
    candidates = torch.cat(reach) if reach else torch.zeros(0)
    if candidates.numel() <= room:
        return 1.0
    return float(torch.kthvalue(candidates, room + 1).values) * (1 - 1e-6)
