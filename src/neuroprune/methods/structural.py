"""Structural selection to a FLOP budget: score whole units (MLP neurons, key/value groups,
attention input dims), remove the lowest-scoring ones until the compacted blocks cost what the
schedule allows, and hold them removed with masks.

Why: element sparsity counts scattered zeros that `compact` cannot remove, and a proximal step
shrinks every surviving weight on the way (issue 14). Here a unit is either removed (its weights
exact zeros, re-imposed after every optimiser step, so `compact` removes it) or untouched: the
survivors train freely. How much a removal saves is read from `compaction.plan`, the decisions
`compact` makes, so the FLOP fraction steered is the one the compacted model has.

The method supplies the scores (`Scorer`): NeuroPrune uses its paper's mechanisms
(`NeuroPrune.unit_scores`), the structured-magnitude baseline plain norms (`structured.magnitude_scores`).
Scores of different kinds are made comparable by dividing each kind's scores by their mean over
the units still present (a unit scoring half its kind's average goes before one scoring 0.9 of
its own), so the split of the budget between neurons, heads and input dims is decided by the
scores, not fixed in advance.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from neuroprune.compaction import CompactionPlan, CompactionRule, compact_uniform, plan, to_host
from neuroprune.errors import ConfigError, UnsupportedArchitectureError
from neuroprune.methods.steering import SparsityTarget
from neuroprune.model.flops import (
    AttentionShape,
    MLPShape,
    dense_flops,
    original_attention,
    original_mlp,
    planned_attention,
    planned_flops,
    planned_mlp,
)
from neuroprune.model.index import ModelIndex
from neuroprune.model.structure import projections
from neuroprune.model.surgery import is_transposed, weight_matrix
from neuroprune.model.units import AttentionUnit

SELECTIONS_PER_RAMP = 20  # default number of selections inside the ramp
CORRECTION_ROUNDS = 4  # re-selections when the plan says a round removed less than estimated
TOLERANCE = 0.002  # of the dense FLOPs: close enough to the scheduled budget
LANDING = 0.01  # of the dense FLOPs: how far below the final target a removal may take the model


@dataclass
class UnitScores:
    """Importance of every present unit (higher = keep), current positions: one tensor per MLP
    (per neuron) and per attention block (per key/value group, and per input dim)."""

    neurons: list[torch.Tensor]
    groups: list[torch.Tensor]
    inputs: list[torch.Tensor]


Scorer = Callable[[ModelIndex], UnitScores]


@dataclass
class Removed:
    """Units removed so far, by kind and block (positions in the current shapes; training does
    no surgery in this mode, so they stay valid), JSON-serialisable."""

    neurons: dict[int, list[int]] = field(default_factory=dict)
    groups: dict[int, list[int]] = field(default_factory=dict)
    inputs: dict[int, list[int]] = field(default_factory=dict)

    def add(self, kind: str, block: int, positions: list[int]) -> None:
        table = getattr(self, kind)
        table[block] = sorted(set(table.get(block, [])) | set(positions))

    def to_dict(self) -> dict[str, dict[str, list[int]]]:
        return {k: {str(b): v for b, v in getattr(self, k).items()} for k in ("neurons", "groups", "inputs")}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Removed:
        return cls(**{k: {int(b): list(v) for b, v in data.get(k, {}).items()}
                      for k in ("neurons", "groups", "inputs")})


# --- scores -----------------------------------------------------------------------------------

def alive_rows(unit: AttentionUnit, removed_groups: list[int]) -> tuple[torch.Tensor, ...]:
    """The Q, K, V rows (head-major, `(rows, in)`) of the groups still present (under
    multi-query attention the shared key/value head, whichever groups remain)."""
    keep = [g for g in range(unit.num_kv_heads) if g not in set(removed_groups)] or [0]
    q, k, v = (m.detach() for m in unit.qkv_matrices())
    kv = unit.kv_rows(keep)
    return q[unit.query_rows(keep)], k[kv], v[kv]


# --- selection --------------------------------------------------------------------------------

@dataclass
class Candidate:
    """One removal: a unit, or (uniform widths) a rank slice, the r-th lowest-scoring present unit
    of its kind in every block at once, scored by their mean."""

    score: float
    kind: str
    units: list[tuple[int, int]]  # (block, position)


def _round_up(kept: int, multiple: int) -> int:
    """The neurons `compact` keeps when `kept` are alive (`compaction._round_up_kept`)."""
    return max(multiple, -(-kept // multiple) * multiple)


class _Budget:
    """What removing one more unit of a block saves, given what was taken so far (exact for the
    rounding of kept neurons and the input-gather threshold; groups and inputs of the same block
    interact, which the caller's re-selection corrects)."""

    def __init__(self, index: ModelIndex, now: Any, seq_len: int, rule: CompactionRule, removed: Removed,
                 input_scores: list[list[float]]) -> None:
        two = 2 * seq_len
        self.rule = rule
        self.neuron_cost, self.neurons_left, self.neurons_gone = [], [], []
        for b, p in enumerate(now.mlps):
            shape = planned_mlp(p)
            self.neuron_cost.append(two * (shape.d_in * shape.expand + shape.rows))
            gone = set(removed.neurons.get(b, [])) | set(p.dead_neurons)  # read with the plan's one copy
            self.neurons_gone.append(gone)
            self.neurons_left.append(p.removable.numel() - len(gone))
        self.group_cost, self.groups_left, self.groups_gone = [], [], []
        self.input_cost, self.inputs_left, self.inputs_gone, self.width, self.gathered = [], [], [], [], []
        for b, p in enumerate(now.attention):
            unit, shape = p.unit, planned_attention(p)
            group_q = unit.group_size * unit.head_dim
            group_kv = 0 if unit.multi_query else unit.head_dim  # multi-query: the k/v head is shared
            projections_ = shape.d_in * (group_q + 2 * group_kv) + group_q * shape.d_out
            self.group_cost.append(two * projections_ + 4 * seq_len**2 * group_q)
            gone = set(removed.groups.get(b, []))
            if p.keep_groups is not None:
                gone |= set(range(unit.num_kv_heads)) - set(p.keep_groups)
            self.groups_gone.append(gone)
            refused = getattr(unit, "head_removal_refused", None)  # compact keeps such heads
            self.groups_left.append(1 if refused else unit.num_kv_heads - len(gone))
            self.input_cost.append(two * (shape.q_rows + 2 * shape.kv_rows))
            dead = set(removed.inputs.get(b, [])) | {i for i, v in enumerate(input_scores[b]) if v == 0}
            self.inputs_gone.append(dead)
            self.width.append(len(input_scores[b]))
            self.inputs_left.append(self.width[b] - len(dead))
            self.gathered.append(p.keep_inputs is not None)

    def gone(self, kind: str, block: int) -> set[int]:
        return getattr(self, f"{kind}_gone")[block]

    def saving(self, kind: str, b: int) -> int | None:
        """FLOPs saved by taking one more unit of `kind` in block `b` (None: the block must keep
        what it has: one group, one input dim, one neuron)."""
        if kind == "neurons":
            left, m = self.neurons_left[b], self.rule.multiple_of
            return None if left <= 1 else self.neuron_cost[b] * (_round_up(left, m) - _round_up(left - 1, m))
        if kind == "groups":
            return None if self.groups_left[b] <= 1 else self.group_cost[b]
        left, width = self.inputs_left[b], self.width[b]
        if left <= 1:
            return None
        if self.gathered[b]:
            return self.input_cost[b]
        dead_after = width - left + 1
        threshold = math.ceil(self.rule.min_input_fraction * width - 1e-9)
        if dead_after < threshold:
            return 0
        return self.input_cost[b] * (dead_after if dead_after == threshold else 1)

    def take(self, kind: str, b: int) -> None:
        getattr(self, f"{kind}_left")[b] -= 1

    def gain(self, c: Candidate) -> int | None:
        """What taking all of `c`'s units saves (None: one of its blocks must keep what it has)."""
        savings = [self.saving(c.kind, b) for b, _ in c.units]
        return None if None in savings else sum(savings)

    def take_all(self, c: Candidate) -> None:
        for b, _ in c.units:
            self.take(c.kind, b)

    def below_threshold(self, b: int) -> bool:
        threshold = math.ceil(self.rule.min_input_fraction * self.width[b] - 1e-9)
        return not self.gathered[b] and self.width[b] - self.inputs_left[b] < threshold


def select_to_budget(index: ModelIndex, scores: UnitScores, budget: int, seq_len: int,
                     rule: CompactionRule, kinds: tuple[str, ...], removed: Removed,
                     floor: int | None = None, now: CompactionPlan | None = None,
                     uniform: bool = False) -> Removed:
    """The lowest-scoring present units whose removal brings the planned compacted block FLOPs
    down to `budget`. A unit whose removal would take them below `floor` (the final budget, less a
    tolerance) is skipped, so the run can land on its target although a head may cost 10% of a
    tiny model. Each block keeps at least one group, one input dim and one neuron. Input dims are
    kept in blocks where too few of them go for `compact` to gather the input
    (`rule.min_input_fraction`): there removing them would save nothing. `now`: the current
    `plan(index, rule)` if the caller has it (a plan costs more than the selection itself).
    `uniform`: candidates are rank slices (`Candidate`), so every block loses as many units of a
    kind as every other; no input dims (a stock config cannot describe gathered inputs)."""
    now = plan(index, rule) if now is None else now
    planned = planned_flops(now, seq_len)
    need = planned - budget
    chosen = Removed()
    if need <= 0:
        return chosen
    room = planned - (budget if floor is None else min(floor, budget))
    host = _host_scores(scores)  # one device read for every score
    account = _Budget(index, now, seq_len, rule, removed, host["inputs"])
    candidates: list[Candidate] = []
    for kind in ("neurons", "groups", "inputs"):
        if (kind if kind != "groups" else "heads") not in kinds or (uniform and kind == "inputs"):
            continue
        per_block = [_of_kind(values, account.gone(kind, b), kind, b) for b, values in enumerate(host[kind])]
        candidates += _slices(per_block, kind) if uniform else [c for block in per_block for c in block]
    candidates.sort(key=lambda c: c.score)
    saved = 0
    too_big: list[Candidate] = []
    taken: dict[tuple[str, int], list[int]] = {}  # added to `chosen` at the end (one sort each)
    for c in candidates:
        if saved >= need:
            break
        gain = account.gain(c)
        if gain is not None and saved + gain > room:
            too_big.append(c)
        if gain is None or saved + gain > room:
            continue
        account.take_all(c)
        saved += gain
        for b, position in c.units:
            taken.setdefault((c.kind, b), []).append(position)
    for (kind, block), positions in taken.items():
        chosen.add(kind, block, positions)
    if saved < need and too_big:  # coarse units left: take the one that lands closest, if closer
        gains = [(account.gain(c), c) for c in too_big]
        gain, c = min(((g, c) for g, c in gains if g is not None), key=lambda x: x[0], default=(None, None))
        if gain is not None and saved + gain - need < need - saved:
            account.take_all(c)
            for b, position in c.units:
                chosen.add(c.kind, b, [position])
    for b in list(chosen.inputs):
        if account.below_threshold(b):
            del chosen.inputs[b]
    return chosen


def _host_scores(scores: UnitScores) -> dict[str, list[list[float]]]:
    """Every block's scores of every kind as host lists (float64), read back in one copy."""
    kinds = ("neurons", "groups", "inputs")
    flat = iter(to_host([t for kind in kinds for t in getattr(scores, kind)], torch.float64))
    return {kind: [next(flat) for _ in getattr(scores, kind)] for kind in kinds}


def _of_kind(values: list[float], gone: set[int], kind: str, block: int) -> list[Candidate]:
    return [Candidate(v, kind, [(block, i)]) for i, v in enumerate(values) if i not in gone]


def _slices(per_block: list[list[Candidate]], kind: str) -> list[Candidate]:
    """Rank slices of the present units of every block (lowest first in each): slice r holds each
    block's r-th lowest, scored by their mean (non-decreasing in r, so slices go in rank order)."""
    if not per_block:
        return []
    ranked = [sorted(block, key=lambda c: c.score) for block in per_block]
    depth = min(len(block) for block in ranked)
    return [Candidate(sum(block[r].score for block in ranked) / len(ranked), kind,
                      [block[r].units[0] for block in ranked]) for r in range(depth)]


def normalise(scores: UnitScores, removed: Removed) -> UnitScores:
    """Each kind's scores divided by their mean over the units still present (model-wide)."""
    out = {}
    for kind in ("neurons", "groups", "inputs"):
        tensors = [t.detach().double() for t in getattr(scores, kind)]
        values = torch.zeros(0, dtype=torch.float64)
        if tensors:  # the present units of all blocks by one boolean index (one host read, not one a block)
            gone, start = [], 0
            for b, t in enumerate(tensors):
                gone += [start + i for i in getattr(removed, kind).get(b, [])]
                start += t.numel()
            values = torch.cat([t.reshape(-1) for t in tensors])
            mask = torch.ones_like(values, dtype=torch.bool)
            mask[gone] = False
            values = values[mask]
        mean = values.mean() if values.numel() else torch.ones((), dtype=torch.float64)
        mean = torch.where(mean > 0, mean, torch.ones_like(mean))  # on the device: no host read
        out[kind] = [t / mean for t in tensors]
    return UnitScores(out["neurons"], out["groups"], out["inputs"])


# --- masks ------------------------------------------------------------------------------------

class StructureMasks:
    """Keep-masks of the weights that hold removed units at zero: a neuron's expand rows (both
    halves of a fused [gate | up] projection) and contract column; a group's Q rows, its own K and
    V rows (not the key/value head multi-query attention shares) and per-head projection rows,
    in whichever projection holds them (fused [q | k | v] too), and its output-projection
    columns; an input dim's q/k/v columns. Every mask is whole rows and whole columns, so it is
    kept as a row factor and a column factor (0/1 vectors in the weight's dtype) and applied
    after every optimiser step by two multi-tensor multiplies (no per-matrix Python work; 4x
    faster than a boolean mask's mixed-dtype multiply on CPU, and a vector per matrix in memory
    instead of a byte per weight)."""

    def __init__(self, index: ModelIndex) -> None:
        self.index = index
        self.params: list[torch.nn.Parameter] = []
        self._rows: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])  # params, (n, 1) factors
        self._cols: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])  # params, (1, m) factors

    @torch.no_grad()
    def build(self, removed: Removed) -> None:
        masks: dict[int, tuple[torch.nn.Parameter, torch.Tensor]] = {}

        def view(module: torch.nn.Module) -> torch.Tensor:
            if id(module.weight) not in masks:
                masks[id(module.weight)] = (module.weight, torch.ones_like(module.weight, dtype=torch.bool))
            mask = masks[id(module.weight)][1]
            return mask.t() if is_transposed(module) else mask

        for b, positions in removed.neurons.items():
            unit = self.index.mlps[b]
            rows = torch.as_tensor(positions, dtype=torch.long)
            if unit.fused:  # one [gate | up] projection: neuron i owns rows i and n + i
                rows = torch.cat([rows, rows + weight_matrix(unit.up).shape[0] // 2])
            for module in (unit.gate, unit.up):
                if module is not None:
                    view(module)[rows] = False
            view(unit.down)[:, positions] = False
        for b, positions in removed.groups.items():
            unit = self.index.attention[b]
            q_rows = unit.query_rows(positions)
            kv_rows = None if unit.multi_query else unit.kv_rows(positions)  # multi-query: K/V shared
            if unit.qkv is not None:  # the group's rows wherever the layout puts them
                fq, fk, fv = unit.fused_rows()
                view(unit.qkv)[fq[q_rows] if kv_rows is None else torch.cat([fq[q_rows], fk[kv_rows],
                                                                             fv[kv_rows]])] = False
            else:
                view(unit.q)[q_rows] = False
                if kv_rows is not None:
                    view(unit.k)[kv_rows] = False
                    view(unit.v)[kv_rows] = False
            for module in unit.head_projections:  # per-head positional rows (DeBERTa)
                view(module)[q_rows] = False
            view(unit.o)[:, q_rows] = False
        for b, positions in removed.inputs.items():
            for module in projections(self.index.attention[b]):
                view(module)[:, positions] = False
        self.params = [p for p, _ in masks.values()]
        self._rows, self._cols = ([], []), ([], [])
        entries = [(param, keep.any(1), keep.any(0), keep) for param, keep in masks.values()]
        checks = [f.to(entries[0][0].device) for _, rows, cols, keep in entries
                  for f in ((keep == (rows[:, None] & cols[None, :])).all(), rows.all(), cols.all())]
        flags = iter(torch.stack(checks).tolist() if checks else [])  # one host read for all matrices
        for param, rows, cols, _ in entries:  # keep = rows x cols (all False: both all False)
            if not next(flags):  # not reachable by build
                raise AssertionError("a structure mask is not whole rows and columns")
            for found, (params, factors), shape in ((rows, self._rows, (-1, 1)), (cols, self._cols, (1, -1))):
                if not next(flags):
                    params.append(param)
                    factors.append(found.to(param.dtype).reshape(shape))

    @torch.no_grad()
    def apply(self) -> None:
        for params, factors in (self._rows, self._cols):
            if params:
                torch._foreach_mul_(params, factors)


# --- the schedule -----------------------------------------------------------------------------

def single_threaded(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run `fn` with one intra-op CPU thread (restored after). A selection is thousands of small
    operators: on CPU extra threads only add a barrier to each, and on a machine whose cores are
    busy a barrier waits a scheduler slice (MiniLM, 2 threads, 2 busy cores: 18 s per selection,
    0.55 s at one thread). Device operators are unaffected."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        threads = torch.get_num_threads()
        if threads == 1:
            return fn(*args, **kwargs)
        torch.set_num_threads(1)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)
    return wrapper


def check_uniform(index: ModelIndex, rule: CompactionRule) -> None:
    """Refuse uniform widths (`SparsityTarget.uniform`) where `compact_uniform` would refuse the
    result: its own check, run once on a copy of the model with one key/value group and
    `rule.multiple_of` neurons per block zeroed (the copy is dropped)."""
    import copy

    model = copy.deepcopy(index.model)
    twin = ModelIndex(model, index.discovery)
    with torch.no_grad():
        for unit in twin.attention:
            if unit.num_kv_heads > 1:
                weight_matrix(unit.o)[:, unit.query_rows([0])] = 0
        for unit in twin.mlps:
            weight_matrix(unit.down)[:, : rule.multiple_of] = 0
    try:
        compact_uniform(twin, rule=rule)
    except UnsupportedArchitectureError as err:
        raise ConfigError(f"uniform widths (--uniform-widths) are refused for this model: {err}") from None
    finally:
        del model, twin


GroupChooser = Callable[[int, list[int], torch.Tensor, Removed], list[int]]


class StructuralPruner:
    """Steers a model to `target.flops` on the cubic schedule: every `select_every` steps (and at
    the end of the ramp) it scores the present units with `scorer`, removes the lowest-scoring
    ones until the planned compacted FLOPs reach the scheduled fraction, and holds them at zero.

    `choose_groups(block, chosen, group_scores, removed)` may replace the groups picked in a block
    by others (the same number): NeuroPrune picks them by redundancy. Runtime state (`state_dict`):
    the removed units, the last selection step, the scheduled and planned fractions."""

    def __init__(self, index: ModelIndex, target: SparsityTarget, scorer: Callable[[Removed], UnitScores],
                 choose_groups: GroupChooser | None = None, rule: CompactionRule | None = None) -> None:
        self.index = index
        self.target = target
        self.scorer = scorer
        self.choose_groups = choose_groups
        self.rule = rule or CompactionRule()
        self.kinds = target.kinds
        if target.uniform:  # plan as `compact_uniform` compacts: no gathers, no dropped rows
            check_uniform(index, self.rule)
            self.rule = CompactionRule(1.0, 1.0, self.rule.multiple_of)
            self.kinds = tuple(k for k in target.kinds if k != "inputs")
        self.removed = Removed()
        self.masks = StructureMasks(index)
        self.total_steps = 0
        self.every = target.select_every
        self.last_selection: int | None = None
        self.scheduled = 1.0
        self.planned = 1.0
        self.dense = dense_flops(index, target.seq_len)

    def heads_held(self) -> int:
        """Query heads of the key/value groups held at zero, which `compact` removes: the
        model's own head count includes them until then (this mode does no surgery in training),
        so logs subtract them to show the heads the compacted model will keep."""
        return sum(len(self.removed.groups.get(b, [])) * unit.group_size
                   for b, unit in enumerate(self.index.attention)
                   if not getattr(unit, "head_removal_refused", None))

    def log_values(self, heads_kept: int) -> dict[str, float]:
        """The selection's figures for a method's logs: the scheduled and planned FLOP fractions,
        and `heads_kept` (the model's own count) less the heads held at zero (`heads_held`)."""
        return {"target_flops_now": self.scheduled, "flops_fraction_now": self.planned,
                "heads_kept": heads_kept - self.heads_held()}

    def smallest_fraction(self) -> float:
        """The least FLOP fraction selection can reach: every block keeps one key/value group
        (all of them where the family refuses head removal), one input dim (all without "inputs"
        in `target.kinds`) and `rule.multiple_of` neurons (all without "neurons")."""
        seq, kinds, least = self.target.seq_len, self.kinds, 0
        for unit in self.index.attention:
            full = original_attention(unit)
            keep_all = "heads" not in kinds or getattr(unit, "head_removal_refused", None)
            share = 1.0 if keep_all else 1 / unit.original_groups
            q_rows, kv_rows = round(full.q_rows * share), round(full.kv_rows * share)
            d_in = full.d_in if "inputs" not in kinds else 1
            least += AttentionShape(d_in, q_rows, max(kv_rows, unit.head_dim), full.d_out).flops(seq)
        for unit in self.index.mlps:
            full = original_mlp(unit)
            neurons = full.neurons if "neurons" not in kinds else min(full.neurons, self.rule.multiple_of)
            least += MLPShape(full.d_in, neurons, full.expand, full.rows).flops(seq)
        return least / self.dense

    def begin(self, total_steps: int) -> None:
        """After any checkpoint's weights are loaded: rebuild and apply the masks."""
        least = self.smallest_fraction()
        if self.target.flops < least:
            raise ConfigError(
                f"target FLOPs {self.target.flops:g} is out of reach for this model: its blocks cannot "
                f"be compacted below {least:.1%} of their dense FLOPs at {self.target.seq_len} tokens "
                f"(every block keeps a head group, an input dim and {self.rule.multiple_of} neurons); "
                f"ask for at least {math.ceil(least * 100) / 100:g}."
            )
        self.total_steps = total_steps
        if not self.every:
            ramp = (self.target.ramp_end - self.target.ramp_begin) * total_steps
            self.every = max(1, round(ramp / SELECTIONS_PER_RAMP))
        self.masks.build(self.removed)
        self.masks.apply()

    def ramp_end_step(self) -> int:
        """The step of the ramp's last selection."""
        return math.ceil(self.target.ramp_end * self.total_steps)

    def ramp_done(self) -> bool:
        """True once the selection at the end of the ramp has run: no selection is left."""
        return self.last_selection is not None and self.last_selection >= self.ramp_end_step()

    def due(self, step: int) -> bool:
        return not self.ramp_done() and (step % self.every == 0 or step >= self.ramp_end_step())

    def step(self, step: int) -> None:
        """After optimiser step `step`: hold the removed units at zero; select when due."""
        self.masks.apply()
        if self.due(step):
            self.select(step)

    @torch.no_grad()
    @single_threaded
    def select(self, step: int) -> None:
        self.last_selection = step
        self.scheduled = self.target.flops_at(step, self.total_steps)
        budget = int(self.scheduled * self.dense)
        floor = int((self.target.flops - LANDING) * self.dense)
        now = plan(self.index, self.rule)  # one plan per round: the next round starts from it
        for _ in range(CORRECTION_ROUNDS):
            scores = normalise(self.scorer(self.removed), self.removed)
            chosen = select_to_budget(self.index, scores, budget, self.target.seq_len, self.rule,
                                      self.kinds, self.removed, floor, now, self.target.uniform)
            if not any(getattr(chosen, k) for k in ("neurons", "groups", "inputs")):
                break
            if self.choose_groups is not None:
                for b, picked in list(chosen.groups.items()):
                    chosen.groups[b] = self.choose_groups(b, picked, scores.groups[b], self.removed)
            for kind in ("neurons", "groups", "inputs"):
                for b, positions in getattr(chosen, kind).items():
                    self.removed.add(kind, b, positions)
            self.masks.build(self.removed)
            self.masks.apply()
            now = plan(self.index, self.rule)
            if planned_flops(now, self.target.seq_len) <= budget + TOLERANCE * self.dense:
                break
        self.planned = planned_flops(now, self.target.seq_len) / self.dense

    def state_dict(self) -> dict[str, Any]:
        return {"removed": self.removed.to_dict(), "last_selection": self.last_selection,
                "every": self.every, "scheduled": self.scheduled, "planned": self.planned}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.removed = Removed.from_dict(state.get("removed", {}))
        self.last_selection = state.get("last_selection")
        self.every = int(state.get("every", self.every))
        self.scheduled = float(state.get("scheduled", 1.0))
        self.planned = float(state.get("planned", 1.0))
