"""`NeuroPrune`: the paper's method (method.md): preferential-attachment l1 on MLP rows (alpha),
l_{1,0.5} groups on the input dimensions of [Q, K, V] (beta), and redundant heads removed by a
dominating set of the head-similarity graph (theta), optionally steered to a target sparsity and a
target number of heads."""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import torch
from torch import nn

from neuroprune import distributed
from neuroprune.config import NeuroPruneConfig
from neuroprune.errors import ConfigError, DistributedError, NeuroPruneError, UnsupportedArchitectureError
from neuroprune.methods.activation_scores import activation_scores
from neuroprune.methods.heads import group_distances, prune_unit, redundant_groups, similarity_from_distances
from neuroprune.methods.penalties import (
    attention_penalty,
    fused_penalty,
    mlp_penalty,
    output_penalty,
    row_weights,
)
from neuroprune.methods.penalty import Part, PenaltyMethod
from neuroprune.methods.steering import SparsityTarget, cubic_schedule
from neuroprune.methods.structural import Removed, StructuralPruner, UnitScores, alive_rows
from neuroprune.model.activations import ActivationStats
from neuroprune.model.architectures import default_unit_scores
from neuroprune.model.index import ATTENTION_KINDS, MLP_KINDS, ModelIndex
from neuroprune.model.sparsity import row_degree
from neuroprune.model.surgery import ParamChange, weight_matrix

logger = logging.getLogger(__name__)

# The head target is reached after this fraction of the sparsity ramp: zeros a head-pruning pass
# adds cannot be taken back, so the penalties must still have room to make up for them.
HEADS_RAMP = 0.5


class NeuroPrune(PenaltyMethod):
    """NeuroPrune on one model.

    Example (plain loop, penalties in the loss as in the paper)::

        pruner = NeuroPrune(model, NeuroPruneConfig(alpha=1e-4, beta=1e-4, theta=0.15))
        loss = task_loss + pruner.regularization_loss()
        removed = pruner.prune_redundant_heads()   # after each epoch
        remap_optimizer(optimizer, pruner.last_changes)
        pruner.finalize()                          # at the end
        print(pruner.sparsity_report())

    With `target` (a `SparsityTarget`), alpha and beta are steered to it and applied as proximal
    steps; with `target.heads`, theta is steered to that number of heads. Heads are removed at the
    end of every epoch and every `prune_every_steps` steps when > 0. Runtime state: `alpha`,
    `beta` (see `PenaltyMethod`) and `theta`, the threshold the next pass uses.

    With a FLOP target (`SparsityTarget(flops=F)`) the penalties stay in the loss (as in the
    paper) and push weakly connected units down, and every few steps (`prune_every_steps`, or
    ~20 times inside the ramp) a `StructuralPruner` removes whole units on the cubic schedule
    from 1 to F, scored by the paper's mechanisms (`unit_scores`): neurons by preferential
    attachment, input dims by their [Q, K, V] group norm, key/value groups by importance, with
    the groups a block loses picked by the dominating-set pass, theta steered to that number
    (`target.heads_by`). Removed units are held at exact zero; survivors are not shrunk; nothing
    is removed physically until `compact`, so the run ends with `flop_count(...).fraction` ~ F.
    """

    name = "neuroprune"
    config_class = NeuroPruneConfig
    config: NeuroPruneConfig

    def __init__(self, model: nn.Module | ModelIndex, config: NeuroPruneConfig | None = None,
                 target: SparsityTarget | None = None, prune_every_steps: int = 0,
                 proximal: bool | None = None) -> None:
        super().__init__(model, config, target, proximal)
        every = prune_every_steps
        if isinstance(every, bool) or not isinstance(every, int) or every < 0:
            raise NeuroPruneError(f"prune_every_steps must be a whole number >= 0, got {every!r}.")
        self.prune_every_steps = prune_every_steps
        refused = [u.head_removal_refused for u in self.index.attention if u.head_removal_refused]
        if refused and self.config.prune_heads:
            raise UnsupportedArchitectureError(refused[0])
        self.theta = self.config.theta
        self.last_changes: list[ParamChange] = []
        self._pruned_at: int | None = None
        if target is not None and target.heads is not None:
            self._check_head_target(target)
        self.structural: StructuralPruner | None = None
        # the unit scores in force: config.scores, with "auto" resolved by the model's family
        self.scores = self.config.scores if self.config.scores != "auto" else default_unit_scores(self.model)
        self.activations: ActivationStats | None = None  # inputs seen since the last selection
        # refresh period of the cached preferential-attachment row weights (`degree_weights`);
        # None: 1, or the selection period under a FLOP target
        self.degree_every_steps: int | None = None
        self.degree_every = 1
        self._degree_cache: list[torch.Tensor] | None = None
        if target is not None and target.flops is not None:
            if prune_every_steps:
                target = dataclasses.replace(target, select_every=prune_every_steps)
            if not self.config.prune_heads:  # prune_heads=False: no head goes, whatever the budget
                target = dataclasses.replace(target, kinds=tuple(k for k in target.kinds if k != "heads"))
            self.target = target
            self.structural = StructuralPruner(self.index, target, self.unit_scores, self._choose_groups)
            if self.scores == "activations":
                self.activations = ActivationStats(self.index)

    def _check_head_target(self, target: SparsityTarget) -> None:
        heads, units = target.heads, self.index.attention
        if not self.config.prune_heads:
            raise ConfigError("a target number of heads needs head pruning: drop prune_heads=False.")
        fewest = sum(u.group_size for u in units)  # one head (key/value group) per block
        most = sum(u.original_heads for u in units)
        if not fewest <= heads <= most:
            raise ConfigError(
                f"target number of heads {heads} is out of range for this model: it has {most} heads "
                f"in {len(units)} attention blocks, and every block keeps at least one ({fewest} in all)."
            )
        attention = sum(sum(u.original_numel.values()) for u in units)
        counted = attention + sum(sum(m.original_numel.values()) for m in self.index.mlps)
        implied = (1 - heads / most) * attention / counted
        if implied > target.sparsity + 0.02:
            raise ConfigError(
                f"keeping {heads} of {most} heads removes {implied:.1%} of the counted weights by "
                f"itself, more than the target sparsity {target.sparsity:.1%}: ask for more heads "
                "or a higher sparsity."
            )

    # --- regularisation ------------------------------------------------------------------------
    def define_parts(self) -> list[Part]:
        kinds = MLP_KINDS | ({"o"} if self.config.output_penalty else set())
        return [Part("mlp", "alpha", frozenset(kinds)), Part("attention", "beta", ATTENTION_KINDS)]

    def penalties(self) -> dict[str, torch.Tensor]:
        """Unweighted sums of R_MLP and R_attn (and R_O when `output_penalty` is on) over all
        blocks (differentiable)."""
        zero = torch.zeros((), device=self.device)
        eps, tiny = self.config.eps, self.config.tiny
        values = {
            "mlp": sum((mlp_penalty(u, eps) for u in self.index.mlps), zero),
            "attention": sum((attention_penalty(u, tiny) for u in self.index.attention), zero),
        }
        if self.config.output_penalty:
            values["output"] = sum((output_penalty(u, eps) for u in self.index.attention), zero)
        return values

    def weighted_penalties(self, weights: tuple[str, ...] = ("alpha", "beta")) -> dict[str, torch.Tensor]:
        """The penalty each weight carries, its current value applied: ``"alpha"``: alpha * sum
        R_MLP (+ sum R_O with `output_penalty`); ``"beta"``: beta * sum R_attn. Only the weights
        asked for are computed, and a weight that is 0 is left out."""
        cfg, out = self.config, {}
        if "alpha" in weights and self.alpha:
            r = sum(mlp_penalty(u, cfg.eps) for u in self.index.mlps)
            if cfg.output_penalty:
                r = r + sum(output_penalty(u, cfg.eps) for u in self.index.attention)
            out["alpha"] = self.alpha * r
        if "beta" in weights and self.beta:
            out["beta"] = self.beta * sum(attention_penalty(u, cfg.tiny) for u in self.index.attention)
        return out

    def part_penalty(self, parts: list[Part]) -> torch.Tensor:
        """`weighted_penalties` of `parts` summed, as one autograd node (`fused_penalty`): the
        per-step path. Its gradients are those of `weighted_penalties`; the row weights of the
        preferential attachment come from `degree_weights` (refreshed every `degree_every` steps)."""
        cfg, weights = self.config, {p.weight for p in parts}
        alpha = self.alpha if "alpha" in weights else 0.0
        beta = self.beta if "beta" in weights else 0.0
        terms = self._pa_terms() if alpha else []
        if alpha:
            terms = list(zip(terms, self.degree_weights(terms)))
        groups = []
        if beta:  # the matrices with their graph (a transposed Conv1D weight is a view), the l1 without
            mats = [list(u.qkv_matrices()) if u.qkv is None else [weight_matrix(u.qkv)]
                    for u in self.index.attention]
            with torch.no_grad():
                groups = [(m, u.input_l1()) for m, u in zip(mats, self.index.attention)]
        value = fused_penalty(terms, alpha, groups, beta, cfg.tiny)
        return torch.zeros((), device=self.device) if value is None else value

    def _pa_terms(self) -> list[list[torch.Tensor]]:
        """The matrices of each preferential-attachment term, in a fixed order: per MLP its
        expand matrices (rows shared) and its contract matrix; with `output_penalty`, each W^O."""
        terms = [t for u in self.index.mlps for t in (u.expand_matrices(), [u.contract_matrix()])]
        if self.config.output_penalty:
            terms += [[weight_matrix(u.o)] for u in self.index.attention]
        return terms

    def degree_weights(self, terms: list[list[torch.Tensor]]) -> list[torch.Tensor]:
        """The row weights 1 / max(degree, 1/length) of each term, without a graph. Cached
        between refreshes: `on_step_end` drops the cache every `degree_every` steps and whenever
        the structure changed or units were removed (a degree moves only when a weight crosses
        eps, which between selections a FLOP-target run's loss-side penalty rarely does).
        `degree_every` = 1 (every run without a FLOP target) recomputes them on every call,
        exactly as `preferential_attachment_l1` does."""
        cached = self._degree_cache
        if self.degree_every <= 1 or cached is None or len(cached) != len(terms) or any(
                w.shape[0] != t[0].shape[0] for w, t in zip(cached, terms)):
            cached = [row_weights(t, self.config.eps) for t in terms]
            self._degree_cache = cached if self.degree_every > 1 else None
        return cached

    # --- heads ---------------------------------------------------------------------------------
    def prune_redundant_heads(self, theta: float | None = None) -> dict[str, list[int]]:
        """Remove heads that duplicate another head (within `theta`, default the current
        `self.theta`, in l_inf), layer by layer; under torch.distributed the same decision is
        made on every rank (weights broadcast from rank 0 first: a collective, call it on every
        rank at once). Returns ``{attention module
        name: [removed original head indices]}``; the parameter changes are in `last_changes`."""
        theta = self.theta if theta is None else theta
        self.last_changes = []
        if not self.config.prune_heads:
            return {}
        if distributed.is_distributed():
            distributed.broadcast_parameters(self.model)
        removed: dict[str, list[int]] = {}
        events = []
        for unit in self.index.attention:
            event, changes = prune_unit(unit, theta, self.config.merge, self.index.layer_mlp[unit.name])
            if event is not None:
                removed[unit.name] = event.removed_heads
                events.append({"theta": theta, **dataclasses.asdict(event)})
                self.last_changes += changes
        self.index.record_pass(events)
        if distributed.is_distributed() and not distributed.same_on_all_ranks(self.index.head_structure()):
            raise DistributedError(
                "ranks disagree on the heads left after pruning although their weights were "
                "synchronised first; are all ranks running the same model, config and theta?"
            )
        return removed

    @torch.no_grad()
    def theta_for_heads(self, heads: int) -> float | None:
        """The largest theta at which one `prune_redundant_heads` pass would leave at least
        `heads` query heads in the model (None: even theta = 0, identical heads only, leaves
        fewer). What a pass removes changes only where theta crosses a pairwise distance, so
        those distances are the candidates, bisected: larger theta keeps fewer heads (the greedy
        can break this order; the theta returned still keeps at least `heads`)."""
        dists = [(u, group_distances(u.group_blocks())) for u in self.index.attention]

        def kept(theta: float) -> int:
            removed = [(u, len(redundant_groups(similarity_from_distances(d, theta)))) for u, d in dists]
            return sum((u.num_kv_heads - r) * u.group_size for u, r in removed)

        pairs = [d[torch.triu(torch.ones_like(d, dtype=torch.bool), 1)] for _, d in dists]
        candidates = sorted({0.0, *torch.cat(pairs).tolist()}) if pairs else [0.0]
        if kept(candidates[0]) < heads:
            return None
        lo, hi = 0, len(candidates) - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if kept(candidates[mid]) >= heads else (lo, mid - 1)
        return candidates[lo]

    def heads_target(self, step: int) -> int | None:
        """The scheduled number of heads for `step` (None without a head target)."""
        t = self.target
        if t is None or t.heads is None:
            return None
        total = sum(u.original_heads for u in self.index.attention)
        end = t.ramp_begin + HEADS_RAMP * (t.ramp_end - t.ramp_begin)
        scheduled = cubic_schedule(step, self.total_steps, t.heads, total, t.ramp_begin, end)
        return math.ceil(scheduled - 1e-9)

    def _pass(self) -> list[ParamChange]:
        """One head-pruning pass at the current step (at most one per step)."""
        if self._pruned_at == self.step:
            return []
        self._pruned_at = self.step
        goal = self.heads_target(self.step)
        if goal is not None:
            theta = self.theta_for_heads(goal)
            if theta is None:  # only identical heads could go, and even they are too many
                return []
            self.theta = theta
        self.prune_redundant_heads()
        return self.last_changes

    # --- structural selection under a FLOP target -------------------------------------------
    @torch.no_grad()
    def unit_scores(self, removed: Removed) -> UnitScores:
        """The paper's mechanisms as unit scores (higher = keep), each of power 1 in the weights
        so that kinds compare after `structural.normalise`: a neuron's fractional degree (section
        1) times the geometric mean of its fan-in and fan-out l1 norms; an input dim's [Q, K, V]
        group l1 over the groups still present, per row (the group of the l_{1,0.5} term, section
        2; per row, so that a block that lost groups is not made to look weak); a
        key/value group's geometric mean of its output-projection and Q/K/V block l1 norms.
        With activation scores (`config.scores`, "auto" by family): `activation_scores` from the
        inputs seen since the last selection, neurons times their degree."""
        eps = self.config.eps
        if self.activations is not None:
            if self.activations.seen:
                pool = torch.distributed.all_reduce if distributed.is_distributed() else None
                scores = activation_scores(self.index, self.activations.means(pool), removed)
                scores.neurons = [s * row_degree([m.detach() for m in u.expand_matrices()], eps).to(s.dtype)
                                  for s, u in zip(scores.neurons, self.index.mlps)]
                return scores
            logger.warning("scores='activations': no training pass reached every pruned unit since the "
                           "last selection (is the model in training mode?); this selection uses the "
                           "weight scores.")
        neurons = []
        for unit in self.index.mlps:
            mats = [m.detach() for m in unit.expand_matrices()]
            fan_in = sum(m.abs().sum(1) for m in mats)
            fan_out = weight_matrix(unit.down).detach().abs().sum(0)
            neurons.append(row_degree(mats, eps) * (fan_in * fan_out).sqrt())
        groups, inputs = [], []
        for b, unit in enumerate(self.index.attention):
            rows = alive_rows(unit, removed.groups.get(b, []))
            inputs.append(sum(r.abs().sum(0) for r in rows) / sum(r.shape[0] for r in rows))
            o = weight_matrix(unit.o).detach().abs()
            out = torch.stack([o[:, unit.query_rows([g])].sum() for g in range(unit.num_kv_heads)])
            groups.append((out * unit.group_blocks().abs().sum(1)).sqrt())
        return UnitScores(neurons, groups, inputs)

    @torch.no_grad()
    def _choose_groups(self, block: int, picked: list[int], scores: torch.Tensor,
                       removed: Removed) -> list[int]:
        """The groups block `block` loses, as many as the budget `picked`: the redundant ones of
        a dominating-set pass (paper Algorithms 2-3) at the largest theta that removes no more
        than that, merged into their survivor (`config.merge == "output"`) where they are within
        the configured theta of it; the rest, if any, by lowest score."""
        n = len(picked)
        if self.target.heads_by != "redundancy" or not self.config.prune_heads or n == 0:
            return picked
        unit = self.index.attention[block]
        gone = set(removed.groups.get(block, []))
        present = [g for g in range(unit.num_kv_heads) if g not in gone]
        dist = group_distances(unit.group_blocks()[present])
        upper = torch.triu(torch.ones_like(dist, dtype=torch.bool), 1)
        thetas = sorted(set(dist[upper].tolist()))
        lo, hi, best = 0, len(thetas) - 1, {}
        while lo <= hi:  # largest theta whose pass removes at most n
            mid = (lo + hi) // 2
            found = redundant_groups(similarity_from_distances(dist, thetas[mid]))
            if len(found) <= n:
                best, lo = found, mid + 1
                self.theta = thetas[mid]
            else:
                hi = mid - 1
        chosen = []
        for src, dst in best.items():
            if self.config.merge == "output" and float(dist[src, dst]) <= self.config.theta:
                unit.merge_output(present[src], present[dst])
            chosen.append(present[src])
        values = scores.tolist()  # one host read, not one per group
        rest = [g for g in sorted(present, key=lambda g: values[g]) if g not in chosen]
        return chosen + rest[: n - len(chosen)]

    # --- hooks ---------------------------------------------------------------------------------
    def on_train_begin(self, total_steps: int, optimizer: torch.optim.Optimizer | None = None) -> None:
        super().on_train_begin(total_steps, optimizer)
        self._degree_cache = None
        if self.structural is not None:
            self.structural.begin(total_steps)
            self.degree_every = self.degree_every_steps or self.structural.every
            if self.activations is not None and not self.structural.ramp_done():
                self.activations.attach()
            return
        self.degree_every = self.degree_every_steps or 1
        t = self.target
        if t is not None and t.heads is not None and not self.prune_every_steps:
            # passes at epoch ends only would fall after the head ramp: ~10 passes inside it
            ramp_steps = HEADS_RAMP * (t.ramp_end - t.ramp_begin) * total_steps
            self.prune_every_steps = max(1, round(ramp_steps / 10))

    def structural_step(self, step: int) -> list[ParamChange]:
        if step % self.degree_every == 0:
            self._degree_cache = None
        if self.structural is not None:  # masks, no surgery: the optimiser state stays valid
            self.structural.step(step)
            if self.structural.last_selection == step:  # units removed: degrees moved
                self._degree_cache = None
                if self.activations is not None:  # the next selection scores the model as it is now
                    self.activations.reset()
                    if self.structural.ramp_done():  # no selection left: no more hooks, no overhead
                        self.activations.detach()
            return []
        self._degree_cache = None
        if self.prune_every_steps and step % self.prune_every_steps == 0:
            return self._pass()
        return []

    def on_train_end(self) -> None:
        if self.activations is not None:
            self.activations.detach()
        super().on_train_end()

    def on_epoch_end(self, epoch: int) -> list[ParamChange]:
        self._degree_cache = None
        if self.structural is not None:  # heads go on the FLOP schedule, not at epoch ends
            return super().on_epoch_end(epoch)
        changes = self._pass()
        super().on_epoch_end(epoch)  # after the pass: the zeros it made are held too
        return changes

    # --- logs and state ------------------------------------------------------------------------
    def log_values(self, detailed: bool = False) -> dict[str, float]:
        values = super().log_values(detailed)
        if self.parts:
            with torch.no_grad():
                penalties = self.penalties()
            values.update(penalty_mlp=float(penalties["mlp"]),
                          penalty_attention=float(penalties["attention"]))
        values["theta"] = self.theta
        goal = self.heads_target(self.step)
        if goal is not None:
            values["target_heads_now"] = goal
        if self.structural is not None:
            values.update(self.structural.log_values(values["heads_kept"]))
        return values

    def summary(self) -> dict[str, Any]:
        out = {**super().summary(), "theta": self.theta}
        if self.target is not None and self.target.heads is not None:
            out.update(target_heads=self.target.heads, heads_kept=self.sparsity_report().heads_kept)
        if self.target is not None and self.target.flops is not None:
            out["target_flops"] = self.target.flops
        return out

    def state_dict(self) -> dict[str, Any]:
        state = {**super().state_dict(), "theta": self.theta, "pruned_at": self._pruned_at,
                 "prune_every_steps": self.prune_every_steps}
        if self.structural is not None:
            state["structural"] = self.structural.state_dict()
        if self.activations is not None:
            state["activations"] = self.activations.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._degree_cache = None
        self.theta = float(state.get("theta", self.theta))
        self._pruned_at = state.get("pruned_at")
        self.prune_every_steps = int(state.get("prune_every_steps", self.prune_every_steps))
        if self.structural is not None and "structural" in state:
            self.structural.load_state_dict(state["structural"])
        if self.activations is not None:
            self.activations.load_state_dict(state.get("activations", {}))
