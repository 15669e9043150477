"""Data-parallel NeuroPrune (`torchrun`, `accelerate launch`): head removal that every rank agrees on.

Head removal changes the model's shapes in the middle of training. If two ranks removed different
heads, their parameters would no longer line up and the next gradient all-reduce would mix
unrelated rows (or hang). The decision is a pure function of the attention weights, so we make the
weights bit-identical first (broadcast from rank 0), let every rank run the same deterministic
`prune_redundant_heads`, then check that all ranks ended with the same head structure. Every rank
therefore performs exactly rank 0's decision, merge included, and keeps its own `last_changes` to
remap its optimiser.

After removal the model holds new parameter objects: a `DistributedDataParallel` wrapper built
around the old ones no longer sees them (its gradient hooks sit on the removed tensors), so it
must be rebuilt with `rewrap_ddp`, and the optimiser remapped with `neuroprune.remap_optimizer`.

Sharded training (FSDP, DeepSpeed ZeRO) is refused by `refuse_sharded`: see its message.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from neuroprune.errors import DistributedError

SHARDED_REFUSAL = (
    "NeuroPrune cannot train under {what}. Head removal changes parameter shapes in the middle of "
    "training, and {what} flattens the parameters into fixed-size sharded buffers when the model "
    "is wrapped, so removed rows cannot follow; the regularisers also read whole weight matrices "
    "outside the forward pass, which no single rank holds. Use plain data parallelism instead "
    "(`torchrun --nproc_per_node N` or `accelerate launch` with a multi-GPU / multi-CPU config "
    "without FSDP or DeepSpeed), which keeps a full copy of the model on every rank."
)


def is_distributed() -> bool:
    """True inside an initialised `torch.distributed` process group with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_main_process() -> bool:
    """Rank 0, or the only process: the one that writes files. Before the process group exists
    (early in a `torchrun` / `accelerate launch` run) the launcher's RANK variable says."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return os.environ.get("RANK", "0") == "0"


def refuse_sharded(model: nn.Module | None = None, accelerator: Any = None) -> None:
    """Raise `DistributedError` if the model or the accelerate setup shards parameters."""
    what = None
    if accelerator is not None:
        kind = str(getattr(getattr(accelerator, "distributed_type", None), "value", "")).upper()
        what = {"FSDP": "FSDP", "DEEPSPEED": "DeepSpeed", "MEGATRON_LM": "Megatron-LM"}.get(kind)
    if what is None and model is not None:
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

        for module in [model, *model.modules()]:
            if isinstance(module, (FullyShardedDataParallel, FSDPModule)):
                what = "FSDP"
            elif type(module).__name__ == "DeepSpeedEngine":
                what = "DeepSpeed"
            if what:
                break
    if what:
        raise DistributedError(SHARDED_REFUSAL.format(what=what))


@torch.no_grad()
def broadcast_parameters(module: nn.Module, src: int = 0) -> None:
    """Overwrite every parameter and buffer with rank `src`'s copy (no-op in one process)."""
    if not is_distributed():
        return
    for tensor in [*module.parameters(), *module.buffers()]:
        dist.broadcast(tensor.data, src)


def same_on_all_ranks(value: Any) -> bool:
    """Whether a picklable value is equal on every rank (True in one process)."""
    if not is_distributed():
        return True
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return all(v == gathered[0] for v in gathered)


def rewrap_ddp(wrapper: DistributedDataParallel) -> DistributedDataParallel:
    """A new `DistributedDataParallel` with the same settings around the (pruned) inner module.

    The old wrapper's reducer holds the removed parameters; gradients of the new ones would never
    be all-reduced and the ranks would silently drift apart.
    """
    if not isinstance(wrapper, DistributedDataParallel):
        raise DistributedError(f"rewrap_ddp expects a DistributedDataParallel, got {type(wrapper).__name__}.")
    return DistributedDataParallel(
        wrapper.module,
        device_ids=wrapper.device_ids,
        output_device=wrapper.output_device,
        dim=wrapper.dim,
        process_group=wrapper.process_group,
        bucket_cap_mb=wrapper.bucket_bytes_cap / (1024 * 1024),
        find_unused_parameters=wrapper.find_unused_parameters,
        gradient_as_bucket_view=wrapper.gradient_as_bucket_view,
        static_graph=wrapper.static_graph,
        # passed only when switched off: torch >= 2.13 warns that the argument is deprecated
        **({} if wrapper.broadcast_buffers else {"broadcast_buffers": False}),
    )
