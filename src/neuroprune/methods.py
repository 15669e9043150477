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
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from .baselines import GradualMagnitudePruning, l1_penalty
from .config import NeuroPruneConfig
from .controller import SparsityTarget, TargetController, near_zero_sparsity
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
    """

    def __init__(self, pruner: NeuroPrune, prune_every_steps: int = 0, target: SparsityTarget | None = None,
                 proximal: bool | None = None) -> None:
        super().__init__(pruner, prune_every_steps, target)
        cfg = pruner.config
        self.base = (cfg.alpha, cfg.beta)
        if target is not None and not any(self.base):
            raise ConfigError("a target sparsity needs alpha or beta > 0: the controller scales them.")
        self.controller = TargetController(target) if target is not None else None
        self.proximal = target is not None if proximal is None else proximal
        self.scale = 1.0
        self.measured: float | None = None
        self.zeros = ZeroMasks(pruner)

    def penalty(self) -> torch.Tensor:
        """The weighted penalty (current alpha / beta applied)."""
        return self.pruner.regularization_loss()

    def regularization_loss(self) -> torch.Tensor | None:
        return None if self.proximal or not any(self.base) else self.penalty()

    def set_scale(self, scale: float) -> None:
        self.scale = scale
        self.pruner.config.alpha, self.pruner.config.beta = (w * scale for w in self.base)

    def on_step_end(self, step: int) -> list[ParamChange]:
        holding = self.controller is not None and self.controller.settings.hold
        if holding:
            self.zeros.apply()
        if self.proximal and not (holding and self.at_target(step)):
            lr = self.optimizer.param_groups[0]["lr"] if self.optimizer is not None else 1.0
            proximal_step(self.penalty(), matrix_parameters(self.pruner), lr)
        if self.controller is not None:
            if not self.total_steps:
                raise ConfigError("a target sparsity needs on_train_begin(total_steps, optimizer) first.")
            self.measured = near_zero_sparsity(self.pruner)
            self.set_scale(self.controller.update(step, self.total_steps, self.measured))
        changes = super().on_step_end(step)
        if holding:
            self.zeros.record()
        return changes

    def on_epoch_end(self, epoch: int) -> list[ParamChange]:
        changes = super().on_epoch_end(epoch)
        if self.controller is not None and self.controller.settings.hold:
            self.zeros.record()
        return changes

    def on_train_begin(self, total_steps: int, optimizer: torch.optim.Optimizer | None) -> None:
        super().on_train_begin(total_steps, optimizer)
        if self.controller is not None and self.controller.settings.hold:
            self.zeros.record()  # after a resume: the zeros already made

    def at_target(self, step: int) -> bool:
        """Whether the last measured sparsity already reaches the scheduled target for `step`."""
        target = self.controller.target_at(step, self.total_steps)
        return self.measured is not None and self.measured >= target

    def log_values(self, detailed: bool = False) -> dict[str, float]:
        cfg = self.pruner.config
        values = {**super().log_values(detailed), "alpha": cfg.alpha, "beta": cfg.beta}
        if self.controller is not None and self.controller.history:
            values["target_sparsity_now"] = self.controller.history[-1]["target"]
            values["near_zero_sparsity"] = self.controller.history[-1]["measured"]
        return values

    def summary(self) -> dict[str, Any]:
        return {**super().summary(), "alpha": self.pruner.config.alpha, "beta": self.pruner.config.beta,
                "proximal": self.proximal}

    def state_dict(self) -> dict[str, Any]:
        state = {**super().state_dict(), "scale": self.scale, "base": list(self.base)}
        if self.controller is not None:
            state["controller"] = self.controller.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.base = tuple(state.get("base", self.base))
        self.set_scale(state.get("scale", 1.0))
        if "controller" in state:
            self.controller = TargetController.from_state_dict(state["controller"])


class TargetNeuroPrune(PenaltyMethod):
    """NeuroPrune (both regularisers, redundant heads removed every epoch / `prune_every_steps`),
    with alpha and beta steered to `target` when one is given."""

    name = "neuroprune"


class L1Method(PenaltyMethod):
    """Plain l1, alpha * sum |w|, on every counted matrix: no degree weighting, no groups, no
    head removal (the pruner is built with prune_heads=False)."""

    name = "l1"

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


def check_method(name: str, target_sparsity: float | None) -> None:
    """Validate `--method` / `--target-sparsity` before any model is loaded."""
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}.")
    if target_sparsity is not None:
        SparsityTarget(target_sparsity)
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
    **kwargs: Any,
) -> ScheduledMethod:
    """The method `name` (one of `METHODS`) on `model`. `target_sparsity` (a fraction, or a
    `SparsityTarget` with its schedule and gains) switches on the controller for neuroprune / l1
    and is required by gmp. Extra keyword arguments go to the
    method (`proximal` for neuroprune / l1, `interval` for gmp). `config` is copied: the
    controller rewrites alpha and beta as it goes."""
    settings = target_sparsity if isinstance(target_sparsity, SparsityTarget) else None
    level = settings.sparsity if settings is not None else target_sparsity
    check_method(name, level)
    config = dataclasses.replace(config or NeuroPruneConfig())
    target = settings or (SparsityTarget(level) if level is not None else None)
    if name == "neuroprune":
        return TargetNeuroPrune(NeuroPrune(model, config), prune_every_steps, target, **kwargs)
    if name == "l1":
        no_heads = dataclasses.replace(config, prune_heads=False)
        return L1Method(NeuroPrune(model, no_heads), 0, target, **kwargs)
    silent = dataclasses.replace(config, alpha=0.0, beta=0.0, prune_heads=False)
    if name == "gmp":
        return GMPMethod(NeuroPrune(model, silent), target, **kwargs)  # type: ignore[arg-type]
    return DenseMethod(NeuroPrune(model, silent))


def matrix_parameters(pruner: NeuroPrune) -> list[nn.Parameter]:
    """The weight parameters behind the counted matrices (current objects: head removal
    replaces them)."""
    modules = []
    for unit in pruner.attention:
        modules += [unit.qkv] if unit.qkv is not None else [unit.q, unit.k, unit.v]
        modules.append(unit.o)
    for mlp in pruner.mlps:
        modules += [m for m in (mlp.gate, mlp.up, mlp.down) if m is not None]
    return [m.weight for m in modules]


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


def proximal_step(penalty: torch.Tensor, params: list[nn.Parameter], lr: float) -> None:
    """w <- w - lr * dR/dw, and exactly 0 where that step would cross zero (prox of l1-type R)."""
    if not penalty.requires_grad:
        return
    grads = torch.autograd.grad(penalty, params, allow_unused=True)
    with torch.no_grad():
        for param, grad in zip(params, grads):
            if grad is None:
                continue
            new = param - lr * grad
            new[new * param <= 0] = 0.0
            param.copy_(new)
