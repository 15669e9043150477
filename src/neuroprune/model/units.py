"""Layer-level mechanics: one attention block or one MLP seen through a canonical lens.

`AttentionUnit` turns whatever the family stores (separate, fused or per-head interleaved Q/K/V,
`Linear` or `Conv1D`, grouped-query attention) into head-major `(out, in)` matrices, and removes
key/value groups while keeping every attribute the module's forward relies on consistent.
`MLPUnit` does the same for expand / gate / contract. Policy (what to remove) lives elsewhere.
"""

from __future__ import annotations

import copy
import inspect
from typing import Any

import torch
from torch import nn

from neuroprune.errors import UnsupportedArchitectureError
from neuroprune.model.architectures import (
    BIAS_FACTORIES,
    HEAD_COUNT_ATTRS,
    KV_GROUPS_ATTRS,
    KV_HEAD_COUNT_ATTRS,
    PER_HEAD_ARGS,
    WIDTH_ATTRS,
    AttentionLayout,
    Found,
    MLPLayout,
    activation_of,
    child_module,
    head_dim_of,
)
from neuroprune.model.surgery import (
    ParamChange,
    head_rows,
    in_features,
    is_projection,
    out_features,
    select_inputs,
    select_outputs,
    weight_matrix,
)

HEADS_ATTR = "_neuroprune_heads"  # on an attention module: (original heads, kept original indices)
FULL_BIAS_ATTR = "_neuroprune_full_bias"  # the unsliced bias between a module's pre and post hook


class AttentionUnit:
    """One attention block. Heads are removed a key/value group at a time (see `heads.py`).

    A *group* is the unit of removal: one key/value head with the query heads that read it
    (`group_size` of them; one head without grouped-query attention). Under multi-query
    attention (one key/value head shared by all query heads) every query head is a group of its
    own that shares the key/value head with the others, so query heads can go one by one while
    the shared key and value stay. `num_kv_heads` counts groups; `kv_heads` the key/value heads.
    """

    def __init__(self, found: Found, model_config: Any) -> None:
        layout: AttentionLayout = found.layout  # type: ignore[assignment]
        self.name = found.name
        self.module = found.module
        self.layout = layout
        self.core = found.module.get_submodule(layout.core) if layout.core else found.module
        self.o = found.module.get_submodule(layout.o)
        self.qkv = found.module.get_submodule(layout.qkv) if layout.qkv else None
        self.q, self.k, self.v = (
            (None, None, None) if self.qkv is not None
            else tuple(found.module.get_submodule(p) for p in (layout.q, layout.k, layout.v))
        )
        self.head_projections = [
            m for m in (child_module(found.module, p) for p in layout.head_projections) if is_projection(m)
        ]
        q_rows = in_features(self.o)
        kv_rows = self._kv_rows(q_rows)
        self.head_dim = head_dim_of(self.core, model_config, q_rows)
        if q_rows % self.head_dim or kv_rows % self.head_dim:
            raise UnsupportedArchitectureError(
                f"{self.name}: projection widths {q_rows} (query) / {kv_rows} (key/value) are not "
                f"multiples of the head size {self.head_dim}; pass a matching attention layout."
            )
        self.original_heads = q_rows // self.head_dim
        self.original_kv_heads = kv_rows // self.head_dim
        if self.original_kv_heads == 0 or self.original_heads % self.original_kv_heads:
            raise UnsupportedArchitectureError(
                f"{self.name}: {self.original_heads} query heads cannot be split evenly over "
                f"{self.original_kv_heads} key/value heads."
            )
        self.multi_query = self.original_kv_heads == 1 and self.original_heads > 1
        self.group_size = 1 if self.multi_query else self.original_heads // self.original_kv_heads
        self.kept_groups: list[int] = list(range(self.original_groups))
        self.original_numel = {k: m.numel() for k, m in self.matrices().items()}
        self._hooks: list[Any] = []
        self._own_config = False
        self.head_removal_refused = self._unsliced_head_terms(model_config)

    def _unsliced_head_terms(self, model_config: Any) -> str:
        """Why heads cannot be removed ('' when they can): the attention forward takes a per-head
        term built for all heads that the layout does not say how to cut."""
        try:
            params = inspect.signature(self.core.forward).parameters
        except (TypeError, ValueError):
            return ""
        sliced = (self.layout.head_bias_arg, self.layout.head_mask_arg)
        unsliced = [a for a in PER_HEAD_ARGS if a in params and a not in sliced]
        if not unsliced:
            return ""
        family = getattr(model_config, "model_type", None) or type(self.core).__name__
        return (
            f"model type {family!r}: head removal is not supported: the attention {self.name} "
            f"({type(self.core).__name__}) takes {unsliced[0]!r}, a per-head term the model builds "
            "for all its heads, and its layout does not say how to cut it to the heads a layer "
            "keeps (removing a head would break the forward pass or shift the remaining heads' "
            f"terms). Name it in an attention layout: {{..., 'head_bias_arg': {unsliced[0]!r}, "
            "'head_bias_dims': 'batch,heads' | 'batch*heads' | 'heads'}, or train with "
            "prune_heads=False (penalties and MLP pruning work)."
        )

    # --- shapes -------------------------------------------------------------------------------
    def _kv_rows(self, q_rows: int) -> int:
        if self.qkv is None:
            return out_features(self.k)
        return (out_features(self.qkv) - q_rows) // 2

    @property
    def num_heads(self) -> int:
        return len(self.kept_groups) * self.group_size

    @property
    def num_kv_heads(self) -> int:
        """Groups present (the units of removal; key/value heads unless multi-query)."""
        return len(self.kept_groups)

    @property
    def kv_heads(self) -> int:
        """Key/value heads present."""
        return 1 if self.multi_query else len(self.kept_groups)

    @property
    def original_groups(self) -> int:
        """Removal groups of the dense block (query heads under multi-query attention)."""
        return self.original_heads // self.group_size

    @property
    def kept_kv_heads(self) -> list[int]:
        """Original indices of the key/value heads still present."""
        return [0] if self.multi_query else list(self.kept_groups)

    @property
    def kept_heads(self) -> list[int]:
        """Original indices of the query heads still present."""
        return [g * self.group_size + t for g in self.kept_groups for t in range(self.group_size)]

    # --- canonical views ----------------------------------------------------------------------
    def fused_rows(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rows of the fused projection holding Q, K and V, each head-major: [all Q | all K | all
        V] for ``concat``, per key/value group [its query heads | k | v] for ``interleaved``
        (which, with one key/value head, is the concat order)."""
        h, kv, heads = self.head_dim, self.kv_heads, self.num_heads
        if self.layout.fused == "interleaved" and not self.multi_query:
            per_group = heads // kv
            base = torch.arange(kv)[:, None] * (per_group + 2) * h
            k = (base + per_group * h + torch.arange(h)[None, :]).reshape(-1)
            return (base + torch.arange(per_group * h)[None, :]).reshape(-1), k, k + h
        k = heads * h + torch.arange(kv * h)
        return torch.arange(heads * h), k, k + kv * h

    def qkv_matrices(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Q, K, V as head-major `(out, in)` matrices (differentiable)."""
        if self.qkv is None:
            return weight_matrix(self.q), weight_matrix(self.k), weight_matrix(self.v)
        w = weight_matrix(self.qkv)
        if self.layout.fused == "interleaved" and not self.multi_query:
            per_group = self.num_heads // self.kv_heads
            blocks = w.reshape(self.kv_heads, per_group + 2, self.head_dim, w.shape[1])
            d_in = w.shape[1]
            return (blocks[:, :per_group].reshape(-1, d_in), blocks[:, per_group].reshape(-1, d_in),
                    blocks[:, per_group + 1].reshape(-1, d_in))
        q_rows = self.num_heads * self.head_dim
        kv_rows = self.kv_heads * self.head_dim
        return w[:q_rows], w[q_rows:q_rows + kv_rows], w[q_rows + kv_rows:]

    def input_l1(self) -> torch.Tensor:
        """sum_j |A_ij| for every input dimension i of A = [Q, K, V] (method.md sec. 2)."""
        if self.qkv is not None:  # the fused matrix holds exactly Q, K and V
            return weight_matrix(self.qkv).abs().sum(0)
        return sum(weight_matrix(m).abs().sum(0) for m in (self.q, self.k, self.v))

    def counted_modules(self) -> dict[str, nn.Module]:
        """The modules behind the counted matrices of this block (method.md sec. 5), by kind: the
        one place that names them (`matrices()` and `ModelIndex.counted_*` derive from it)."""
        if self.qkv is not None:
            return {"qkv": self.qkv, "o": self.o}
        return {"q": self.q, "k": self.k, "v": self.v, "o": self.o}

    def matrices(self) -> dict[str, torch.Tensor]:
        """The regularised / counted matrices of this block, `(out, in)`."""
        return {k: weight_matrix(m) for k, m in self.counted_modules().items()}

    def group_blocks(self) -> torch.Tensor:
        """One flat row per group: its query heads' Q rows, then its K and V rows (under
        multi-query attention the shared K and V, the same in every row)."""
        q, k, v = (m.detach() for m in self.qkv_matrices())
        g = self.num_kv_heads
        if self.multi_query:
            shared = torch.cat([k.reshape(-1), v.reshape(-1)])
            return torch.cat([q.reshape(g, -1), shared.expand(g, -1)], dim=1)
        d_in = q.shape[1]
        return torch.cat(
            [q.reshape(g, -1, d_in), k.reshape(g, -1, d_in), v.reshape(g, -1, d_in)], dim=1
        ).reshape(g, -1)

    # --- surgery ------------------------------------------------------------------------------
    def query_rows(self, groups: list[int]) -> torch.Tensor:
        """Rows of Q (= columns of O) of the query heads in the given current group positions."""
        heads = [g * self.group_size + t for g in groups for t in range(self.group_size)]
        return head_rows(heads, self.head_dim)

    def kv_rows(self, groups: list[int]) -> torch.Tensor:
        """Rows of K and V that the given current group positions read (under multi-query
        attention the one shared key/value head, whichever groups)."""
        return head_rows([0] if self.multi_query else groups, self.head_dim)

    @torch.no_grad()
    def merge_output(self, src: int, dst: int) -> None:
        """Add group `src`'s slice of the output projection into group `dst`'s (current positions)."""
        w = weight_matrix(self.o)
        w[:, self.query_rows([dst])] += w[:, self.query_rows([src])]

    @torch.no_grad()
    def keep_groups(self, keep: list[int]) -> list[ParamChange]:
        """Physically keep only the groups at current positions `keep` (sorted)."""
        if self.head_removal_refused and len(keep) < self.num_kv_heads:
            raise UnsupportedArchitectureError(self.head_removal_refused)
        q_idx = self.query_rows(keep)
        kv_idx = self.kv_rows(keep)
        changes: list[ParamChange] = []
        if self.qkv is None:
            changes += select_outputs(self.q, q_idx)
            if not self.multi_query:
                changes += select_outputs(self.k, kv_idx)
                changes += select_outputs(self.v, kv_idx)
        else:
            fq, fk, fv = self.fused_rows()
            rows = torch.cat([fq[q_idx], fk[kv_idx], fv[kv_idx]]).sort().values  # layout order kept
            changes += select_outputs(self.qkv, rows)
        for module in self.head_projections:
            changes += select_outputs(module, q_idx)
        changes += select_inputs(self.o, q_idx)
        self.kept_groups = [self.kept_groups[p] for p in keep]
        self._sync_attributes()
        self.core.__dict__[HEADS_ATTR] = (self.original_heads, tuple(self.kept_heads))
        if (self.layout.head_bias_arg or self.layout.head_mask_arg) and not self._hooks:
            self._install_bias_hooks()
        return changes

    def _sync_attributes(self) -> None:
        """Rewrite the head counts and widths the module's forward reads, on the module and, where
        it reads them from `self.config` (Phi-3), on a copy of the config of its own (the model's
        config, which other layers share and `save_pretrained` writes, keeps the dense values)."""
        values = (
            (HEAD_COUNT_ATTRS, self.num_heads),
            (KV_HEAD_COUNT_ATTRS, self.kv_heads),
            (WIDTH_ATTRS + self.layout.width_attrs, self.num_heads * self.head_dim),
            (KV_GROUPS_ATTRS, self.num_heads // self.kv_heads),
        )
        for attrs, value in values:
            for attr in attrs:
                if isinstance(getattr(self.core, attr, None), int):
                    setattr(self.core, attr, value)
        config = getattr(self.core, "config", None)
        if config is None or not any(isinstance(getattr(config, a, None), int) for a in HEAD_COUNT_ATTRS):
            return
        if not self._own_config:
            self.core.config = config = copy.copy(config)
            self._own_config = True
        for attrs, value in values[:2]:
            for attr in attrs:
                if isinstance(getattr(config, attr, None), int):
                    setattr(config, attr, value)

    def _install_bias_hooks(self) -> None:
        """Slice the per-head bias (and a per-head mask) to this layer's heads on the way in, and
        hand the full bias on to the next layer on the way out where the family passes it from
        layer to layer (T5). The hooks read the heads from the module they run on (`HEADS_ATTR`),
        so a deep copy of the model (a dense reference) keeps its own heads."""
        signature = inspect.signature(self.core.forward)
        layout = self.layout
        factory = BIAS_FACTORIES.get(layout.bias_factory)

        def pre(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            original, kept = getattr(module, HEADS_ATTR)
            bound = signature.bind(*args, **kwargs)
            if layout.head_bias_arg:
                bias = bound.arguments.get(layout.head_bias_arg)
                if bias is None and factory is not None:
                    bias = factory(module, bound.arguments, original)
                module.__dict__[FULL_BIAS_ATTR] = bias
                if bias is not None:
                    cut = slice_heads(bias, layout.head_bias_dims, original, kept)
                    bound.arguments[layout.head_bias_arg] = cut
            mask = bound.arguments.get(layout.head_mask_arg) if layout.head_mask_arg else None
            if mask is not None:
                bound.arguments[layout.head_mask_arg] = slice_heads(mask, "batch,heads", original, kept)
            return bound.args, bound.kwargs

        def post(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            full = module.__dict__.pop(FULL_BIAS_ATTR, None)
            index = layout.head_bias_output
            if index is None or full is None or not isinstance(output, tuple):
                return None
            return output[:index] + (full,) + output[index + 1:]

        self._hooks = [
            self.core.register_forward_pre_hook(pre, with_kwargs=True),
            self.core.register_forward_hook(post, with_kwargs=True),
        ]


def slice_heads(tensor: Any, dims: str, original: int, kept: tuple[int, ...]) -> Any:
    """`tensor`, built by the model for all `original` heads, cut to the heads `kept` (original
    indices); `dims` says where the heads are (`AttentionLayout.head_bias_dims`)."""
    if not isinstance(tensor, torch.Tensor) or len(kept) == original:
        return tensor
    index = torch.tensor(kept, device=tensor.device)
    if dims == "heads" and tensor.shape[0] == original:
        return tensor.index_select(0, index)
    if dims == "batch*heads" and tensor.dim() == 4:  # Falcon unflattens it: (batch, heads, 1, k)
        dims = "batch,heads"
    if dims == "batch*heads" and tensor.dim() > 0 and tensor.shape[0] % original == 0:
        per_batch = tensor.reshape(-1, original, *tensor.shape[1:])
        return per_batch.index_select(1, index).flatten(0, 1)
    if dims == "batch,heads" and tensor.dim() > 1 and tensor.shape[1] == original:
        return tensor.index_select(1, index)
    return tensor


class MLPUnit:
    """One MLP: expand (`up`, plus `gate` for gated MLPs, one neuron = row i of both) and contract.
    With a fused `gate_up` projection (rows [gate | up]) `up` is that projection and neuron i
    owns its rows i and n + i."""

    def __init__(self, found: Found) -> None:
        layout: MLPLayout = found.layout  # type: ignore[assignment]
        self.name = found.name
        self.module = found.module
        self.layout = layout
        self.fused = bool(layout.gate_up)
        self.up = found.module.get_submodule(layout.expand)
        self.down = found.module.get_submodule(layout.down)
        self.gate = found.module.get_submodule(layout.gate) if layout.gate else None
        self.original_neurons = out_features(self.up) // (2 if self.fused else 1)
        if self.fused and out_features(self.up) % 2:
            raise UnsupportedArchitectureError(
                f"{self.name}: the fused gate/up projection {layout.gate_up!r} has an odd number of "
                f"rows ({out_features(self.up)}); it cannot hold [gate | up] halves."
            )
        self.original_numel = {k: m.numel() for k, m in self.matrices().items()}
        self.kept_neurons: list[int] = list(range(self.original_neurons))
        self.added_contract_bias = False  # compaction gave `down` a bias the dense config lacks

    @property
    def gated(self) -> bool:
        return self.fused or self.gate is not None

    def _half(self, tensor: torch.Tensor | None, second: bool) -> torch.Tensor | None:
        if tensor is None or not self.fused:
            return tensor
        n = tensor.shape[0] // 2
        return tensor[n:] if second else tensor[:n]

    def up_matrix(self) -> torch.Tensor:
        """`(neurons, d)` up rows (a view)."""
        return self._half(weight_matrix(self.up), second=True)

    def gate_matrix(self) -> torch.Tensor | None:
        """`(neurons, d)` gate rows (a view), None for a plain MLP."""
        if self.gate is not None:
            return weight_matrix(self.gate)
        return self._half(weight_matrix(self.up), second=False) if self.fused else None

    def up_bias(self) -> torch.Tensor | None:
        return self._half(self.up.bias, second=True)

    def gate_bias(self) -> torch.Tensor | None:
        if self.gate is not None:
            return self.gate.bias
        return self._half(self.up.bias, second=False) if self.fused else None

    def activation(self) -> Any:
        """The activation of the gate (of the up rows for a plain MLP), None if not found."""
        return activation_of(self.module, self.layout.expand)

    def expand_matrices(self) -> list[torch.Tensor]:
        """`(neurons, d)` matrices whose row i together is neuron i's fan-in."""
        gate = self.gate_matrix()
        return [self.up_matrix()] if gate is None else [gate, self.up_matrix()]

    def contract_matrix(self) -> torch.Tensor:
        return weight_matrix(self.down)

    def counted_modules(self) -> dict[str, nn.Module]:
        """The modules behind the counted matrices of this MLP, by kind (see `AttentionUnit`); a
        fused gate/up projection counts as `up` as a whole."""
        return {k: m for k, m in (("gate", self.gate), ("up", self.up), ("down", self.down)) if m is not None}

    def matrices(self) -> dict[str, torch.Tensor]:
        """Counted matrices, `(out, in)`; a fused gate/up projection counts as `up` as a whole."""
        return {k: weight_matrix(m) for k, m in self.counted_modules().items()}

    @torch.no_grad()
    def keep_neurons(self, keep: list[int]) -> list[ParamChange]:
        """Physically keep only the neurons at current positions `keep` (sorted): rows of the
        expand matrices (gate and up), columns of the contract matrix."""
        index = torch.as_tensor(keep, dtype=torch.long)
        changes: list[ParamChange] = []
        if self.fused:
            changes += select_outputs(self.up, torch.cat([index, index + len(self.kept_neurons)]))
        for module in (self.gate, None if self.fused else self.up):
            if module is not None:
                changes += select_outputs(module, index)
        changes += select_inputs(self.down, index)
        self.kept_neurons = [self.kept_neurons[p] for p in keep]
        return changes
