"""Redundant-head pruning (method.md section 4, paper Algorithms 2 and 3): similarity graph,
the paper's greedy FIND_DOMINATING, and the merge + removal of dominated heads."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from neuroprune.errors import ConfigError
from neuroprune.model.surgery import ParamChange, weight_matrix
from neuroprune.model.units import AttentionUnit, MLPUnit


def group_distances(blocks: torch.Tensor) -> torch.Tensor:
    """l_inf distance between every pair of parameter blocks (one row per head / key-value group)."""
    # = max |b_i - b_j| row by row, ~20x faster; cdist has no half-precision kernel on CPU
    blocks = blocks.to(torch.promote_types(blocks.dtype, torch.float32))
    return torch.cdist(blocks, blocks, p=float("inf"))


def similarity_graph(blocks: torch.Tensor, theta: float) -> torch.Tensor:
    """S[i, j] = 1 iff max |A_Hi - A_Hj| <= theta (l_inf distance of parameter blocks); S_ii = 1."""
    return similarity_from_distances(group_distances(blocks), theta)


def similarity_from_distances(dist: torch.Tensor, theta: float) -> torch.Tensor:
    """`similarity_graph` from the blocks' `group_distances` (computed once, thresholded often)."""
    sim = (dist <= theta).to(torch.int64)
    sim.fill_diagonal_(1)
    return sim


def find_dominating(sim: torch.Tensor) -> list[int]:
    """The paper's greedy FIND_DOMINATING, step for step: for each head i, walk j = 0..k-1 and move
    the candidate j* to j when j's neighbourhood strictly contains j*'s, or equals it and j* < j.
    Returns j* for every i (i is replaceable by j*; j* == i means i stays)."""
    k = sim.shape[0]
    rows = sim.tolist()
    replacement = []
    for i in range(k):
        best = i
        for j in range(k):
            s = [a - b for a, b in zip(rows[best], rows[j])]
            strictly_contained = 1 not in s and -1 in s
            if strictly_contained or (not any(s) and best < j):
                best = j
        replacement.append(best)
    return replacement


def redundant_groups(sim: torch.Tensor) -> dict[int, int]:
    """{removed position: position that absorbs it} for a similarity graph (empty: none).

    No replacement is itself replaced, so one merge per removed head suffices and no chain
    i -> a -> b needs resolving: if the walk from i ends at j*, the walk from j* stays there.
    Proof: the neighbourhoods along i's walk only grow, so every candidate it holds has
    N <= N(j*). Were the walk from j* to move, it would first move at some index a with
    N(a) > N(j*) strictly, or N(a) = N(j*) and a > j*. In the first case i's walk, at index a,
    holds a candidate with N <= N(j*) < N(a) and moves to a, after which it can never come back
    down to N(j*). In the second, i's walk at index a holds a candidate b with N(b) <= N(a): it
    moves to a (strict containment, or a tie with b < a) or keeps b > a; either way it then holds
    a head other than j* (a, or b > a > j*) and can only move to later indices, so it never holds
    j* again. (Checked exhaustively for up to 6 heads, and by a property test.)
    """
    if int(sim.sum()) == sim.shape[0]:  # only the diagonal: nothing is redundant
        return {}
    return {i: j for i, j in enumerate(find_dominating(sim)) if j != i}


def merge_into_mlp_input(unit: AttentionUnit, mlp: MLPUnit | None, src: int, dst: int) -> None:
    """The paper's literal merge: add head src's slice of the layer's MLP expand matrix L_in
    (input columns src*h .. src*h+h-1) into dst's slice. Not function preserving."""
    if mlp is None:
        raise ConfigError(
            f"merge='mlp_input' needs the MLP of the layer of {unit.name}, but none was found; "
            "use merge='output' or 'none'."
        )
    cols_src, cols_dst = unit.query_rows([src]), unit.query_rows([dst])
    with torch.no_grad():
        for w in mlp.expand_matrices():
            if w.shape[1] <= int(cols_src.max()) or w.shape[1] <= int(cols_dst.max()):
                raise ConfigError(f"merge='mlp_input' needs an MLP as wide as the heads of {unit.name}.")
            w[:, cols_dst] += w[:, cols_src]


@dataclass
class PruneEvent:
    """What one pruning pass did to one block, in original key/value-group indices (= head
    indices without GQA): the similarity graph it saw, who absorbed whom, and every group's
    output-projection importance just before removal (paper Fig. 7)."""

    layer: str
    groups: list[int]
    similarity: list[list[int]]
    absorbed_by: dict[int, int]
    removed_heads: list[int]
    importance: dict[int, float]


def prune_unit(
    unit: AttentionUnit, theta: float, merge: str, mlp: MLPUnit | None = None
) -> tuple[PruneEvent | None, list[ParamChange]]:
    """Remove the redundant key/value groups of one block. With plain multi-head attention a
    group is one head. Returns the event (None if nothing was redundant) and parameter changes."""
    sim = similarity_graph(unit.group_blocks(), theta)
    survivors = redundant_groups(sim)
    if not survivors:
        return None, []
    groups = list(unit.kept_groups)
    importance = output_importance(unit)
    for src, dst in survivors.items():
        if merge == "output":
            unit.merge_output(src, dst)
        elif merge == "mlp_input":
            merge_into_mlp_input(unit, mlp, src, dst)
    before = unit.kept_heads
    keep = [p for p in range(unit.num_kv_heads) if p not in survivors]
    changes = unit.keep_groups(keep)
    event = PruneEvent(
        layer=unit.name,
        groups=groups,
        similarity=sim.tolist(),
        absorbed_by={groups[s]: groups[d] for s, d in survivors.items()},
        removed_heads=sorted(set(before) - set(unit.kept_heads)),
        importance=importance,
    )
    return event, changes


def output_importance(unit: AttentionUnit) -> dict[int, float]:
    """Summed absolute output-projection weights per present key/value group, keyed by original
    group index (paper Fig. 7 left: importance of removed versus kept heads)."""
    w = weight_matrix(unit.o).detach().abs()
    return {
        group: float(w[:, unit.query_rows([pos])].sum()) for pos, group in enumerate(unit.kept_groups)
    }
