"""NeuroPrune: sparse fine-tuning of transformer language models with neuro-inspired topology.

The public API, importable from here: the methods (`NeuroPrune` and the baselines, one
`SparsityMethod` protocol, `build_method` by name), their configs (one per method on the shared
`MethodConfig`: `NeuroPruneConfig`, `L1Config`, `GMPConfig`, `DenseConfig`; `SparsityTarget`), the
model index, compaction, save / load, the Trainer and the errors.
"""

from neuroprune.compaction import CompactionRule, compact
from neuroprune.config import MethodConfig, NeuroPruneConfig
from neuroprune.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    DistributedError,
    ModelError,
    NeuroPruneError,
    NonFiniteError,
    ReportError,
    UnsupportedArchitectureError,
)
from neuroprune.methods import (
    GMP,
    L1,
    METHODS,
    Dense,
    DenseConfig,
    GMPConfig,
    L1Config,
    NeuroPrune,
    SparsityMethod,
    build_method,
    check_method,
)
from neuroprune.methods.steering import SparsityTarget
from neuroprune.model.index import ModelIndex, load
from neuroprune.model.optim import remap_optimizer
from neuroprune.model.packaged import resolve_model_path
from neuroprune.model.sparsity import SparsityReport
from neuroprune.version import __version__

__all__ = [
    "CheckpointError", "CompactionRule", "ConfigError", "DataError", "Dense", "DenseConfig",
    "DistributedError", "GMP", "GMPConfig", "L1", "L1Config", "METHODS", "MethodConfig",
    "ModelError", "ModelIndex", "NeuroPrune", "NeuroPruneConfig", "NeuroPruneError",
    "NeuroPruneSeq2SeqTrainer", "NeuroPruneTrainer", "NonFiniteError", "ReportError",
    "SparsityMethod", "SparsityReport", "SparsityTarget", "UnsupportedArchitectureError",
    "build_method", "check_method", "compact", "load", "remap_optimizer", "resolve_model_path",
    "__version__",
]


def __getattr__(name: str):
    """The Trainer classes import `transformers.Trainer`, which is slow to import and not needed
    by a plain training loop: they load on first use."""
    if name in ("NeuroPruneTrainer", "NeuroPruneSeq2SeqTrainer"):
        from neuroprune.integrations import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'neuroprune' has no attribute {name!r}")
