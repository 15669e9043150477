"""`neuroprune eval`: score a saved model (a run directory, its model/ folder, or any transformers
model folder) on a labelled file, and print (or write) the metrics with its sparsity."""

from __future__ import annotations

import argparse
import json

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
        "with the task's metrics (GLUE conventions, BLEU / ROUGE, perplexity).",
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
    from neuroprune.errors import ConfigError
    from neuroprune.files import write_json
    from neuroprune.training.evaluate import evaluate_model
    from neuroprune.training.settings import TrainSettings

    values = read_config_file(args.config) if args.config else {}
    values = {k: v for k, v in values.items() if k in EVAL_SETTINGS}
    values.update({k: v for k, v in vars(args).items() if k in settings_types() and v is not None})
    split = args.split or ("test" if values.get("test_file") else "validation")
    if not values.get(f"{split}_file") and not values.get("dataset"):
        raise ConfigError(f"nothing to evaluate: pass --{split}-file FILE.")
    # Only the evaluated split is read; the train file is not needed.
    settings = TrainSettings(
        **{**values, "train_file": None, "validation_file": values.get(f"{split}_file"), "test_file": None}
    )
    metrics = evaluate_model(args.model, settings, split="validation")
    metrics = {k.replace("validation_", f"{split}_", 1): v for k, v in metrics.items()}
    text = json.dumps(metrics, indent=1)
    print(text)
    if args.output:
        write_json(args.output, metrics)
    return 0
