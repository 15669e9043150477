"""`neuroprune eval`: score a saved model (a run directory, its model/ folder, or any transformers
model folder) on a labelled file, and print (or write) the metrics with its sparsity."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from neuroprune.cli.train import add_settings_arguments, read_config_file, settings_types

EVAL_SETTINGS = [
    "validation_file",
    "test_file",
    "dataset",
    "task",
    "task_name",
    "text_fields",
    "label_field",
    "source_lang",
    "target_lang",
    "source_prefix",
    "max_length",
    "max_eval_samples",
    "eval_batch_size",
    "generation_max_length",
    "num_beams",
]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="evaluate a saved model on a labelled data file",
        description="Evaluate RUN_DIR/model (or any model folder) on --validation-file or --test-file "
        "with the task's metrics (GLUE conventions, BLEU / ROUGE, perplexity); without a file, a run "
        "directory is scored on its own validation file.",
    )
    parser.add_argument("--model", required=True, help="run directory, its model/ folder, or a model folder")
    parser.add_argument(
        "--split",
        choices=("validation", "test"),
        default=None,
        help="which file to score (default: test if given, else validation)",
    )
    parser.add_argument("--output", metavar="FILE", help="also write the metrics to this JSON file")
    parser.add_argument("--config", metavar="FILE", help="YAML or JSON file of settings (flags win)")
    add_settings_arguments(parser, EVAL_SETTINGS)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import transformers

    from neuroprune.files import write_json
    from neuroprune.training.evaluate import evaluate_model
    from neuroprune.training.settings import TrainSettings

    values, split, origin = resolve_eval_settings(args)
    print(f"neuroprune eval: scoring {args.model} on {origin}", file=sys.stderr)
    transformers.utils.logging.disable_progress_bar()  # weight loading: not worth a bar
    # Only the evaluated split is read, under its own name (errors and metrics say "test" for a test file).
    files = {"train_file": None, "validation_file": None, "test_file": None,
             f"{split}_file": values.get(f"{split}_file")}
    settings = TrainSettings(**{**values, **files})
    metrics = evaluate_model(args.model, settings, split=split)
    text = json.dumps(metrics, indent=1)
    print(text)
    if args.output:
        write_json(args.output, metrics)
    return 0


def resolve_eval_settings(args: argparse.Namespace) -> tuple[dict[str, Any], str, str]:
    """Settings <- the run's own settings (when --model is a run directory) <- config file <- flags;
    and which split to score: --split, else the file given (test first), else the run's own
    validation file (then its test file). Returns the settings, the split and what is scored (for
    the message)."""
    from neuroprune.errors import ConfigError
    from neuroprune.run_folder import RunDir

    saved = {k: v for k, v in RunDir(args.model).settings().items() if k in EVAL_SETTINGS and v is not None}
    given = read_config_file(args.config) if args.config else {}
    given = {k: v for k, v in given.items() if k in EVAL_SETTINGS}
    given.update({k: v for k, v in vars(args).items() if k in settings_types() and v is not None})
    values = {**saved, **given}
    split = args.split or next(
        (name for name in ("test", "validation") if given.get(f"{name}_file")),
        next((name for name in ("validation", "test") if saved.get(f"{name}_file")), "test"),
    )
    if not values.get(f"{split}_file"):
        if values.get("dataset"):
            return values, split, f"the {split} split of {values['dataset']}"
        where = f" (the run in {args.model} has none)" if saved or RunDir(args.model).has_run() else ""
        raise ConfigError(f"nothing to evaluate: pass --{split}-file FILE{where}.")
    mine = "" if given.get(f"{split}_file") else " (the run's own)"
    return values, split, f"the {split} file {values[f'{split}_file']}{mine}"
