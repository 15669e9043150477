"""Ask for a sparsity instead of sweeping alpha and beta: a target schedule and a feedback
controller for the penalty strength.

The paper has no way to ask for "90%": sparsity is whatever alpha, beta and theta produce. Here the
target is ramped from 0 to the requested level with the cubic schedule of Zhu & Gupta (2017)
(fast early, gentle at the end, when the network has the least slack), and the penalty weights are
scaled by one common factor, updated every step from the *measured* sparsity:

    e_t          = target_t - measured_t                       (fractions, not percent)
    log_scale_t  = clamp(log_scale_{t-1} + clamp(ki * e_t, +-max_rate))      integral part
    alpha_t      = alpha * exp(log_scale_t + kp * e_t),  beta_t likewise    proportional part

i.e. a PI controller acting on log(alpha): multiplicative updates, so it crosses orders of
magnitude in a few dozen steps, and the ratio beta/alpha the user chose is kept.

The measured value is the method.md section 5 measure as `finalize()` would make it *now*: the
fraction of entries of the regularised matrices with |w| < eps (the ones finalize zeroes), counted
against the dense shapes, so removed heads and neurons count as zeros. No post-hoc magnitude cut
is ever made: when training ends at the target, finalize only zeroes what is already below eps.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from neuroprune.errors import ConfigError


def cubic_schedule(
    step: int, total_steps: int, final: float, initial: float = 0.0, begin: float = 0.0, end: float = 0.75
) -> float:
    """Zhu & Gupta (2017), eq. 1: s_t = s_f + (s_i - s_f) * (1 - p)^3, where p is the progress
    through the ramp, which runs from fraction `begin` to fraction `end` of `total_steps`.
    Before the ramp: `initial`; after it: `final`."""
    start, stop = begin * total_steps, end * total_steps
    if step <= start:
        return initial
    if step >= stop or stop <= start:
        return final
    progress = (step - start) / (stop - start)
    return final + (initial - final) * (1.0 - progress) ** 3


def count_of(
    counts: dict[str, tuple[int, int]], kinds: set[str] | frozenset[str] | None = None
) -> tuple[int, int]:
    """(zeros, entries) of the matrix kinds `kinds` (all when None) in `ModelIndex.near_zero_by_kind`
    counts."""
    picked = [v for k, v in counts.items() if kinds is None or k in kinds]
    return sum(z for z, _ in picked), sum(t for _, t in picked)


def fraction(counts: dict[str, tuple[int, int]], kinds: set[str] | frozenset[str] | None = None) -> float:
    """Zeros over entries of the matrix kinds `kinds` (all when None)."""
    zeros, total = count_of(counts, kinds)
    return zeros / total if total else 0.0


FLOP_KINDS = ("neurons", "heads", "inputs")  # structural units a FLOP target may remove
HEAD_CHOICES = ("redundancy", "importance")


@dataclass
class SparsityTarget:
    """What to steer to, and how: a sparsity (the paper's axis, the controller below) or a FLOP
    budget (`flops`, the structural selection of `neuroprune.methods.structural`). Exactly one of
    the two is given.

    Attributes:
        sparsity: requested final sparsity (fraction in [0, 1), section 5 measure).
        ramp_begin, ramp_end: fractions of training over which the target is ramped up (cubic);
            the remaining steps hold it, so the run settles before finalize.
        kp, ki: proportional and integral gains on log(scale), in nats per unit of error.
        max_rate: largest change of log(scale) per step from the integral part (keeps the loop
            stable when the error is large early on).
        min_scale, max_scale: bounds of the factor applied to alpha and beta.
        hold: keep what the penalty removed: exact zeros stay zero (re-imposed after every
            optimiser step) and the proximal step pauses while the measured sparsity is at or
            above the scheduled target, so surviving weights are not shrunk beyond what the target
            needs and recover during the hold phase. False: the penalty acts every step and the
            controller alone balances it against the optimiser reviving weights.
        step: "soft" (default): the proximal step shrinks every weight by lr * dR/dw and zeroes
            those it takes across zero. "hard": it only zeroes those, leaving the survivors
            unshrunk (the penalty's gradient then sets a per-weight threshold: low-degree MLP rows
            and weak attention input groups have the highest).
        limit_step: the proximal step never takes a part past its scheduled share of the target:
            where the step at the current penalty weights would put more entries below eps than
            the schedule allows at this step, it is shortened (lr times a factor c < 1, found
            exactly from the step length at which each weight would cross eps). Why: while the
            weights are still far from zero the integral part keeps raising the weights, and in a
            short run the first step that reaches them removes far too much at once (SmolLM2, 25
            steps: 60.9% at a 50% target, 93.7% at 90%). The penalty still decides which weights
            go; the limit only decides how far one step may go.
        heads: optionally, the number of query heads to end with (NeuroPrune only). Ramped from
            all heads to this number on the same cubic schedule; every head-pruning pass takes the
            largest theta that keeps at least the scheduled number (`NeuroPrune.theta_for_heads`),
            so heads go in order of redundancy and the count ends at or just above the target.
        flops: instead of a sparsity: the cost of the compacted attention + MLP blocks at
            `seq_len` tokens, as a fraction of the dense blocks' (0.5: half the FLOPs; 1: nothing
            removed), counted as `compaction.flop_count` counts it. Reached by removing whole
            neurons, key/value groups and attention input dims on the cubic schedule (from 1 to
            `flops` over the ramp), every `select_every` steps; the rest train freely.
        seq_len: sequence length at which FLOPs are counted (attention scores grow with it).
        select_every: steps between two structural selections (0: about 20 inside the ramp).
        kinds: which structural units a FLOP target may remove (subset of `FLOP_KINDS`).
        heads_by: which key/value groups go once the budget says how many per block:
            "redundancy" (NeuroPrune's dominating-set pass with theta steered to that number,
            the rest by importance) or "importance" (lowest score first).
        uniform: with `flops`: every layer loses the same number of MLP neurons and of key/value
            groups (each layer its own lowest-scoring ones) and no attention input dims, so that
            `compact --uniform` (`compaction.compact_uniform`) saves the model the family's stock
            class loads with no padding. Refused for families whose stock config cannot describe
            uniformly narrower layers (the check `compact_uniform` makes).
    """

    sparsity: float | None = None
    ramp_begin: float = 0.0
    ramp_end: float = 0.7
    kp: float = 2.0
    ki: float = 20.0
    max_rate: float = 0.5
    min_scale: float = 1e-4
    max_scale: float = 1e8
    hold: bool = True
    step: str = "soft"
    limit_step: bool = True
    heads: int | None = None
    flops: float | None = None
    seq_len: int = 128
    select_every: int = 0
    kinds: tuple[str, ...] = FLOP_KINDS
    heads_by: str = "redundancy"
    uniform: bool = False

    def __post_init__(self) -> None:
        self.kinds = tuple(self.kinds)  # a list after a JSON round trip (checkpoints)
        s, f = self.sparsity, self.flops
        if (s is None) == (f is None):
            raise ConfigError(
                "give exactly one target: a sparsity (--target-sparsity, e.g. 0.9) or a fraction of "
                f"the dense blocks' FLOPs (--target-flops, e.g. 0.5); got sparsity={s!r}, flops={f!r}."
            )
        if s is not None and (isinstance(s, bool) or not isinstance(s, (int, float)) or not 0.0 <= s < 1.0):
            raise ConfigError(
                f"target sparsity must be a fraction in [0, 1) (e.g. 0.9 for 90%), got {s!r}."
            )
        if f is not None:
            self._check_flops(f)
        if not 0.0 <= self.ramp_begin <= self.ramp_end <= 1.0:
            raise ConfigError(
                f"need 0 <= ramp_begin <= ramp_end <= 1, got {self.ramp_begin} and {self.ramp_end}."
            )
        if not isinstance(self.uniform, bool):
            raise ConfigError(f"uniform must be true or false, got {self.uniform!r}.")
        if self.uniform and f is None:
            raise ConfigError(
                "uniform widths (--uniform-widths) shape the structural selection of a FLOP target: "
                "give --target-flops F instead of --target-sparsity."
            )
        h = self.heads
        if h is not None and (isinstance(h, bool) or not isinstance(h, int) or h < 1):
            raise ConfigError(f"target number of heads must be a positive whole number, got {h!r}.")
        if self.step not in ("soft", "hard"):
            raise ConfigError(f"proximal step must be 'soft' or 'hard', got {self.step!r}.")
        if self.kp < 0 or self.ki <= 0 or self.max_rate <= 0 or not 0 < self.min_scale < self.max_scale:
            raise ConfigError(
                "controller gains must be kp >= 0, ki > 0, max_rate > 0 and 0 < min_scale < max_scale."
            )

    def _check_flops(self, f: Any) -> None:
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 < f <= 1.0:
            raise ConfigError(
                f"target FLOPs must be a fraction of the dense blocks' FLOPs in (0, 1] (e.g. 0.5 for "
                f"half the cost), got {f!r}."
            )
        if self.heads is not None:
            raise ConfigError(
                "a target number of heads goes with --target-sparsity; under --target-flops the FLOP "
                "budget decides how many heads go: drop --target-heads."
            )
        for name, least in (("seq_len", 1), ("select_every", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ConfigError(f"{name} must be a whole number >= {least}, got {value!r}.")
        unknown = sorted(set(self.kinds) - set(FLOP_KINDS))
        if unknown or not self.kinds:
            raise ConfigError(f"kinds {list(self.kinds)!r}: choose one or more of {', '.join(FLOP_KINDS)}.")
        if self.heads_by not in HEAD_CHOICES:
            raise ConfigError(f"heads_by must be one of {', '.join(HEAD_CHOICES)}, got {self.heads_by!r}.")

    def flops_at(self, step: int, total_steps: int) -> float:
        """The scheduled FLOP fraction for `step`: cubic from 1 (dense) to `flops` over the ramp."""
        return cubic_schedule(step, total_steps, self.flops, 1.0, self.ramp_begin, self.ramp_end)


@dataclass
class TargetController:
    """Feedback loop of `SparsityTarget`; `update()` once per optimiser step returns the factor
    by which the user's alpha and beta are multiplied for the next step."""

    settings: SparsityTarget
    log_scale: float = 0.0
    history: list[dict[str, float]] = field(default_factory=list)

    def target_at(self, step: int, total_steps: int) -> float:
        s = self.settings
        return cubic_schedule(step, total_steps, s.sparsity, 0.0, s.ramp_begin, s.ramp_end)

    def update(self, step: int, total_steps: int, measured: float, target: float | None = None,
               steps: int = 1) -> float:
        """`target` overrides the schedule's value for this step (a part of the model steered to
        its share of the overall target). `steps`: optimiser steps since the last update (a
        method that measures every k steps), each integrating this error."""
        s = self.settings
        target = self.target_at(step, total_steps) if target is None else target
        error = target - measured
        self.log_scale += steps * max(-s.max_rate, min(s.max_rate, s.ki * error))
        low, high = math.log(s.min_scale), math.log(s.max_scale)
        self.log_scale = max(low, min(high, self.log_scale))
        scale = math.exp(max(low, min(high, self.log_scale + s.kp * error)))
        self.history.append({"step": step, "target": target, "measured": measured, "scale": scale})
        return scale

    def state_dict(self) -> dict[str, Any]:
        return {"settings": asdict(self.settings), "log_scale": self.log_scale, "history": self.history}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> TargetController:
        return cls(SparsityTarget(**state["settings"]), state["log_scale"], list(state.get("history", [])))
