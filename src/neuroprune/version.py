"""The package version, in a module of its own so that any layer can record it (checkpoints, run
folders, reports) without importing the `neuroprune` facade, which imports every layer."""

__version__ = "0.1.0"
