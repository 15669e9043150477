"""all-MiniLM-L6-v2 on GLUE RTE and MRPC (the copies in ../shared/data), dense fine-tuning versus
NeuroPrune, through the same `neuroprune train` pipeline users run (`neuroprune.training.train.train_run`).

Each (task, method) is one run directory under --runs; finished runs are recorded in
benchmarks/results/glue_minilm.json as they complete and skipped when the script is run again,
so it can be run in slices. Test sets are the labelled test files (RTE 1,384 rows; MRPC 1,725),
or their first --max-eval-samples rows.

Usage::

    .venv/bin/python benchmarks/glue_minilm.py --tasks rte mrpc --epochs 3 --max-length 128
"""

from __future__ import annotations

import argparse
import os
import platform
from pathlib import Path
from typing import Any

from neuroprune.files import write_json, write_text
from neuroprune.run_folder import versions
from neuroprune.training.settings import TrainSettings
from neuroprune.training.train import train_run

RESULTS = Path(__file__).resolve().parent / "results"
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
METHODS = ("dense", "neuroprune")


def machine() -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo")
    names = (
        [
            line.split(":", 1)[1].strip()
            for line in cpuinfo.read_text().splitlines()
            if line.startswith("model name")
        ]
        if cpuinfo.exists()
        else []
    )
    return {
        "cpu": names[0] if names else platform.processor(),
        "cores": os.cpu_count(),
        "load_average_at_start": os.getloadavg(),
    }


def settings(args: argparse.Namespace, task: str, method: str) -> TrainSettings:
    folder = Path(args.data) / task
    return TrainSettings(
        model="minilm",
        method=method,  # "dense": no penalties, no head removal, nothing finalised
        output_dir=str(Path(args.runs) / f"{task}-{method}"),
        train_file=str(folder / "train.jsonl"),
        validation_file=str(folder / "validation.jsonl"),
        test_file=str(folder / "test.jsonl"),
        max_length=args.max_length,
        max_train_samples=args.max_train_samples,
        max_eval_samples=args.max_eval_samples,
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        seed=args.seed,
        alpha=args.alpha,
        beta=args.beta,
        theta=args.theta,
        prune_every_steps=args.prune_every_steps,
        overwrite=True,
        report_to="none",
    )


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| task | method | train rows | epochs | val acc | val F1 | test acc | test F1 | sparsity (blocks) "
        "| heads kept | train time (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        m = r["metrics"]
        lines.append(
            f"| {r['task']} | {r['method']} | {r['train_rows']} | {r['epochs']} "
            f"| {m.get('eval_accuracy', float('nan')):.4f} | {m.get('eval_f1', float('nan')):.4f} "
            f"| {m.get('test_accuracy', float('nan')):.4f} | {m.get('test_f1', float('nan')):.4f} "
            f"| {r['sparsity']:.2%} | {r['heads_kept']}/{r['heads_total']} | {r['train_seconds']:.0f} |"
        )
    return "\n".join(lines)


def write(out: dict[str, Any]) -> None:
    write_json(RESULTS / "glue_minilm.json", out)
    md = [
        "# all-MiniLM-L6-v2 on GLUE RTE / MRPC: dense vs NeuroPrune",
        "",
        f"Machine: {out['machine']['cpu']}, {out['machine']['cores']} cores (shared with other jobs: "
        f"load average at start {[round(x, 1) for x in out['machine']['load_average_at_start']]}, so "
        "times are inflated and only comparable within one row pair). "
        f"torch {out['versions']['torch']}, transformers {out['versions']['transformers']}, "
        f"neuroprune {out['versions']['neuroprune']}.",
        "",
        "Settings per row are in glue_minilm.json; all rows: MiniLM (packaged), AdamW with linear decay, "
        "batch 32, max length 128 unless the JSON says otherwise; dense = alpha 0, beta 0, no head pruning.",
        "",
        "Settings of the rows: "
        + "; ".join(
            sorted(
                {
                    f"{r['task']}: " + ", ".join(f"{k}={v}" for k, v in r["settings"].items())
                    for r in out["results"]
                }
            )
        )
        + ". max_eval_samples limits validation and test to their first N rows (RTE validation has 139, "
        "MRPC 408).",
        "",
        "F1 is of the positive class (GLUE convention for MRPC; shown for RTE as well). Sparsity: exact "
        "zeros of Q, K, V, O and MLP matrices against the dense shapes (removed heads count as zeros).",
        "",
        table(out["results"]),
        "",
    ]
    write_text(RESULTS / "glue_minilm.md", "\n".join(md))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=["rte", "mrpc"])
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--runs", default="runs/glue_minilm")
    parser.add_argument("--epochs", type=float, default=3)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--max-train-samples", type=int, default=None)
    parser.add_argument("--max-eval-samples", type=int, default=None, help="first N validation / test rows")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--alpha", type=float, default=1e-3)
    parser.add_argument("--beta", type=float, default=1e-3)
    parser.add_argument("--theta", type=float, default=0.43)
    parser.add_argument("--prune-every-steps", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    keys = (
        "epochs",
        "max_length",
        "max_train_samples",
        "max_eval_samples",
        "batch_size",
        "learning_rate",
        "alpha",
        "beta",
        "theta",
        "prune_every_steps",
        "seed",
    )
    chosen = {k: getattr(args, k) for k in keys}
    previous = {}
    path = RESULTS / "glue_minilm.json"
    if path.exists():
        import json

        previous = json.loads(path.read_text())
    done = previous.get("results", [])
    out = {"machine": previous.get("machine") or machine(), "versions": versions(args.seed), "results": done}
    for task in args.tasks:
        for method in METHODS:
            if any(r["task"] == task and r["method"] == method and r["settings"] == chosen for r in done):
                continue
            s = settings(args, task, method)
            print(f"=== {task} / {method} ===", flush=True)
            res = train_run(s, quiet=True)
            train_rows = len(Path(s.train_file).read_text().splitlines())
            out["results"].append(
                {
                    "task": task,
                    "method": method,
                    "epochs": args.epochs,
                    "settings": chosen,
                    "train_rows": min(train_rows, args.max_train_samples or train_rows),
                    "metrics": {
                        k: v
                        for k, v in {**res.metrics, **(res.test_metrics or {})}.items()
                        if k.startswith(("eval_", "test_")) and "/" not in k
                    },
                    "sparsity": res.sparsity["sparsity"],
                    "model_sparsity": res.sparsity["model_sparsity"],
                    "heads_kept": res.sparsity["heads_kept"],
                    "heads_total": res.sparsity["heads_total"],
                    "train_seconds": res.train_seconds,
                    "load_average_after": os.getloadavg(),
                }
            )
            write(out)
    print(table(out["results"]))


if __name__ == "__main__":
    main()
