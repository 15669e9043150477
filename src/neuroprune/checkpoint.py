"""Save and reload a pruned model: HF config + safetensors weights + `neuroprune.json` (the
discovery options of its `ModelIndex`, the structure that differs from the dense config, e.g.
heads kept per layer, and what the method that trained it records: its name and user config).
Writes go to a temporary folder that is renamed into place, so a crash never leaves a half-written
checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import transformers
from safetensors import SafetensorError
from safetensors.torch import load_file

from neuroprune.errors import CheckpointError
from neuroprune.files import atomic_dir, commit_dir, sha256

if TYPE_CHECKING:
    from neuroprune.model.index import ModelIndex

STRUCTURE_FILE = "neuroprune.json"
FORMAT_VERSION = 1


def save_pretrained(index: ModelIndex, directory: str | Path, tokenizer: Any = None,
                    extra: dict[str, Any] | None = None) -> Path:
    """Save `index.model` with its structure to `directory` (atomically). `extra` adds keys to
    `neuroprune.json` (a method records its name and the config the user gave)."""
    from neuroprune import __version__

    target = Path(directory)
    tmp = atomic_dir(target)
    try:
        # keys as the modules name them (no legacy renaming such as GPT-NeoX lm_head -> embed_out),
        # so that `load_into` can match them one to one
        index.model.save_pretrained(tmp, save_original_format=False)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        meta = {
            "format_version": FORMAT_VERSION,
            "neuroprune_version": __version__,
            "model_type": getattr(index.model.config, "model_type", None),
            "architectures": getattr(index.model.config, "architectures", None),
            "discovery": index.discovery,
            "structure": index.structure(),
            "shapes": {k: list(v.shape) for k, v in index.model.state_dict().items()},
            "weights_sha256": {f.name: sha256(f) for f in sorted(tmp.glob("*.safetensors"))},
            **(extra or {}),
        }
        (tmp / STRUCTURE_FILE).write_text(json.dumps(meta, indent=1))
        commit_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def read_meta(directory: str | Path) -> dict[str, Any]:
    path = Path(directory)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a folder; pass the folder written by save_pretrained().")
    meta_file = path / STRUCTURE_FILE
    if not meta_file.exists():
        raise CheckpointError(
            f"{path} has no {STRUCTURE_FILE}, so it is not a neuroprune model folder. A plain "
            "transformers folder loads with AutoModel...from_pretrained; wrap it with NeuroPrune()."
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


def saved_eps(meta: dict[str, Any]) -> float:
    """The eps the method that trained a saved model counted absent weights with (for reports of
    the loaded model: degrees and finalize use the same threshold as training did)."""
    from neuroprune.config import NeuroPruneConfig

    return float((meta.get("neuroprune_config") or {}).get("eps", NeuroPruneConfig.eps))


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


def load_into(index: ModelIndex, directory: str | Path, meta: dict[str, Any]) -> None:
    """Give `index.model` the saved structure, then the saved weights, checking every shape."""
    path = Path(directory)
    index.restore_structure(meta["structure"])
    state = _read_weights(path)
    own = index.model.state_dict()
    wrong = [k for k, v in state.items() if k in own and tuple(own[k].shape) != tuple(v.shape)]
    unexpected = [k for k in state if k not in own]
    if wrong or unexpected:
        example = wrong[0] if wrong else unexpected[0]
        raise CheckpointError(
            f"the weights in {path} do not fit the model described by its config and "
            f"{STRUCTURE_FILE} ({len(wrong)} shape mismatches, {len(unexpected)} unknown tensors, "
            f"e.g. {example!r}); was a file copied from another model?"
        )
    missing = set(index.model.load_state_dict(state, strict=False).missing_keys)
    index.model.tie_weights()
    loaded_ptrs = {own[k].data_ptr() for k in state}
    really_missing = sorted(k for k in missing if own[k].data_ptr() not in loaded_ptrs)
    if really_missing:
        raise CheckpointError(
            f"{path} lacks weights for {len(really_missing)} tensors, e.g. {really_missing[0]!r}; "
            "the save was incomplete or the files were edited."
        )
    _check_checksums(path, meta)


def from_pretrained(directory: str | Path, **model_kwargs: Any) -> ModelIndex:
    """Rebuild the model and its `ModelIndex` from a folder written by `save_pretrained`."""
    from neuroprune.model.index import ModelIndex

    meta = read_meta(directory)
    try:
        hf_config = transformers.AutoConfig.from_pretrained(directory)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot read the model config in {directory}: {err}") from None
    cls = _model_class(meta)
    build = cls.from_config if hasattr(cls, "from_config") else cls._from_config
    model = build(hf_config, **model_kwargs)
    # folders of format 1 written before the index existed hold the options in the config
    index = ModelIndex(model, meta.get("discovery") or meta.get("neuroprune_config"))
    load_into(index, directory, meta)
    model.eval()
    return index


def load(directory: str | Path, **model_kwargs: Any) -> torch.nn.Module:
    """Load a model saved by neuroprune (pruned or compacted) in one call."""
    return from_pretrained(directory, **model_kwargs).model
