"""The `transformers` side of a run: its TrainingArguments and the NeuroPrune trainer for its task."""

from __future__ import annotations

import os
from typing import Any

from neuroprune.integrations.trainer import NeuroPruneSeq2SeqTrainer, NeuroPruneTrainer
from neuroprune.methods import SparsityMethod
from neuroprune.run_folder import RunDir
from neuroprune.training.data import collator
from neuroprune.training.settings import TrainSettings
from neuroprune.training.tasks import Task


def training_arguments(s: TrainSettings, run: RunDir, task: Task, has_eval: bool) -> Any:
    from transformers import Seq2SeqTrainingArguments, TrainingArguments

    report_to = s.report_to
    if report_to == "auto":
        import importlib.util

        report_to = "tensorboard" if importlib.util.find_spec("tensorboard") else "none"
    if "tensorboard" in report_to:
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(run.logs)  # transformers 5 reads the folder from here
    kwargs = dict(
        output_dir=str(run.checkpoints),
        num_train_epochs=s.epochs,
        per_device_train_batch_size=s.batch_size,
        per_device_eval_batch_size=s.eval_batch_size,
        learning_rate=s.learning_rate,
        weight_decay=s.weight_decay,
        warmup_steps=s.warmup_ratio,
        gradient_accumulation_steps=s.gradient_accumulation_steps,
        seed=s.seed,
        data_seed=s.seed,
        eval_strategy="epoch" if has_eval else "no",
        save_strategy="steps" if s.save_steps else "epoch",
        save_steps=s.save_steps or 500,
        save_total_limit=2,
        logging_steps=s.logging_steps,
        report_to=report_to,
        use_cpu=not _has_accelerator(),
        dataloader_num_workers=0,
        disable_tqdm=False,
    )
    if task.kind == "seq2seq":
        return Seq2SeqTrainingArguments(
            **kwargs,
            predict_with_generate=True,
            generation_max_length=s.generation_max_length,
            generation_num_beams=s.num_beams,
        )
    return TrainingArguments(**kwargs)


def _has_accelerator() -> bool:
    import torch

    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())


def build_trainer(
    model: Any,
    tokenizer: Any,
    task: Task,
    args: Any,
    encoded: dict[str, Any],
    method: SparsityMethod | None,
    callbacks: list | None = None,
    distiller: Any = None,
) -> Any:
    cls = NeuroPruneSeq2SeqTrainer if task.kind == "seq2seq" else NeuroPruneTrainer
    if task.kind in ("classification", "regression"):
        # These heads average their loss and ignore `num_items_in_batch`. Left to guess from the
        # forward's **kwargs, the Trainer would multiply the loss by the number of processes
        # (`average_tokens_across_devices`) and not divide it over gradient-accumulation steps.
        model.accepts_loss_kwargs = False
    return cls(
        model=model,
        args=args,
        train_dataset=encoded.get("train"),
        eval_dataset=encoded.get("validation"),
        data_collator=collator(task, tokenizer, model),
        processing_class=tokenizer,
        compute_metrics=task.compute_metrics(tokenizer),
        preprocess_logits_for_metrics=task.preprocess_logits(),
        method=method,
        callbacks=callbacks,
        distiller=distiller,
    )
