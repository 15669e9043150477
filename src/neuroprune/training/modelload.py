"""Loading the model of a run: a packaged model by its short name, a local folder or a hub id, with
the head its task needs; and the task a saved model was trained for."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from neuroprune.errors import ModelError
from neuroprune.model.architectures import head_kind
from neuroprune.model.packaged import resolve_model_path
from neuroprune.training.tasks import Task


def load_model(name: str, task: Task) -> tuple[Any, Any]:
    """Model (with the task's head) and tokenizer from a local folder or a hub id."""
    import transformers
    from transformers import AutoTokenizer

    path = resolve_model_path(name)
    local = Path(path)
    if (local.is_absolute() or path.startswith((".", "~")) or local.exists()) and not local.is_dir():
        raise ModelError(f"model path {path} does not exist; pass a folder with config.json and weights.")
    if local.is_dir() and not (local / "config.json").exists():
        raise ModelError(f"model folder {path} has no config.json, so it is not a transformers model.")
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # a new task head is expected, not worth a warning table
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = task.model_class().from_pretrained(path, **task.model_kwargs())
    except (OSError, ValueError, KeyError) as err:
        raise ModelError(
            f"cannot load model {name!r} ({str(err).splitlines()[0][:200]}); pass a local model folder "
            "(the Hugging Face hub may be unreachable) or --model minilm for the packaged MiniLM."
        ) from None
    finally:
        transformers.logging.set_verbosity(verbosity)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def saved_task(path: Path, kind: str | None = None, name: str | None = None) -> Task:
    """The task a saved model was trained for, read from its config (labels in id order); a
    generating `kind` (seq2seq, causal_lm) given by the user wins. `name` is the metric convention."""
    from neuroprune.model.remote_code import stock_config  # also reads folders with remote code

    try:
        cfg = stock_config(path)
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot read the model config in {path}: {err}") from None
    if kind in ("seq2seq", "causal_lm"):
        return Task(kind, name)
    found = head_kind(cfg)
    if found == "causal_lm":
        return Task("causal_lm")
    if found == "classification":
        return Task("classification", name, [cfg.id2label[i] for i in range(cfg.num_labels)])
    return Task(found, name)
