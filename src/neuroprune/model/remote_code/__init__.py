"""Saved folders that the Hugging Face Auto classes load (`trust_remote_code=True`) and that they
refuse, loudly, without it.

A compacted or head-pruned model has per-layer shapes its config cannot describe. Its folder
therefore gets, next to the weights, a copy of `modeling_neuroprune.py` (self-contained: torch
and transformers only) and a `config.json` that

- names a model type the stock Auto classes do not know and an `auto_map` into that file, so
  `AutoModel...from_pretrained(folder)` fails with transformers' "pass `trust_remote_code=True`"
  and, with it, builds the stock class resized to the saved structure before weights load;
- holds the per-layer structure under `neuroprune` (`hf_structure` below);
- replaces the family's layer count with a message saying how to load the folder, so that a stock
  class used directly (`BertModel.from_pretrained(folder, ignore_mismatched_sizes=True)`) fails
  config validation with that message instead of loading other weights.

`neuroprune.load` reads the same config back as the stock family config (`stock_config`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import transformers
from torch import nn
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from neuroprune.model.architectures import HEAD_COUNT_ATTRS, KV_GROUPS_ATTRS, KV_HEAD_COUNT_ATTRS, WIDTH_ATTRS
from neuroprune.model.remote_code.modeling_neuroprune import (
    MODEL_TYPE,
    PREFIX,
    STRUCTURE_KEY,
    stock_config_dict,
)
from neuroprune.model.structure import OUTPUT_FILL, kept_inputs, kept_outputs, projections

if TYPE_CHECKING:
    from neuroprune.model.index import ModelIndex

MODELING_FILE = Path(__file__).with_name("modeling_neuroprune.py")
FORMAT = 1
LOAD_HINT = (
    "compacted by neuroprune: the layers of this folder differ from its config. Load it with "
    "AutoModel...from_pretrained(folder, trust_remote_code=True) or neuroprune.load(folder)"
)
LAYER_COUNT = "num_hidden_layers"  # hidden behind LOAD_HINT (under the family's own field name)


def hf_structure(index: ModelIndex) -> dict[str, Any] | None:
    """What `modeling_neuroprune.apply_structure` needs to give a stock model the compacted or
    head-pruned shapes of `index.model`, by module path; None when it has its config's shapes."""
    names = {id(m): n for n, m in index.model.named_modules()}
    pruned = [u for u in index.attention if u.num_heads < u.original_heads]
    compacted = [u for u in index.mlps if len(u.kept_neurons) < u.original_neurons or u.added_contract_bias
                 or kept_outputs(u.down) is not None]
    gathered = [u for u in index.attention if kept_inputs(projections(u)[0]) is not None]
    if not (pruned or compacted or gathered):
        return None
    # every module with parameters inside a changed block (head surgery also cuts per-head
    # projections beside q/k/v/o, e.g. DeBERTa's positional ones)
    touched = [m for u in [*pruned, *gathered, *compacted] for m in u.module.modules()]
    out: dict[str, Any] = {
        "parameters": {names[id(m)]: {n: list(p.shape) for n, p in m.named_parameters(recurse=False)}
                       for m in touched if next(m.parameters(recurse=False), None) is not None},
        "attributes": {}, "config_attributes": {}, "gathered_inputs": [], "dropped_rows": {}, "head_bias": {},
    }
    for unit in pruned:
        core, layout = names[id(unit.core)], unit.layout
        attrs = HEAD_COUNT_ATTRS + KV_HEAD_COUNT_ATTRS + WIDTH_ATTRS + layout.width_attrs + KV_GROUPS_ATTRS
        out["attributes"][core] = {a: getattr(unit.core, a) for a in attrs
                                   if isinstance(getattr(unit.core, a, None), int)}
        own = getattr(unit.core, "config", None)  # a copy of its own: AttentionUnit._sync_attributes
        if own is not None and own is not index.model.config:
            counts = HEAD_COUNT_ATTRS + KV_HEAD_COUNT_ATTRS
            out["config_attributes"][core] = {a: getattr(own, a) for a in counts
                                              if isinstance(getattr(own, a, None), int)}
        if layout.head_bias_arg or layout.head_mask_arg:
            out["head_bias"][core] = {
                "arg": layout.head_bias_arg, "output": layout.head_bias_output,
                "factory": layout.bias_factory,
                "dims": layout.head_bias_dims, "mask_arg": layout.head_mask_arg,
                "original_heads": unit.original_heads, "kept_heads": unit.kept_heads,
            }
    for unit in gathered:
        out["gathered_inputs"].append({"modules": [names[id(m)] for m in projections(unit)],
                                       "keep": kept_inputs(projections(unit)[0])})
    for unit in index.mlps:
        keep = kept_outputs(unit.down)
        if keep is not None:
            width = getattr(unit.down, OUTPUT_FILL).numel()
            out["dropped_rows"][names[id(unit.down)]] = {"keep": keep, "width": width}
    return out


def auto_map(config: Any, classes: list[str]) -> dict[str, str]:
    """`auto_map` entries: the config, every Auto class whose mapping holds one of the saved
    architecture `classes`, and `AutoModel` (the base model) for a model with a head."""
    model_type = config.model_type
    entries = {"AutoConfig": f"modeling_neuroprune.{PREFIX}{type(config).__name__}"}
    for auto_name in [n for n in dir(transformers) if n.startswith("AutoModel")]:
        lazy = getattr(getattr(transformers, auto_name), "_model_mapping", None)
        mapping = getattr(lazy, "_model_mapping", None)  # model type -> class name(s)
        if not isinstance(mapping, dict) or model_type not in mapping:
            continue
        mapped = mapping[model_type]
        for name in (mapped if isinstance(mapped, (list, tuple)) else [mapped]):
            if name in classes or auto_name == "AutoModel":
                entries[auto_name] = f"modeling_neuroprune.{PREFIX}{name}"
                break
    return entries


def write_remote_code(folder: Path, model: nn.Module, structure: dict[str, Any]) -> None:
    """Turn a folder just written by `model.save_pretrained` into one the Auto classes load with
    `trust_remote_code=True` (and refuse without it)."""
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text())
    field = model.config.attribute_map.get(LAYER_COUNT, LAYER_COUNT)
    hidden = {field: config[field]} if field in config else {}
    classes = list(config.get("architectures") or [])
    config.update({
        "model_type": MODEL_TYPE,
        "architectures": [PREFIX + name for name in classes],
        "auto_map": auto_map(model.config, classes),
        STRUCTURE_KEY: {"format": FORMAT, "base_model_type": model.config.model_type,
                        "architectures": classes, "hidden_fields": hidden,
                        "hidden_messages": dict.fromkeys(hidden, LOAD_HINT), **structure},
        **dict.fromkeys(hidden, LOAD_HINT),
    })
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    shutil.copyfile(MODELING_FILE, folder / MODELING_FILE.name)


def stock_config(directory: str | Path) -> Any:
    """The stock transformers config of a saved folder, with or without remote code."""
    config_file = Path(directory) / "config.json"
    data = json.loads(config_file.read_text())
    if STRUCTURE_KEY not in data:
        return transformers.AutoConfig.from_pretrained(directory)
    plain = stock_config_dict(data)
    return CONFIG_MAPPING[plain.pop("model_type")].from_dict(plain)
