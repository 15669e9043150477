"""A training run end to end (`neuroprune train`): prepare the run folder (fresh, overwrite or
resume), train with the chosen method, evaluate, and write the final model and its numbers."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from neuroprune.compaction import flop_count
from neuroprune.distributed import is_main_process
from neuroprune.errors import ConfigError
from neuroprune.integrations.distill import Distiller
from neuroprune.methods import build_method
from neuroprune.run_folder import SETTINGS_FILE, SPARSITY_FILE, VERSIONS_FILE, RunDir, versions
from neuroprune.training.dataprep import encode_splits, prepare_data
from neuroprune.training.modelload import load_model
from neuroprune.training.recorder import RunRecorder
from neuroprune.training.settings import RESUME_MAY_CHANGE, TrainSettings
from neuroprune.training.tasks import Task
from neuroprune.training.trainer_factory import build_trainer, training_arguments


def start(s: TrainSettings) -> tuple[RunDir, Path | None, list[dict[str, Any]]]:
    """Prepare the run folder: a fresh run, an overwrite, or a resume (returns the checkpoint and
    the metrics recorded up to it)."""
    s.validate()
    if not (s.dataset or s.train_file):
        raise ConfigError("no training data: pass --train-file FILE (or --dataset NAME).")
    run = RunDir(s.output_dir)
    checkpoint = None
    records: list[dict[str, Any]] = []
    if s.resume:
        saved = run.settings()
        if saved:
            changed = sorted(
                k
                for k, v in s.to_dict().items()
                if k not in RESUME_MAY_CHANGE and k in saved and saved[k] != v
            )
            if changed:
                raise ConfigError(
                    f"--resume with settings that differ from the run in {run.path}: "
                    + ", ".join(f"{k}={s.to_dict()[k]!r} (run has {saved[k]!r})" for k in changed)
                    + "; resume with the same settings or start a new --output-dir."
                )
        checkpoint = run.latest_checkpoint()
        if checkpoint is None:
            print(
                f"neuroprune: no complete checkpoint in {run.checkpoints}; starting from the beginning.",
                file=sys.stderr,
            )
        else:
            step = int(checkpoint.name.split("-")[-1])
            records = [r for r in run.metrics() if r.get("step", 0) <= step]
    elif run.has_run() and is_main_process():  # other ranks may already see rank 0's new run_config.json
        if not s.overwrite:
            raise ConfigError(
                f"{run.path} already holds a run; pass --resume to continue it, --overwrite to replace "
                "it, or choose another --output-dir."
            )
        run.clear()
    run.path.mkdir(parents=True, exist_ok=True)
    run.write(SETTINGS_FILE, s.to_dict())
    run.write(VERSIONS_FILE, versions(s.seed))
    return run, checkpoint, records


@dataclass
class RunResult:
    run_dir: Path
    task: Task
    metrics: dict[str, Any]  # final evaluation (after finalize)
    test_metrics: dict[str, Any] | None
    sparsity: dict[str, Any]
    train_seconds: float
    records: list[dict[str, Any]]


def train_run(s: TrainSettings, callbacks: list | None = None, quiet: bool = False) -> RunResult:
    """Run `neuroprune train` with resolved settings; returns the final numbers."""
    import transformers

    run, checkpoint, records = start(s)
    transformers.set_seed(s.seed)
    splits, task, fields = prepare_data(s)
    model, tokenizer = load_model(s.model, task)
    method = build_method(s.method, model, s.method_config(), s.target_sparsity, s.prune_every_steps,
                          target_heads=s.target_heads, target_flops=s.target_flops)
    distiller = (Distiller.from_source(s.distill_from, model, tokenizer, s.distill_temperature,
                                       s.distill_weight, s.distill_hidden_weight)
                 if s.distill_from else None)  # refused here, before any training, if it cannot teach
    encoded = encode_splits(s, splits, task, fields, tokenizer)
    args = training_arguments(s, run, task, "validation" in encoded)
    elapsed = records[-1]["wall_clock_s"] if records else 0.0
    recorder = RunRecorder(run, records, elapsed)
    trainer = build_trainer(
        model,
        tokenizer,
        task,
        args,
        encoded,
        method,
        [recorder, *(callbacks or [])],
        distiller=distiller,
    )
    recorder.values = trainer.method.log_values
    t0 = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    train_seconds = time.perf_counter() - t0 + elapsed
    trainer.remove_callback(recorder)  # the final record is added below, once, marked final
    final: dict[str, Any] = trainer.evaluate() if "validation" in encoded else {}  # finalised model
    test = None
    if "test" in encoded and "labels" in encoded["test"].column_names:
        test = trainer.evaluate(encoded["test"], metric_key_prefix="test")
    recorder.add(
        {**trainer.method.log_values(), **final, **(test or {})},
        trainer.state.epoch,
        trainer.state.global_step,
        final=True,
        **method.summary(),
    )
    report = method.sparsity_report()
    figures = {**report.to_dict(), **flop_count(method).to_dict()}  # size and cost once compacted
    run.write(SPARSITY_FILE, {**figures, **method.summary()})
    if is_main_process():
        method.save_pretrained(run.model, tokenizer)
    if not quiet:
        print(report.to_markdown().split("\n")[0])
    return RunResult(run.path, task, final, test, figures, train_seconds, recorder.records)
