"""Keep an optimiser in step with surgery: replace removed parameters by their smaller versions and
slice their state (AdamW moments, momentum buffers) the same way."""

from __future__ import annotations

import torch

from neuroprune.model.surgery import ParamChange


def remap_optimizer(optimizer: torch.optim.Optimizer, changes: list[ParamChange]) -> None:
    """Apply parameter changes from head removal to `optimizer` in place."""
    by_old = {id(c.old): c for c in changes}
    for group in optimizer.param_groups:
        for pos, param in enumerate(group["params"]):
            change = by_old.get(id(param))
            if change is None:
                continue
            group["params"][pos] = change.new
            state = optimizer.state.pop(param, None)
            if state is None:
                continue
            optimizer.state[change.new] = {
                key: value.index_select(change.dim, change.index.to(value.device))
                if torch.is_tensor(value) and value.shape == change.old.shape
                else value
                for key, value in state.items()
            }
