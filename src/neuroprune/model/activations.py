"""Per-channel input statistics of the pruned units, gathered from the forward passes of training.

Weight-only unit scores ignore how strongly each channel is actually driven. On LLM-style
decoders a few channels carry very large activations (Sun et al. 2024, "Massive activations"),
and a neuron or head whose weights look small can be load-bearing; Wanda (Sun et al. 2023) and
FLAP (An et al. 2024) score weights by the norm of their inputs for that reason. `ActivationStats`
keeps, per unit, the mean square of the channels its removal would cut:

- `neurons[b]`: the inputs of MLP `b`'s contract projection (one per neuron);
- `heads[b]`: the inputs of attention block `b`'s output projection (one per query-head row);
- `inputs[b]`: the inputs of its Q/K/V projections (one per input dimension).

Forward pre-hooks add squares and counts while the model is in training mode (never during
evaluation, so the evaluation schedule cannot change a selection). Sums stay on the device; they
are read back only when a method scores units. Under data-parallel training every rank sees other
rows, so the method passes `means` an all-reduce that sums the statistics over ranks first (all
ranks then select the same units).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from neuroprune.model.index import ModelIndex

KINDS = ("neurons", "heads", "inputs")


class ActivationStats:
    """Running sums of squared inputs (and token counts) of every pruned unit; see the module
    docstring. `attach()` installs the hooks, `detach()` removes them, `reset()` starts a new
    window; `state_dict()` / `load_state_dict()` carry the window across a resume."""

    def __init__(self, index: ModelIndex, training_only: bool = True) -> None:
        self.index = index
        self.training_only = training_only  # False: also count eval-mode passes (a calibration set)
        self.sums: dict[str, list[torch.Tensor | None]] = {
            "neurons": [None] * len(index.mlps), "heads": [None] * len(index.attention),
            "inputs": [None] * len(index.attention)}
        self.counts: dict[str, list[int]] = {k: [0] * len(v) for k, v in self.sums.items()}
        self._handles: list[Any] = []

    def modules(self) -> list[tuple[str, int, nn.Module]]:
        """(kind, block, module whose input is measured) for every unit."""
        found = [("neurons", b, u.down) for b, u in enumerate(self.index.mlps)]
        for b, u in enumerate(self.index.attention):
            found.append(("heads", b, u.o))
            found.append(("inputs", b, u.qkv if u.qkv is not None else u.q))
        return found

    def attach(self) -> None:
        if self._handles:
            return
        for kind, block, module in self.modules():
            self._handles.append(module.register_forward_pre_hook(self._hook(kind, block)))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _hook(self, kind: str, block: int) -> Any:
        def pre(module: nn.Module, args: tuple) -> None:
            if self.training_only and not module.training:
                return
            if not args or not isinstance(args[0], torch.Tensor):
                return
            with torch.no_grad():
                x = args[0].detach()
                x = x.reshape(-1, x.shape[-1]).float()
                squares = (x * x).sum(0)
                old = self.sums[kind][block]
                if old is None or old.shape != squares.shape:  # first batch, or the unit was compacted
                    self.sums[kind][block] = squares
                    self.counts[kind][block] = x.shape[0]
                else:  # in place (`.to` moves loaded sums, which sit on the CPU, once)
                    self.sums[kind][block] = old.to(squares.device).add_(squares)
                    self.counts[kind][block] += x.shape[0]
        return pre

    @property
    def seen(self) -> bool:
        """True when every unit has had at least one training forward pass since `reset`."""
        return all(c > 0 for counts in self.counts.values() for c in counts)

    def reset(self) -> None:
        for kind in KINDS:
            self.sums[kind] = [None] * len(self.sums[kind])
            self.counts[kind] = [0] * len(self.counts[kind])

    def means(self, all_reduce: Callable[[torch.Tensor], Any] | None = None) -> dict[str, list[torch.Tensor]]:
        """Mean square of every channel since `reset`, per kind and block; `all_reduce` (in place,
        a sum: `torch.distributed.all_reduce` under data parallelism) pools the ranks' sums and
        counts first. Call only when `seen`."""
        if not self.seen:
            raise RuntimeError("ActivationStats.means() before every unit saw a training forward pass")
        out: dict[str, list[torch.Tensor]] = {}
        for kind in KINDS:
            sums: list[torch.Tensor] = self.sums[kind]  # type: ignore[assignment]  (all set: `seen`)
            counts: list[float] = [float(c) for c in self.counts[kind]]
            if all_reduce is not None and sums:
                flat = torch.cat([s.double() for s in sums]
                                 + [torch.tensor(counts, dtype=torch.float64, device=sums[0].device)])
                all_reduce(flat)
                parts = flat.split([s.numel() for s in sums] + [len(counts)])
                sums, counts = [p.float() for p in parts[:-1]], parts[-1].tolist()
            out[kind] = [s / c for s, c in zip(sums, counts)]  # new tensors: the window is not touched
        return out

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable (float32 sums as lists of floats: exact), so a resumed run selects
        from the same window as the uninterrupted one."""
        return {"sums": {k: [None if s is None else s.detach().cpu().tolist() for s in v]
                         for k, v in self.sums.items()},
                "counts": {k: list(v) for k, v in self.counts.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        for kind in KINDS:
            sums = state["sums"][kind]
            if len(sums) != len(self.sums[kind]):
                raise ValueError(f"activation statistics for {len(sums)} {kind} blocks; the model has "
                                 f"{len(self.sums[kind])}")
            self.sums[kind] = [None if s is None else torch.tensor(s, dtype=torch.float32) for s in sums]
            self.counts[kind] = [int(c) for c in state["counts"][kind]]
