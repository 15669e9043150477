"""What uniform compaction costs against the (non-uniform) compaction, in parameters and latency.

Uniform compaction (`neuroprune compact --uniform`) keeps in every layer as many key/value groups
and MLP neurons as the layer that needs most, so that the family's stock config describes the
result (loadable without remote code, e.g. by serving engines). It is exact by construction (the
outputs are checked here too), so it costs no accuracy; what it costs is the dead structure it
keeps. Measured on Llama-architecture decoders with random weights (latency does not depend on
the values) and non-uniform structure imposed per layer: layer i gets a dead-neuron fraction
spread over an interval and some dead key/value groups (`SCENARIOS`). Dense, compacted and
uniform models are timed interleaved in one process (round-robin, order shuffled each round), so
their ratios are comparable.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/uniform.py            # tiny Llama + SmolLM2 shape
    .venv/bin/python benchmarks/uniform.py --models tiny-llama --budget 10

Writes benchmarks/results/uniform.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).parent))
import neuroprune  # noqa: E402
from common import load, machine, write_atomic  # noqa: E402
from inference import interleaved  # noqa: E402
from neuroprune.compaction import compact_uniform  # noqa: E402
from neuroprune.model.index import ModelIndex  # noqa: E402
from neuroprune.model.surgery import weight_matrix  # noqa: E402

MODELS: dict[str, dict[str, Any]] = {
    # a small Llama with GQA (8 query heads over 4 key/value groups)
    "tiny-llama": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=8,
                       num_key_value_heads=4, vocab_size=1000, max_position_embeddings=256),
    # SmolLM2-135M's shapes (models.md): 30 layers, d=576, 9 query / 3 key-value heads, FFN 1536
    "smollm2-shape": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                          num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                          max_position_embeddings=2048, tie_word_embeddings=True),
}


# dead-neuron fractions spread evenly over [low, high] (shuffled over layers); dead key/value
# groups of layer i: `groups(i, G)` (G = the model's groups)
SCENARIOS: dict[str, dict[str, Any]] = {
    "wide": dict(low=0.3, high=0.9, groups=lambda i, g: i % g),  # some layers lose no group
    "narrow": dict(low=0.6, high=0.8, groups=lambda i, g: 1 + i % (g - 1)),  # every layer loses one
}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=list(SCENARIOS))
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    p.add_argument("--budget", type=float, default=40.0, help="timing seconds per model and batch size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    return p.parse_args()


@torch.no_grad()
def uneven(name: str, scenario: str, args: argparse.Namespace) -> ModelIndex:
    """A random model with per-layer structure as a sparse method leaves it: dead neurons (zero
    contract columns) and dead key/value groups (zero output-projection columns), different in
    every layer."""
    torch.manual_seed(args.seed)
    config = AutoConfig.for_model("llama", **MODELS[name])
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    index = ModelIndex(model)
    rng = random.Random(args.seed)
    layers = len(index.mlps)
    low, high, dead_groups = (SCENARIOS[scenario][k] for k in ("low", "high", "groups"))
    fractions = [low + (high - low) * i / max(layers - 1, 1) for i in range(layers)]
    rng.shuffle(fractions)
    g = torch.Generator().manual_seed(args.seed)
    for unit, fraction in zip(index.mlps, fractions):
        n = unit.original_neurons
        weight_matrix(unit.down)[:, torch.randperm(n, generator=g)[: round(fraction * n)]] = 0
    for i, unit in enumerate(index.attention):
        dead = rng.sample(range(unit.num_kv_heads), dead_groups(i, unit.num_kv_heads))
        if dead:
            weight_matrix(unit.o)[:, unit.query_rows(dead)] = 0
    return index


def params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def widths(index: ModelIndex) -> dict[str, list[int]]:
    return {"groups": [u.num_kv_heads for u in index.attention],
            "neurons": [len(u.kept_neurons) for u in index.mlps]}


@torch.no_grad()
def measure(name: str, scenario: str, args: argparse.Namespace) -> dict[str, Any]:
    dense = uneven(name, scenario, args)
    compacted = neuroprune.compact(copy.deepcopy(dense.model))
    uniform = compact_uniform(copy.deepcopy(dense.model))
    models = {"dense": dense.model, "compacted": compacted.model, "uniform": uniform.index.model}
    g = torch.Generator().manual_seed(args.seed + 1)
    x = torch.randint(0, dense.model.config.vocab_size, (2, 32), generator=g)
    reference = dense.model(input_ids=x).logits
    diff = {k: float((models[k](input_ids=x).logits - reference).abs().max())
            for k in ("compacted", "uniform")}
    row: dict[str, Any] = {
        "model": name, "scenario": scenario, "config": MODELS[name],
        "params": {k: params(m) for k, m in models.items()},
        "max_abs_logit_diff": diff,
        "widths_compacted": widths(compacted),
        "uniform": {"groups": uniform.groups, "neurons": uniform.neurons, "config": uniform.config_changes},
        "latency": {},
    }
    for batch in args.batches:
        ids = torch.randint(0, dense.model.config.vocab_size, (batch, args.seq), generator=g)
        fns = {k: (lambda m=m, ids=ids: m(input_ids=ids, use_cache=False)) for k, m in models.items()}
        times = interleaved(fns, args.budget, 5, 200, random.Random(args.seed))
        med = {k: statistics.median(v) for k, v in times.items()}
        row["latency"][str(batch)] = {
            "median_ms": {k: 1000 * v for k, v in med.items()}, "rounds": len(times["dense"]),
            "speedup_vs_dense": {k: med["dense"] / med[k] for k in ("compacted", "uniform")},
            "uniform_over_compacted_time": med["uniform"] / med["compacted"],
        }
        timing = ", ".join(f"{k} {1000 * v:.1f} ms" for k, v in med.items())
        print(f"{name} {scenario} batch {batch}: {timing}", flush=True)
    return row


def markdown(result: dict[str, Any]) -> str:
    mach = result["machine"]
    lines = ["# Uniform compaction: cost against the non-uniform compaction", "",
             f"`{result['command']}`; {mach['cpu']}, torch {mach['torch']} ({mach['torch_threads']} "
             f"threads), transformers {mach['transformers']}, load {result['load_before']['loadavg']} -> "
             f"{result['load_after']['loadavg']}.", "",
             "Scenarios: *wide* = dead-neuron fraction per layer spread over [0.3, 0.9] (shuffled), layer i "
             "has i mod G dead key/value groups (some layers none); *narrow* = [0.6, 0.8], 1 + i mod (G-1) "
             f"dead groups (every layer at least one). Sequence {result['settings']['seq']}; median "
             "latency, the three models timed interleaved.", "",
             "| model | scenario | params dense | compacted | uniform | uniform / compacted | groups kept "
             "(compacted) | neurons kept (compacted) | uniform groups x neurons | max logit diff "
             "(compacted / uniform) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        p = r["params"]
        w = r["widths_compacted"]
        lines.append(
            f"| {r['model']} | {r['scenario']} | {p['dense']:,} | {p['compacted']:,} | {p['uniform']:,} | "
            f"{p['uniform'] / p['compacted']:.3f} | {min(w['groups'])}-{max(w['groups'])} | "
            f"{min(w['neurons'])}-{max(w['neurons'])} | {r['uniform']['groups']} x "
            f"{r['uniform']['neurons']} | {r['max_abs_logit_diff']['compacted']:.1e} / "
            f"{r['max_abs_logit_diff']['uniform']:.1e} |")
    lines += ["", "| model | scenario | batch | dense ms | compacted ms | uniform ms | speed-up compacted | "
              "speed-up uniform | uniform time / compacted time | rounds |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        for batch, t in r["latency"].items():
            m = t["median_ms"]
            s = t["speedup_vs_dense"]
            lines.append(f"| {r['model']} | {r['scenario']} | {batch} | {m['dense']:.1f} | "
                         f"{m['compacted']:.1f} | {m['uniform']:.1f} | {s['compacted']:.2f}x | "
                         f"{s['uniform']:.2f}x | "
                         f"{t['uniform_over_compacted_time']:.2f} | {t['rounds']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parse()
    before = load()
    rows = [measure(name, scenario, args) for name in args.models for scenario in args.scenarios]
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    result = {"command": "python benchmarks/uniform.py " + " ".join(sys.argv[1:]), "machine": machine(),
              "load_before": before, "load_after": load(), "settings": settings, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out / "uniform.json", json.dumps(result, indent=1))
    write_atomic(args.out / "uniform.md", markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
