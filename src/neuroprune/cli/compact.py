"""`neuroprune compact RUN_DIR`: physically remove the learned structure of a trained run's model
and save the smaller model (it reloads with `neuroprune.load`)."""

from __future__ import annotations

import argparse
import copy
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "compact",
        help="remove dead neurons, heads and input dimensions: a smaller, faster model",
        description=(
            "Load RUN_DIR/model (or a model folder written by NeuroPrune.save_pretrained), remove "
            "the structure its zeros describe (dead MLP neurons, dead heads, dead attention input "
            "dimensions, zero contract rows), check that the outputs did not change and save the "
            "compacted model to RUN_DIR/compact (reload it with neuroprune.load)."
        ),
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="run directory (with model/) or a model folder")
    parser.add_argument("--output-dir", "-o", metavar="DIR", help="where to save (default: RUN_DIR/compact)")
    parser.add_argument(
        "--finalize", action="store_true",
        help="first set every |w| < eps to 0 (for a model saved before NeuroPrune.finalize())",
    )
    parser.add_argument(
        "--min-input-fraction", type=float, default=None, metavar="F",
        help="gather an attention block's input only if at least this fraction of its input dims "
        "is dead (default 0.25; 1 = never)",
    )
    parser.add_argument(
        "--min-row-fraction", type=float, default=None, metavar="F",
        help="drop an MLP's zero contract rows only if at least this fraction is zero (default 0.25; "
        "1 = never)",
    )
    parser.add_argument(
        "--multiple-of", type=int, default=None, metavar="N",
        help="keep neuron / contract-row counts at multiples of N (default 8; 1 = exact minimum)",
    )
    parser.add_argument(
        "--uniform", action="store_true",
        help="keep the same number of heads / key-value groups and MLP neurons in every layer (the "
        "most any layer needs; exact) and write them into the config, so that the family's stock "
        "class loads the folder without remote code (Llama / Qwen2 / Mistral style decoders); no "
        "gathered inputs or dropped rows",
    )
    parser.add_argument("--no-verify", action="store_true", help="skip the before/after output check")
    parser.add_argument("--atol", type=float, default=1e-4, help="output check tolerance (default 1e-4)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from neuroprune.compaction import CompactionRule, compact, compact_uniform
    from neuroprune.errors import NeuroPruneError
    from neuroprune.methods.registry import saved_config
    from neuroprune.model.checkpoint import read_meta
    from neuroprune.model.index import ModelIndex
    from neuroprune.run_folder import RunDir

    run_dir = RunDir(args.run_dir)
    source = run_dir.model_dir()
    target = Path(args.output_dir) if args.output_dir else run_dir.compact
    thresholds = {"min_input_fraction": args.min_input_fraction, "min_row_fraction": args.min_row_fraction,
                  "multiple_of": args.multiple_of}
    rule = CompactionRule(**{k: v for k, v in thresholds.items() if v is not None})
    meta = read_meta(source)
    index = ModelIndex.from_pretrained(source)
    if args.finalize:
        index.finalize(saved_config(meta).eps)
    model = index.model
    dense = None if args.no_verify else copy.deepcopy(model)
    before = sum(p.numel() for p in model.parameters())
    uniform = None
    if args.uniform:
        uniform = compact_uniform(index, rule=rule)
        index = uniform.index  # the config now describes the model: nothing left to restore
    else:
        compact(index, rule=rule)
    after = sum(p.numel() for p in model.parameters())
    summary = {"parameters_before": before, "parameters_after": after, "parameter_ratio": after / before}
    if uniform is not None:
        summary["uniform"] = {"groups": uniform.groups, "neurons": uniform.neurons,
                              "groups_needed": uniform.min_groups_needed,
                              "neurons_needed": uniform.min_neurons_needed, "config": uniform.config_changes}
    if dense is not None:
        inputs = _check_inputs(model)
        with torch.no_grad():
            diff = max(
                float((a - b).abs().max())
                for a, b in zip(_tensors(dense(**inputs)), _tensors(model(**inputs)))
            )
        summary["max_abs_diff"] = diff
        if diff > args.atol:
            raise NeuroPruneError(
                f"compaction changed the outputs by {diff:.2e} (> --atol {args.atol}); nothing was saved. "
                "Please report this with the model folder."
            )
    structure = index.structure()
    for key in ("mlp_neurons", "attention_inputs"):
        summary[f"{key}_kept"] = sum(len(v) for v in structure.get(key, {}).values())
    provenance = {k: meta[k] for k in ("method", "method_config", "neuroprune_config") if k in meta}
    index.save_pretrained(target, _tokenizer(source), extra={**provenance, "compaction": summary})
    print(f"compacted model saved to {target}: {before:,} -> {after:,} parameters ({after / before:.1%})"
          + (f", outputs within {summary['max_abs_diff']:.1e}" if "max_abs_diff" in summary else ""))
    if uniform is not None:
        print(f"  uniform: {uniform.groups} key/value groups and {uniform.neurons} neurons in every layer "
              f"(layers need {min(uniform.min_groups_needed, default=0)}-{uniform.groups} groups, "
              f"{min(uniform.min_neurons_needed, default=0)}-{uniform.neurons} neurons); the folder loads "
              "with the stock transformers class")
    return 0


def _check_inputs(model) -> dict:
    from neuroprune.integrations.export import example_inputs
    from neuroprune.model.architectures import is_encoder_decoder

    inputs = example_inputs(model, 2, 12)
    if is_encoder_decoder(model.config):
        inputs["decoder_input_ids"] = inputs["input_ids"][:, :5]
    return inputs


def _tensors(output) -> list:
    import torch

    if not hasattr(output, "values"):
        return [output]
    return [v for v in output.values() if isinstance(v, torch.Tensor)]


def _tokenizer(path: Path):
    """The tokenizer saved beside the model, if there is one (copied to the compacted folder)."""
    if not any((path / name).exists() for name in ("tokenizer_config.json", "tokenizer.json")):
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError):
        return None
