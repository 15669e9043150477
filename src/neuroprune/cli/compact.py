"""`neuroprune compact RUN_DIR`: physically remove the learned structure of a trained run's model
and save the smaller model (it reloads with `neuroprune.load`)."""

from __future__ import annotations

import argparse
import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any


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
    import transformers

    from neuroprune.compaction import CompactionRule, compact, compact_uniform
    from neuroprune.errors import ConfigError, NeuroPruneError
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
    if args.uniform and (args.min_input_fraction is not None or args.min_row_fraction is not None):
        raise ConfigError("--uniform keeps no gathered inputs and no dropped rows (the stock class has "
                          "no place for them): leave out --min-input-fraction / --min-row-fraction.")
    transformers.utils.logging.disable_progress_bar()  # the shard-writing bar of the save
    meta = read_meta(source)
    index = ModelIndex.from_pretrained(source)
    if args.finalize:
        index.finalize(saved_config(meta).eps)
    model = index.model
    dense = None if args.no_verify else copy.deepcopy(model)
    before = sum(p.numel() for p in model.parameters())
    found = explain(index, rule)  # before compacting: what is dead, what the rule keeps, and why
    uniform = None
    if args.uniform:
        uniform = compact_uniform(index, rule=rule)
        index = uniform.index  # the config now describes the model: nothing left to restore
    else:
        compact(index, rule=rule)
    after = sum(p.numel() for p in model.parameters())
    summary = {"parameters_before": before, "parameters_after": after, "parameter_ratio": after / before,
               **found.figures}
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
    checked = f" (outputs within {summary['max_abs_diff']:.1e} of the model before)" if dense else ""
    print(f"compacted model saved to {target}{checked}")
    if uniform is not None:
        print(f"  uniform: {uniform.groups} key/value groups and {uniform.neurons} neurons in every layer "
              f"(layers need {min(uniform.min_groups_needed, default=0)}-{uniform.groups} groups, "
              f"{min(uniform.min_neurons_needed, default=0)}-{uniform.neurons} neurons); the folder loads "
              "with the stock transformers class")
    print("\n".join(found.lines(after)))
    return 0


@dataclass
class Explanation:
    """What `compact` found in a model, against the original dense model: the figures (saved in
    the compacted folder's neuroprune.json) and the sentences `lines` prints."""

    figures: dict[str, Any]
    removed: list[str]  # what compaction removes now
    kept: list[str]  # dead structure the rule keeps, and how to remove it
    scattered: float  # fraction of the remaining block weights that are exact zeros

    def lines(self, params_after: int) -> list[str]:
        f = self.figures
        heads = (f"; {f['heads_removed_in_training']} of {f['heads_total']} heads were removed in training"
                 if f["heads_removed_in_training"] else "")
        out = [
            f"  parameters: {f['parameters_dense']:,} dense -> {params_after:,} compacted "
            f"({params_after / f['parameters_dense']:.1%} of the dense model{heads})",
            f"  block FLOPs (attention + MLP, {f['flops_seq_len']} tokens): {f['flops_fraction']:.1%} of "
            f"the dense model's",
            "  removed: " + ("; ".join(self.removed) if self.removed else "nothing"),
        ]
        out += [f"  kept: {k}" for k in self.kept]
        if not self.removed and not self.kept and not f["heads_removed_in_training"]:
            out.append("  why: " + self.nothing_removable())
        return out

    def nothing_removable(self) -> str:
        if self.scattered == 0:
            return "the model has no zero weights: train it with a sparse method first."
        return (
            f"{self.scattered:.2%} of the block weights are zero, but the zeros are scattered: no whole "
            "MLP neuron, head or attention input dimension is dead, so no matrix can shrink. "
            + _structured_hint()
        )


def _structured_hint() -> str:
    """How to train for structure compaction can remove (the flag, if this version has it)."""
    import dataclasses

    from neuroprune.training.settings import TrainSettings

    if "target_flops" in {f.name for f in dataclasses.fields(TrainSettings)}:
        return ("Train with --target-flops F (e.g. 0.5): it steers to removable structure, which "
                "--target-sparsity (element zeros) does not.")
    return ("Element sparsity (--target-sparsity) counts scattered zeros; train longer or with larger "
            "penalties so that whole neurons and input dimensions die.")


def explain(index: Any, rule: Any) -> Explanation:
    """Compare the plan of `rule` with the exact plan (no thresholds, no rounding): what goes, what
    dead structure stays and which option would remove it."""
    import torch

    from neuroprune.compaction import CompactionRule, plan
    from neuroprune.model import flops

    actual = plan(index, rule)
    exact = plan(index, CompactionRule(min_input_fraction=0.0, min_row_fraction=0.0, multiple_of=1))
    count = flops.count(index, actual)

    def groups_removed(p: Any) -> int:
        return 0 if p.keep_groups is None else (p.unit.num_kv_heads - len(p.keep_groups)) * p.unit.group_size

    def inputs_of(p: Any) -> int:
        return 0 if p.keep_inputs is None else flops.current_attention(p.unit).d_in - len(p.keep_inputs)

    def rows_of(p: Any) -> int:
        return 0 if p.keep_rows is None else flops.current_mlp(p.unit).rows - len(p.keep_rows)

    heads_total = sum(u.original_heads for u in index.attention)
    heads_now = sum(u.num_heads for u in index.attention)
    heads_dead = sum(groups_removed(p) for p in actual.attention)
    neurons_now = sum(int(p.removable.numel()) for p in actual.mlps)
    neurons_gone = sum(int(p.removable.sum()) for p in actual.mlps)
    neurons_dead = sum(int(p.removable.sum()) for p in exact.mlps)
    inputs = [(inputs_of(a), inputs_of(e)) for a, e in zip(actual.attention, exact.attention)]
    rows = [(rows_of(a), rows_of(e)) for a, e in zip(actual.mlps, exact.mlps)]
    removed, kept = [], []
    if heads_dead:
        removed.append(f"{heads_dead} dead heads (their output-projection columns are zero)")
    if neurons_gone:
        removed.append(f"{neurons_gone:,} of {neurons_now:,} MLP neurons")
    if neurons_dead > neurons_gone:
        kept.append(f"{neurons_dead - neurons_gone} dead MLP neurons, to keep widths at multiples of "
                    f"{rule.multiple_of} (faster matmuls; --multiple-of 1 removes them)")
    gathered = _thresholded(inputs, "attention input dimensions (q/k/v read a gathered input)",
                            "dead attention input dimensions",
                            f"--min-input-fraction {rule.min_input_fraction:g}",
                            "inputs, not worth the gather", removed, kept)
    dropped = _thresholded(rows, "zero MLP output rows", "zero MLP output rows",
                           f"--min-row-fraction {rule.min_row_fraction:g}", "rows", removed, kept)
    with torch.no_grad():
        weights = index.counted_weights()
        total = sum(w.numel() for w in weights)
        zeros = sum(int((w == 0).sum()) for w in weights)
    figures = {
        **count.to_dict(),
        "heads_total": heads_total,
        "heads_removed_in_training": heads_total - heads_now,
        "heads_removed": heads_dead,
        "mlp_neurons_removed": neurons_gone,
        "mlp_neurons_dead_kept": neurons_dead - neurons_gone,
        "attention_inputs_removed": gathered,
        "mlp_rows_removed": dropped,
    }
    figures["parameters_dense"] = figures.pop("params_dense")
    figures["parameters_compacted"] = figures.pop("params_compacted")
    return Explanation(figures, removed, kept, zeros / total if total else 0.0)


def _thresholded(per_block: list[tuple[int, int]], gone: str, dead: str, option: str, share_of: str,
                 removed: list[str], kept: list[str]) -> int:
    """One kind that compact removes only above a per-block threshold (attention inputs, MLP
    rows): `per_block` holds (removed under the rule, dead at all) per block. Adds the line of what
    goes to `removed` and of the dead ones left below the threshold to `kept`; returns how many go."""
    total = sum(a for a, _ in per_block)
    if total:
        removed.append(f"{total:,} {gone}")
    skipped = [e for a, e in per_block if not a and e]
    if skipped:
        kept.append(f"{sum(skipped):,} {dead} in {len(skipped)} blocks: fewer than {option} of a block's "
                    f"{share_of}")
    return total


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
        from neuroprune.model.checkpoint import load_tokenizer

        return load_tokenizer(path)
    except (OSError, ValueError, TypeError):
        return None
