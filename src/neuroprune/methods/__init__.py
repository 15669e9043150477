"""Sparse-training methods: the `SparsityMethod` protocol, NeuroPrune, the baselines, and the
registry behind `--method`."""

from neuroprune.methods.base import SparsityMethod
from neuroprune.methods.baselines import GMP, L1, Dense, magnitude_mask
from neuroprune.methods.neuroprune import NeuroPrune
from neuroprune.methods.penalty import PenaltyMethod, proximal_step, step_factor
from neuroprune.methods.registry import METHODS, REGISTRY, build_method, check_method

__all__ = [
    "GMP", "L1", "METHODS", "REGISTRY", "Dense", "NeuroPrune", "PenaltyMethod", "SparsityMethod",
    "build_method", "check_method", "magnitude_mask", "proximal_step", "step_factor",
]
