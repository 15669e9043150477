"""`transformers.Trainer` integration: one subclass, `NeuroPruneTrainer`, that runs a sparse-training
*method* inside the ordinary Trainer loop.

A method (`PruningMethod`) owns the regulariser added to the loss and the structural changes made
at the end of steps and epochs; the trainer only adds the regulariser, keeps the optimiser (and so
its LR scheduler, which holds the same param groups) in step with removed parameters, logs the
method's values next to the loss, and saves / restores the method's state in checkpoints. The
NeuroPrune method is `NeuroPruneMethod`; other methods plug in the same way.

    pruner = NeuroPrune(model, NeuroPruneConfig(alpha=1e-4, beta=1e-4, theta=0.15))
    trainer = NeuroPruneTrainer(model=model, args=args, train_dataset=train, pruner=pruner)
    trainer.train()          # penalties in the loss, heads pruned every epoch, finalised at the end
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from transformers import Seq2SeqTrainer, Trainer, TrainerCallback

from . import distributed
from .errors import NeuroPruneError
from .guards import check_loss, check_weights, newest_good_checkpoint, write_manifest
from .optim import remap_optimizer
from .pruner import NeuroPrune
from .surgery import ParamChange

METHOD_STATE_FILE = "neuroprune_method.json"


class PruningMethod:
    """What a sparse-training method contributes to a training loop. Every hook has a no-op
    default, so a method overrides only what it needs. Hooks that change the model's structure
    return the `ParamChange`s so the caller can update its optimiser."""

    name = "dense"

    def regularization_loss(self) -> torch.Tensor | None:
        """Added to the task loss on every training micro-batch (None: nothing to add)."""
        return None

    def on_step_end(self, step: int) -> list[ParamChange]:
        """After optimiser step `step` (1-based global step)."""
        return []

    def on_epoch_end(self, epoch: int) -> list[ParamChange]:
        """After the last step of epoch `epoch` (0-based), before that epoch's evaluation."""
        return []

    def on_train_end(self) -> None:
        """After the last step, before the final model is saved."""

    def log_values(self, detailed: bool = False) -> dict[str, float]:
        """Scalars for the Trainer's logs; `detailed` (evaluation logs) may add per-layer ones."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state saved in every checkpoint (structure, schedules)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()` on a freshly loaded dense model, before its weights load."""


class NeuroPruneMethod(PruningMethod):
    """NeuroPrune: both penalties in the loss, redundant heads removed at the end of every epoch
    (and every `prune_every_steps` steps if > 0, for runs of one long epoch), finalised at the end."""

    name = "neuroprune"

    def __init__(self, pruner: NeuroPrune, prune_every_steps: int = 0) -> None:
        if prune_every_steps < 0:
            raise NeuroPruneError(f"prune_every_steps must be >= 0, got {prune_every_steps}.")
        self.pruner = pruner
        self.prune_every_steps = prune_every_steps
        self._pruned_at: int | None = None
        self._step = 0

    def regularization_loss(self) -> torch.Tensor | None:
        cfg = self.pruner.config
        return self.pruner.regularization_loss() if (cfg.alpha or cfg.beta) else None

    def _prune(self) -> list[ParamChange]:
        if self._pruned_at == self._step:  # a step-end pass already ran at this very step
            return []
        self._pruned_at = self._step
        distributed.prune_redundant_heads(self.pruner)  # the same decision on every rank
        return self.pruner.last_changes

    def on_step_end(self, step: int) -> list[ParamChange]:
        self._step = step
        if self.prune_every_steps and step % self.prune_every_steps == 0:
            return self._prune()
        return []

    def on_epoch_end(self, epoch: int) -> list[ParamChange]:
        return self._prune()

    def on_train_end(self) -> None:
        cfg = self.pruner.config
        if cfg.alpha or cfg.beta:  # without a penalty there is nothing to finalise: dense stays dense
            self.pruner.finalize()

    def log_values(self, detailed: bool = False) -> dict[str, float]:
        rep = self.pruner.sparsity_report()
        with torch.no_grad():
            penalties = self.pruner.penalties()
        values: dict[str, float] = {
            "sparsity": rep.sparsity,
            "model_sparsity": rep.model_sparsity,
            "heads_kept": rep.heads_kept,
            "heads_total": rep.heads_total,
            "penalty_mlp": float(penalties["mlp"]),
            "penalty_attention": float(penalties["attention"]),
        }
        if detailed:
            for layer in rep.layers:
                values[f"sparsity/{layer.name}"] = layer.sparsity
                if layer.degree is not None:
                    values[f"degree_sd/{layer.name}"] = layer.degree.sd_percent
        return values

    def state_dict(self) -> dict[str, Any]:
        return {"structure": self.pruner.structure(), "config": self.pruner.config.to_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pruner.restore_structure(state["structure"])


class _MethodCallback(TrainerCallback):
    """Drives the method's hooks from the Trainer's events."""

    def __init__(self, trainer: NeuroPruneMixin) -> None:
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer.apply_changes(self.trainer.method.on_step_end(state.global_step))

    def on_epoch_end(self, args, state, control, **kwargs):
        epoch = max(int(round(state.epoch or 0)) - 1, 0)
        self.trainer.apply_changes(self.trainer.method.on_epoch_end(epoch))

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        # never seal non-finite weights as a good checkpoint
        check_weights(self.trainer.model, state.global_step, self.trainer.last_good_checkpoint)
        if distributed.is_distributed():
            torch.distributed.barrier()  # every rank's files (RNG states) are in the folder
        if args.should_save and folder.is_dir():
            write_method_state(folder, self.trainer.method)
            write_manifest(folder)  # sealed last: an unsealed folder is never resumed from
        if folder.is_dir():
            self.trainer.last_good_checkpoint = str(folder)

    def on_train_end(self, args, state, control, **kwargs):
        self.trainer.method.on_train_end()


def write_method_state(folder: Path, method: PruningMethod) -> None:
    """Written last into a checkpoint folder, so its presence also marks the checkpoint complete."""
    tmp = folder / f".{METHOD_STATE_FILE}.tmp"
    tmp.write_text(json.dumps({"method": method.name, "state": method.state_dict()}))
    os.replace(tmp, folder / METHOD_STATE_FILE)


def read_method_state(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / METHOD_STATE_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise NeuroPruneError(
            f"checkpoint {folder} has no {METHOD_STATE_FILE}: it was not written by NeuroPruneTrainer "
            "or its save was interrupted; resume from an earlier checkpoint."
        ) from None
    except json.JSONDecodeError as err:
        raise NeuroPruneError(f"{path} is corrupt ({err}); resume from an earlier checkpoint.") from None


class NeuroPruneMixin:
    """The NeuroPrune behaviour, mixed into `Trainer` and `Seq2SeqTrainer` below.

    Pass either `pruner` (a `NeuroPrune`, run with `NeuroPruneMethod`) or `method` (any
    `PruningMethod`). With neither, it behaves exactly like the base Trainer.
    """

    def __init__(
        self,
        *args: Any,
        pruner: NeuroPrune | None = None,
        method: PruningMethod | None = None,
        prune_every_steps: int = 0,
        **kwargs: Any,
    ) -> None:
        if pruner is not None and method is not None:
            raise NeuroPruneError("pass either pruner= or method= to NeuroPruneTrainer, not both.")
        self.method: PruningMethod = method or (
            NeuroPruneMethod(pruner, prune_every_steps) if pruner is not None else PruningMethod()
        )
        # First, so that the method's state is in a checkpoint before any user callback sees it.
        kwargs["callbacks"] = [_MethodCallback(self), *(kwargs.get("callbacks") or [])]
        self.last_good_checkpoint: str | None = None  # named when the loss turns non-finite
        super().__init__(*args, **kwargs)

    # --- loss -----------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )
        reg = self.method.regularization_loss() if model.training else None
        if reg is None:
            return result
        if self._loss_scaled_for_ga(num_items_in_batch):
            # The task loss is already normalised over the whole accumulated batch, so the Trainer
            # will not divide it by the accumulation steps: scale the regulariser ourselves so it
            # counts once per optimiser step.
            reg = reg / self.current_gradient_accumulation_steps
        if return_outputs:
            loss, outputs = result
            return loss + reg, outputs
        return result + reg

    def _loss_scaled_for_ga(self, num_items_in_batch: Any) -> bool:
        """The Trainer's own rule (`training_step`) for whether it divides the loss by the steps."""
        if self.loss_is_scaled_for_ga is not None:
            return self.loss_is_scaled_for_ga
        return bool(self.model_accepts_loss_kwargs and num_items_in_batch is not None) or (
            self.compute_loss_func is not None
        )

    # --- structure changes ----------------------------------------------------------------------
    def apply_changes(self, changes: list[ParamChange]) -> None:
        """Swap removed parameters for their smaller versions in the optimiser, keeping AdamW's
        moments for what survives. The LR scheduler shares the optimiser's param groups, which are
        edited in place, so it needs nothing."""
        if not changes or self.optimizer is None:
            return
        remap_optimizer(getattr(self.optimizer, "optimizer", self.optimizer), changes)
        if isinstance(self.model_wrapped, torch.nn.parallel.DistributedDataParallel):
            # the old wrapper all-reduces the removed parameters' gradients only: build a new one
            old, self.model_wrapped = self.model_wrapped, distributed.rewrap_ddp(self.model_wrapped)
            models = self.accelerator._models
            self.accelerator._models = [self.model_wrapped if m is old else m for m in models]

    def training_step(self, model, inputs, num_items_in_batch=None):
        if isinstance(model, torch.nn.parallel.DistributedDataParallel) and model is not self.model_wrapped:
            model = self.model_wrapped  # the Trainer's loop still holds the wrapper from before removal
        loss = super().training_step(model, inputs, num_items_in_batch)
        check_loss(loss, self.state.global_step + 1, self.last_good_checkpoint)
        return loss

    # --- logging --------------------------------------------------------------------------------
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # In place, so `evaluate()` returns (and callbacks see) the same values that are logged.
        logs.update(self.method.log_values(detailed=any(k.startswith("eval_") for k in logs)))
        super().log(logs, start_time)

    # --- resume ---------------------------------------------------------------------------------
    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any):
        """As `Trainer.train`; when resuming, the method's state (e.g. the heads already removed)
        is restored first, so the checkpoint's smaller weights and optimiser state fit."""
        distributed.refuse_sharded(self.model, self.accelerator)
        if resume_from_checkpoint is True:
            found = list(Path(self.args.output_dir).glob("checkpoint-*"))
            resume_from_checkpoint = newest_good_checkpoint(found)
            if resume_from_checkpoint is None:
                raise NeuroPruneError(f"no intact checkpoint to resume from in {self.args.output_dir}.")
        if resume_from_checkpoint:
            self.last_good_checkpoint = str(resume_from_checkpoint)
            saved = read_method_state(resume_from_checkpoint)
            if saved["method"] != self.method.name:
                raise NeuroPruneError(
                    f"checkpoint {resume_from_checkpoint} was trained with method {saved['method']!r}, "
                    f"not {self.method.name!r}; resume with the same method."
                )
            self.method.load_state_dict(saved["state"])
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)


class NeuroPruneTrainer(NeuroPruneMixin, Trainer):
    """`transformers.Trainer` with a sparse-training method (NeuroPrune by default)."""


class NeuroPruneSeq2SeqTrainer(NeuroPruneMixin, Seq2SeqTrainer):
    """`Seq2SeqTrainer` (generation during evaluation: BLEU / ROUGE) with a sparse-training method."""
