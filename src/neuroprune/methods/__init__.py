"""Sparse-training methods: the `SparsityMethod` protocol, NeuroPrune, the baselines, and the
registry behind `--method`."""

from neuroprune.methods.base import SparsityMethod
from neuroprune.methods.baselines import GMP, L1, Dense, DenseConfig, GMPConfig, L1Config, magnitude_mask
from neuroprune.methods.neuroprune import NeuroPrune
from neuroprune.methods.penalty import PenaltyMethod, proximal_step, step_factor
from neuroprune.methods.registry import (
    METHODS,
    REGISTRY,
    build_method,
    check_method,
    config_class,
    method_config,
    saved_config,
)
from neuroprune.methods.structured import StructuredConfig, StructuredMagnitude

__all__ = [
    "GMP", "L1", "METHODS", "REGISTRY", "Dense", "DenseConfig", "GMPConfig", "L1Config", "NeuroPrune",
    "PenaltyMethod", "SparsityMethod", "build_method", "check_method", "config_class", "magnitude_mask",
    "method_config", "proximal_step", "saved_config", "step_factor", "StructuredConfig",
    "StructuredMagnitude",
]
