"""Which units does each scorer pick? One-shot structural removal on a fine-tuned classifier, no
training afterwards: validation accuracy right after the units go (issue 16's open question: why
pruned SmolLM2 runs end at chance where MiniLM's do not).

For each (method, kinds) cell the method's own selection removes units down to `--flops` of the
dense block FLOPs in one step (the `StructuralPruner` the training runs use, ramp ending at step
1), held at zero by its masks; a `random` cell removes the same number of MLP neurons per layer
at random, as a floor any score should beat. Accuracy on the first `--rows` rows of a validation
file (never a test split).

    .venv/bin/python benchmarks/oneshot_scores.py --model /tmp/uniform_training/runs/dense/model \\
        --validation /tmp/uniform_training/data/sst2/validation.jsonl --rows 256 --flops 0.9

The `activations` cells score units by activation (`methods/activation_scores.py`) from eval-mode
passes over calibration rows (`--calibration`, e.g. the training jsonl; never the scored rows):

    .venv/bin/python benchmarks/oneshot_scores.py ... --methods activations \
        --calibration /tmp/uniform_training/data/sst2/train.jsonl \
        --out benchmarks/results/oneshot_scores_activations

Writes benchmarks/results/oneshot_scores.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

sys.path.insert(0, str(Path(__file__).parent))
from common import load, machine, write_atomic  # noqa: E402
from neuroprune import NeuroPruneConfig  # noqa: E402
from neuroprune.methods import build_method  # noqa: E402
from neuroprune.methods.activation_scores import activation_scores  # noqa: E402
from neuroprune.methods.steering import SparsityTarget  # noqa: E402
from neuroprune.model.activations import ActivationStats  # noqa: E402
from neuroprune.model.surgery import weight_matrix  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
CELLS = [("activations", ("neurons", "heads", "inputs")), ("activations", ("neurons",)),
         ("activations", ("heads",)), ("activations", ("inputs",)),
         ("neuroprune", ("neurons", "heads", "inputs")), ("structured", ("neurons", "heads", "inputs")),
         ("neuroprune", ("neurons",)), ("structured", ("neurons",)), ("random", ("neurons",)),
         ("neuroprune", ("heads",)), ("neuroprune", ("inputs",))]


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, required=True, help="a fine-tuned classifier folder")
    p.add_argument("--validation", type=Path, required=True, help="jsonl with sentence, label")
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--calibration", type=Path, default=None,
                   help="jsonl (e.g. the training file) whose first --calibration-rows rows feed the "
                        "activation scores; default: the validation file's rows after the scored ones")
    p.add_argument("--calibration-rows", type=int, default=128)
    p.add_argument("--flops", type=float, default=0.9)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", nargs="+", default=None, help="run only these scorers' cells (default: all)")
    p.add_argument("--out", type=Path, default=RESULTS / "oneshot_scores")
    return p.parse_args()


def accuracy(model: Any, tok: Any, rows: list[dict], max_length: int) -> float:
    model.eval()
    right = 0
    with torch.no_grad():
        for i in range(0, len(rows), 64):
            chunk = rows[i:i + 64]
            enc = tok([r["sentence"] for r in chunk], truncation=True, max_length=max_length, padding=True,
                      return_tensors="pt")
            labels = torch.tensor([int(r["label"]) for r in chunk])
            right += int((model(**enc).logits.argmax(-1) == labels).sum())
    return 100 * right / len(rows)


def calibrated_scorer(meth: Any, model: Any, tok: Any, rows: list[dict], max_length: int) -> Any:
    """Activation scores from eval-mode passes over `rows` (never the scored rows)."""
    stats = ActivationStats(meth.index, training_only=False)
    stats.attach()
    accuracy(model, tok, rows, max_length)
    stats.detach()
    means = stats.means()
    return lambda removed: activation_scores(meth.index, means, removed)


def fresh(args: argparse.Namespace, tok: Any) -> Any:
    model = AutoModelForSequenceClassification.from_pretrained(args.model, dtype=torch.float32)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    return model


def run_cell(method: str, kinds: tuple[str, ...], args: argparse.Namespace, tok: Any, rows: list[dict],
             neurons_per_layer: list[int], calibration: list[dict]) -> dict[str, Any]:
    model = fresh(args, tok)
    if method == "random":  # the same number of neurons per layer as neuroprune's neurons-only cell
        meth = build_method("dense", model)
        g = torch.Generator().manual_seed(args.seed)
        with torch.no_grad():
            for unit, n in zip(meth.index.mlps, neurons_per_layer):
                weight_matrix(unit.down)[:, torch.randperm(len(unit.kept_neurons), generator=g)[:n]] = 0
        removed = {"neurons": sum(neurons_per_layer), "groups": 0, "inputs": 0}
        per_layer = neurons_per_layer
    else:
        config = NeuroPruneConfig() if method != "structured" else None
        target = SparsityTarget(flops=args.flops, kinds=kinds, ramp_end=0.01)
        meth = build_method("neuroprune" if method == "activations" else method, model, config, target)
        if method == "activations":
            meth.structural.scorer = calibrated_scorer(meth, model, tok, calibration, args.max_length)
        meth.on_train_begin(100, None)
        meth.on_step_end(1)  # the end of the ramp: one selection down to --flops
        r = meth.structural.removed
        removed = {k: sum(map(len, getattr(r, k).values())) for k in ("neurons", "groups", "inputs")}
        per_layer = [len(r.neurons.get(b, [])) for b in range(len(meth.index.mlps))]
    return {"method": method, "kinds": list(kinds), "removed": removed, "neurons_per_layer": per_layer,
            "accuracy": accuracy(model, tok, rows, args.max_length)}


def main() -> None:
    args = parse()
    torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(args.model)
    tok.pad_token = tok.pad_token or tok.eos_token
    lines = args.validation.read_text().splitlines()
    every = [json.loads(line) for line in lines if line.strip()]
    rows = every[: args.rows]
    if args.calibration is None:
        calibration = every[args.rows: args.rows + args.calibration_rows]
    else:
        calibration = [json.loads(line) for line in args.calibration.read_text().splitlines()
                       if line.strip()][: args.calibration_rows]
    if not calibration:
        raise SystemExit("no calibration rows: pass --calibration FILE (e.g. the training jsonl)")
    before = load()
    cells = [{"method": "dense", "kinds": [], "removed": {}, "neurons_per_layer": [],
              "accuracy": accuracy(fresh(args, tok), tok, rows, args.max_length)}]
    per_layer: list[int] = []
    for method, kinds in CELLS:
        if args.methods and method not in args.methods:
            continue
        cell = run_cell(method, kinds, args, tok, rows, per_layer, calibration)
        if method == "neuroprune" and kinds == ("neurons",):
            per_layer = cell["neurons_per_layer"]
        cells.append(cell)
        print(json.dumps({k: v for k, v in cell.items() if k != "neurons_per_layer"}), flush=True)
    result = {"machine": machine(), "load_before": before, "load_after": load(),
              "settings": {k: str(v) for k, v in vars(args).items()}, "cells": cells}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out.with_suffix(".json"), json.dumps(result, indent=1))
    lines = ["# One-shot structural removal: which units does each scorer pick?", "",
             f"Model `{args.model}`, first {args.rows} rows of `{args.validation}`, removal to "
             f"{args.flops:.0%} of the dense block FLOPs in one step, no training after. "
             f"Machine: {result['machine']}.", "",
             "| scorer | kinds | neurons / groups / inputs removed | val. accuracy |", "|---|---|---|---|"]
    for c in cells:
        r = c["removed"]
        removed = "-" if not r else f"{r['neurons']} / {r['groups']} / {r['inputs']}"
        lines.append(f"| {c['method']} | {', '.join(c['kinds']) or '-'} | {removed} | {c['accuracy']:.2f} |")
    write_atomic(args.out.with_suffix(".md"), "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
