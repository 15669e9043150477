"""`NeuroPrune`: the model-level orchestration. Wrap any `transformers` model, add
`regularization_loss()` to the task loss, call `prune_redundant_heads()` after each epoch and
`finalize()` at the end."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import checkpoint
from .architectures import discover
from .compaction import compaction_structure, restore_compaction
from .config import NeuroPruneConfig
from .errors import NeuroPruneError
from .heads import group_distances, prune_unit, redundant_groups, similarity_from_distances
from .penalties import attention_penalty, mlp_penalty, output_penalty
from .sparsity import SparsityReport, report
from .surgery import ParamChange
from .units import AttentionUnit, MLPUnit


class NeuroPrune:
    """NeuroPrune applied to one model.

    Example::

        pruner = NeuroPrune(model, NeuroPruneConfig(alpha=1e-4, beta=1e-4, theta=0.15))
        loss = task_loss + pruner.regularization_loss()
        removed = pruner.prune_redundant_heads()   # after each epoch
        pruner.finalize()                          # at the end
        print(pruner.sparsity_report())

    Head removal replaces parameters of the model: rebuild your optimiser afterwards, or pass it
    to `neuroprune.optim.remap_optimizer(optimizer, pruner.last_changes)` to keep its state.
    """

    def __init__(self, model: nn.Module, config: NeuroPruneConfig | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise NeuroPruneError(f"NeuroPrune expects a torch.nn.Module, got {type(model).__name__}.")
        self.model = model
        self.config = config or NeuroPruneConfig()
        self.config.validate()
        found_attention, found_mlps = discover(
            model,
            attention_layouts=self.config.attention_layouts,
            mlp_layouts=self.config.mlp_layouts,
            attention_modules=self.config.attention_modules,
            mlp_modules=self.config.mlp_modules,
            exclude_modules=self.config.exclude_modules,
        )
        model_config = getattr(model, "config", None)
        self.attention: list[AttentionUnit] = [AttentionUnit(f, model_config) for f in found_attention]
        self.mlps: list[MLPUnit] = [MLPUnit(f) for f in found_mlps]
        self.original_parameters = sum(p.numel() for p in model.parameters())
        self.last_changes: list[ParamChange] = []
        self.passes = 0  # pruning passes done so far
        self.history: list[dict[str, Any]] = []  # one dict per block per pruning pass that removed heads
        self._layer_mlp = {u.name: _same_layer(u.name, self.mlps) for u in self.attention}

    # --- regularisation -------------------------------------------------------------------------
    def penalties(self) -> dict[str, torch.Tensor]:
        """Unweighted sums of R_MLP and R_attn (and R_O when `output_penalty` is on) over all
        blocks (differentiable)."""
        zero = torch.zeros((), device=next(self.model.parameters()).device)
        values = {
            "mlp": sum((mlp_penalty(u, self.config.eps) for u in self.mlps), zero),
            "attention": sum((attention_penalty(u, self.config.tiny) for u in self.attention), zero),
        }
        if self.config.output_penalty:
            values["output"] = sum((output_penalty(u, self.config.eps) for u in self.attention), zero)
        return values

    def weighted_penalties(self, weights: tuple[str, ...] = ("alpha", "beta")) -> dict[str, torch.Tensor]:
        """The penalty each weight carries, weight applied: ``"alpha"``: alpha * sum R_MLP (+ sum
        R_O with `output_penalty`); ``"beta"``: beta * sum R_attn. Only the weights asked for
        are computed, and a weight that is 0 is left out."""
        cfg = self.config
        out: dict[str, torch.Tensor] = {}
        if "alpha" in weights and cfg.alpha:
            r = sum(mlp_penalty(u, cfg.eps) for u in self.mlps)
            if cfg.output_penalty:
                r = r + sum(output_penalty(u, cfg.eps) for u in self.attention)
            out["alpha"] = cfg.alpha * r
        if "beta" in weights and cfg.beta:
            out["beta"] = cfg.beta * sum(attention_penalty(u, cfg.tiny) for u in self.attention)
        return out

    def regularization_loss(self) -> torch.Tensor:
        """alpha * sum R_MLP + beta * sum R_attn (+ alpha * sum R_O with `output_penalty`), a
        differentiable scalar to add to the task loss.
        A penalty whose weight is 0 is not computed at all."""
        zero = torch.zeros((), device=next(self.model.parameters()).device)
        return sum(self.weighted_penalties().values(), zero)

    # --- heads ----------------------------------------------------------------------------------
    def prune_redundant_heads(self, theta: float | None = None) -> dict[str, list[int]]:
        """Remove heads that duplicate another head (within `theta` in l_inf), layer by layer.

        Returns ``{attention module name: [removed original head indices]}`` for the layers
        that lost heads. The parameter changes are kept in `last_changes`.
        """
        theta = self.config.theta if theta is None else theta
        removed: dict[str, list[int]] = {}
        self.last_changes = []
        if not self.config.prune_heads:
            return removed
        for unit in self.attention:
            event, changes = prune_unit(unit, theta, self.config.merge, self._layer_mlp[unit.name])
            if event is not None:
                removed[unit.name] = event.removed_heads
                self.history.append({"pass": self.passes, "theta": theta, **dataclasses.asdict(event)})
                self.last_changes += changes
        self.passes += 1
        return removed

    @torch.no_grad()
    def theta_for_heads(self, heads: int) -> float | None:
        """The largest theta at which one `prune_redundant_heads` pass would leave at least
        `heads` query heads in the model (None: even theta = 0, identical heads only, leaves
        fewer). What a pass removes changes only where theta crosses a pairwise distance, so
        those distances are the candidates, bisected: larger theta keeps fewer heads (the greedy
        can break this order; the theta returned still keeps at least `heads`)."""
        dists = [(u, group_distances(u.group_blocks())) for u in self.attention]

        def kept(theta: float) -> int:
            removed = [(u, len(redundant_groups(similarity_from_distances(d, theta)))) for u, d in dists]
            return sum((u.num_kv_heads - r) * u.group_size for u, r in removed)

        pairs = [d[torch.triu(torch.ones_like(d, dtype=torch.bool), 1)] for _, d in dists]
        candidates = sorted({0.0, *torch.cat(pairs).tolist()}) if pairs else [0.0]
        if kept(candidates[0]) < heads:
            return None
        lo, hi = 0, len(candidates) - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if kept(candidates[mid]) >= heads else (lo, mid - 1)
        return candidates[lo]

    def head_structure(self) -> dict[str, list[int]]:
        """Original indices of the key/value groups each block still has (for checkpoints)."""
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

    # --- end of training ------------------------------------------------------------------------
    @torch.no_grad()
    def finalize(self) -> int:
        """Set every |w| < eps of the regularised matrices to exactly 0; returns how many changed."""
        changed = 0
        for unit in [*self.attention, *self.mlps]:
            for mat in unit.matrices().values():
                small = (mat.abs() < self.config.eps) & (mat != 0)
                changed += int(small.sum())
                mat.masked_fill_(small, 0.0)
        return changed

    def sparsity_report(self) -> SparsityReport:
        return report(self.model, self.attention, self.mlps, self.config.eps, self.original_parameters)

    def structure(self) -> dict[str, Any]:
        """Everything that differs from the dense config's shapes, plus the pruning history
        (saved in checkpoints)."""
        return {"heads": self.head_structure(), "passes": self.passes, "history": self.history,
                **compaction_structure(self)}

    def restore_structure(self, structure: dict[str, Any]) -> None:
        """Re-apply a saved `structure()` to a dense model of the same config."""
        self.restore_head_structure(structure.get("heads", {}))
        restore_compaction(self, structure)
        self.passes = structure.get("passes", 0)
        self.history = list(structure.get("history", []))

    def save_pretrained(self, directory: str | Path, tokenizer: Any = None) -> Path:
        """Save the model, its config and its structure to `directory` (atomically)."""
        return checkpoint.save_pretrained(self, directory, tokenizer)

    @classmethod
    def from_pretrained(cls, directory: str | Path, **model_kwargs: Any) -> NeuroPrune:
        """Rebuild a model saved with `save_pretrained`, structure and weights."""
        return checkpoint.from_pretrained(directory, **model_kwargs)


def _same_layer(name: str, mlps: list[MLPUnit]) -> MLPUnit | None:
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
