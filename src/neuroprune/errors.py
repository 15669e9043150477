"""The project's own error types: every user-facing failure is one of these, with a message
that names what was wrong and how to fix it."""


class NeuroPruneError(Exception):
    """Base class of every error neuroprune raises on purpose."""


class ConfigError(NeuroPruneError, ValueError):
    """A configuration value is out of range or inconsistent."""


class UnsupportedArchitectureError(NeuroPruneError):
    """The model's attention / MLP blocks could not be mapped."""
