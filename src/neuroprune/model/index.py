"""`ModelIndex`: what every sparse-training method, the checkpoint code and compaction need to know
about one model, and nothing of any algorithm.

It finds the attention blocks and MLPs (`architectures.discover`), remembers their original shapes,
lists the counted matrices (method.md section 5) of all blocks (each unit names its own in
`counted_modules()`), keeps the structure that differs from the dense config (heads kept, compacted
widths, the head-removal history) so a checkpoint can be re-applied, measures sparsity, and saves /
loads itself (on the folder format of `model.checkpoint`). Methods (`neuroprune.methods`) hold an
index; saving, loading and compaction need only the index.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from neuroprune.errors import NeuroPruneError
from neuroprune.model import checkpoint
from neuroprune.model.architectures import discover
from neuroprune.model.remote_code import hf_structure
from neuroprune.model.sparsity import SparsityReport, report
from neuroprune.model.structure import compaction_structure, restore_compaction
from neuroprune.model.surgery import weight_matrix
from neuroprune.model.units import AttentionUnit, MLPUnit

ATTENTION_KINDS = frozenset({"q", "k", "v", "qkv"})
MLP_KINDS = frozenset({"up", "gate", "down"})
ALL_KINDS = ATTENTION_KINDS | MLP_KINDS | {"o"}
DISCOVERY_FIELDS = ("attention_layouts", "mlp_layouts", "attention_modules", "mlp_modules", "exclude_modules",
                    "allow_missing_attention")


class ModelIndex:
    """The blocks of `model` seen through the canonical unit lens.

    `discovery` holds the options of `architectures.discover` (extra layouts, name filters); any
    object with those attributes works, e.g. a `NeuroPruneConfig`.
    """

    def __init__(self, model: nn.Module, discovery: Any = None) -> None:
        if not isinstance(model, nn.Module):
            raise NeuroPruneError(f"expected a torch.nn.Module, got {type(model).__name__}.")
        self.model = model
        self.discovery = _discovery_dict(discovery)
        found_attention, found_mlps = discover(model, **self.discovery)
        model_config = getattr(model, "config", None)
        self.attention: list[AttentionUnit] = [AttentionUnit(f, model_config) for f in found_attention]
        self.mlps: list[MLPUnit] = [MLPUnit(f) for f in found_mlps]
        self.original_parameters = sum(p.numel() for p in model.parameters())
        self.passes = 0  # head-pruning passes done so far
        self.history: list[dict[str, Any]] = []  # one dict per block per pass that removed heads
        self.layer_mlp = {u.name: same_layer(u.name, self.mlps) for u in self.attention}

    # --- the counted matrices (method.md section 5): each unit's `counted_modules()` names them --
    def counted_modules(self, kinds: frozenset[str] | set[str] | None = None) -> list[tuple[str, nn.Module]]:
        """(kind, module) of every counted projection of every block (attention blocks first),
        current objects (surgery replaces them)."""
        return [(k, m) for unit in [*self.attention, *self.mlps] for k, m in unit.counted_modules().items()
                if kinds is None or k in kinds]

    def counted_weights(self, kinds: frozenset[str] | set[str] | None = None) -> list[nn.Parameter]:
        """The weight parameters behind the counted matrices of `kinds` (all when None)."""
        return [m.weight for _, m in self.counted_modules(kinds)]

    def counted_matrices(self, kinds: frozenset[str] | set[str] | None = None) -> list[torch.Tensor]:
        """The counted matrices of `kinds` as live `(out, in)` views."""
        return [weight_matrix(m) for _, m in self.counted_modules(kinds)]

    @torch.no_grad()
    def near_zero_by_kind(self, eps: float, finalized: frozenset[str] | set[str] | None = None
                          ) -> dict[str, tuple[int, int]]:
        """(zeros after `finalize(eps, finalized)`, dense entries) per matrix kind over all
        blocks, against the dense shapes: removed entries, plus |w| < eps in the kinds
        `finalized` (all when None) and exact zeros in the others. One host-device
        synchronisation for all matrices (the counts stay on the device until then)."""
        counts: dict[str, tuple[int, int]] = {}
        keys, small = [], []
        for unit in [*self.attention, *self.mlps]:
            for key, mat in unit.matrices().items():
                dense = unit.original_numel[key]
                exact = finalized is not None and key not in finalized
                small.append((mat == 0).sum() if exact else (mat.abs() < eps).sum())
                keys.append(key)
                zeros, total = counts.get(key, (0, 0))
                counts[key] = (zeros + dense - mat.numel(), total + dense)
        for key, n in zip(keys, torch.stack(small).tolist() if small else []):
            zeros, total = counts[key]
            counts[key] = (zeros + n, total)
        return counts

    @torch.no_grad()
    def finalize(self, eps: float, kinds: frozenset[str] | set[str] | None = None) -> int:
        """Set every |w| < eps of the counted matrices of `kinds` (all when None) to exactly 0;
        returns how many entries changed."""
        changed = 0
        for mat in self.counted_matrices(kinds):
            small = (mat.abs() < eps) & (mat != 0)
            changed += int(small.sum())
            mat.masked_fill_(small, 0.0)
        return changed

    def report(self, eps: float) -> SparsityReport:
        """Exact zeros against the dense shapes, heads kept, neuron degrees (at `eps`)."""
        return report(self.model, self.attention, self.mlps, eps, self.original_parameters)

    # --- structure -----------------------------------------------------------------------------
    def record_pass(self, events: list[dict[str, Any]]) -> None:
        """Note one head-pruning pass (its per-block events) in the history."""
        self.history += [{"pass": self.passes, **e} for e in events]
        self.passes += 1

    def head_structure(self) -> dict[str, list[int]]:
        """Original indices of the key/value groups each block still has."""
        return {u.name: list(u.kept_groups) for u in self.attention}

    def restore_head_structure(self, structure: dict[str, list[int]]) -> None:
        """Remove, without merging, the groups a saved structure no longer has, so that a
        checkpoint's weights fit (resume, reload)."""
        units = {u.name: u for u in self.attention}
        unknown = sorted(set(structure) - set(units))
        if unknown:
            raise NeuroPruneError(
                f"the saved head structure names attention blocks this model does not have: "
                f"{unknown[:5]}; was it saved from a different model?"
            )
        for name, kept in structure.items():
            unit = units[name]
            missing = sorted(set(kept) - set(unit.kept_groups))
            if missing:
                raise NeuroPruneError(f"{name}: saved structure keeps groups {missing} already removed.")
            keep = [p for p, g in enumerate(unit.kept_groups) if g in set(kept)]
            if len(keep) != unit.num_kv_heads:
                unit.keep_groups(keep)

    def structure(self) -> dict[str, Any]:
        """Everything that differs from the dense config's shapes, plus the head-pruning history."""
        return {"heads": self.head_structure(), "passes": self.passes, "history": self.history,
                **compaction_structure(self)}

    def restore_structure(self, structure: dict[str, Any]) -> None:
        """Re-apply a saved `structure()` to a dense model of the same config."""
        self.restore_head_structure(structure.get("heads", {}))
        restore_compaction(self, structure)
        self.passes = structure.get("passes", 0)
        self.history = list(structure.get("history", []))

    # --- persistence (the folder format is `model.checkpoint`'s) ----------------------------------
    def save_pretrained(self, directory: str | Path, tokenizer: Any = None,
                        extra: dict[str, Any] | None = None) -> Path:
        """Save the model with its discovery options and structure to `directory` (atomically);
        `extra` adds keys to `neuroprune.json` (a method records its name and the config the user
        gave). `ModelIndex.from_pretrained` / `neuroprune.load` read it back."""
        meta = {"discovery": self.discovery, "structure": self.structure(), **(extra or {})}
        return checkpoint.write_folder(self.model, directory, meta, tokenizer, hf_structure(self))

    @classmethod
    def from_pretrained(cls, directory: str | Path, **model_kwargs: Any) -> ModelIndex:
        """Rebuild a model saved with `save_pretrained`: the dense model of its config, the saved
        structure re-applied, then the saved weights (every shape and checksum checked)."""
        meta = checkpoint.read_meta(directory)
        model = checkpoint.build_model(directory, meta, **model_kwargs)
        # folders written before the index existed hold the options in the method's config
        index = cls(model, meta.get("discovery") or meta.get("neuroprune_config"))
        index.restore_structure(meta["structure"])
        checkpoint.load_weights(model, directory, meta)
        model.eval()
        return index


def load(directory: str | Path, **model_kwargs: Any) -> nn.Module:
    """Load a model saved by neuroprune (pruned or compacted) in one call."""
    return ModelIndex.from_pretrained(directory, **model_kwargs).model


def _discovery_dict(discovery: Any) -> dict[str, Any]:
    if discovery is None:
        return {"attention_layouts": [], "mlp_layouts": [], "attention_modules": None,
                "mlp_modules": None, "exclude_modules": None, "allow_missing_attention": False}
    get = discovery.get if isinstance(discovery, dict) else lambda k, d=None: getattr(discovery, k, d)
    out = {k: get(k, None) for k in DISCOVERY_FIELDS}
    out["allow_missing_attention"] = bool(out["allow_missing_attention"])
    for key in ("attention_layouts", "mlp_layouts"):
        out[key] = [dict(layout) for layout in (out[key] or [])]
    return out


def same_layer(name: str, mlps: list[MLPUnit]) -> MLPUnit | None:
    """The MLP sharing the longest dotted prefix with an attention block: its layer's MLP."""
    parts = name.split(".")

    def shared(mlp: MLPUnit) -> int:
        n = 0
        for a, b in zip(parts, mlp.name.split(".")):
            if a != b:
                break
            n += 1
        return n

    return max(mlps, key=shared, default=None)
