"""The project's own error types, all of them: every user-facing failure is one of these, with a
message that names what was wrong and how to fix it."""


class NeuroPruneError(Exception):
    """Base class of every error neuroprune raises on purpose."""


class ConfigError(NeuroPruneError, ValueError):
    """A configuration value is out of range or inconsistent."""


class UnsupportedArchitectureError(NeuroPruneError):
    """The model's attention / MLP blocks could not be mapped."""


class CheckpointError(NeuroPruneError):
    """A checkpoint folder is missing, incomplete, corrupt or from another model."""


class ModelError(NeuroPruneError):
    """The model cannot be found or loaded."""


class DataError(NeuroPruneError):
    """A data file or data set cannot be used as given."""


class NonFiniteError(NeuroPruneError):
    """The loss or a weight became NaN or infinite during training."""


class DistributedError(NeuroPruneError):
    """Multi-process training was set up in a way NeuroPrune cannot follow."""


class ReportError(NeuroPruneError):
    """A run directory cannot be reported on (missing, not a run, unknown layer)."""
