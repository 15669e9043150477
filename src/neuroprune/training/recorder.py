"""Metrics recording: one record per evaluation in a run folder's metrics.json."""

from __future__ import annotations

import time
from typing import Any

from transformers import TrainerCallback

from neuroprune.run_folder import METRICS_FILE, RunDir


class RunRecorder(TrainerCallback):
    """Appends one record per evaluation to metrics.json (rewritten atomically each time)."""

    def __init__(self, run: RunDir, records: list[dict[str, Any]], elapsed_before: float = 0.0) -> None:
        self.run = run
        self.records = records
        self.start = time.perf_counter() - elapsed_before
        self.train_loss: float | None = None  # the task loss (the penalty is logged apart)
        self.train_penalty: float | None = None  # only for methods that add one to the loss
        self.values: Any = None  # the method's `log_values`, for records without an evaluation

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.train_loss = float(logs["loss"])
            self.train_penalty = float(logs["penalty"]) if "penalty" in logs else None

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
            **({"train_penalty": self.train_penalty} if self.train_penalty is not None else {}),
            "wall_clock_s": round(time.perf_counter() - self.start, 2),
            **extra,
        }
        self.records.append(record)
        self.run.write(METRICS_FILE, self.records)
        return record
