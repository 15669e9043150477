"""Activation-aware unit scores: the root mean energy a unit adds to its output.

A unit's contribution to its block's output is its input channel(s) times its outgoing weights;
its mean squared norm over the tokens seen is `E[x_c^2] * ||W[:, c]||_2^2` summed over the unit's
channels c (cross terms between channels ignored). The score is the square root of that:

- neuron j of an MLP: `rms(a_j) * ||W_down[:, j]||_2`, `a` the contract projection's input;
- key/value group g: `sqrt(sum_c E[o_c^2] ||W_O[:, c]||_2^2)` over the output-projection columns c
  of g's query heads;
- input dim i of attention: `rms(h_i) * ||[Q; K; V][:, i]||_2` over the rows of the groups still
  present, per row (as the weight scores do: a block that lost groups is not made to look weak).

This is the Wanda / FLAP family of scores (weights times input norms) in structured form. Weight
norms alone miss channels that carry large activations, which on LLM-style decoders makes a
weight-only score remove load-bearing neurons first (`benchmarks/oneshot_scores.py`).
"""

from __future__ import annotations

import torch

from neuroprune.methods.structural import Removed, UnitScores, alive_rows
from neuroprune.model.index import ModelIndex
from neuroprune.model.surgery import weight_matrix


@torch.no_grad()
def activation_scores(index: ModelIndex, means: dict[str, list[torch.Tensor]],
                      removed: Removed) -> UnitScores:
    """Scores of every present unit from `ActivationStats.means()` (see the module docstring)."""
    neurons = []
    for b, unit in enumerate(index.mlps):
        down = weight_matrix(unit.down).detach().float()
        neurons.append((means["neurons"][b].to(down.device) * down.pow(2).sum(0)).sqrt())
    groups, inputs = [], []
    for b, unit in enumerate(index.attention):
        o = weight_matrix(unit.o).detach().float()
        energy = means["heads"][b].to(o.device) * o.pow(2).sum(0)
        per_group = [energy[unit.query_rows([g])].sum() for g in range(unit.num_kv_heads)]
        groups.append(torch.stack(per_group).sqrt())
        rows = alive_rows(unit, removed.groups.get(b, []))
        per_row = sum(r.float().pow(2).sum(0) for r in rows) / sum(r.shape[0] for r in rows)
        inputs.append((means["inputs"][b].to(o.device) * per_row).sqrt())
    return UnitScores(neurons, groups, inputs)
