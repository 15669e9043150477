"""The file format of a saved model folder: HF config + safetensors weights + `neuroprune.json`
(what the caller records: for a `ModelIndex` its discovery options and the structure that differs
from the dense config, for a method its name and user config; plus checksums and shapes written
here). It knows models and files only, nothing of the index that gives a model its structure:
`ModelIndex.save_pretrained` / `from_pretrained` build on it (as peft's `PeftModel` builds on its
state-dict helpers). Writes go to a temporary folder that is renamed into place, so a crash never
leaves a half-written checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from neuroprune.errors import CheckpointError
from neuroprune.files import atomic_dir, commit_dir, sha256
from neuroprune.model.remote_code import stock_config, write_remote_code
from neuroprune.version import __version__

STRUCTURE_FILE = "neuroprune.json"
FORMAT_VERSION = 1


def write_folder(model: nn.Module, directory: str | Path, meta: dict[str, Any],
                 tokenizer: Any = None, hf_structure: dict[str, Any] | None = None) -> Path:
    """Save `model` (and `tokenizer`) to `directory` atomically, with `meta` plus the format
    version, the model type, every tensor's shape and every weights file's checksum in
    `neuroprune.json`. `hf_structure` (`remote_code.hf_structure`: shapes the config cannot
    describe) makes the folder load with the Auto classes and `trust_remote_code=True`."""
    target = Path(directory)
    tmp = atomic_dir(target)
    try:
        # keys as the modules name them (no legacy renaming such as GPT-NeoX lm_head -> embed_out),
        # so that `load_weights` can match them one to one
        model.save_pretrained(tmp, save_original_format=False)
        if hf_structure:
            write_remote_code(tmp, model, hf_structure)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        full = {
            "format_version": FORMAT_VERSION,
            "neuroprune_version": __version__,
            "model_type": getattr(model.config, "model_type", None),
            "architectures": getattr(model.config, "architectures", None),
            **meta,
            "shapes": {k: list(v.shape) for k, v in model.state_dict().items()},
            "weights_sha256": {f.name: sha256(f) for f in sorted(tmp.glob("*.safetensors"))},
        }
        (tmp / STRUCTURE_FILE).write_text(json.dumps(full, indent=1))
        commit_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def read_meta(directory: str | Path) -> dict[str, Any]:
    """The `neuroprune.json` of a saved folder, checked to be one this version reads."""
    path = Path(directory)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a folder; pass the folder written by save_pretrained().")
    meta_file = path / STRUCTURE_FILE
    if not meta_file.exists():
        raise CheckpointError(
            f"{path} has no {STRUCTURE_FILE}, so it is not a neuroprune model folder. A plain "
            "transformers folder loads with AutoModel...from_pretrained; wrap it with ModelIndex()."
        )
    try:
        meta = json.loads(meta_file.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{meta_file} is corrupt ({err}); re-save the model.") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{meta_file} has format version {meta.get('format_version')!r}; this neuroprune "
            f"reads version {FORMAT_VERSION}."
        )
    return meta


def build_model(directory: str | Path, meta: dict[str, Any], **model_kwargs: Any) -> nn.Module:
    """A dense model of the saved config and architecture (random weights: the caller gives it
    the saved structure, then `load_weights`)."""
    try:
        hf_config = stock_config(directory)
    except (OSError, ValueError, KeyError) as err:
        raise CheckpointError(f"cannot read the model config in {directory}: {err}") from None
    cls = _model_class(meta)
    build = cls.from_config if hasattr(cls, "from_config") else cls._from_config
    return build(hf_config, **model_kwargs)


def _model_class(meta: dict[str, Any]) -> type:
    for name in meta.get("architectures") or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    return transformers.AutoModel


def _check_checksums(path: Path, meta: dict[str, Any]) -> None:
    """Weights whose shapes fit can still have been edited, or copied from another compaction of
    the same model that kept the same widths: the checksums recorded at save time tell."""
    for name, expected in (meta.get("weights_sha256") or {}).items():
        file = path / name
        if not file.exists():
            raise CheckpointError(f"{file} is missing; the folder is incomplete. Re-save the model.")
        if sha256(file) != expected:
            raise CheckpointError(
                f"{file} does not match the checksum recorded in {STRUCTURE_FILE} when it was saved: "
                "it was edited, replaced or corrupted since. Re-save the model (or restore the file)."
            )


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path} holds no .safetensors weights; the save was incomplete.")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            state.update(load_file(file))
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(
                f"weights file {file} is truncated or corrupt ({err}); re-save the model."
            ) from None
    return state


def load_weights(model: nn.Module, directory: str | Path, meta: dict[str, Any]) -> None:
    """Load the saved weights into `model`, which already has the saved structure: every shape,
    every tensor and every checksum checked."""
    path = Path(directory)
    state = _read_weights(path)
    own = model.state_dict()
    wrong = [k for k, v in state.items() if k in own and tuple(own[k].shape) != tuple(v.shape)]
    unexpected = [k for k in state if k not in own]
    if wrong or unexpected:
        example = wrong[0] if wrong else unexpected[0]
        raise CheckpointError(
            f"the weights in {path} do not fit the model described by its config and "
            f"{STRUCTURE_FILE} ({len(wrong)} shape mismatches, {len(unexpected)} unknown tensors, "
            f"e.g. {example!r}); was a file copied from another model?"
        )
    missing = set(model.load_state_dict(state, strict=False).missing_keys)
    model.tie_weights()
    loaded_ptrs = {own[k].data_ptr() for k in state}
    really_missing = sorted(k for k in missing if own[k].data_ptr() not in loaded_ptrs)
    if really_missing:
        raise CheckpointError(
            f"{path} lacks weights for {len(really_missing)} tensors, e.g. {really_missing[0]!r}; "
            "the save was incomplete or the files were edited."
        )
    _check_checksums(path, meta)


def load_tokenizer(directory: str | Path) -> Any:
    """The stock tokenizer saved in a model folder. A compacted folder maps the Auto classes to its
    own modeling code; the tokenizer needs none, and without `trust_remote_code=False`
    transformers would stop at an interactive trust_remote_code prompt (it reads the config).
    The stock config is passed too: read from a compacted folder's config.json, transformers
    would warn that a `neuroprune_compacted` model instantiates a model of another type."""
    from transformers import AutoTokenizer

    config = stock_config(directory) if (Path(directory) / "config.json").exists() else None
    return AutoTokenizer.from_pretrained(directory, config=config, trust_remote_code=False)
