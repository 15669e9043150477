"""Layer-level mechanics: one attention block or one MLP seen through a canonical lens.

`AttentionUnit` turns whatever the family stores (separate, fused or per-head interleaved Q/K/V,
`Linear` or `Conv1D`, grouped-query attention) into head-major `(out, in)` matrices, and removes
key/value groups while keeping every attribute the module's forward relies on consistent.
`MLPUnit` does the same for expand / gate / contract. Policy (what to remove) lives elsewhere.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from neuroprune.errors import UnsupportedArchitectureError
from neuroprune.model.architectures import (
    BIAS_FACTORIES,
    HEAD_COUNT_ATTRS,
    KV_HEAD_COUNT_ATTRS,
    WIDTH_ATTRS,
    AttentionLayout,
    Found,
    MLPLayout,
    head_dim_of,
)
from neuroprune.model.surgery import (
    ParamChange,
    head_rows,
    in_features,
    out_features,
    select_inputs,
    select_outputs,
    weight_matrix,
)


class AttentionUnit:
    """One attention block. Heads are removed a key/value group at a time (see `heads.py`)."""

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
        self.group_size = self.original_heads // self.original_kv_heads
        self.kept_groups: list[int] = list(range(self.original_kv_heads))
        self.original_numel = {k: m.numel() for k, m in self.matrices().items()}
        self._signature: inspect.Signature | None = None
        self._full_bias: torch.Tensor | None = None
        self._hooks: list[Any] = []

    # --- shapes -------------------------------------------------------------------------------
    def _kv_rows(self, q_rows: int) -> int:
        if self.qkv is None:
            return out_features(self.k)
        total = out_features(self.qkv)
        if self.layout.fused == "interleaved":
            return q_rows
        return (total - q_rows) // 2

    @property
    def num_heads(self) -> int:
        return len(self.kept_groups) * self.group_size

    @property
    def num_kv_heads(self) -> int:
        return len(self.kept_groups)

    @property
    def kept_heads(self) -> list[int]:
        """Original indices of the query heads still present."""
        return [g * self.group_size + t for g in self.kept_groups for t in range(self.group_size)]

    # --- canonical views ----------------------------------------------------------------------
    def qkv_matrices(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Q, K, V as head-major `(out, in)` matrices (differentiable)."""
        if self.qkv is None:
            return weight_matrix(self.q), weight_matrix(self.k), weight_matrix(self.v)
        w = weight_matrix(self.qkv)
        if self.layout.fused == "interleaved":
            per_head = w.reshape(self.num_heads, 3, self.head_dim, w.shape[1])
            return tuple(per_head[:, i].reshape(-1, w.shape[1]) for i in range(3))  # type: ignore[return-value]
        q_rows = self.num_heads * self.head_dim
        kv_rows = self.num_kv_heads * self.head_dim
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
        """One flat row per key/value group: its query heads' Q rows, then its K and V rows."""
        q, k, v = (m.detach() for m in self.qkv_matrices())
        d_in = q.shape[1]
        g = self.num_kv_heads
        return torch.cat(
            [q.reshape(g, -1, d_in), k.reshape(g, -1, d_in), v.reshape(g, -1, d_in)], dim=1
        ).reshape(g, -1)

    # --- surgery ------------------------------------------------------------------------------
    def query_rows(self, groups: list[int]) -> torch.Tensor:
        """Rows of Q (= columns of O) of the query heads in the given current group positions."""
        heads = [g * self.group_size + t for g in groups for t in range(self.group_size)]
        return head_rows(heads, self.head_dim)

    @torch.no_grad()
    def merge_output(self, src: int, dst: int) -> None:
        """Add group `src`'s slice of the output projection into group `dst`'s (current positions)."""
        w = weight_matrix(self.o)
        w[:, self.query_rows([dst])] += w[:, self.query_rows([src])]

    @torch.no_grad()
    def keep_groups(self, keep: list[int]) -> list[ParamChange]:
        """Physically keep only the key/value groups at current positions `keep` (sorted)."""
        q_idx = self.query_rows(keep)
        kv_idx = head_rows(keep, self.head_dim)
        changes: list[ParamChange] = []
        if self.qkv is None:
            changes += select_outputs(self.q, q_idx)
            changes += select_outputs(self.k, kv_idx)
            changes += select_outputs(self.v, kv_idx)
        elif self.layout.fused == "interleaved":
            changes += select_outputs(self.qkv, head_rows(keep, 3 * self.head_dim))
        else:
            q_rows, kv_rows = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
            changes += select_outputs(
                self.qkv, torch.cat([q_idx, q_rows + kv_idx, q_rows + kv_rows + kv_idx])
            )
        changes += select_inputs(self.o, q_idx)
        self.kept_groups = [self.kept_groups[p] for p in keep]
        self._sync_attributes()
        if self.layout.head_bias_arg and not self._hooks:
            self._install_bias_hooks()
        return changes

    def _sync_attributes(self) -> None:
        for attrs, value in (
            (HEAD_COUNT_ATTRS, self.num_heads),
            (KV_HEAD_COUNT_ATTRS, self.num_kv_heads),
            (WIDTH_ATTRS, self.num_heads * self.head_dim),
        ):
            for attr in attrs:
                if isinstance(getattr(self.core, attr, None), int):
                    setattr(self.core, attr, value)

    def _install_bias_hooks(self) -> None:
        """Slice the shared per-head bias to this layer's heads on the way in, and hand the full
        bias on to the next layer on the way out (the bias is computed once for all layers)."""
        self._signature = inspect.signature(self.core.forward)
        arg = self.layout.head_bias_arg
        factory = BIAS_FACTORIES.get(self.layout.bias_factory)

        def pre(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            bound = self._signature.bind(*args, **kwargs)
            bias = bound.arguments.get(arg)
            if bias is None and factory is not None:
                bias = factory(module, bound.arguments, self.original_heads)
            if bias is None:
                return None
            self._full_bias = bias
            if bias.shape[1] == self.original_heads and self.num_heads != self.original_heads:
                bias = bias.index_select(1, torch.tensor(self.kept_heads, device=bias.device))
            bound.arguments[arg] = bias
            return bound.args, bound.kwargs

        def post(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            full, self._full_bias = self._full_bias, None
            index = self.layout.head_bias_output
            if index is None or full is None or not isinstance(output, tuple):
                return None
            return output[:index] + (full,) + output[index + 1:]

        self._hooks = [
            self.core.register_forward_pre_hook(pre, with_kwargs=True),
            self.core.register_forward_hook(post, with_kwargs=True),
        ]


class MLPUnit:
    """One MLP: expand (`up`, plus `gate` for gated MLPs, one neuron = row i of both) and contract."""

    def __init__(self, found: Found) -> None:
        layout: MLPLayout = found.layout  # type: ignore[assignment]
        self.name = found.name
        self.module = found.module
        self.layout = layout
        self.up = found.module.get_submodule(layout.up)
        self.down = found.module.get_submodule(layout.down)
        self.gate = found.module.get_submodule(layout.gate) if layout.gate else None
        self.original_neurons = out_features(self.up)
        self.original_numel = {k: m.numel() for k, m in self.matrices().items()}
        self.kept_neurons: list[int] = list(range(self.original_neurons))
        self.added_contract_bias = False  # compaction gave `down` a bias the dense config lacks

    def expand_matrices(self) -> list[torch.Tensor]:
        """`(neurons, d)` matrices whose row i together is neuron i's fan-in."""
        mats = [weight_matrix(self.up)]
        if self.gate is not None:
            mats.insert(0, weight_matrix(self.gate))
        return mats

    def contract_matrix(self) -> torch.Tensor:
        return weight_matrix(self.down)

    def counted_modules(self) -> dict[str, nn.Module]:
        """The modules behind the counted matrices of this MLP, by kind (see `AttentionUnit`)."""
        return {k: m for k, m in (("gate", self.gate), ("up", self.up), ("down", self.down)) if m is not None}

    def matrices(self) -> dict[str, torch.Tensor]:
        """The regularised / counted matrices of this MLP, `(out, in)`."""
        return {k: weight_matrix(m) for k, m in self.counted_modules().items()}

    @torch.no_grad()
    def keep_neurons(self, keep: list[int]) -> list[ParamChange]:
        """Physically keep only the neurons at current positions `keep` (sorted): rows of the
        expand matrices (gate and up), columns of the contract matrix."""
        index = torch.as_tensor(keep, dtype=torch.long)
        changes: list[ParamChange] = []
        for module in (self.gate, self.up):
            if module is not None:
                changes += select_outputs(module, index)
        changes += select_inputs(self.down, index)
        self.kept_neurons = [self.kept_neurons[p] for p in keep]
        return changes
