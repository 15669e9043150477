"""NeuroPrune: sparse fine-tuning of transformer language models with neuro-inspired topology."""

from .checkpoint import CheckpointError, load
from .compaction import CompactionRule, compact
from .config import NeuroPruneConfig
from .errors import ConfigError, NeuroPruneError, UnsupportedArchitectureError
from .optim import remap_optimizer
from .pruner import NeuroPrune
from .sparsity import SparsityReport

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "CompactionRule",
    "compact",
    "load",
    "ConfigError",
    "NeuroPrune",
    "NeuroPruneConfig",
    "NeuroPruneError",
    "SparsityReport",
    "UnsupportedArchitectureError",
    "remap_optimizer",
    "__version__",
]
