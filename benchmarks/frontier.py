"""The accuracy / speed frontier of structured pruning on MiniLM-L6 and SST-2 (issue 14): dense
fine-tuning and every structured method at 50% and 25% of the dense blocks' FLOPs (NeuroPrune with
`--target-flops`, structured magnitude pruning, NeuroPrune with distillation from the dense run,
reported separately), plus the paper's 90% element-sparsity NeuroPrune cell.

Every cell is one `neuroprune train` run (`training.train.train_run`, the Trainer path a user
takes); then the saved model is loaded, compacted (`neuroprune.compact`), its block FLOPs and
parameters counted (`neuroprune.model.flops`), and its CPU latency measured *interleaved with the
dense model in the same process* (2 threads, batch 32 x 128 tokens: dense, compacted, dense, ...,
order alternating), so the speed-up is a ratio measured side by side under the same load.

Protocols:
- CPU (default): the packaged all-MiniLM-L6-v2 (`--model minilm`), a seeded 4,000-example subset
  of SST-2's training split (the sweep's subset, `sweep.task_data`), 1 epoch, batch 16, lr 1e-4,
  max length 48 (benchmarks/sweep.py's protocol, dense 82.9 there); test = GLUE dev (872).
  Cells run one after another in this process.
- `--device-protocol`: the paper's (../shared/device/README.md): the whole training split, 1
  epoch, batch 32, lr 1e-4, max length 64; every cell in its own process, all in parallel (the
  distilled cells start when the dense teacher is done); latency afterwards, in this process.
  `--limit N` caps every split (a smoke test on CPU).

Validation: every cell evaluates on the first 872 rows of ../shared/data/sst2/validation.jsonl,
which is carved from GLUE's *training* split; any choice is made on it. The test split (GLUE dev)
is evaluated once per cell, after training, and never used to choose anything. No setting here
was tuned: the methods run at their defaults except where a flag says otherwise.

Outputs (OUT = benchmarks/results by default): OUT/frontier.json, OUT/frontier.md,
OUT/frontier.png (accuracy vs measured speed-up); per-cell JSON under OUT/frontier_cells/ (finished
cells are skipped on a re-run); run folders under --work (not committed).

    .venv/bin/python benchmarks/frontier.py                       # every cell, CPU protocol
    .venv/bin/python benchmarks/frontier.py --cells dense structured_f50
    .venv/bin/python benchmarks/frontier.py --device-protocol --limit 64 --out /tmp/fr --work /tmp/frw
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from common import load, machine, write_atomic

RESULTS = Path(__file__).resolve().parent / "results"
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
DENSE_REFERENCE = 82.9  # benchmarks/results/sweep: dense MiniLM, same subset, plain loop
VALIDATION_ROWS = 872

# name: (label shown, `neuroprune train` settings of the cell)
CELLS: dict[str, tuple[str, dict[str, Any]]] = {
    "dense": ("dense", {"method": "dense"}),
    "neuroprune_f50": ("NeuroPrune", {"method": "neuroprune", "target_flops": 0.5}),
    "neuroprune_f25": ("NeuroPrune", {"method": "neuroprune", "target_flops": 0.25}),
    "structured_f50": ("structured magnitude", {"method": "structured", "target_flops": 0.5}),
    "structured_f25": ("structured magnitude", {"method": "structured", "target_flops": 0.25}),
    "neuroprune_distill_f50": (
        "NeuroPrune + distillation",
        {"method": "neuroprune", "target_flops": 0.5, "distill": True},
    ),
    "neuroprune_distill_f25": (
        "NeuroPrune + distillation",
        {"method": "neuroprune", "target_flops": 0.25, "distill": True},
    ),
    # the paper's axis: element sparsity, with the sweep's settings for its 90% cell
    "neuroprune_s90": (
        "NeuroPrune (90% element sparsity)",
        {
            "method": "neuroprune",
            "target_sparsity": 0.9,
            "alpha": 1.0,
            "beta": 10.0,
            "output_penalty": True,
            "prune_every_steps": 20,
        },
    ),
}
TEACHER = "dense"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cells", nargs="*", choices=list(CELLS), help="default: all cells")
    p.add_argument(
        "--device-protocol",
        action="store_true",
        help="full SST-2, batch 32, max length 64, all cells in parallel processes",
    )
    p.add_argument("--limit", type=int, help="cap every split at N rows (smoke test)")
    p.add_argument("--model", default="minilm", help="model folder or 'minilm' (packaged)")
    p.add_argument(
        "--data", type=Path, default=DATA, help="folder holding sst2/{train,validation,test}.jsonl"
    )
    p.add_argument("--train-samples", type=int, default=4000, help="CPU protocol's training subset")
    p.add_argument("--latency-repeats", type=int, default=8, help="dense/compacted timing pairs per cell")
    p.add_argument("--threads", type=int, default=2, help="torch threads of the latency timing")
    p.add_argument("--train-threads", type=int,
                   help="torch threads while training (default: --threads; 1 trains faster than 2 on "
                        "an oversubscribed machine, where threads wait on each other)")
    p.add_argument("--validation-rows", type=int, default=VALIDATION_ROWS,
                   help="validation rows (from GLUE's training split) evaluated per cell")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument(
        "--work",
        type=Path,
        default=Path("/tmp/neuroprune_frontier"),
        help="run folders and data subsets (not committed)",
    )
    p.add_argument("--aggregate-only", action="store_true")
    p.add_argument("--retime", type=int, metavar="ROUNDS",
                   help="no training: time dense and every recorded cell's compacted model together, "
                        "round-robin in one process, ROUNDS rounds (writes frontier_retime.{json,md})")
    p.add_argument("--one-cell", help=argparse.SUPPRESS)  # a child process of --device-protocol
    return p.parse_args(argv)


# --- protocol --------------------------------------------------------------------------------------
def protocol(args: argparse.Namespace) -> dict[str, Any]:
    common = {"epochs": 1, "learning_rate": 1e-4, "validation_rows": args.validation_rows,
              "train_threads": args.train_threads or args.threads, "latency_threads": args.threads}
    if args.device_protocol:
        return {"name": "device", "train": None, "batch_size": 32, "max_length": 64, **common}
    return {"name": "cpu", "train": args.train_samples, "batch_size": 16, "max_length": 48, **common}


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open() as f:
        return [json.loads(line) for line in f if line.strip()]


def write_data(args: argparse.Namespace) -> dict[str, Path]:
    """The splits every cell trains and is measured on: the seeded training subset (the sweep's:
    shuffled with the seed, first N), validation (from GLUE's training split), test (GLUE dev)."""
    proto = protocol(args)
    train = read_jsonl(args.data / "sst2" / "train.jsonl")
    if proto["train"] is not None:
        random.Random(args.seed).shuffle(train)
        train = train[: proto["train"]]
    validation = read_jsonl(args.data / "sst2" / "validation.jsonl")[: args.validation_rows]
    test = read_jsonl(args.data / "sst2" / "test.jsonl")
    if args.limit:
        train, validation, test = train[: args.limit], validation[: args.limit], test[: args.limit]
    folder = args.work / "data" / "sst2"
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, rows in (("train", train), ("validation", validation), ("test", test)):
        files[name] = folder / f"{name}.jsonl"
        write_atomic(files[name], "".join(json.dumps(r) + "\n" for r in rows))
    return files


def cell_settings(name: str, args: argparse.Namespace, files: dict[str, Path]) -> dict[str, Any]:
    proto = protocol(args)
    own = dict(CELLS[name][1])
    if own.pop("distill", False):
        own["distill_from"] = str(args.work / "runs" / TEACHER)
    return {
        "model": args.model,
        "output_dir": str(args.work / "runs" / name),
        "overwrite": True,
        "train_file": str(files["train"]),
        "validation_file": str(files["validation"]),
        "test_file": str(files["test"]),
        "task_name": "sst2",
        "epochs": proto["epochs"],
        "batch_size": proto["batch_size"],
        "learning_rate": proto["learning_rate"],
        "max_length": proto["max_length"],
        "weight_decay": 0.01,
        "eval_batch_size": 64,
        "seed": args.seed,
        "logging_steps": 50,
        "report_to": "none",
        **own,
    }


# --- one cell: train ---------------------------------------------------------------------------------
def train_cell(name: str, args: argparse.Namespace, files: dict[str, Path]) -> dict[str, Any]:
    """Train one cell with `neuroprune train`'s code path; its numbers, without latency."""
    from neuroprune.training.settings import TrainSettings
    from neuroprune.training.train import train_run

    settings = cell_settings(name, args, files)
    threads = torch.get_num_threads()
    if args.train_threads:
        torch.set_num_threads(args.train_threads)
    try:
        result = train_run(TrainSettings(**settings), quiet=True)
    finally:
        torch.set_num_threads(threads)
    test = result.test_metrics or {}
    return {
        "cell": name,
        "label": CELLS[name][0],
        "settings": settings,
        "test_accuracy": 100 * test.get("test_accuracy", float("nan")),
        "validation_accuracy": 100 * result.metrics.get("eval_accuracy", float("nan")),
        "train_seconds": round(result.train_seconds, 1),
        "steps": result.records[-1]["step"] if result.records else None,
        "sparsity": {k: result.sparsity.get(k) for k in ("sparsity", "heads_kept", "heads_total")},
        "run_dir": str(result.run_dir),
        "load_after_training": load(),
    }


# --- one cell: compact, count, time ------------------------------------------------------------------
def latency_batch(args: argparse.Namespace, files: dict[str, Path]) -> dict[str, torch.Tensor]:
    """32 test sentences padded to 128 tokens (the issue's batch 32 x 128)."""
    from transformers import AutoTokenizer

    from neuroprune.model.packaged import resolve_model_path

    rows = read_jsonl(files["test"])[:32]
    rows = (rows * (32 // max(len(rows), 1) + 1))[:32]
    tok = AutoTokenizer.from_pretrained(resolve_model_path(args.model))
    return dict(
        tok(
            [r["sentence"] for r in rows],
            truncation=True,
            max_length=128,
            padding="max_length",
            return_tensors="pt",
        )
    )


def interleaved_latency(
    dense: Any, compacted: Any, batch: dict[str, torch.Tensor], repeats: int
) -> dict[str, Any]:
    """Seconds per forward of the two models, timed alternately in this process after one warm-up
    each (`neuroprune.training.latency`), so both see the same machine load."""
    from neuroprune.training import latency

    timing = latency.interleaved({"dense": dense, "compacted": compacted}, batch, repeats)
    return {
        "dense_s": timing["median_s"]["dense"],
        "compacted_s": timing["median_s"]["compacted"],
        "speedup": latency.speedup(timing, "dense", "compacted"),
        "speedup_pairs_median": latency.round_speedup(timing, "dense", "compacted"),
        "times": timing["times_s"],
        "threads": timing["threads"],
        "repeats": repeats,
    }


def measure_cell(
    cell: dict[str, Any], dense: Any, batch: dict[str, torch.Tensor], args: argparse.Namespace
) -> dict[str, Any]:
    """Compact the cell's saved model, count its FLOPs and parameters, time it against dense."""
    from neuroprune.compaction import compact, flop_count
    from neuroprune.model import flops
    from neuroprune.model.index import ModelIndex

    # the saved structure on the dense config: the index knows the original shapes
    index = ModelIndex.from_pretrained(Path(cell["run_dir"]) / "model")
    planned = flop_count(index)
    index = compact(index)
    seq = planned.seq_len
    compacted = flops.current_flops(index, seq)
    dense_flops = flops.dense_flops(index, seq)
    cell = {
        **cell,
        "flops_fraction": compacted / dense_flops,
        "flops_fraction_planned": planned.fraction,
        "params_dense": index.original_parameters,
        "params_compacted": sum(p.numel() for p in index.model.parameters()),
        "heads_compacted": sum(u.num_heads for u in index.attention),
        "neurons_compacted": sum(len(u.kept_neurons) for u in index.mlps),
        "latency": interleaved_latency(dense, index.model, batch, args.latency_repeats),
        "load_at_timing": load(),
    }
    return cell


def dense_reference(args: argparse.Namespace) -> Any:
    """A dense MiniLM classifier (its weights do not matter for timing, only its shapes)."""
    import transformers
    from transformers import AutoModelForSequenceClassification

    from neuroprune.model.packaged import resolve_model_path

    transformers.logging.set_verbosity_error()  # the new classifier head is expected
    return AutoModelForSequenceClassification.from_pretrained(
        resolve_model_path(args.model), num_labels=2
    ).eval()


# --- the runs ----------------------------------------------------------------------------------------
def cell_path(args: argparse.Namespace, name: str) -> Path:
    return args.out / "frontier_cells" / f"{protocol(args)['name']}_{name}.json"


def planned(args: argparse.Namespace) -> list[str]:
    names = args.cells or list(CELLS)
    needs_teacher = any(CELLS[n][1].get("distill") for n in names)
    if needs_teacher and TEACHER not in names and not (args.work / "runs" / TEACHER / "model").is_dir():
        names = [TEACHER, *names]  # the distilled cells learn from the dense run
    return names


def run_sequential(names: list[str], args: argparse.Namespace, files: dict[str, Path]) -> None:
    dense, batch = dense_reference(args), latency_batch(args, files)
    for name in names:
        path = cell_path(args, name)
        if path.exists():
            print(f"skip {name} (done: {path})", flush=True)
            continue
        print(f"run {name} ({time.strftime('%H:%M:%S')}, load {os.getloadavg()[0]:.2f})", flush=True)
        cell = measure_cell(train_cell(name, args, files), dense, batch, args)
        write_atomic(path, json.dumps(cell, indent=1))
        print(
            f"  {name}: test {cell['test_accuracy']:.2f}, FLOPs {cell['flops_fraction']:.3f}, "
            f"speed-up {cell['latency']['speedup']:.2f}x, train {cell['train_seconds']:.0f} s",
            flush=True,
        )
        aggregate(args)


def run_parallel(names: list[str], args: argparse.Namespace, files: dict[str, Path]) -> None:
    """Each cell trains in its own process (`--one-cell`), all at once; the distilled cells once
    their teacher exists. Then compaction and latency here, one cell after another."""
    todo = [n for n in names if not cell_path(args, n).exists()]
    first = [n for n in todo if not CELLS[n][1].get("distill")]
    second = [n for n in todo if CELLS[n][1].get("distill")]
    for wave in (first, second):
        procs = []
        for name in wave:
            log = args.work / "logs" / f"{name}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            cmd = [
                sys.executable,
                __file__,
                "--one-cell",
                name,
                "--device-protocol",
                "--model",
                args.model,
                "--data",
                str(args.data),
                "--work",
                str(args.work),
                "--out",
                str(args.out),
                "--seed",
                str(args.seed),
            ]
            cmd += ["--limit", str(args.limit)] if args.limit else []
            with log.open("w") as handle:
                procs.append((name, subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT)))
        for name, proc in procs:
            if proc.wait() != 0:
                print(
                    f"cell {name} failed (exit {proc.returncode}); see {log.parent / (name + '.log')}",
                    flush=True,
                )
    torch.set_num_threads(args.threads)
    dense, batch = dense_reference(args), latency_batch(args, files)
    for name in todo:
        trained = args.work / "trained" / f"{name}.json"
        if not trained.exists():
            continue
        cell = measure_cell(json.loads(trained.read_text()), dense, batch, args)
        write_atomic(cell_path(args, name), json.dumps(cell, indent=1))
    aggregate(args)


# --- aggregate -----------------------------------------------------------------------------------------
def aggregate(args: argparse.Namespace) -> dict[str, Any]:
    name = protocol(args)["name"]
    cells = [json.loads(p.read_text()) for p in sorted((args.out / "frontier_cells").glob(f"{name}_*.json"))]
    order = {n: i for i, n in enumerate(CELLS)}
    cells.sort(key=lambda c: order.get(c["cell"], 99))
    result = {
        "machine": machine(),
        "load_now": load(),
        "protocol": protocol(args),
        "description": __doc__.split("\n\n")[2],
        "limit": args.limit,
        "cells": cells,
        "chance_level": chance_level(args),
        "targets": targets(cells, chance_level(args)),
    }
    suffix = "" if name == "cpu" else f"_{name}"
    write_atomic(args.out / f"frontier{suffix}.json", json.dumps(result, indent=1))
    write_atomic(args.out / f"frontier{suffix}.md", markdown(result))
    plot(cells, args.out / f"frontier{suffix}.png")
    return result


def retime(args: argparse.Namespace) -> dict[str, Any]:
    """Latency of every recorded cell's compacted model and dense, all in one round-robin (the
    order rotates every round): one load for all, so the cells' speed-ups compare with each other,
    which per-cell pairs timed hours apart under another load do not."""
    from neuroprune.compaction import compact
    from neuroprune.model.index import ModelIndex
    from neuroprune.training import latency

    name = protocol(args)["name"]
    files = {n: args.work / "data" / "sst2" / f"{n}.jsonl" for n in ("test",)}
    if not files["test"].exists():
        files = write_data(args)
    cells = [json.loads(p.read_text()) for p in sorted((args.out / "frontier_cells").glob(f"{name}_*.json"))]
    missing = [c["cell"] for c in cells if not (Path(c["run_dir"]) / "model").exists()]
    if missing:
        raise SystemExit(f"--retime needs the cells' run folders; missing for {missing} (rerun those cells)")
    models = {"dense": dense_reference(args)}
    for c in cells:
        if c["cell"] != "dense":
            models[c["cell"]] = compact(ModelIndex.from_pretrained(Path(c["run_dir"]) / "model")).model
    before = load()
    with torch.no_grad():
        timing = latency.interleaved(models, latency_batch(args, files), args.retime)
    rows = [{"cell": c["cell"], "label": c["label"], "test_accuracy": c["test_accuracy"],
             "flops_fraction": c.get("flops_fraction"), "params_compacted": c.get("params_compacted"),
             "median_ms": 1e3 * timing["median_s"][c["cell"] if c["cell"] in models else "dense"],
             "speedup": latency.speedup(timing, "dense", c["cell"]) if c["cell"] != "dense" else 1.0,
             "speedup_rounds_median": (latency.round_speedup(timing, "dense", c["cell"])
                                       if c["cell"] != "dense" else 1.0)} for c in cells]
    result = {"machine": machine(), "load_before": before, "load_after": load(), "rounds": args.retime,
              "threads": timing["threads"], "batch": "32 x 128", "cells": rows, "times_s": timing["times_s"]}
    write_atomic(args.out / "frontier_retime.json", json.dumps(result, indent=1))
    lines = ["# Frontier: every compacted model timed in one round-robin", "",
             f"`benchmarks/frontier.py --retime {args.retime}`: dense MiniLM and each recorded cell's "
             f"compacted model, batch 32 x 128, {timing['threads']} threads, {args.retime} rounds, order "
             f"rotating every round. Load {before['loadavg']} -> {result['load_after']['loadavg']}. "
             f"Machine: {result['machine']}.", "",
             "| cell | test acc. | block FLOPs | params | median ms | speed-up (ratio of medians) | "
             "speed-up (median of per-round ratios) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        flops_text = "-" if r["flops_fraction"] is None else f"{r['flops_fraction']:.1%}"
        params = "-" if r["params_compacted"] is None else f"{r['params_compacted'] / 1e6:.2f}M"
        lines.append(f"| {r['label']} | {r['test_accuracy']:.2f} | {flops_text} | {params} | "
                     f"{r['median_ms']:.0f} | {r['speedup']:.2f}x | {r['speedup_rounds_median']:.2f}x |")
    write_atomic(args.out / "frontier_retime.md", "\n".join(lines) + "\n")
    return result


def chance_level(args: argparse.Namespace) -> float | None:
    """Test accuracy of always predicting the majority class (a model at this level learned nothing)."""
    path = args.work / "data" / "sst2" / "test.jsonl"
    if not path.exists():
        return None
    labels = [int(r["label"]) for r in read_jsonl(path)]
    return 100 * max(labels.count(v) for v in set(labels)) / len(labels)


def targets(cells: list[dict[str, Any]], chance: float | None = None) -> list[dict[str, Any]]:
    """The issue's targets, each met or NOT met on the cells present (missing: said so). "Better
    than" needs the NeuroPrune cell above chance (the majority class + 2 points): two models that
    both predict one class are not ordered by a 0.2-point difference."""
    by = {c["cell"]: c for c in cells}
    dense = by.get("dense")
    out: list[dict[str, Any]] = []

    def add(text: str, ok: bool | None, detail: str) -> None:
        out.append({"target": text, "met": ok, "detail": detail})

    for level, margin in (("50", 1.5), ("25", 4.0)):
        mine = by.get(f"neuroprune_f{level}")
        text = f"NeuroPrune at {level}% block FLOPs within {margin} points of dense"
        if dense and mine:
            gap = dense["test_accuracy"] - mine["test_accuracy"]
            add(
                text,
                gap <= margin,
                f"{mine['test_accuracy']:.2f} vs dense {dense['test_accuracy']:.2f} "
                f"({gap:+.2f} below), FLOPs {100 * mine['flops_fraction']:.1f}%",
            )
        else:
            add(text, None, "cell missing")
        other = by.get(f"structured_f{level}")
        text = f"NeuroPrune better than structured magnitude at {level}% block FLOPs"
        if mine and other:
            at_chance = chance is not None and mine["test_accuracy"] <= chance + 2
            add(text, mine["test_accuracy"] > other["test_accuracy"] and not at_chance,
                f"{mine['test_accuracy']:.2f} vs {other['test_accuracy']:.2f}"
                + (f"; NeuroPrune is at chance level (majority class {chance:.2f})" if at_chance else ""))
        else:
            add(text, None, "cell missing")
    mine = by.get("neuroprune_f25")
    text = "the 25% model >= 3x faster than dense on CPU (measured, interleaved)"
    if mine:
        add(text, mine["latency"]["speedup"] >= 3.0, f"{mine['latency']['speedup']:.2f}x")
    else:
        add(text, None, "cell missing")
    return out


def markdown(result: dict[str, Any]) -> str:
    m, proto = result["machine"], result["protocol"]
    train = (
        "the whole training split" if proto["train"] is None else f"a seeded {proto['train']}-example subset"
    )
    lines = [
        f"# Accuracy / speed frontier ({proto['name']} protocol)",
        "",
        f"Machine: {m['cpu']}, {m['cpu_count']} cores (shared with other work), torch {m['torch']}, "
        f"transformers {m['transformers']}, neuroprune {m['neuroprune']} @ {m['git_commit']}. "
        f"Load average when aggregated: {result['load_now']['loadavg']}.",
        "",
        f"Protocol: all-MiniLM-L6-v2, SST-2, {train} of the training split"
        + (f" (limited to {result['limit']} rows per split: a smoke test)" if result["limit"] else "")
        + f", {proto['epochs']} epoch, batch {proto['batch_size']}, lr {proto['learning_rate']}, max length "
        f"{proto['max_length']}, weight decay 0.01, seed 0, {proto.get('train_threads')} training thread(s); "
        f"validation = {proto.get('validation_rows')} rows carved from GLUE's "
        "training split; test = GLUE dev (872), evaluated once, never used for a choice. Each cell is one "
        "`neuroprune train` run (Trainer), then `compact`. FLOPs: attention + MLP blocks at sequence 128 "
        "(neuroprune.model.flops), compacted over dense. Latency: the compacted model against a dense MiniLM "
        "in the same process, 2 threads, batch 32 x 128 tokens, timed alternately (median of the pairs); "
        "speed-up = dense median / compacted median. Train s: `Trainer.train` (with its one validation "
        "pass) on a machine shared with other jobs (see the load column).",
        "",
        f"Dense reference of the sweep (plain loop, 4,000-example subset): {DENSE_REFERENCE}"
        + ("." if proto["train"] == 4000 else
           f"; this run trained on {proto['train'] or 'all'} examples, so compare with its own dense row."),
        "",
        "| cell | method | target | test acc | val acc | block FLOPs | params (M) | heads | neurons "
        "| dense ms | compacted ms | speed-up | train s | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in result["cells"]:
        s = c["settings"]
        target = (
            f"{100 * s['target_flops']:.0f}% FLOPs"
            if s.get("target_flops") is not None
            else f"{100 * s['target_sparsity']:.0f}% sparsity"
            if s.get("target_sparsity") is not None
            else "-"
        )
        lat = c["latency"]
        lines.append(
            f"| {c['cell']} | {c['label']} | {target} | {c['test_accuracy']:.2f} "
            f"| {c['validation_accuracy']:.2f} | {100 * c['flops_fraction']:.1f}% "
            f"| {c['params_compacted'] / 1e6:.2f} | {c['heads_compacted']} "
            f"| {c['neurons_compacted']} | {1e3 * lat['dense_s']:.0f} | {1e3 * lat['compacted_s']:.0f} "
            f"| {lat['speedup']:.2f}x | {c['train_seconds']:.0f} | {c['load_after_training']['loadavg'][0]} |"
        )
    lines += ["", "## Targets (issue 14; never tuned on the test split)", ""]
    for t in result["targets"]:
        verdict = "cell missing" if t["met"] is None else ("met" if t["met"] else "NOT met")
        lines.append(f"- {t['target']}: **{verdict}** ({t['detail']})")
    lines += [
        "",
        "NeuroPrune + distillation (teacher: the dense cell's model) is reported separately from "
        "the paper-faithful NeuroPrune cells and is not used for the targets above.",
    ]
    return "\n".join(lines) + "\n"


def plot(cells: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label in dict.fromkeys(c["label"] for c in cells):
        mine = [c for c in cells if c["label"] == label]
        xs = [c["latency"]["speedup"] for c in mine]
        ys = [c["test_accuracy"] for c in mine]
        ax.plot(xs, ys, marker="o", linestyle="-" if len(mine) > 1 else "", label=label)
        for c, x, y in zip(mine, xs, ys):
            ax.annotate(
                f"{100 * c['flops_fraction']:.0f}%",
                (x, y),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=8,
            )
    ax.set_xlabel("measured CPU speed-up over dense (2 threads, batch 32 x 128)")
    ax.set_ylabel("SST-2 test accuracy (%)")
    ax.set_title("Accuracy vs measured speed-up (labels: block FLOPs kept)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.one_cell:  # a training process of --device-protocol: train, record, exit
        files = {n: args.work / "data" / "sst2" / f"{n}.jsonl" for n in ("train", "validation", "test")}
        if not torch.cuda.is_available():
            torch.set_num_threads(1)  # CPU smoke test: the cells share the cores
        cell = train_cell(args.one_cell, args, files)
        write_atomic(args.work / "trained" / f"{args.one_cell}.json", json.dumps(cell, indent=1))
        return 0
    torch.set_num_threads(args.threads)
    (args.out / "frontier_cells").mkdir(parents=True, exist_ok=True)
    if args.retime:
        retime(args)
        return 0
    if not args.aggregate_only:
        files = write_data(args)
        names = planned(args)
        (run_parallel if args.device_protocol else run_sequential)(names, args, files)
    aggregate(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
