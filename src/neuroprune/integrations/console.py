"""What a training run shows on the console: the progress bar with a short postfix (task loss,
penalty, sparsity or FLOP fraction, heads) at every training log, one short line per evaluation,
and at the end what finalize changed and which targets were missed.

Only the console is short: every logger (TensorBoard, W&B), `trainer.state.log_history` and the
CLI's metrics.json still receive every value, per-layer sparsity and degrees included.
"""

from __future__ import annotations

import sys
from typing import Any

from tqdm.auto import tqdm
from transformers.trainer_callback import ProgressCallback

# evaluation values that are timings, not results (left to the logs)
TIMINGS = ("_runtime", "_samples_per_second", "_steps_per_second")
# a target counts as met within this many points (fractions) of it
TARGET_TOLERANCE = 0.01


def _number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _percent(value: float) -> str:
    return f"{100 * value:.2f}%"


def _flops(logs: dict[str, Any]) -> float | None:
    """The block-FLOP fraction the compacted model would have (FLOP-steered runs log it)."""
    return logs.get("flops_fraction", logs.get("flops_fraction_now"))


def structure_text(logs: dict[str, Any]) -> str:
    """Sparsity (or the FLOP fraction when the run logs one), its scheduled target, heads."""
    def scheduled(key: str) -> str:
        return f" (target now {_percent(logs[key])})" if key in logs else ""

    parts = []
    flops = _flops(logs)
    if flops is not None:
        parts.append(f"FLOPs {_percent(flops)} of dense{scheduled('target_flops_now')}")
    if "near_zero_sparsity" in logs:  # a steered run: what finalize will leave is what is steered
        parts.append(f"sparsity at finalize {_percent(logs['near_zero_sparsity'])}"
                     f"{scheduled('target_sparsity_now')}")
    elif "sparsity" in logs:
        parts.append(f"sparsity {_percent(logs['sparsity'])}")
    if "heads_kept" in logs:
        parts.append(f"heads {logs['heads_kept']}/{logs.get('heads_total', '?')}")
    return ", ".join(parts)


def loss_text(logs: dict[str, Any]) -> str:
    """The task loss, and the penalty beside it for methods that add one to the loss."""
    if "loss" not in logs:
        return ""
    penalty = f", penalty {_number(logs['penalty'])}" if "penalty" in logs else ""
    return f"task loss {_number(logs['loss'])}{penalty}"


def evaluation_line(logs: dict[str, Any], last_train: dict[str, Any], step: int, max_steps: int) -> str:
    """One evaluation in one line: its metrics (no per-layer values, no timings), the last
    training loss and penalty, the model's structure."""
    metrics = ", ".join(
        f"{key[len('eval_'):]} {_number(value)}"
        for key, value in logs.items()
        if key.startswith("eval_") and "/" not in key and not key.endswith(TIMINGS)
    )
    epoch = logs.get("epoch")
    head = f"epoch {epoch:.2f}, step {step}/{max_steps}" if isinstance(epoch, float) else f"step {step}"
    pieces = [head, f"eval: {metrics}", loss_text(last_train), structure_text(logs)]
    return " | ".join(p for p in pieces if p)


def step_postfix(logs: dict[str, Any]) -> dict[str, str]:
    """The progress bar's postfix at a training log."""
    out = {"loss": _number(logs["loss"])}
    if "penalty" in logs:
        out["penalty"] = _number(logs["penalty"])
    if _flops(logs) is not None:
        out["flops"] = _percent(_flops(logs))
    if "sparsity" in logs:
        out["sparsity"] = _percent(logs.get("near_zero_sparsity", logs["sparsity"]))
    if "heads_kept" in logs:
        out["heads"] = f"{logs['heads_kept']}/{logs.get('heads_total', '?')}"
    return out


def finalize_note(before: float, after: float, eps: float) -> str | None:
    """Why the final sparsity differs from the last one logged during training."""
    if abs(after - before) < 5e-5:
        return None
    return (
        f"finalize set the penalised weights with |w| < eps = {eps:g} to exactly 0: sparsity "
        f"{_percent(before)} during training -> {_percent(after)} in the final model (the `sparsity` "
        "logged during training counts exact zeros only)."
    )


# a controller that raised alpha / beta this many times over already pushed as hard as it can
SATURATED = 100.0


def unmet_targets(summary: dict[str, Any], steps: int | None = None,
                  initial: dict[str, float] | None = None) -> list[str]:
    """A sentence per target the run did not reach (within `TARGET_TOLERANCE`), naming the value
    reached and what to change. `summary` is `method.summary()`; `initial` the user's alpha and
    beta (the controller's starting point), to tell "too few steps" from "too weak a start"."""
    done = f" in {steps} steps" if steps else ""
    longer = "Train longer (more --epochs or more training rows)"
    out = []
    target, achieved = summary.get("target_sparsity"), summary.get("achieved_sparsity")
    if target is not None and achieved is not None and achieved < target - TARGET_TOLERANCE:
        names = [k for k in ("alpha", "beta") if summary.get(k) is not None]
        start = {k: (initial or {}).get(k) for k in names}
        raised = [summary[k] / start[k] for k in names if start[k]]
        ended = ", ".join(
            f"{k} {start[k]:.3g} -> {summary[k]:.3g}" if start[k] else f"{k} {summary[k]:.3g}" for k in names
        )
        if raised and min(raised) >= SATURATED:
            advice = (f"{longer}: the controller already raised the penalties {min(raised):,.0f}x or more "
                      f"({ended}), so the steps, not the starting weights, were too few.")
        else:
            advice = (f"{longer}, or start from a larger --alpha / --beta (the controller scales them "
                      f"from their initial values" + (f"; {ended}" if ended else "") + ").")
        out.append(f"target sparsity {_percent(target)} was not reached: the run ended at "
                   f"{_percent(achieved)}{done}. {advice}")
    target, achieved = summary.get("target_flops"), summary.get("flops_fraction")
    if target is not None and achieved is not None and achieved > target + TARGET_TOLERANCE:
        out.append(
            f"target FLOPs {_percent(target)} of dense was not reached: the compacted blocks cost "
            f"{_percent(achieved)}{done}. {longer}, or start from a larger --alpha / --beta."
        )
    target, kept = summary.get("target_heads"), summary.get("heads_kept")
    if target is not None and kept is not None and kept > target:
        out.append(
            f"target of {target} heads was not reached: {kept} heads remain{done}. {longer}, prune more "
            "often (--prune-every-steps) or start from a larger --theta."
        )
    return out


class ConsoleCallback(ProgressCallback):
    """transformers' progress bar with a short postfix instead of the full log dict printed at
    every log, one line per evaluation, and the end-of-training notes (`report_at_end`; the CLI
    prints them itself, after its summary). With `bars=False` (``disable_tqdm``) it prints the
    lines only."""

    def __init__(self, trainer: Any, bars: bool = True) -> None:
        super().__init__()
        self.trainer = trainer
        self.bars = bars
        self.last_train: dict[str, Any] = {}
        self.in_training = False
        self.report_at_end = True

    def _write(self, text: str) -> None:
        if self.training_bar is not None:
            self.training_bar.write(text, file=sys.stderr)
        else:
            tqdm.write(text, file=sys.stderr)

    def on_train_begin(self, args, state, control, **kwargs):
        self.last_train, self.in_training = {}, True
        if self.bars:
            super().on_train_begin(args, state, control, **kwargs)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bars:
            super().on_step_end(args, state, control, **kwargs)

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        if self.bars:
            super().on_prediction_step(args, state, control, eval_dataloader=eval_dataloader, **kwargs)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        if any(key.startswith("eval_") for key in logs):
            if self.in_training:  # evaluate() called by hand returns its values; nothing to print
                self._write(evaluation_line(logs, self.last_train, state.global_step, state.max_steps))
        elif "loss" in logs:
            self.last_train = dict(logs)
            if self.training_bar is not None:
                self.training_bar.set_postfix(step_postfix(logs), refresh=False)
            elif not self.bars:
                self._write(f"step {state.global_step}/{state.max_steps}: " + ", ".join(
                    f"{k} {v}" for k, v in step_postfix(logs).items()))

    def on_train_end(self, args, state, control, **kwargs):
        self.in_training = False
        if self.bars:
            super().on_train_end(args, state, control, **kwargs)
        if not state.is_world_process_zero or not self.report_at_end:
            return
        for line in end_notes(self.trainer, state.global_step):
            self._write(f"neuroprune: {line}")


def end_notes(trainer: Any, steps: int | None = None) -> list[str]:
    """What finalize changed, and a warning per missed target (see `unmet_targets`)."""
    notes = []
    finalized = getattr(trainer, "finalized", None)
    if finalized is not None:
        note = finalize_note(*finalized, trainer.method.config.eps)
        if note:
            notes.append(note)
    summary = trainer.method.summary()
    if summary.get("target_flops") is not None and "flops_fraction" not in summary:
        from neuroprune.compaction import flop_count

        summary["flops_fraction"] = flop_count(trainer.method).fraction
    initial = getattr(trainer.method, "base", None)  # penalty methods: the user's alpha and beta
    notes += [f"warning: {w}" for w in unmet_targets(summary, steps, initial)]
    return notes
