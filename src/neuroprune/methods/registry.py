"""The methods behind `--method`, by name: one registry, one factory, one validation of the
method / target combination (run before any model is loaded)."""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from neuroprune.config import MethodConfig
from neuroprune.errors import ConfigError
from neuroprune.methods.base import SparsityMethod
from neuroprune.methods.baselines import GMP, L1, Dense
from neuroprune.methods.neuroprune import NeuroPrune
from neuroprune.methods.steering import SparsityTarget
from neuroprune.methods.structured import StructuredMagnitude

REGISTRY: dict[str, type[SparsityMethod]] = {"neuroprune": NeuroPrune, "l1": L1, "gmp": GMP, "dense": Dense,
                                              "structured": StructuredMagnitude}
METHODS: tuple[str, ...] = tuple(REGISTRY)
FLOP_TARGET_METHODS = {"neuroprune", "structured"}  # methods that take --target-flops (structural selection)


def check_method(name: str, target_sparsity: float | None, target_heads: int | None = None,
                 target_flops: float | None = None) -> None:
    """Validate `--method` / `--target-sparsity` / `--target-heads` / `--target-flops` before any
    model is loaded."""
    if name not in REGISTRY:
        raise ConfigError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}.")
    if target_flops is not None:
        if target_sparsity is not None:
            raise ConfigError("give --target-sparsity or --target-flops, not both: one target per run.")
        if name not in FLOP_TARGET_METHODS:
            raise ConfigError(
                f"--target-flops steers structural pruning; --method {name} has none: use "
                f"{' or '.join(sorted(FLOP_TARGET_METHODS))}, or --target-sparsity."
            )
        SparsityTarget(flops=target_flops, heads=target_heads)
    if target_heads is not None:
        if name != "neuroprune":
            raise ConfigError(
                f"--target-heads steers NeuroPrune's head pruning; --method {name} removes no heads."
            )
        if target_sparsity is None:
            raise ConfigError("--target-heads needs --target-sparsity too (the heads ramp with it).")
    if target_sparsity is not None:
        SparsityTarget(target_sparsity, heads=target_heads)
    if name == "structured" and target_flops is None:
        raise ConfigError(
            "--method structured removes whole units to a FLOP budget: give --target-flops F (e.g. 0.5), "
            "not --target-sparsity; for magnitude pruning to an element sparsity use --method gmp."
        )
    if name == "gmp" and target_sparsity is None:
        raise ConfigError("--method gmp needs --target-sparsity (the sparsity to prune to).")
    if name == "dense" and target_sparsity is not None:
        raise ConfigError("--method dense does not sparsify: drop --target-sparsity or pick another method.")


def config_class(name: str) -> type[MethodConfig]:
    """The config dataclass of method `name`."""
    if name not in REGISTRY:
        raise ConfigError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}.")
    return REGISTRY[name].config_class


def method_config(name: str, values: dict[str, Any] | MethodConfig | None = None) -> MethodConfig:
    """The config of method `name` from `values` (a dict such as a run's settings, or another
    method's config): the fields that config has are taken, all others are not its business (l1
    has no theta, dense no alpha) and are left out. A config of the right class is used as is."""
    cls = config_class(name)
    if isinstance(values, cls):
        return values
    data = values.to_dict() if isinstance(values, MethodConfig) else dict(values or {})
    known = {f.name for f in dataclasses.fields(cls)}
    return cls.from_dict({k: v for k, v in data.items() if k in known})


def saved_config(meta: dict[str, Any]) -> MethodConfig:
    """The config a saved model was trained with, as its method's config class (`neuroprune.json`
    of `SparsityMethod.save_pretrained`; folders written before per-method configs hold a full
    NeuroPruneConfig under "neuroprune_config" for every method)."""
    name = meta.get("method", "neuroprune")
    if "method_config" in meta:
        return config_class(name).from_dict(meta["method_config"])
    return method_config(name, meta.get("neuroprune_config"))


def build_method(
    name: str,
    model: nn.Module,
    config: MethodConfig | dict[str, Any] | None = None,
    target_sparsity: float | SparsityTarget | None = None,
    prune_every_steps: int = 0,
    target_heads: int | None = None,
    target_flops: float | None = None,
    **kwargs: Any,
) -> SparsityMethod:
    """The method `name` (one of `METHODS`) on `model`, with its own config class built from
    `config` (`method_config`: e.g. a `NeuroPruneConfig` gives l1 its alpha and eps; default
    values when None). `target_sparsity` (a fraction, or a `SparsityTarget` with its schedule and
    gains) switches on the controller for neuroprune / l1 and is required by gmp; `target_heads`
    (neuroprune) also steers theta to that number of heads. Extra keyword arguments go to the
    method (`proximal` for neuroprune / l1)."""
    settings = target_sparsity if isinstance(target_sparsity, SparsityTarget) else None
    level = settings.sparsity if settings is not None else target_sparsity
    if settings is not None and target_heads is not None:
        settings = dataclasses.replace(settings, heads=target_heads)
    heads = settings.heads if settings is not None else target_heads
    flops = settings.flops if settings is not None else target_flops
    check_method(name, level, heads, flops)
    own = method_config(name, config)
    target = settings or (SparsityTarget(level, heads=heads) if level is not None else None)
    if target is None and flops is not None:
        target = SparsityTarget(flops=flops)
    if name == "neuroprune":
        return NeuroPrune(model, own, target, prune_every_steps, **kwargs)
    if name in ("l1", "gmp", "structured"):
        return REGISTRY[name](model, own, target, **kwargs)
    return REGISTRY[name](model, own, **kwargs)
