"""A training run end to end (`neuroprune train`): prepare the run folder (fresh, overwrite or
resume), train with the chosen method, evaluate, and write the final model and its numbers."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from neuroprune.compaction import flop_count
from neuroprune.distributed import is_main_process
from neuroprune.errors import ConfigError
from neuroprune.integrations.console import end_notes
from neuroprune.integrations.distill import Distiller
from neuroprune.methods import build_method
from neuroprune.run_folder import SETTINGS_FILE, SPARSITY_FILE, VERSIONS_FILE, RunDir, versions
from neuroprune.training.dataprep import encode_splits, prepare_data
from neuroprune.training.modelload import load_model, saved_task
from neuroprune.training.recorder import RunRecorder
from neuroprune.training.settings import RESUME_MAY_CHANGE, TrainSettings
from neuroprune.training.tasks import Task
from neuroprune.training.trainer_factory import build_trainer, training_arguments


def start(s: TrainSettings) -> tuple[RunDir, Path | None, list[dict[str, Any]]]:
    """Check the run folder: a fresh run, an overwrite, or a resume (returns the checkpoint and the
    metrics recorded up to it). Nothing is written here: `begin` writes the settings once the data,
    model and method are ready, so a start that fails leaves the folder as it was."""
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
        if run.final_record() is not None:
            return run, None, run.metrics()  # finished: `train_run` says so and trains nothing
        checkpoint = run.latest_checkpoint()
        if checkpoint is None:
            print(
                f"neuroprune: no complete checkpoint in {run.checkpoints}; starting from the beginning.",
                file=sys.stderr,
            )
        else:
            step = int(checkpoint.name.split("-")[-1])
            records = [r for r in run.metrics() if r.get("step", 0) <= step and not r.get("final")]
    elif is_main_process() and not s.overwrite and run.has_results():
        # rank 0 only: other ranks may already see its new files. A folder holding only settings
        # is a start that failed before saving anything: `begin` replaces them.
        raise ConfigError(
            f"{run.path} already holds a run; pass --resume to continue it, --overwrite to replace "
            "it, or choose another --output-dir."
        )
    return run, checkpoint, records


def begin(run: RunDir, s: TrainSettings) -> None:
    """Write the run's settings and versions (replacing an overwritten run's files first): called
    once everything a start can fail on has been loaded and checked."""
    if not s.resume and run.has_run():
        run.clear()  # --overwrite, or the settings of a start that failed before saving anything
    run.path.mkdir(parents=True, exist_ok=True)
    run.write(SETTINGS_FILE, s.to_dict())
    run.write(VERSIONS_FILE, versions(s.seed))


def finished_result(run: RunDir, s: TrainSettings, quiet: bool = False) -> RunResult:
    """`--resume` of a run that already finished: nothing to train; its saved final numbers."""
    records = run.metrics()
    final = run.final_record() or {}
    if not quiet:
        print(
            f"neuroprune: {run.path} holds a finished run (final record at step {final.get('step')}); "
            f"nothing to resume. Its model is in {run.model}; pass --overwrite to train it again, or "
            "another --output-dir.",
            file=sys.stderr,
        )
    task = saved_task(run.model_dir(), s.task, s.task_name)
    test = {k: v for k, v in final.items() if k.startswith("test_")} or None
    metrics = {k: v for k, v in final.items() if not k.startswith("test_")}
    sparsity = run.sparsity() or {}
    return RunResult(run.path, task, metrics, test, sparsity, float(final.get("wall_clock_s", 0.0)), records)


@dataclass
class RunResult:
    run_dir: Path
    task: Task
    metrics: dict[str, Any]  # final evaluation (after finalize)
    test_metrics: dict[str, Any] | None
    sparsity: dict[str, Any]
    train_seconds: float
    records: list[dict[str, Any]]
    notes: list[str] = field(default_factory=list)  # what finalize changed; a warning per missed target


def train_run(s: TrainSettings, callbacks: list | None = None, quiet: bool = False) -> RunResult:
    """Run `neuroprune train` with resolved settings; returns the final numbers."""
    import transformers

    run, checkpoint, records = start(s)
    if s.resume and run.final_record() is not None:
        return finished_result(run, s, quiet)
    transformers.set_seed(s.seed)
    splits, task, fields = prepare_data(s)
    model, tokenizer = load_model(s.model, task)
    method = build_method(s.method, model, s.method_config(), s.flop_target() or s.target_sparsity,
                          s.prune_every_steps, target_heads=s.target_heads)
    distiller = (Distiller.from_source(s.distill_from, model, tokenizer, s.distill_temperature,
                                       s.distill_weight, s.distill_hidden_weight)
                 if s.distill_from else None)  # refused here, before any training, if it cannot teach
    encoded = encode_splits(s, splits, task, fields, tokenizer)
    begin(run, s)
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
    if trainer.console is not None:
        trainer.console.report_at_end = False  # printed below, after the final numbers
    t0 = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    train_seconds = time.perf_counter() - t0 + elapsed
    trainer.remove_callback(recorder)  # the final record is added below, once, marked final
    final: dict[str, Any] = trainer.evaluate() if "validation" in encoded else {}  # finalised model
    test = None
    if "test" in encoded and "labels" in encoded["test"].column_names:
        test = trainer.evaluate(encoded["test"], metric_key_prefix="test")
    notes = end_notes(trainer, trainer.state.global_step)
    missed = [n for n in notes if n.startswith("warning: ")]
    recorder.add(
        {**trainer.method.log_values(), **final, **(test or {}),
         **({"warnings": " ".join(missed)} if missed else {})},
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
        print(f"once compacted (neuroprune compact): {figures['params_compacted']:,} of "
              f"{figures['params_dense']:,} parameters, {figures['flops_fraction']:.1%} of the dense "
              f"block FLOPs, {figures['heads_compacted']} of {report.heads_total} heads")
        for note in notes:
            print(f"neuroprune: {note}", file=sys.stderr)
    return RunResult(run.path, task, final, test, figures, train_seconds, recorder.records, notes)
