"""What training-side uniform widths cost in accuracy and speed on a real task (issue 16).

`neuroprune train --target-flops F --uniform-widths` makes the structural selector remove rank
slices (the r-th weakest neuron / key-value group of every layer at once), so that `compact
--uniform` (a folder the stock class loads, no remote code) pads nothing. The constraint is
coarser than free per-layer selection; this measures what it costs against it.

Protocol: SmolLM2-135M (the packaged GGUF, converted once to /tmp/smollm2-135m, Llama
architecture with 9 query / 3 key-value heads) as a 2-class sequence classifier on SST-2: a seeded
training subset (SST-2's training split shuffled with the seed, first N rows), 1 epoch, batch 16,
max length 64, AdamW lr 1e-4 with 10% warm-up, weight decay 0.01, seed 0: the same data and seed
for three runs of `neuroprune train` (`training.train.train_run`, the CLI's code path): dense,
NeuroPrune `--target-flops 0.5` (free per-layer widths), and NeuroPrune `--target-flops 0.5
--uniform-widths`. Validation: the first rows of ../shared/data/sst2/validation.jsonl (carved from
GLUE's *training* split); test: GLUE dev (all 872 rows), evaluated once per run after training and
never used to choose anything. No setting was tuned.

Then every pruned run is compacted both ways (`neuroprune.compact` and `compact_uniform`, what
`neuroprune compact` / `compact --uniform` do), its outputs checked against the saved masked model,
parameters and block FLOPs counted, and the dense model and the four compacted ones timed
interleaved in one process (`inference.interleaved`: round-robin, order shuffled each round) at
batch 1 and 8 x 64 tokens, so the speed-ups are ratios measured side by side under the same load.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/uniform_training.py --train dense   # one run
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/uniform_training.py --measure      # compact + time
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/uniform_training.py                # all of it
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/uniform_training.py --train free_f75 uniform_f75

Further cells (see CELLS): `*_act` rank units by activations (`--scores activations`), `*_nopen`
have no penalties, `ft_*` prune the dense run's classifier instead of the pretrained model (one
more epoch on the same rows; the protocol of CoFi / nn_pruning). The committed results: the
three default runs, the F = 0.75 pair, the activation-score runs, and the from-classifier F = 0.75
pair + its weight-score twin, which is the one protocol where pruned runs stay above chance
(docs/compaction.md); then `--measure --budget 120 --measure-cells ...` (the cells named in
docs/compaction.md).

Writes benchmarks/results/uniform_training.{json,md}; run folders under --work (not committed).
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import SMOLLM2_DIR, ensure_smollm2, load, machine, write_atomic  # noqa: E402
from inference import interleaved  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# name: (label shown, `neuroprune train` settings of the run); the f75 pair is trained on request
# (`--train free_f75 uniform_f75`): a milder target, for when 50% leaves every pruned run at chance
CELLS: dict[str, tuple[str, dict[str, Any]]] = {"dense": ("dense", {"method": "dense"})}
for _level in (50, 75):
    CELLS[f"free_f{_level}"] = (f"NeuroPrune F={_level / 100}, free widths",
                                {"method": "neuroprune", "target_flops": _level / 100})
    CELLS[f"uniform_f{_level}"] = (f"NeuroPrune F={_level / 100}, --uniform-widths",
                                   {**CELLS[f"free_f{_level}"][1], "uniform_widths": True})
# the same runs ranking units by activations (`--scores activations`): weight scores remove
# load-bearing SmolLM2 neurons (benchmarks/oneshot_scores.py), which left every run above at chance
for _level in (50, 75):
    for _kind in ("free", "uniform"):
        _label, _settings = CELLS[f"{_kind}_f{_level}"]
        CELLS[f"{_kind}_f{_level}_act"] = (f"{_label}, --scores activations",
                                           {**_settings, "scores": "activations"})
        CELLS[f"{_kind}_f{_level}_act_nopen"] = (f"{_label}, --scores activations --alpha 0 --beta 0",
                                                 {**_settings, "scores": "activations", "alpha": 0.0,
                                                  "beta": 0.0})
# pruning a model that already knows the task: the dense run's classifier, one more epoch on the
# same rows under the FLOP target (the protocol of CoFi / nn_pruning, which prune fine-tuned models)
for _name in ("free_f50_act", "uniform_f50_act", "free_f50", "uniform_f50", "free_f75_act_nopen",
              "uniform_f75_act_nopen", "free_f75_act", "uniform_f75_act"):
    _label, _settings = CELLS[_name]
    CELLS[f"ft_{_name}"] = (f"{_label}, from the dense classifier", {**_settings, "from_dense": True})
# the weight scores under the same protocol (is it the scores that keep the run above chance?)
CELLS["ft_weights_f75_nopen"] = (
    "NeuroPrune F=0.75, free widths, --alpha 0 --beta 0, weight scores, from the dense classifier",
    {**CELLS["free_f75"][1], "alpha": 0.0, "beta": 0.0, "from_dense": True})
DEFAULT_CELLS = ["dense", "free_f50", "uniform_f50"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train", nargs="*", choices=list(CELLS), help="train only these runs")
    p.add_argument("--measure", action="store_true", help="only compact, time and write the results")
    p.add_argument("--measure-cells", nargs="+", choices=list(CELLS), default=None,
                   help="with --measure: only these trained runs (and dense); default: every trained run")
    p.add_argument("--train-samples", type=int, default=1024)
    p.add_argument("--validation-rows", type=int, default=256)
    p.add_argument("--test-rows", type=int, default=872, help="GLUE dev has 872; fewer = its first rows")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--learning-rate", type=float, default=1e-4)
    p.add_argument("--warmup-ratio", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-threads", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="torch threads of the latency timing")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--seq", type=int, default=64, help="tokens per sequence in the timing")
    p.add_argument("--budget", type=float, default=60.0, help="timing seconds per batch size")
    p.add_argument("--model-dir", type=Path, default=SMOLLM2_DIR)
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--work", type=Path, default=Path("/tmp/uniform_training"))
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--seeds-summary", nargs="+", type=Path, default=None, metavar="SOURCE",
                   help="only summarise the free / uniform pairs over seeds (SEED_PAIRS): each SOURCE "
                        "a --work folder of a seed's runs or a results JSON of this script; writes "
                        "uniform_training_seeds.{json,md}")
    return p.parse_args(argv)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open() as f:
        return [json.loads(line) for line in f if line.strip()]


def write_data(args: argparse.Namespace) -> dict[str, Path]:
    """The splits every run sees (the frontier's seeded subset convention: shuffle, first N)."""
    train = read_jsonl(args.data / "sst2" / "train.jsonl")
    random.Random(args.seed).shuffle(train)
    rows = {"train": train[: args.train_samples],
            "validation": read_jsonl(args.data / "sst2" / "validation.jsonl")[: args.validation_rows],
            "test": read_jsonl(args.data / "sst2" / "test.jsonl")[: args.test_rows]}
    folder = args.work / "data" / "sst2"
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, split in rows.items():
        files[name] = folder / f"{name}.jsonl"
        text = "".join(json.dumps(r) + "\n" for r in split)
        if not files[name].exists() or files[name].read_text() != text:
            write_atomic(files[name], text)
    return files


def settings(name: str, args: argparse.Namespace, files: dict[str, Path]) -> dict[str, Any]:
    cell = dict(CELLS[name][1])
    model = str(ensure_smollm2(args.model_dir))
    if cell.pop("from_dense", False):
        model = str(args.work / "runs" / "dense" / "model")
        if not Path(model).exists():
            raise SystemExit(f"cell {name} starts from the dense run's classifier: run --train dense first")
    return {"model": model, "output_dir": str(args.work / "runs" / name),
            "overwrite": True, "train_file": str(files["train"]),
            "validation_file": str(files["validation"]), "test_file": str(files["test"]),
            "task_name": "sst2", "epochs": 1, "batch_size": args.batch_size,
            "learning_rate": args.learning_rate, "warmup_ratio": args.warmup_ratio,
            "max_length": args.max_length, "weight_decay": 0.01, "eval_batch_size": 64,
            "seed": args.seed, "logging_steps": 10, "report_to": "none", **cell}


def train_cell(name: str, args: argparse.Namespace, files: dict[str, Path]) -> dict[str, Any]:
    """One `neuroprune train` run; its numbers, saved to WORK/trained/NAME.json."""
    from neuroprune.training.settings import TrainSettings
    from neuroprune.training.train import train_run

    chosen = settings(name, args, files)
    torch.set_num_threads(args.train_threads)
    before = load()
    result = train_run(TrainSettings(**chosen), quiet=True)
    test = result.test_metrics or {}
    cell = {"cell": name, "label": CELLS[name][0], "settings": chosen,
            "test_accuracy": 100 * test.get("test_accuracy", float("nan")),
            "validation_accuracy": 100 * result.metrics.get("eval_accuracy", float("nan")),
            "train_seconds": round(result.train_seconds, 1),
            "steps": result.records[-1]["step"] if result.records else None,
            "final": {k: v for k, v in result.sparsity.items() if not isinstance(v, (dict, list))},
            "run_dir": str(result.run_dir), "train_threads": args.train_threads,
            "load_before": before, "load_after": load()}
    path = args.work / "trained" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(cell, indent=1))
    print(f"{name}: test {cell['test_accuracy']:.2f}, validation {cell['validation_accuracy']:.2f}, "
          f"{cell['steps']} steps in {cell['train_seconds']:.0f} s", flush=True)
    return cell


# --- compaction and timing ---------------------------------------------------------------------------
def params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def compacted_variants(cell: dict[str, Any], probe: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The run's saved model compacted plainly and uniformly: models, params, FLOP fractions,
    widths, and the largest logit difference of each against the saved (masked) model."""
    from neuroprune.compaction import compact, compact_uniform
    from neuroprune.model import flops
    from neuroprune.model.index import ModelIndex

    saved = ModelIndex.from_pretrained(Path(cell["run_dir"]) / "model")
    saved.model.eval()
    reference = saved.model(**probe).logits
    dense_flops = flops.dense_flops(saved, 64)
    plain = compact(copy.deepcopy(saved))
    uniform = compact_uniform(copy.deepcopy(saved))
    out = {"dense_params": saved.original_parameters, "models": {}, "info": {}}
    for kind, index in (("compacted", plain), ("uniform", uniform.index)):
        model = index.model.eval()
        out["models"][kind] = model
        out["info"][kind] = {
            "params": params(model),
            "flops_fraction": flops.current_flops(index, 64) / dense_flops,
            "groups_per_layer": [u.num_kv_heads for u in index.attention],
            "neurons_per_layer": [len(u.kept_neurons) for u in index.mlps],
            "max_abs_logit_diff": float((model(**probe).logits - reference).abs().max()),
        }
    out["info"]["uniform"].update(groups=uniform.groups, neurons=uniform.neurons,
                                  config_changes=uniform.config_changes,
                                  stock_class_logit_diff=stock_reload(uniform.index.model, probe, reference))
    return out


@torch.no_grad()
def stock_reload(model: torch.nn.Module, probe: dict[str, torch.Tensor], reference: torch.Tensor) -> float:
    """Save the uniform model and load it back with the stock Auto class (no remote code): the
    largest logit difference against the saved masked model."""
    import tempfile

    from transformers import AutoModelForSequenceClassification

    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        stock = AutoModelForSequenceClassification.from_pretrained(folder).eval()
        return float((stock(**probe).logits - reference).abs().max())


def probe_batch(files: dict[str, Path], tok: Any, rows: int, length: int) -> dict[str, torch.Tensor]:
    """`rows` test sentences padded to `length` tokens (pad = the tokenizer's, as trained)."""
    texts = [r["sentence"] for r in read_jsonl(files["test"])]
    texts = (texts * (rows // len(texts) + 1))[:rows]
    return dict(tok(texts, truncation=True, max_length=length, padding="max_length", return_tensors="pt"))


def measure(args: argparse.Namespace, files: dict[str, Path]) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from neuroprune.model.index import ModelIndex

    torch.set_num_threads(args.threads)
    wanted = None if args.measure_cells is None else {"dense", *args.measure_cells}
    trained = {n: json.loads((args.work / "trained" / f"{n}.json").read_text()) for n in CELLS
               if (args.work / "trained" / f"{n}.json").exists() and (wanted is None or n in wanted)}
    if "dense" not in trained:
        raise SystemExit("the dense run is missing: run --train dense first")
    tok = AutoTokenizer.from_pretrained(Path(trained["dense"]["run_dir"]) / "model")
    probe = probe_batch(files, tok, 8, args.seq)
    dense = ModelIndex.from_pretrained(Path(trained["dense"]["run_dir"]) / "model").model.eval()
    models: dict[str, torch.nn.Module] = {"dense": dense}
    for name, cell in trained.items():
        cell["label"] = CELLS[name][0]
        if name == "dense":
            cell["params"] = params(dense)
            continue
        variants = compacted_variants(cell, probe)
        cell["compaction"] = variants["info"]
        cell["dense_params"] = variants["dense_params"]
        for kind, model in variants["models"].items():
            models[f"{name}/{kind}"] = model
    latency: dict[str, Any] = {}
    rng = random.Random(args.seed)
    with torch.inference_mode():
        for batch in args.batches:
            x = probe_batch(files, tok, batch, args.seq)
            fns = {k: (lambda m=m, x=x: m(**x)) for k, m in models.items()}
            before = load()
            times = interleaved(fns, args.budget, 5, 500, rng)
            med = {k: statistics.median(v) for k, v in times.items()}
            latency[str(batch)] = {"median_ms": {k: 1000 * v for k, v in med.items()},
                                   "speedup_vs_dense": {k: med["dense"] / v for k, v in med.items()},
                                   "rounds": len(times["dense"]), "load_before": before, "load_after": load()}
            shown = ", ".join(f"{k} {1000 * v:.1f} ms" for k, v in med.items())
            print(f"batch {batch}: {shown}", flush=True)
    return {"cells": list(trained.values()), "latency": latency}


# --- results -----------------------------------------------------------------------------------------
def chance(files: dict[str, Path]) -> float:
    labels = [int(r["label"]) for r in read_jsonl(files["test"])]
    return 100 * max(labels.count(v) for v in set(labels)) / len(labels)


def markdown(result: dict[str, Any]) -> str:
    mach, s = result["machine"], result["settings"]
    cells = {c["cell"]: c for c in result["cells"]}
    lines = ["# Training-side uniform widths: accuracy and speed on SST-2 (SmolLM2-135M)", "",
             f"`{result['command']}`; {mach['cpu']}, torch {mach['torch']}, transformers "
             f"{mach['transformers']}, neuroprune {mach['neuroprune']} ({mach['git_commit']}); "
             f"training {s['train_threads']} thread(s), timing {s['threads']} thread(s); load "
             f"{result['load_before']['loadavg']} -> {result['load_after']['loadavg']} (shared machine).", "",
             f"SST-2: {s['train_samples']} training rows (seeded subset, seed {s['seed']}), 1 epoch, batch "
             f"{s['batch_size']}, max length {s['max_length']}, lr {s['learning_rate']}, warm-up "
             f"{s['warmup_ratio']}; validation = first {s['validation_rows']} rows of validation.jsonl "
             f"(from GLUE train); test = GLUE dev ({s['test_rows']} rows; majority class "
             f"{result['chance']:.2f}%). Block FLOPs at 64 tokens against the dense blocks.", "",
             "| run | test acc. | val. acc. | train s | model | params | block FLOPs | kv groups / layer | "
             "neurons / layer | max logit diff vs saved |", "|---|---|---|---|---|---|---|---|---|---|"]
    for cell in cells.values():
        head = (f"| {cell['label']} | {cell['test_accuracy']:.2f} | {cell['validation_accuracy']:.2f} | "
                f"{cell['train_seconds']:.0f} |")
        if "compaction" not in cell:
            lines.append(f"{head} dense | {cell['params']:,} | 1.000 | 3 | 1536 | - |")
            continue
        for kind, info in cell["compaction"].items():
            g, n = info["groups_per_layer"], info["neurons_per_layer"]
            lines.append(f"{head if kind == 'compacted' else '| | | | |'} {kind} | {info['params']:,} | "
                         f"{info['flops_fraction']:.3f} | {min(g)}-{max(g)} | {min(n)}-{max(n)} | "
                         f"{info['max_abs_logit_diff']:.1e} |")
    stock = [f"{c['cell']} {c['compaction']['uniform']['stock_class_logit_diff']:.1e}"
             for c in cells.values() if "compaction" in c]
    lines += ["", "Uniform folders saved and loaded back with the stock `AutoModelForSequenceClassification` "
              f"(no remote code), max logit diff against the saved model: {', '.join(stock)}."]
    lines += ["", "Speed-up against the dense model (median latency, all models timed interleaved):", "",
              "| model | " + " | ".join(f"batch {b} ms | speed-up" for b in result["latency"]) + " |",
              "|---|" + "---|---|" * len(result["latency"])]
    for key in next(iter(result["latency"].values()))["median_ms"]:
        row = [f"{t['median_ms'][key]:.1f} | {t['speedup_vs_dense'][key]:.2f}x"
               for t in result["latency"].values()]
        lines.append(f"| {key} | " + " | ".join(row) + " |")
    rounds = ", ".join(f"batch {b}: {t['rounds']}" for b, t in result["latency"].items())
    lines += ["", f"Rounds: {rounds}.", ""]
    lines += [f"- {t['target']}: {'met' if t['met'] else 'NOT met'} ({t['detail']})"
              for t in result["targets"]]
    return "\n".join(lines) + "\n"


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """What the comparison can say: is every run above chance (else accuracy says nothing), does
    uniform stay within 1 point of free widths, and does compact --uniform pad nothing."""
    cells = {c["cell"]: c for c in result["cells"]}
    out = []
    floor = result["chance"] + 2
    above = {n: c["test_accuracy"] > floor for n, c in cells.items()}
    out.append({"target": f"every run above chance + 2 ({floor:.1f}%)", "met": all(above.values()),
                "detail": ", ".join(f"{n} {c['test_accuracy']:.2f}" for n, c in cells.items())})
    for name in cells:  # every free-widths run whose uniform twin (same settings) was measured too
        free, uniform = cells[name], cells.get(name.replace("free_", "uniform_"))
        if "free_" not in name or not uniform:
            continue
        what = free["label"].replace(", free widths", "")
        gap = free["test_accuracy"] - uniform["test_accuracy"]
        out.append({"target": f"{what}: uniform widths within 1 point of free widths (test)",
                    "met": gap <= 1.0, "detail": f"free - uniform = {gap:+.2f} points"})
        u = uniform["compaction"]
        out.append({"target": f"{what}: compact --uniform of the uniform run pads nothing "
                              "(params = plain compact)",
                    "met": u["uniform"]["params"] == u["compacted"]["params"],
                    "detail": f"{u['uniform']['params']:,} vs {u['compacted']['params']:,}"})
    return out


# --- the pair over seeds -----------------------------------------------------------------------------
# The measurement of docs/compaction.md, repeated with other seeds (`--seed S --work W`: another
# training subset, classifier initialisation and batch order; its own dense classifier first):
#   --seed 1 --work /tmp/ut_seed1 --train dense ft_free_f75_act_nopen ft_uniform_f75_act_nopen
# The first pair is required of every source; the others are summarised over the sources that hold them.
SEED_PAIRS: dict[str, tuple[str, str]] = {
    "no penalties (--alpha 0 --beta 0)": ("ft_free_f75_act_nopen", "ft_uniform_f75_act_nopen"),
    "default penalties (alpha = beta = 1e-4)": ("ft_free_f75_act", "ft_uniform_f75_act"),
}


def seed_cells(source: Path) -> dict[str, dict[str, Any]]:
    """The dense run and every SEED_PAIRS run one seed holds: a --work folder's trained/*.json, or
    the cells of a results JSON this script wrote."""
    wanted = {"dense", *(n for pair in SEED_PAIRS.values() for n in pair)}
    if source.is_dir():
        cells = {n: json.loads((source / "trained" / f"{n}.json").read_text()) for n in sorted(wanted)
                 if (source / "trained" / f"{n}.json").exists()}
    else:
        cells = {c["cell"]: c for c in json.loads(source.read_text())["cells"] if c["cell"] in wanted}
    missing = [n for n in ("dense", *next(iter(SEED_PAIRS.values()))) if n not in cells]
    if missing:
        raise SystemExit(f"{source}: no {', '.join(missing)} run; train it with --train {' '.join(missing)} "
                         "(same --seed and --work)")
    seeds = {c["settings"]["seed"] for c in cells.values()}
    if len(seeds) != 1:
        raise SystemExit(f"{source}: runs of different seeds {sorted(seeds)}")
    return cells


def pair_rows(cells: dict[str, dict[str, Any]], pair: tuple[str, str], source: Path) -> dict[str, Any]:
    free, uniform = (cells[n] for n in pair)
    return {"seed": cells["dense"]["settings"]["seed"], "source": str(source),
            **{f"{k}_{split}": c[f"{split}_accuracy"]
               for k, c in (("dense", cells["dense"]), ("free", free), ("uniform", uniform))
               for split in ("test", "validation")},
            "flops_free": free["final"]["flops_fraction"],
            "flops_uniform": uniform["final"]["flops_fraction"],
            "gap_test": free["test_accuracy"] - uniform["test_accuracy"],
            "gap_validation": free["validation_accuracy"] - uniform["validation_accuracy"]}


def seeds_summary(sources: list[Path]) -> dict[str, Any]:
    """Per pair of SEED_PAIRS: test and validation accuracy of dense, free and uniform per seed;
    the free - uniform gap per seed, its mean and its standard error over seeds (paired: each
    seed's pair shares data, classifier and batch order)."""
    per_source = [(source, seed_cells(source)) for source in sources]
    seeds = [cells["dense"]["settings"]["seed"] for _, cells in per_source]
    if len(set(seeds)) != len(seeds):
        raise SystemExit("two sources hold the same seed: give each seed once")
    pairs = {}
    for name, pair in SEED_PAIRS.items():
        rows = sorted((pair_rows(cells, pair, source) for source, cells in per_source
                       if all(n in cells for n in pair)), key=lambda r: r["seed"])
        if not rows:
            continue
        summary = {}
        for key in rows[0]:
            if key in ("seed", "source"):
                continue
            values = [r[key] for r in rows]
            sem = statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else float("nan")
            summary[key] = {"mean": statistics.fmean(values), "sem": sem}
        pairs[name] = {"cells": list(pair), "seeds": rows, "summary": summary}
    return {"pairs": pairs}


def seeds_markdown(result: dict[str, Any]) -> str:
    keys = ["dense_test", "free_test", "uniform_test", "gap_test", "dense_validation", "free_validation",
            "uniform_validation", "gap_validation"]
    lines = ["# Training-side uniform widths over seeds: accuracy (SmolLM2-135M, SST-2)", "",
             f"`{result['command']}`; {result['machine']['cpu']}, torch {result['machine']['torch']}, "
             f"neuroprune {result['machine']['neuroprune']} ({result['machine']['git_commit']}).", "",
             "Each pair: free widths and `--uniform-widths`, `--target-flops 0.75 --scores activations`, "
             "pruning the seed's own dense classifier, 1 epoch of the seed's 1,024-row SST-2 subset (64 "
             "steps); test = GLUE dev (872 rows), validation = 256 rows carved from GLUE train. Gap = free "
             "- uniform (positive: uniform widths cost accuracy).", ""]
    for name, entry in result["pairs"].items():
        rows, summary = entry["seeds"], entry["summary"]
        lines += [f"## {name}: `{entry['cells'][0]}` / `{entry['cells'][1]}`", "",
                  "| seed | dense test | free test | uniform test | gap test | dense val. | free val. | "
                  "uniform val. | gap val. | block FLOPs (128 tokens) free / uniform |",
                  "|---|" + "---|" * (len(keys) + 1)]
        for r in rows:
            shown = [f"{r[k]:+.2f}" if k.startswith("gap") else f"{r[k]:.2f}" for k in keys]
            lines.append(f"| {r['seed']} | " + " | ".join(shown)
                         + f" | {r['flops_free']:.3f} / {r['flops_uniform']:.3f} |")
        means = [f"{summary[k]['mean']:{'+' if k.startswith('gap') else ''}.2f} +- {summary[k]['sem']:.2f}"
                 for k in keys]
        lines += ["| mean +- s.e. | " + " | ".join(means) + " | |"] if len(rows) > 1 else []
        lines.append("")
    lines += [*[f"- {t['target']}: {'met' if t['met'] else 'NOT met'} ({t['detail']})"
                for t in result["targets"]], ""]
    return "\n".join(lines)


def seeds_targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Per pair: uniform within 1 point of free on the mean test gap; and whether the seeds can
    tell (with two or more): a mean gap two standard errors from zero is a cost (or a gain) the
    seeds resolve."""
    out = []
    for name, entry in result["pairs"].items():
        gap, n = entry["summary"]["gap_test"], len(entry["seeds"])
        out.append({"target": f"{name}: uniform widths within 1 point of free widths (mean test gap)",
                    "met": gap["mean"] <= 1.0,
                    "detail": f"{gap['mean']:+.2f} +- {gap['sem']:.2f} points, {n} seed(s)"})
        if n > 1:
            out.append({"target": f"{name}: the gap is resolved (|mean| > 2 s.e.)",
                        "met": abs(gap["mean"]) > 2 * gap["sem"],
                        "detail": f"|{gap['mean']:+.2f}| vs 2 x {gap['sem']:.2f}"})
    return out


def write_results(result: dict[str, Any], out: Path, name: str,
                  targets_of: Any, markdown_of: Any) -> None:
    """Add the targets, then write NAME.json and NAME.md under `out` (atomically) and print the table."""
    result["targets"] = targets_of(result)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / f"{name}.json", json.dumps(result, indent=1))
    write_atomic(out / f"{name}.md", markdown_of(result))
    print(markdown_of(result))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = "python benchmarks/uniform_training.py " + " ".join(sys.argv[1:])
    if args.seeds_summary is not None:
        result = {"command": command, "machine": machine(), "time": time.strftime("%Y-%m-%d %H:%M"),
                  **seeds_summary(args.seeds_summary)}
        write_results(result, args.out, "uniform_training_seeds", seeds_targets, seeds_markdown)
        return 0
    files = write_data(args)
    before = load()
    if args.train is not None or not args.measure:
        for name in args.train or DEFAULT_CELLS:
            train_cell(name, args, files)
        if args.train is not None:
            return 0
    measured = measure(args, files)
    chosen = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    result = {"command": command, "machine": machine(), "settings": chosen, "load_before": before,
              "load_after": load(), "chance": chance(files), "time": time.strftime("%Y-%m-%d %H:%M"),
              **measured}
    write_results(result, args.out, "uniform_training", targets, markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
