"""`transformers.Trainer` integration: one subclass, `NeuroPruneTrainer`, that runs any
`SparsityMethod` inside the ordinary Trainer loop, driven by one callback.

The method owns the regulariser added to the loss and the structural changes made at the end of
steps and epochs; the trainer only adds the regulariser, keeps the optimiser (and so its LR
scheduler, which holds the same param groups) in step with removed parameters, logs the method's
values next to the loss, and saves / restores the method's state in checkpoints.

    method = NeuroPrune(model, NeuroPruneConfig(alpha=1e-4, beta=1e-4, theta=0.15))
    trainer = NeuroPruneTrainer(model=model, args=args, train_dataset=train, method=method)
    trainer.train()          # penalties in the loss, heads pruned every epoch, finalised at the end
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import Seq2SeqTrainer, Trainer, TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from neuroprune import distributed
from neuroprune.errors import NeuroPruneError
from neuroprune.files import write_json
from neuroprune.guards import check_loss, check_weights, newest_good_checkpoint, write_manifest
from neuroprune.integrations.console import ConsoleCallback
from neuroprune.integrations.distill import Distiller
from neuroprune.methods import Dense, SparsityMethod
from neuroprune.model.optim import remap_optimizer
from neuroprune.model.surgery import ParamChange

METHOD_STATE_FILE = "neuroprune_method.json"


class _MethodCallback(TrainerCallback):
    """Drives every hook of the method from the Trainer's events (`on_train_begin` included:
    it runs after a resumed checkpoint's weights and optimiser state are loaded)."""

    def __init__(self, trainer: NeuroPruneMixin) -> None:
        self.trainer = trainer
        self.epochs_ended: set[int] = set()

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        optimizer = optimizer if optimizer is not None else self.trainer.optimizer
        self.trainer.method.on_train_begin(state.max_steps, getattr(optimizer, "optimizer", optimizer))
        self.trainer.loss_split.begin(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer.apply_changes(self.trainer.method.on_step_end(state.global_step))
        if state.epoch is not None and state.epoch > 0 and state.epoch == int(state.epoch):
            # the epoch's last step: its epoch-end hook runs now, before this step's checkpoint
            # is saved, so that a run resumed from that checkpoint has had it too
            self._epoch_end(int(state.epoch) - 1)

    def on_epoch_end(self, args, state, control, **kwargs):
        self._epoch_end(max(int(round(state.epoch or 0)) - 1, 0))  # an epoch cut short by max_steps

    def _epoch_end(self, epoch: int) -> None:
        if epoch in self.epochs_ended:
            return
        self.epochs_ended.add(epoch)
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
        method = self.trainer.method
        # the sparsity before and after finalize, so the console can say why the final one differs
        before = method.sparsity_report().sparsity if method.finalize_kinds is not None else None
        method.on_train_end()
        self.trainer.finalized = None if before is None else (before, method.sparsity_report().sparsity)


class LossSplit:
    """The penalty's share of the loss the Trainer logs, so that the logs show the task loss
    (`loss`, `train_loss`) and the weighted penalty (`penalty`) apart: a NeuroPrune penalty can be
    hundreds of times the task loss. Each micro-batch adds reg / accumulation steps to the Trainer's
    loss sum, whether the Trainer or `compute_loss` divides, so that is what is counted here."""

    def __init__(self) -> None:
        self.since_log: torch.Tensor | float = 0.0  # a tensor: no device sync per micro-batch
        self.total = 0.0
        self.logged_step = self.start_step = 0
        self.active = False  # a penalty was added to the loss in this training

    def begin(self, step: int) -> None:
        self.since_log, self.total, self.logged_step, self.start_step = 0.0, 0.0, step, step

    def add(self, reg: torch.Tensor, accumulation_steps: int) -> None:
        self.since_log = self.since_log + reg.detach() / accumulation_steps
        self.active = True

    def split(self, logs: dict[str, float], step: int) -> None:
        """In place: `loss` (since the last log) and `train_loss` (the whole training) lose the
        penalty's share, which goes to `penalty`."""
        if not self.active:
            return
        if "loss" in logs:
            penalty = float(self.since_log) / max(step - self.logged_step, 1)
            self.total += float(self.since_log)
            self.since_log, self.logged_step = 0.0, step
            logs["loss"], logs["penalty"] = logs["loss"] - penalty, penalty
        if "train_loss" in logs:
            self.total += float(self.since_log)
            self.since_log = 0.0
            penalty = self.total / max(step - self.start_step, 1)
            logs["train_loss"], logs["train_penalty"] = logs["train_loss"] - penalty, penalty


def write_method_state(folder: Path, method: SparsityMethod) -> None:
    """Written last into a checkpoint folder, so its presence also marks the checkpoint complete."""
    write_json(folder / METHOD_STATE_FILE, {"method": method.name, "state": method.state_dict()}, indent=None)


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
    """The method's behaviour, mixed into `Trainer` and `Seq2SeqTrainer` below.

    `method` is any `SparsityMethod` (`NeuroPrune`, a baseline, or your own) built on the same
    model. Without one, the trainer trains densely (the `Dense` method: measured and logged, no
    penalty), which is exactly the base Trainer's computation.
    """

    def __init__(self, *args: Any, method: SparsityMethod | None = None,
                 distiller: Distiller | None = None, **kwargs: Any) -> None:
        if method is not None and not isinstance(method, SparsityMethod):
            raise NeuroPruneError(
                f"method= must be a neuroprune SparsityMethod (e.g. NeuroPrune(model, config) or "
                f"build_method(...)), got {type(method).__name__}."
            )
        model = kwargs.get("model", args[0] if args else None)
        if method is None:
            method = Dense(model)
        elif model is not None and method.model is not model:
            raise NeuroPruneError("method= was built on another model than the one given to the trainer.")
        self.method: SparsityMethod = method
        # opt-in recovery by distillation from a dense teacher (integrations/distill.py)
        self.distiller = distiller
        self._distill_logs: dict[str, list[float]] = {}
        # First, so that the method's state is in a checkpoint before any user callback sees it.
        kwargs["callbacks"] = [_MethodCallback(self), *(kwargs.get("callbacks") or [])]
        self.last_good_checkpoint: str | None = None  # named when the loss turns non-finite
        self.loss_split = LossSplit()
        self.finalized: tuple[float, float] | None = None  # sparsity before / after finalize
        super().__init__(*args, **kwargs)
        self.console = self._short_console()

    def _short_console(self) -> ConsoleCallback | None:
        """transformers' progress output prints every log as a dict (with per-layer values, ~1,000
        characters per evaluation): replace it by the short console (integrations/console.py)."""
        bars = self.callback_handler.pop_callback(ProgressCallback)
        printer = None if bars is not None else self.callback_handler.pop_callback(PrinterCallback)
        if bars is None and printer is None:
            return None  # the user's own progress callbacks
        console = ConsoleCallback(self, bars=bars is not None)
        self.add_callback(console)
        return console

    # --- loss -----------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.distiller is not None and model.training:
            result = self._distilled_loss(model, inputs, return_outputs, num_items_in_batch)
        else:
            result = super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        reg = self.method.regularization_loss() if model.training else None
        if reg is None or not reg.requires_grad:  # no penalty (dense, GMP, proximal steps)
            return result
        self.loss_split.add(reg, getattr(self, "current_gradient_accumulation_steps", 1))
        if self._loss_scaled_for_ga(num_items_in_batch):
            # The task loss is already normalised over the whole accumulated batch, so the Trainer
            # will not divide it by the accumulation steps: scale the regulariser ourselves so it
            # counts once per optimiser step.
            reg = reg / self.current_gradient_accumulation_steps
        if return_outputs:
            loss, outputs = result
            return loss + reg, outputs
        return result + reg

    def _distilled_loss(self, model, inputs, return_outputs, num_items_in_batch):
        """The task loss mixed with the teacher's terms; the terms are kept for the next log."""
        if self.distiller.hidden_weight:
            inputs = {**inputs, "output_hidden_states": True}
        loss, outputs = super().compute_loss(
            model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
        )
        # the distillation terms are per-micro-batch means, like an unnormalised task loss
        scale = 1 / self.current_gradient_accumulation_steps if self._loss_scaled_for_ga(
            num_items_in_batch) else 1.0
        loss, parts = self.distiller.combine(inputs, outputs, loss, scale)
        for key, value in parts.items():
            self._distill_logs.setdefault(key, []).append(value)
        return (loss, outputs) if return_outputs else loss

    def _loss_scaled_for_ga(self, num_items_in_batch: Any) -> bool:
        """The Trainer's own rule (`training_step`) for whether it divides the loss by the steps."""
        scaled = getattr(self, "loss_is_scaled_for_ga", None)  # transformers >= 5.17 only
        if scaled is not None:
            return scaled
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
            models = getattr(self.accelerator, "_models", None)  # accelerate's own list (private)
            if models is not None:
                self.accelerator._models = [self.model_wrapped if m is old else m for m in models]

    def training_step(self, model, inputs, num_items_in_batch=None):
        if isinstance(model, torch.nn.parallel.DistributedDataParallel) and model is not self.model_wrapped:
            model = self.model_wrapped  # the Trainer's loop still holds the wrapper from before removal
        loss = super().training_step(model, inputs, num_items_in_batch)
        check_loss(loss, self.state.global_step + 1, self.last_good_checkpoint)
        return loss

    # --- evaluation -----------------------------------------------------------------------------
    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        """As `Trainer.evaluate`, without touching the training's random state: building the
        evaluation DataLoader iterator draws from the global CPU generator, so an evaluation at an
        epoch end after a checkpoint would otherwise shift every later dropout mask, and a run
        resumed from that checkpoint (whose saved RNG state predates the evaluation) would not end
        where the uninterrupted run ends."""
        with torch.random.fork_rng(devices=[]):
            return super().evaluate(*args, **kwargs)

    # --- logging --------------------------------------------------------------------------------
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # In place, so `evaluate()` returns (and callbacks see) the same values that are logged.
        logs.update(self.method.log_values(detailed=any(k.startswith("eval_") for k in logs)))
        self.loss_split.split(logs, self.state.global_step)
        if "loss" in logs and self._distill_logs:  # training logs: the teacher's terms since the last
            logs.update({k: sum(v) / len(v) for k, v in self._distill_logs.items()})
            self._distill_logs = {}
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
