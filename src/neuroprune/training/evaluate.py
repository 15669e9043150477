"""Scoring a saved model (`neuroprune eval`) on a labelled split, with its sparsity."""

from __future__ import annotations

import tempfile
from typing import Any

from neuroprune.errors import CheckpointError, DataError, ModelError
from neuroprune.run_folder import RunDir
from neuroprune.training.dataprep import encode_splits, prepare_data
from neuroprune.training.modelload import load_model, saved_task
from neuroprune.training.settings import TrainSettings
from neuroprune.training.trainer_factory import build_trainer, training_arguments


def evaluate_model(model_dir: str, s: TrainSettings, split: str = "validation") -> dict[str, Any]:
    """`neuroprune eval`: score a saved model (a run folder, its model/ folder, or any
    transformers folder) on a labelled file."""
    from neuroprune.methods.registry import saved_config
    from neuroprune.model.checkpoint import load_tokenizer, read_meta
    from neuroprune.model.index import ModelIndex

    path = RunDir(model_dir).model_dir(plain_ok=True)
    if not path.is_dir():
        raise ModelError(f"model folder {model_dir} does not exist.")
    try:
        meta = read_meta(path)
        index = ModelIndex.from_pretrained(path)
        model = index.model
    except CheckpointError:
        index = None
        model = None
    s.validate()
    task_guess = saved_task(path, s.task, s.task_name)
    splits, task, fields = prepare_data(s, task_guess)
    if split not in splits:
        raise DataError(f"no {split} data to evaluate: pass --{split}-file FILE.")
    labelled = fields.label in splits[split].dataset.column_names
    if task.kind in ("classification", "regression") and not labelled:
        raise DataError(
            f"{splits[split].source} has no label field {fields.label!r}, so it cannot be scored; pass a "
            "labelled file (or name the field with --label-field)."
        )
    if model is None:
        model, _ = load_model(str(path), task)
    tokenizer = load_tokenizer(path)
    encoded = encode_splits(s, {split: splits[split]}, task, fields, tokenizer)
    s.report_to = "none"
    with tempfile.TemporaryDirectory() as scratch:
        args = training_arguments(s, RunDir(scratch), task, has_eval=False)
        trainer = build_trainer(model, tokenizer, task, args, {}, None)
        metrics = trainer.evaluate(encoded[split], metric_key_prefix=split)
    if index is not None:
        rep = index.report(saved_config(meta).eps)
        metrics.update(
            sparsity=rep.sparsity,
            model_sparsity=rep.model_sparsity,
            heads_kept=rep.heads_kept,
            heads_total=rep.heads_total,
        )
    return metrics
