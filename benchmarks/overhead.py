"""Per-step cost of every sparse-training method against dense fine-tuning (issues 2 and 15).

Every method of `neuroprune.methods.REGISTRY` (at run time, so methods added later are measured
too), with and without a target where the method allows both, is driven through its
`SparsityMethod` hooks in a plain loop (README): ``loss = task + method.regularization_loss()``,
backward, AdamW step, ``zero_grad``, ``method.on_step_end(step)``. Each condition has its own copy
of the same model and its own optimiser; all run in ONE process, one step of each condition per
repeat, the order reversed every other repeat, so that drift in machine load hits all alike. What
is recorded per condition:

- wall time of a whole step (median, quartiles) and its ratio to dense (ratio of medians and the
  median of the per-repeat paired ratios);
- operators per step, from one extra step under `torch.profiler`: all ATen calls of the step and
  those inside the method's hooks (`regularization_loss` and `on_step_end`, tagged with
  `record_function`);
- host-device synchronisations per step: the calls whose CUDA kernels make the host wait for the
  device, counted as profiler events of the same step: `aten::_local_scalar_dense` (every
  `.item()`, `float(t)`, `int(t)`, `bool(t)`), `aten::nonzero` (boolean-mask indexing,
  `masked_select`, `nonzero`), plus `Tensor.tolist()` calls counted by wrapping it (on CPU it
  dispatches no operator). On CPU none of these waits for anything; the count says what a GPU
  would have to wait for.

Cases: ``tiny`` (a random 4-layer BERT, hidden 128, 4 heads, FFN 512, batch 8 x 32, 1 thread: the
per-operator-cost regime of a GPU running a small model), ``tiny-llama`` (the same size as a
Llama decoder: its FLOP target ranks units by activations, so the forward hooks are timed too),
``minilm`` (the packaged all-MiniLM-L6-v2, 2 threads, batch 32 x 128) and, on request only,
``smollm2`` (the packaged SmolLM2-135M, 2 threads, batch 8 x 64: the real decoder).

Usage::

    .venv/bin/python benchmarks/overhead.py --label after            # both cases
    .venv/bin/python benchmarks/overhead.py --label before --cases tiny

Results go to ``benchmarks/results/overhead.json`` under ``runs[label][case]`` (other labels
already in the file are kept, so "before" and "after" sit side by side) and ``overhead.md``.
`--heads` also times the head-pruning pass of issue 2 (MPNet-base geometry).
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers
from torch.profiler import ProfilerActivity, profile, record_function
from transformers import AutoModelForSequenceClassification, BertConfig, MPNetConfig

from common import ensure_smollm2, load, machine, summary, write_atomic
from neuroprune import NeuroPrune, NeuroPruneConfig, remap_optimizer
from neuroprune.methods import registry

RESULTS = Path(__file__).resolve().parent / "results"
# per-step time of every NeuroPrune condition / dense
TARGETS = {"tiny": 1.10, "tiny-llama": 1.10, "minilm": 1.05, "smollm2": 1.10}
PRUNE_TARGET_S = 1.0
SYNC_OPS = ("aten::_local_scalar_dense", "aten::nonzero")
HOOKS = ("method.regularization_loss", "method.on_step_end")

CASES: dict[str, dict[str, Any]] = {
    "tiny": {"threads": 1, "batch": 8, "length": 32, "warmup": 8, "repeats": 64, "total_steps": 400,
             "model": "random BertForSequenceClassification: 4 layers, hidden 128, 4 heads, FFN 512, "
                      "vocab 1000, num_labels 2"},
    # a decoder: under a FLOP target its units are ranked by activations (`--scores auto`), so
    # this case also times the activation statistics' forward hooks (live for the whole ramp)
    "tiny-llama": {"threads": 1, "batch": 8, "length": 32, "warmup": 8, "repeats": 64, "total_steps": 400,
                   "model": "random LlamaForSequenceClassification: 4 layers, hidden 128, 4 heads in 2 "
                            "key/value groups, FFN 512, vocab 1000, num_labels 2, pad token 0"},
    "minilm": {"threads": 2, "batch": 32, "length": 128, "warmup": 1, "repeats": 4, "total_steps": 100,
               "model": "packaged all-MiniLM-L6-v2 (resolve_model_path('minilm')), "
                        "AutoModelForSequenceClassification, num_labels 2"},
    # the real decoder behind tiny-llama's figures (on request: needs the SmolLM2 package, see
    # benchmarks/common.ensure_smollm2); told a 1-epoch-sized run, so selections come every ~70 steps
    "smollm2": {"threads": 2, "batch": 8, "length": 64, "warmup": 1, "repeats": 8, "total_steps": 2000,
                "model": "SmolLM2-135M (packaged GGUF converted by ensure_smollm2), "
                         "AutoModelForSequenceClassification, num_labels 2, pad token = eos"},
}
DEFAULT_CASES = ["tiny", "tiny-llama", "minilm"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--label", default="after", help="key of this run in the JSON (e.g. before / after)")
    p.add_argument("--cases", nargs="+", choices=tuple(CASES), default=DEFAULT_CASES)
    p.add_argument("--repeats", type=int, default=0, help="timed steps per condition (0: the case's default)")
    p.add_argument("--warmup", type=int, default=-1, help="untimed steps per condition first (-1: default)")
    p.add_argument("--target-sparsity", type=float, default=0.9)
    p.add_argument("--target-flops", type=float, default=0.5, help="for methods that take a FLOP target")
    p.add_argument("--total-steps", type=int, default=0,
                   help="the run length the methods are told (schedules, the work period of the target "
                        "path); 0: the case's (tiny 400: period 8, MiniLM 100: period 4)")
    p.add_argument("--alpha", type=float, default=1e-2,
                   help="large enough that the targets prune inside the timed window")
    p.add_argument("--beta", type=float, default=1e-2)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--methods", nargs="*", default=None, help="only these condition names")
    p.add_argument("--profile-steps", type=int, default=8,
                   help="steps profiled per condition (at batch 2 x 16: operator counts do not depend on it)")
    p.add_argument("--heads", action="store_true", help="also time the head-pruning pass (issue 2)")
    p.add_argument("--prune-repeats", type=int, default=5)
    p.add_argument("--thetas", type=float, nargs="+", default=[0.05, 0.15, 1.0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS)
    return p.parse_args(argv)


# --- the conditions -----------------------------------------------------------------------------
def conditions(args: argparse.Namespace) -> list[tuple[str, str, dict[str, Any]]]:
    """(condition name, method name, build_method keywords) for every method in the registry:
    without a target where the method runs without one, with `--target-sparsity` where it takes
    one, and with a FLOP target where `build_method` offers one."""
    out = []
    options: list[tuple[str, dict[str, Any]]] = [("", {}), (f"@{args.target_sparsity:g}",
                                                            {"target_sparsity": args.target_sparsity})]
    if "target_flops" in inspect.signature(registry.build_method).parameters:  # issue 14
        flops = getattr(args, "target_flops", 0.5)  # memory.py's arguments have none
        options.append((f"@flops{flops:g}", {"target_flops": flops}))
    for name in registry.METHODS:
        for suffix, kwargs in options:
            try:
                registry.check_method(name, kwargs.get("target_sparsity"), **(
                    {"target_flops": kwargs["target_flops"]} if "target_flops" in kwargs else {}))
            except Exception:  # noqa: BLE001 (the registry says this combination is refused)
                continue
            out.append((name + suffix, name, kwargs))
    if args.methods:
        out = [c for c in out if c[0] in args.methods or c[0] == "dense"]
    return out


def build_model(case: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    if case == "tiny":
        config = BertConfig(vocab_size=1000, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                            intermediate_size=512, num_labels=2)
        return AutoModelForSequenceClassification.from_config(config)
    if case == "tiny-llama":
        from transformers import LlamaConfig

        config = LlamaConfig(vocab_size=1000, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                             num_key_value_heads=2, intermediate_size=512, num_labels=2, pad_token_id=0)
        return AutoModelForSequenceClassification.from_config(config)
    if case == "smollm2":
        model = AutoModelForSequenceClassification.from_pretrained(ensure_smollm2(),
                                                                   num_labels=2)
        model.config.pad_token_id = model.config.eos_token_id
        return model
    from neuroprune.model.packaged import resolve_model_path

    return AutoModelForSequenceClassification.from_pretrained(resolve_model_path("minilm"), num_labels=2)


class Runner:
    """One condition: its model, optimiser and method, stepped one training step at a time."""

    def __init__(self, base: torch.nn.Module, method: str, kwargs: dict[str, Any], config: NeuroPruneConfig,
                 batch: dict[str, torch.Tensor], total_steps: int, lr: float) -> None:
        self.model = copy.deepcopy(base).train()
        self.method = registry.build_method(method, self.model, config, **kwargs)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=lr)
        self.method.on_train_begin(total_steps, self.optimizer)
        self.batch, self.step_no = batch, 0

    def step(self) -> None:
        self.step_no += 1
        loss = self.model(**self.batch).loss
        with record_function(HOOKS[0]):
            loss = loss + self.method.regularization_loss()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        with record_function(HOOKS[1]):
            remap_optimizer(self.optimizer, self.method.on_step_end(self.step_no))


class ToListCounter:
    """Counts `Tensor.tolist()` calls (a device-to-host copy on a GPU, no operator on CPU)."""

    def __init__(self) -> None:
        self.calls = 0
        self._orig: Callable[..., Any] | None = None

    def __enter__(self) -> ToListCounter:
        self._orig = torch.Tensor.tolist
        orig = self._orig

        def counted(t: torch.Tensor) -> Any:
            self.calls += 1
            return orig(t)

        torch.Tensor.tolist = counted  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        torch.Tensor.tolist = self._orig  # type: ignore[method-assign]


def profiled_steps(runner: Runner, steps: int) -> dict[str, Any]:
    """Operators and synchronisations per step over `steps` steps (a whole work period of the
    target path), all of each step and inside the method's hooks. The counts do not depend on the
    batch size, so the caller may profile on a small batch."""
    with ToListCounter() as tolist, profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            runner.step()
    events = prof.events()
    hooks = [e for e in events if e.name in HOOKS]

    def inside(e: Any) -> bool:
        return any(h.time_range.start <= e.time_range.start and e.time_range.end <= h.time_range.end
                   and e.thread == h.thread for h in hooks)

    ops = [e for e in events if e.name.startswith("aten::")]
    in_hooks = [e for e in ops if inside(e)]
    syncs = Counter(e.name for e in ops if e.name in SYNC_OPS)
    hook_syncs = Counter(e.name for e in in_hooks if e.name in SYNC_OPS)
    return {"ops": len(ops) / steps, "ops_in_hooks": len(in_hooks) / steps,
            "syncs": (sum(syncs.values()) + tolist.calls) / steps,
            "syncs_in_hooks": (sum(hook_syncs.values()) + tolist.calls) / steps,
            "syncs_by_kind": {**syncs, "tolist": tolist.calls}, "profiled_steps": steps}


def run_case(case: str, args: argparse.Namespace) -> dict[str, Any]:
    spec = dict(CASES[case])
    if args.repeats:
        spec["repeats"] = args.repeats
    if args.warmup >= 0:
        spec["warmup"] = args.warmup
    torch.set_num_threads(spec["threads"])
    base = build_model(case, args.seed)
    g = torch.Generator().manual_seed(args.seed)
    vocab = base.config.vocab_size
    ids = torch.randint(min(1000, vocab // 2), vocab, (spec["batch"], spec["length"]), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
             "labels": torch.randint(0, 2, (spec["batch"],), generator=g)}
    config = NeuroPruneConfig(alpha=args.alpha, beta=args.beta)
    total = spec["total_steps"] = args.total_steps or spec["total_steps"]
    conds = conditions(args)
    runners = {name: Runner(base, method, kw, config, batch, total, args.lr) for name, method, kw in conds}
    for _ in range(spec["warmup"]):
        for r in runners.values():
            r.step()
    times: dict[str, list[float]] = {name: [] for name in runners}
    cpu: dict[str, list[float]] = {name: [] for name in runners}
    for rep in range(spec["repeats"]):
        order = list(runners) if rep % 2 == 0 else list(reversed(runners))
        for name in order:
            start, start_cpu = time.perf_counter(), time.process_time()
            runners[name].step()
            times[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
        print(f"[{case}] repeat {rep + 1}/{spec['repeats']}: "
              + ", ".join(f"{n} {times[n][-1] * 1e3:.0f}" for n in runners) + " ms", file=sys.stderr)
    dense = statistics.median(times["dense"])
    out: dict[str, Any] = {"settings": spec, "load_start": load(), "conditions": {}}
    for name, method, kw in conds:
        runner = runners[name]
        timed_batch, runner.batch = runner.batch, {k: v[:2, :16] if v.dim() == 2 else v[:2]
                                                   for k, v in runner.batch.items()}
        prof = profiled_steps(runner, args.profile_steps)
        runner.batch = timed_batch
        paired = [t / d for t, d in zip(times[name], times["dense"])]
        out["conditions"][name] = {
            "method": method, "kwargs": kw, **summary(times[name]),
            "mean_s": statistics.fmean(times[name]), "ratio_median": statistics.median(times[name]) / dense,
            "ratio": statistics.fmean(times[name]) / statistics.fmean(times["dense"]),
            "ratio_paired": statistics.median(paired),
            "mean_cpu_s": statistics.fmean(cpu[name]),
            "ratio_cpu": statistics.fmean(cpu[name]) / statistics.fmean(cpu["dense"]),
            "period": getattr(runner.method, "period", 1) if getattr(runner.method, "controllers", 0)
            else None,  # the work period of the target path (the code before issue 15: every step)
            **prof, "sparsity_end": runner.method.sparsity_report().sparsity, "raw_s": times[name],
            "raw_cpu_s": cpu[name],
        }
    out["load_end"] = load()
    return out


# --- head-pruning pass (issue 2) ---------------------------------------------------------------
def head_pruning(args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    config = MPNetConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                         intermediate_size=3072, num_labels=2)
    base = AutoModelForSequenceClassification.from_config(config).eval()
    heads = sum(u.original_heads for u in NeuroPrune(base).index.attention)
    runs = []
    for theta in args.thetas:
        times, removed = [], 0
        for _ in range(args.prune_repeats):
            pruner = NeuroPrune(copy.deepcopy(base), NeuroPruneConfig(theta=theta))
            start = time.perf_counter()
            result = pruner.prune_redundant_heads()
            times.append(time.perf_counter() - start)
            removed = sum(len(v) for v in result.values())
        runs.append({"theta": theta, "heads_removed": removed, "heads_total": heads, **summary(times),
                     "meets_target": statistics.median(times) < PRUNE_TARGET_S, "raw_s": times})
    return {"model": "random MPNet-base geometry (hidden 768, 12 x 12 heads, FFN 3072)", "runs": runs}


# --- report ------------------------------------------------------------------------------------
def verdict(case: str, run: dict[str, Any], key: str = "ratio") -> tuple[float, bool]:
    """The worst NeuroPrune condition's per-step time over dense (`key`: wall or CPU ratio)."""
    worst = max(c.get(key, float("nan")) for c in run["conditions"].values() if c["method"] == "neuroprune")
    return worst, worst <= TARGETS[case]


def fmt(x: Any, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def case_table(case: str, run: dict[str, Any]) -> list[str]:
    s = run["settings"]
    lines = [
        f"### {case}: {s['model']}", "",
        f"batch {s['batch']} x {s['length']}, {s['threads']} thread(s), {s['warmup']} warm-up + "
        f"{s['repeats']} timed steps per condition, interleaved; load average "
        f"{run['load_start']['loadavg']} -> {run['load_end']['loadavg']}."
        + (f" Command: `{run['command']}`." if "command" in run else ""), "",
        "| condition | mean step (ms) | median (ms) | / dense, wall | paired median | / dense, CPU "
        "| ops / step | in hooks | syncs / step | in hooks | work period | sparsity at end |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, c in run["conditions"].items():
        lines.append(
            f"| {name} | {c.get('mean_s', c['median_s']) * 1e3:.1f} | {c['median_s'] * 1e3:.1f} | "
            f"{c['ratio']:.3f} | {c['ratio_paired']:.3f} | {fmt(c.get('ratio_cpu'))} | {c['ops']:.0f} | "
            f"{c['ops_in_hooks']:.0f} | {c['syncs']:.1f} | {fmt(c.get('syncs_in_hooks'), '.1f')} | "
            f"{fmt(c.get('period'), 'd')} | {c['sparsity_end']:.3f} |")
    wall, ok = verdict(case, run)
    cpu, ok_cpu = verdict(case, run, "ratio_cpu")
    said = {True: "met", False: "NOT met"}
    lines += ["", f"Worst NeuroPrune condition: **{wall:.3f}x dense wall clock ({said[ok]}), "
              f"{cpu:.3f}x CPU time ({said[ok_cpu]})**; target <= {TARGETS[case]:.2f}x.", ""]
    return lines


def comparison(result: dict[str, Any]) -> list[str]:
    """Before / after side by side (each ratio measured against dense in its own run)."""
    runs = result["runs"]
    if not {"before", "after"} <= set(runs):
        return []
    lines = ["## Before and after", "",
             "Each ratio is against dense measured interleaved in the same process; the two runs are "
             "separate processes (the before run imports the code of the commit it names).", "",
             "| case | condition | / dense before | / dense after | CPU before | CPU after | ops in hooks "
             "before | after | syncs in hooks before | after |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for case, after in runs["after"]["cases"].items():
        before = runs["before"]["cases"].get(case, {"conditions": {}})
        for name, a in after["conditions"].items():
            b = before["conditions"].get(name, {})
            lines.append(f"| {case} | {name} | {fmt(b.get('ratio'))} | {a['ratio']:.3f} | "
                         f"{fmt(b.get('ratio_cpu'))} | {fmt(a.get('ratio_cpu'))} | "
                         f"{fmt(b.get('ops_in_hooks'), '.0f')} | "
                         f"{a['ops_in_hooks']:.0f} | {fmt(b.get('syncs_in_hooks'), '.1f')} | "
                         f"{fmt(a.get('syncs_in_hooks'), '.1f')} |")
    return lines + [""]


def markdown(result: dict[str, Any]) -> str:
    lines = ["# Per-step overhead of the sparse-training methods", "", *comparison(result)]
    for label, entry in result["runs"].items():
        m = entry["machine"]
        lines += [f"## {label}", "",
                  f"Command: `{entry['command']}`; commit {m['git_commit']}; "
                  f"code from {entry['neuroprune_path']}; "
                  f"{m['cpu']}, {m['cpu_count']} cores; Python {m['python']}, torch {m['torch']}, "
                  f"transformers {m['transformers']}.", ""]
        for case, run in entry["cases"].items():
            lines += case_table(case, run)
    if "head_pruning" in result:
        h = result["head_pruning"]
        lines += ["## Head-pruning pass", "", h["model"], "", "| theta | heads removed | median (s) |",
                  "|---|---|---|"]
        lines += [f"| {r['theta']} | {r['heads_removed']}/{r['heads_total']} | {r['median_s']:.3f} |"
                  for r in h["runs"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    transformers.logging.set_verbosity_error()
    path = args.out / "overhead.json"
    result: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    if "runs" not in result:  # the issue-2 layout of this file: start afresh
        result = {"runs": {}}
    entry = {"command": " ".join([Path(sys.executable).name, *sys.argv]) if argv is None else str(argv),
             "machine": machine(), "neuroprune_path": str(Path(registry.__file__).parents[1]),
             "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
             "cases": {}}
    old = result["runs"].get(args.label, {}).get("cases", {})
    entry["cases"] = {k: v for k, v in old.items() if k not in args.cases}
    for case in args.cases:  # written after each case: a long MiniLM run killed keeps the rest
        entry["cases"][case] = {**run_case(case, args), "command": entry["command"]}  # cases outlive runs
        result["runs"][args.label] = entry
        write_atomic(path, json.dumps(result, indent=2))
    if args.heads:
        result["head_pruning"] = head_pruning(args)
    write_atomic(path, json.dumps(result, indent=2))
    write_atomic(args.out / "overhead.md", markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
