"""Ways of sparsifying a model during fine-tuning, behind one interface so that a training loop,
the CLI (`--method`) and the benchmarks treat NeuroPrune and its baselines alike.

A training loop does, with `method = build_method(name, model, config, target_sparsity)`::

    loss = task_loss + method.loss()            # the regulariser that goes through the loss
    loss.backward(); optimizer.step()
    method.after_step(optimizer, step, total)  # proximal penalty step, controller, GMP masks
    ...                                         # at the end of every epoch:
    method.after_epoch(optimizer)              # NeuroPrune's redundant-head removal
    report = method.finalize()                 # |w| < eps -> 0, section 5 sparsity report

Every method wraps a `NeuroPrune` object: the same architecture discovery, the same `finalize()`,
the same `SparsityReport` and the same saved structure, so every method's model goes through the
same compaction (`neuroprune.compact`) and its numbers are comparable.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from .baselines import GradualMagnitudePruning, l1_penalty
from .config import NeuroPruneConfig
from .controller import SparsityTarget, TargetController, near_zero_sparsity
from .errors import ConfigError
from .optim import remap_optimizer
from .pruner import NeuroPrune
from .sparsity import SparsityReport

Optimizer = torch.optim.Optimizer

METHODS: tuple[str, ...] = ("neuroprune", "l1", "gmp", "dense")


class Method:
    """Dense fine-tuning: no regulariser, no pruning; the base every method builds on."""

    name = "dense"

    def __init__(self, model: nn.Module, config: NeuroPruneConfig | None = None) -> None:
        self.pruner = NeuroPrune(model, config or NeuroPruneConfig(alpha=0.0, beta=0.0, prune_heads=False))
        self.target: float | None = None

    def loss(self) -> torch.Tensor:
        """Regulariser to add to the task loss (zero when the method has none)."""
        return torch.zeros((), device=next(self.pruner.model.parameters()).device)

    def after_step(self, optimizer: Optimizer | None, step: int, total_steps: int) -> dict[str, float]:
        """Call after every optimiser step; `step` counts from 1. Returns values worth logging."""
        return {}

    def after_epoch(self, optimizer: Optimizer | None = None) -> dict[str, list[int]]:
        """Call after every epoch. Returns the heads removed, {layer: [original head indices]}."""
        return {}

    def finalize(self) -> SparsityReport:
        self.pruner.finalize()
        return self.pruner.sparsity_report()

    def summary(self, report: SparsityReport | None = None) -> dict[str, Any]:
        """What a run records beside its sparsity report: method, target and achieved sparsity."""
        report = report or self.pruner.sparsity_report()
        return {"method": self.name, "target_sparsity": self.target, "achieved_sparsity": report.sparsity}

    def state_dict(self) -> dict[str, Any]:
        return {"method": self.name}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("method", self.name) != self.name:
            raise ConfigError(f"checkpoint was trained with --method {state['method']}, not {self.name}.")


class PenaltyMethod(Method):
    """A penalty scaled by alpha (and beta), optionally steered to a target sparsity.

    `proximal=False` adds the penalty to the loss, as the paper does. `proximal=True` (the
    default when a target is given) applies the penalty's gradient as a separate plain-SGD step
    after the optimiser step, clipping at zero any weight it would push across zero, i.e. the
    proximal operator of the (linearised) penalty. Why: Adam normalises every update to about
    `lr`, so through the loss no penalty weight can move a weight further than ~lr per step; on a
    short fine-tuning run (a few hundred steps at lr 5e-5) that caps the reachable sparsity far
    below 90%. Decoupled, the step is `lr * alpha * dR/dw`, which the controller can scale, and
    the weights it removes are exactly zero, so finalize() cuts nothing that training did not.
    """

    def __init__(
        self,
        model: nn.Module,
        config: NeuroPruneConfig | None = None,
        target: SparsityTarget | None = None,
        proximal: bool | None = None,
        prune_every: int | None = None,
    ) -> None:
        # a copy: the controller rewrites alpha and beta as it goes
        super().__init__(model, dataclasses.replace(config or NeuroPruneConfig()))
        self.base = (self.pruner.config.alpha, self.pruner.config.beta)
        if target is not None and not any(self.base):
            raise ConfigError("a target sparsity needs alpha or beta > 0: the controller scales them.")
        self.controller = TargetController(target) if target is not None else None
        self.target = target.sparsity if target is not None else None
        self.proximal = target is not None if proximal is None else proximal
        self.prune_every = prune_every
        self.scale = 1.0

    def penalty(self) -> torch.Tensor:
        """The weighted penalty (alpha / beta already applied)."""
        raise NotImplementedError

    def loss(self) -> torch.Tensor:
        return super().loss() if self.proximal else self.penalty()

    def set_scale(self, scale: float) -> None:
        self.scale = scale
        self.pruner.config.alpha, self.pruner.config.beta = (w * scale for w in self.base)

    def after_step(self, optimizer: Optimizer | None, step: int, total_steps: int) -> dict[str, float]:
        logs: dict[str, float] = {}
        if self.proximal:
            lr = optimizer.param_groups[0]["lr"] if optimizer is not None else 1.0
            proximal_step(self.penalty(), matrix_parameters(self.pruner), lr)
        if self.controller is not None:
            measured = near_zero_sparsity(self.pruner)
            self.set_scale(self.controller.update(step, total_steps, measured))
            logs = {"target_now": self.controller.history[-1]["target"], "near_zero_sparsity": measured}
        if self.prune_every and step % self.prune_every == 0 and step < total_steps:
            self.after_epoch(optimizer)
        return {**logs, "alpha": self.pruner.config.alpha, "beta": self.pruner.config.beta}

    def summary(self, report: SparsityReport | None = None) -> dict[str, Any]:
        return {**super().summary(report), "alpha": self.pruner.config.alpha, "beta": self.pruner.config.beta,
                "proximal": self.proximal}

    def state_dict(self) -> dict[str, Any]:
        state = {**super().state_dict(), "scale": self.scale}
        if self.controller is not None:
            state["controller"] = self.controller.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.set_scale(state.get("scale", 1.0))
        if "controller" in state:
            self.controller = TargetController.from_state_dict(state["controller"])


class NeuroPruneMethod(PenaltyMethod):
    """The paper's method: preferential-attachment l1 on MLP rows, l_{1,0.5} on attention input
    groups, redundant heads removed after every epoch (and every `prune_every` steps if set)."""

    name = "neuroprune"

    def penalty(self) -> torch.Tensor:
        return self.pruner.regularization_loss()

    def after_epoch(self, optimizer: Optimizer | None = None) -> dict[str, list[int]]:
        removed = self.pruner.prune_redundant_heads()
        if optimizer is not None and self.pruner.last_changes:
            remap_optimizer(optimizer, self.pruner.last_changes)
        return removed


class L1Method(PenaltyMethod):
    """Plain l1 (alpha * sum |w|) on the counted matrices: no degree weighting, no groups, no heads."""

    name = "l1"

    def __init__(self, model: nn.Module, config: NeuroPruneConfig | None = None, **kwargs: Any) -> None:
        config = dataclasses.replace(config or NeuroPruneConfig(), prune_heads=False)
        super().__init__(model, config, **kwargs)

    def penalty(self) -> torch.Tensor:
        return self.pruner.config.alpha * l1_penalty(self.pruner)


class GMPMethod(Method):
    """Gradual magnitude pruning to `target.sparsity` with the target's cubic ramp."""

    name = "gmp"

    def __init__(
        self, model: nn.Module, config: NeuroPruneConfig | None = None, target: SparsityTarget | None = None,
        interval: int = 10,
    ) -> None:
        if target is None:
            raise ConfigError("--method gmp needs --target-sparsity (the sparsity to prune to).")
        config = config or NeuroPruneConfig()
        super().__init__(model, NeuroPruneConfig(alpha=0.0, beta=0.0, eps=config.eps, prune_heads=False))
        self.target = target.sparsity
        self.gmp = GradualMagnitudePruning(
            self.pruner, target.sparsity, target.ramp_begin, target.ramp_end, interval
        )

    def after_step(self, optimizer: Optimizer | None, step: int, total_steps: int) -> dict[str, float]:
        return {"target_now": self.gmp.step(step, total_steps)}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "current": self.gmp.current}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.gmp.restore(state.get("current", 0.0))


def build_method(
    name: str,
    model: nn.Module,
    config: NeuroPruneConfig | None = None,
    target_sparsity: float | None = None,
    **kwargs: Any,
) -> Method:
    """The method called `name` (one of `METHODS`) on `model`. `target_sparsity` (a fraction)
    switches on the controller for neuroprune / l1 and is required by gmp; extra keyword
    arguments go to the method (`proximal`, `prune_every` for penalties, `interval` for gmp)."""
    target = SparsityTarget(target_sparsity) if target_sparsity is not None else None
    if name == "dense":
        if target is not None:
            raise ConfigError(
                "--method dense does not sparsify: drop --target-sparsity or pick another method."
            )
        return Method(model)
    if name == "neuroprune":
        return NeuroPruneMethod(model, config, target=target, **kwargs)
    if name == "l1":
        return L1Method(model, config, target=target, **kwargs)
    if name == "gmp":
        return GMPMethod(model, config, target=target, **kwargs)
    raise ConfigError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}.")


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
