"""`neuroprune train`: fine-tune a model with NeuroPrune and write a run directory.

Every flag is a field of `neuroprune.training.settings.TrainSettings` and can also come from a YAML or JSON
file given with --config (keys with dashes or underscores); flags given on the command line win.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from pathlib import Path
from typing import Any

from neuroprune.errors import ConfigError
from neuroprune.training.settings import TrainSettings

HELP = {
    "model": "model folder, hub id, or 'minilm' for the packaged all-MiniLM-L6-v2",
    "output_dir": "run directory to write (config, versions, metrics, sparsity, model, checkpoints)",
    "dataset": "hub data set, e.g. glue/sst2 (GLUE field names are mapped automatically)",
    "train_file": "local training data (.jsonl, .json, .csv or .tsv)",
    "validation_file": "local validation data, evaluated after every epoch",
    "test_file": "local test data, evaluated once at the end",
    "task": "classification, regression, seq2seq or causal_lm (default: from the labels)",
    "task_name": "metric convention: a GLUE task (cola, mrpc, qqp, stsb, ...; default: from the data "
    "folder name) or, for seq2seq, translation (BLEU) / summarization (ROUGE)",
    "text_fields": "input field(s): one, or two for sentence pairs (default: usual names)",
    "label_field": "label field, or the target text field for seq2seq (default: usual names)",
    "source_lang": "translation: source language key in the 'translation' field",
    "target_lang": "translation: target language key",
    "source_prefix": "text put before every source (e.g. 'translate English to German: ' for T5)",
    "max_length": "truncate inputs to this many tokens",
    "max_train_samples": "use only the first N training rows",
    "max_eval_samples": "use only the first N validation / test rows",
    "epochs": "training epochs (heads are pruned at the end of each)",
    "batch_size": "training batch size",
    "eval_batch_size": "evaluation batch size",
    "learning_rate": "AdamW learning rate (linear decay)",
    "weight_decay": "AdamW weight decay",
    "warmup_ratio": "fraction of steps with linear warm-up",
    "gradient_accumulation_steps": "micro-batches per optimiser step",
    "seed": "random seed (data order, new heads, dropout)",
    "alpha": "weight of the MLP preferential-attachment penalty (>= 0; 0 switches it off)",
    "beta": "weight of the attention l_{1,0.5} group penalty (>= 0; 0 switches it off)",
    "theta": "l_inf distance at or below which two heads are redundant (> 0)",
    "eps": "magnitude below which a weight counts as zero",
    "merge": "how a removed head is folded into its survivor: output, mlp_input or none",
    "prune_heads": "remove redundant heads at the end of every epoch",
    "prune_every_steps": "also prune heads every N optimiser steps (0: only at epoch ends)",
    "output_penalty": "also put the MLP-style row penalty (alpha) on the attention output projection; "
    "not in the paper, needed for targets of ~90%% and above",
    "method": "neuroprune, l1 (plain l1, no head pruning), gmp (gradual magnitude pruning), structured "
    "(structured magnitude pruning of neurons, heads and input dims; needs --target-flops) or dense",
    "target_sparsity": "ask for a sparsity (fraction, e.g. 0.9): alpha and beta are steered to it during "
    "training (neuroprune, l1); the final sparsity for gmp",
    "target_flops": "ask for a compacted model whose attention + MLP blocks cost this fraction of the "
    "dense blocks' FLOPs at 128 tokens (e.g. 0.5): whole neurons, heads and input dims are removed on "
    "a schedule (neuroprune); instead of --target-sparsity",
    "uniform_widths": "with --target-flops: remove the same number of neurons and of key/value heads in "
    "every layer (no attention input dims), so `neuroprune compact --uniform` saves a model the stock "
    "class loads with no padding (Llama / Qwen2 / Mistral style families)",
    "scores": "neuroprune with --target-flops: how units are ranked for removal: weights (the paper's "
    "mechanisms on the weights), activations (the energy each unit adds to its output, from the inputs "
    "seen in training) or auto (activations for decoder-only LLM families such as Llama / Qwen2 / GPT-2, "
    "weights for the others)",
    "target_heads": "neuroprune with --target-sparsity: end with this many attention heads (theta is "
    "steered; head-pruning passes every few steps unless --prune-every-steps is given)",
    "distill_from": "recovery by distillation (opt-in): a fine-tuned dense teacher, the --output-dir of a "
    "dense run or a model folder; its logits join the loss (same vocabulary and labels required)",
    "distill_temperature": "distillation temperature T (the KL term is scaled by T^2)",
    "distill_weight": "share of the loss taken by the teacher's soft targets (0..1; the task loss gets "
    "the rest)",
    "distill_hidden_weight": "weight of the hidden-state MSE to the teacher (needs equal depth and width; "
    "0: off)",
    "attention_layouts": "attention layouts for a model the registry does not know, as JSON, e.g. "
    "'[{\"q\": \"wq\", \"k\": \"wk\", \"v\": \"wv\", \"o\": \"wo\"}]' (docs/architectures.md)",
    "mlp_layouts": "MLP layouts as JSON, e.g. '[{\"up\": \"w1\", \"down\": \"w2\"}]'",
    "attention_modules": "regex: only attention blocks whose name matches are pruned",
    "mlp_modules": "regex: only MLPs whose name matches are pruned",
    "exclude_modules": "regex: blocks whose name matches are left alone",
    "allow_missing_attention": "accept a model whose attention is not found (MLPs only; a warning says so)",
    "save_steps": "checkpoint every N steps (0: at the end of every epoch)",
    "logging_steps": "log loss, penalties and sparsity every N steps",
    "generation_max_length": "seq2seq: longest generated output during evaluation",
    "num_beams": "seq2seq: beams for generation during evaluation",
    "report_to": "auto (TensorBoard when installed), none, tensorboard, wandb, ...",
    "resume": "continue the run in --output-dir from its last checkpoint",
    "overwrite": "replace an existing run in --output-dir",
}


JSON_SETTINGS = ("attention_layouts", "mlp_layouts")  # lists of dicts: JSON on the command line


def _json_list(text: str) -> list[Any]:
    """A JSON list (or one JSON object, as a list of one) from a flag or a config file string."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{text!r} is not valid JSON: {err}.") from None
    return value if isinstance(value, list) else [value]


def _base_type(annotation: Any) -> type:
    """`int | None` -> int, `list[str] | None` -> list."""
    hint = annotation
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if args and typing.get_origin(hint) is not list:
        hint = args[0]
    return list if typing.get_origin(hint) is list else hint


def settings_types() -> dict[str, type]:
    hints = typing.get_type_hints(TrainSettings)
    return {f.name: _base_type(hints[f.name]) for f in dataclasses.fields(TrainSettings)}


def add_settings_arguments(parser: argparse.ArgumentParser, names: list[str] | None = None) -> None:
    """One flag per setting (all default to None, so that we can tell what was given)."""
    defaults = TrainSettings()
    for name, kind in settings_types().items():
        if names is not None and name not in names:
            continue
        flag = "--" + name.replace("_", "-")
        help_text = f"{HELP.get(name, '')} (default: {getattr(defaults, name)!r})"
        if name in JSON_SETTINGS:
            parser.add_argument(flag, type=_json_list, default=None, metavar="JSON", help=help_text)
        elif kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif kind is list:
            parser.add_argument(flag, nargs="+", default=None, metavar="FIELD", help=help_text)
        else:
            parser.add_argument(
                flag, type=kind, default=None, metavar=name.split("_")[-1].upper(), help=help_text
            )


def read_config_file(path: str) -> dict[str, Any]:
    """YAML or JSON mapping of settings; keys may use dashes."""
    import yaml

    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"config file {path} does not exist.")
    try:
        data = (
            yaml.safe_load(file.read_text())
            if file.suffix.lower() != ".json"
            else json.loads(file.read_text())
        )
    except (yaml.YAMLError, json.JSONDecodeError) as err:
        raise ConfigError(f"config file {path} cannot be parsed: {str(err).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {path} must hold a mapping of settings (key: value), not {type(data).__name__}."
        )
    types = settings_types()
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in types:
            raise ConfigError(
                f"config file {path}: unknown setting {key!r}; known settings are {sorted(types)}."
            )
        out[name] = _coerce(name, value, types[name], path)
    return out


def _coerce(name: str, value: Any, kind: type, source: str) -> Any:
    """YAML reads `1e-4` as a string and JSON has no int/float distinction: convert like argparse."""
    if value is None:
        return None
    if name in JSON_SETTINGS:  # layout dicts as they are (checked by the method's config)
        return _json_list(value) if isinstance(value, str) else value
    if kind is list:
        return [str(v) for v in value] if isinstance(value, list) else [str(value)]
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{source}: {name} must be true or false, got {value!r}.")
    try:
        if kind is int and isinstance(value, float) and value.is_integer():
            return int(value)
        return kind(value) if not isinstance(value, kind) else value
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: {name}={value!r} is not a valid {kind.__name__}.") from None


def resolve_settings(args: argparse.Namespace) -> TrainSettings:
    """Defaults <- saved run (when resuming) <- config file <- command line."""
    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        values.update(read_config_file(args.config))
    given = {k: v for k, v in vars(args).items() if k in settings_types() and v is not None}
    values.update(given)
    if values.get("resume"):
        from neuroprune.run_folder import RunDir

        saved = RunDir(values.get("output_dir", TrainSettings.output_dir)).settings()
        if saved:
            values = {**saved, **values}
    return TrainSettings.from_dict(values, source="settings")


def resume_hint(settings: TrainSettings) -> str:
    """How to continue an interrupted run: from its newest intact checkpoint, if it has one."""
    from neuroprune.run_folder import RunDir

    run = RunDir(settings.output_dir)
    command = f"neuroprune train --output-dir {run.path} --resume"
    checkpoint = run.latest_checkpoint() if run.has_run() else None
    if checkpoint is not None:
        return f"Continue from {checkpoint.name} with: {command}"
    every = f"every {settings.save_steps} steps" if settings.save_steps else "at the end of every epoch"
    if run.has_run():
        return (f"No checkpoint was saved yet (one is saved {every}); `{command}` starts it again from "
                "the beginning.")
    return "Nothing was saved; run the same command again to start over."


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="fine-tune a model with NeuroPrune (sparse, heads pruned) and write a run directory",
        description=(
            "Fine-tune with the NeuroPrune penalties in the loss, remove redundant heads after every "
            "epoch, finalise, and write RUN_DIR (run_config.json, versions.json, metrics.json, "
            "sparsity.json, model/, checkpoints/, logs/). Use --alpha 0 --beta 0 --no-prune-heads for "
            "dense fine-tuning."
        ),
    )
    parser.add_argument("--config", metavar="FILE", help="YAML or JSON file of settings (flags win)")
    add_settings_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import transformers

    from neuroprune.integrations.console import TIMINGS
    from neuroprune.training.train import train_run

    settings = resolve_settings(args)
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()  # weight loading / shard writing: one bar per save
    try:
        result = train_run(settings)
    except KeyboardInterrupt:
        # on a line of its own: the progress bar was cut off mid-line
        print(f"\nneuroprune train: interrupted. {resume_hint(settings)}", file=sys.stderr)
        return 130
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()
    flops = result.sparsity.get("flops_fraction")
    shown = {
        k: round(v, 4) if isinstance(v, float) else v
        for k, v in result.metrics.items()
        if k.startswith("eval_") and "/" not in k and not k.endswith(TIMINGS)
    }
    print(
        json.dumps(
            {
                "run_dir": str(result.run_dir),
                **shown,
                "sparsity": round(result.sparsity["sparsity"], 4),
                # .get: a finished run of an older version (--resume prints its saved numbers)
                "flops_fraction": None if flops is None else round(flops, 4),
                "params_compacted": result.sparsity.get("params_compacted"),
                "heads_kept": result.sparsity["heads_kept"],
                "heads_total": result.sparsity["heads_total"],
                "train_seconds": round(result.train_seconds, 1),
            },
            indent=1,
        )
    )
    return 0
