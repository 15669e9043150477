"""`SparsityMethod`: the one protocol every sparse-training method implements (NeuroPrune and every
baseline), torch only, so the same object runs in a plain loop, in `NeuroPruneTrainer` and in the
CLI. A plain loop calls the hooks where the Trainer would::

    method = build_method("neuroprune", model, config, target_sparsity=0.9)
    method.on_train_begin(total_steps, optimizer)
    for step in range(1, total_steps + 1):
        loss = task_loss(model, batch) + method.regularization_loss()
        loss.backward(); optimizer.step(); optimizer.zero_grad()
        remap_optimizer(optimizer, method.on_step_end(step))
        ...                                   # after each epoch:
        remap_optimizer(optimizer, method.on_epoch_end(epoch))
    method.on_train_end()                     # finalize where the method calls for it

A method *holds* a `ModelIndex` (the model's blocks, original shapes, structure); it does not
derive from one. Its `config` is what the user asked for (frozen); everything a method changes
while it runs is its own state, returned by `state_dict()` and logged by `log_values()`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from neuroprune.config import MethodConfig
from neuroprune.errors import ConfigError
from neuroprune.model.index import ModelIndex
from neuroprune.model.sparsity import SparsityReport
from neuroprune.model.surgery import ParamChange


class SparsityMethod:
    """Base of every method; each hook has a sensible default, so a method overrides only what
    it needs. Hooks that change the model's structure return the `ParamChange`s so the caller can
    keep its optimiser in step (`neuroprune.remap_optimizer`)."""

    name: ClassVar[str] = "dense"
    # the method's config dataclass (peft-style, one per method); a saved config is read back with it
    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    # matrix kinds `finalize()` zeroes below eps at the end of training (None: none; the method
    # makes exact zeros itself or none at all)
    finalize_kinds: ClassVar[frozenset[str] | None] = None

    def __init__(self, model: nn.Module | ModelIndex, config: MethodConfig | None = None) -> None:
        config = self.config_class() if config is None else config
        if not isinstance(config, self.config_class):
            raise ConfigError(
                f"{type(self).__name__} takes a {self.config_class.__name__}, got a {type(config).__name__}; "
                f"build it as {self.config_class.__name__}(...) or use build_method({self.name!r}, ...)."
            )
        self.config = config
        self.index = model if isinstance(model, ModelIndex) else ModelIndex(model, self.config)
        self.model = self.index.model
        self.target: Any = None  # the method's target settings, if it has one
        self.total_steps = 0
        self.optimizer: torch.optim.Optimizer | None = None
        self.step = 0  # last optimiser step seen

    # --- hooks ---------------------------------------------------------------------------------
    def on_train_begin(self, total_steps: int, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Before the first step, *after* any checkpoint's weights were loaded: how long training
        is and which optimiser runs it (its learning rate sizes proximal steps)."""
        self.total_steps, self.optimizer = total_steps, optimizer

    def regularization_loss(self) -> torch.Tensor:
        """Added to the task loss on every training micro-batch (a zero without a penalty)."""
        return torch.zeros((), device=self.device)

    def on_step_end(self, step: int) -> list[ParamChange]:
        """After optimiser step `step` (counted from 1)."""
        self.step = step
        return []

    def on_epoch_end(self, epoch: int) -> list[ParamChange]:
        """After the last step of epoch `epoch` (from 0), before that epoch's evaluation."""
        return []

    def on_train_end(self) -> None:
        """After the last step, before the final model is saved."""
        if self.finalize_kinds is not None:
            self.finalize()

    # --- measurements --------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def finalize(self) -> int:
        """Set |w| < eps of the matrices this method regularises to exactly 0 (method.md sec. 5);
        returns how many entries changed."""
        kinds = self.finalize_kinds
        return 0 if kinds is None else self.index.finalize(self.config.eps, kinds)

    def sparsity_report(self) -> SparsityReport:
        return self.index.report(self.config.eps)

    def log_values(self, detailed: bool = False) -> dict[str, float]:
        """Scalars for the training logs; `detailed` (evaluation logs) adds per-layer ones."""
        rep = self.sparsity_report()
        values: dict[str, float] = {
            "sparsity": rep.sparsity,
            "model_sparsity": rep.model_sparsity,
            "heads_kept": rep.heads_kept,
            "heads_total": rep.heads_total,
        }
        if detailed:
            for layer in rep.layers:
                values[f"sparsity/{layer.name}"] = layer.sparsity
                if layer.degree is not None:
                    values[f"degree_sd/{layer.name}"] = layer.degree.sd_percent
        return values

    def summary(self) -> dict[str, Any]:
        """Recorded beside the sparsity report: method, target and achieved sparsity."""
        return {
            "method": self.name,
            "target_sparsity": getattr(self.target, "sparsity", None),
            "achieved_sparsity": self.sparsity_report().sparsity,
        }

    # --- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state saved in every checkpoint: the structure and what the method
        changed while it ran (never the user's config, which is saved as given)."""
        return {"structure": self.index.structure(), "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()` on a freshly loaded dense model, *before* the checkpoint's
        weights load (so that their shapes fit). State derived from the weights is rebuilt in
        `on_train_begin`, which runs after they are loaded."""
        self.index.restore_structure(state["structure"])
        self.step = int(state.get("step", 0))

    def save_pretrained(self, directory: str | Path, tokenizer: Any = None) -> Path:
        """Save the model with its structure (atomically); `neuroprune.load` reads it back."""
        return self.index.save_pretrained(
            directory, tokenizer, extra={"method": self.name, "method_config": self.config.to_dict()}
        )
