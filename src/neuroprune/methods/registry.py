"""The methods behind `--method`, by name: one registry, one factory, one validation of the
method / target combination (run before any model is loaded)."""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from neuroprune.config import NeuroPruneConfig
from neuroprune.errors import ConfigError
from neuroprune.methods.base import SparsityMethod
from neuroprune.methods.baselines import GMP, L1, Dense
from neuroprune.methods.neuroprune import NeuroPrune
from neuroprune.methods.steering import SparsityTarget

REGISTRY: dict[str, type[SparsityMethod]] = {"neuroprune": NeuroPrune, "l1": L1, "gmp": GMP, "dense": Dense}
METHODS: tuple[str, ...] = tuple(REGISTRY)


def check_method(name: str, target_sparsity: float | None, target_heads: int | None = None) -> None:
    """Validate `--method` / `--target-sparsity` / `--target-heads` before any model is loaded."""
    if name not in REGISTRY:
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
) -> SparsityMethod:
    """The method `name` (one of `METHODS`) on `model`. `target_sparsity` (a fraction, or a
    `SparsityTarget` with its schedule and gains) switches on the controller for neuroprune / l1
    and is required by gmp; `target_heads` (neuroprune) also steers theta to that number of heads.
    Extra keyword arguments go to the method (`proximal` for neuroprune / l1, `interval` for gmp).
    l1 never removes heads (its config is used with `prune_heads=False`)."""
    settings = target_sparsity if isinstance(target_sparsity, SparsityTarget) else None
    level = settings.sparsity if settings is not None else target_sparsity
    if settings is not None and target_heads is not None:
        settings = dataclasses.replace(settings, heads=target_heads)
    heads = settings.heads if settings is not None else target_heads
    check_method(name, level, heads)
    config = config or NeuroPruneConfig()
    target = settings or (SparsityTarget(level, heads=heads) if level is not None else None)
    if name == "neuroprune":
        return NeuroPrune(model, config, target, prune_every_steps, **kwargs)
    if name == "l1":
        return L1(model, dataclasses.replace(config, prune_heads=False), target, **kwargs)
    if name == "gmp":
        return GMP(model, config, target, **kwargs)
    return Dense(model, config)
