"""Sparse-training methods: the `SparsityMethod` protocol, NeuroPrune, the baselines, and the
registry behind `--method`."""

from .base import SparsityMethod
from .baselines import GMP, L1, Dense, magnitude_mask
from .neuroprune import NeuroPrune
from .penalty import PenaltyMethod, proximal_step, step_factor
from .registry import METHODS, REGISTRY, build_method, check_method

__all__ = [
    "GMP", "L1", "METHODS", "REGISTRY", "Dense", "NeuroPrune", "PenaltyMethod", "SparsityMethod",
    "build_method", "check_method", "magnitude_mask", "proximal_step", "step_factor",
]
