"""The data of a run, from its settings: splits loaded and checked, the task and fields they
describe, and the splits tokenized for the model."""

from __future__ import annotations

from typing import Any

from neuroprune.training.data import build_task, encode, glue_name, load_splits, resolve_fields
from neuroprune.training.settings import TrainSettings
from neuroprune.training.tasks import Task


def prepare_data(s: TrainSettings, task: Task | None = None) -> tuple[dict[str, Any], Task, Any]:
    """Load, check and describe the data of a run: splits, task, fields."""
    files = {"train": s.train_file, "validation": s.validation_file, "test": s.test_file}
    splits = load_splits(s.dataset, files)
    name = s.task_name or glue_name(s.dataset, files)
    kind = task.kind if task else s.task
    fields = resolve_fields(splits, kind, s.text_fields, s.label_field, s.source_lang, s.target_lang, name)
    if kind is None and fields.source_lang:
        kind = "seq2seq"
    built = build_task(splits, fields, kind, name, known=task)
    return splits, built, fields


def encode_splits(
    s: TrainSettings, splits: dict[str, Any], task: Task, fields: Any, tokenizer: Any
) -> dict[str, Any]:
    """Tokenize `splits` with the run's length, prefix and sample limits."""
    limits = {name: s.max_train_samples if name == "train" else s.max_eval_samples for name in splits}
    return encode(splits, task, fields, tokenizer, s.max_length, s.source_prefix, limits)
