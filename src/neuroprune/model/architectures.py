"""Architecture knowledge, all of it: which sub-modules of a `transformers` model are the attention
projections and the MLP of each block, per model family, plus a generic fallback and user
overrides. Nothing else in the package looks at `model_type`.

A *layout* names child modules relative to a candidate module: the attention layout
``AttentionLayout(q="q_proj", k="k_proj", v="v_proj", o="o_proj")`` matches every module that has
those four children. Discovery walks `model.named_modules()` and tries the layouts of the model's
family (then the user's, then every built-in one for unknown families).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from neuroprune.errors import ConfigError, UnsupportedArchitectureError
from neuroprune.model.surgery import is_projection

# Attributes that hold a head count / a width of all heads together, on whichever module the
# family keeps them; head removal rewrites those that exist.
HEAD_COUNT_ATTRS = ("num_heads", "num_attention_heads", "n_heads", "n_head")
KV_HEAD_COUNT_ATTRS = ("num_key_value_heads", "num_kv_heads")
WIDTH_ATTRS = ("all_head_size", "inner_dim", "split_size")
HEAD_DIM_ATTRS = ("head_dim", "attention_head_size", "key_value_proj_dim", "head_size", "d_kv")
# Attributes under which a family keeps its MLP activation function, on the MLP module or on
# the module holding the expand projection (compaction folds constant activations of dead neurons).
ACTIVATION_ATTRS = ("act_fn", "act", "activation_fn", "activation", "intermediate_act_fn")
# Parts of the class names in `config.architectures` that mark a model with a generating head.
SEQ2SEQ_CLASS_MARKS = ("ConditionalGeneration", "Seq2Seq")
CAUSAL_LM_CLASS_MARKS = ("CausalLM", "LMHead")

BiasFactory = Callable[[nn.Module, dict[str, Any], int], torch.Tensor | None]


@dataclass(frozen=True)
class AttentionLayout:
    """Where an attention block keeps its projections (paths relative to the matched module).

    Attributes:
        q, k, v: separate query / key / value projections (leave empty when `qkv` is used).
        qkv: one fused projection producing Q, K and V.
        fused: how `qkv`'s outputs are ordered: ``"concat"`` = [all Q | all K | all V] (GPT-2
            `c_attn`), ``"interleaved"`` = per head [q | k | v] (GPT-NeoX `query_key_value`).
        o: output projection.
        core: module that owns the head-count attributes and runs the attention (forward hooks
            for per-head biases go there); ``""`` is the matched module itself.
        head_bias_arg: name of a forward argument of `core` that carries a per-head additive
            bias of shape (batch, heads, q, k) computed once for all layers (T5, MPNet). After
            head removal it is sliced to the heads this layer still has.
        head_bias_output: index in `core`'s output tuple where the bias is handed on to the next
            layer; the full (unsliced) bias is put back there.
        bias_factory: name in `BIAS_FACTORIES` of a function that builds the full bias when the
            layer would otherwise compute it itself (T5's first layer).
    """

    q: str = ""
    k: str = ""
    v: str = ""
    o: str = ""
    qkv: str = ""
    fused: Literal["concat", "interleaved", ""] = ""
    core: str = ""
    head_bias_arg: str = ""
    head_bias_output: int | None = None
    bias_factory: str = ""

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "attention layout") -> AttentionLayout:
        layout = _from_dict(cls, data, source)
        separate = layout.q and layout.k and layout.v
        if not layout.o or not (separate or (layout.qkv and layout.fused)):
            raise ConfigError(
                f"{source}: {data!r} must give `o` and either all of `q`, `k`, `v` or `qkv` with "
                "`fused` ('concat' or 'interleaved')."
            )
        if layout.fused not in ("", "concat", "interleaved"):
            raise ConfigError(f"{source}: fused={layout.fused!r} must be 'concat' or 'interleaved'.")
        return layout

    def projection_paths(self) -> tuple[str, ...]:
        return (self.qkv, self.o) if self.qkv else (self.q, self.k, self.v, self.o)


@dataclass(frozen=True)
class MLPLayout:
    """Where an MLP keeps its expand (`up`), optional `gate` and contract (`down`) projections."""

    up: str = ""
    down: str = ""
    gate: str = ""

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "mlp layout") -> MLPLayout:
        layout = _from_dict(cls, data, source)
        if not (layout.up and layout.down):
            raise ConfigError(f"{source}: {data!r} must give at least `up` and `down`.")
        return layout

    def projection_paths(self) -> tuple[str, ...]:
        return tuple(p for p in (self.gate, self.up, self.down) if p)


def _from_dict(cls: type, data: Any, source: str) -> Any:
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a dict of module paths, got {data!r}.")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{source}: unknown field(s) {unknown}; allowed: {sorted(known)}.")
    return cls(**data)


@dataclass(frozen=True)
class ArchSpec:
    """The layouts of one model family, most specific first."""

    attention: tuple[AttentionLayout, ...]
    mlp: tuple[MLPLayout, ...]


# --- per-family layouts -------------------------------------------------------------------------

def _t5_full_bias(core: nn.Module, args: dict[str, Any], heads: int) -> torch.Tensor | None:
    """T5's first self-attention layer computes the relative position bias itself, for the heads
    the embedding has (all original heads); later layers receive it. Build it here instead so
    that every layer can slice the full bias to its own heads."""
    hidden = args["hidden_states"]
    kv = args.get("key_value_states")
    q_len = hidden.shape[1]
    if kv is not None:
        k_len = kv.shape[1]
        past = 0
    else:
        cache = args.get("cache", args.get("kwargs", {}).get("past_key_values"))
        past = cache.get_seq_length(core.layer_idx) if cache is not None else 0
        k_len = past + q_len
    if getattr(core, "has_relative_attention_bias", False):
        return core.compute_bias(q_len, k_len, device=hidden.device, past_seen_tokens=past)
    return torch.zeros((1, heads, q_len, k_len), device=hidden.device, dtype=hidden.dtype)


BIAS_FACTORIES: dict[str, BiasFactory] = {"t5": _t5_full_bias}

BERT_ATTN = AttentionLayout(q="self.query", k="self.key", v="self.value", o="output.dense", core="self")
BERT_MLP = MLPLayout(up="intermediate.dense", down="output.dense")
LLAMA_ATTN = AttentionLayout(q="q_proj", k="k_proj", v="v_proj", o="o_proj")
LLAMA_MLP = MLPLayout(gate="gate_proj", up="up_proj", down="down_proj")
BART_ATTN = AttentionLayout(q="q_proj", k="k_proj", v="v_proj", o="out_proj")
FC_MLP = MLPLayout(up="fc1", down="fc2")
DISTILBERT_ATTN = AttentionLayout(q="q_lin", k="k_lin", v="v_lin", o="out_lin")
DISTILBERT_MLP = MLPLayout(up="lin1", down="lin2")
MPNET_ATTN = AttentionLayout(q="q", k="k", v="v", o="o", head_bias_arg="position_bias")
T5_ATTN = AttentionLayout(
    q="q", k="k", v="v", o="o", head_bias_arg="position_bias", head_bias_output=1, bias_factory="t5"
)
T5_MLP = MLPLayout(up="wi", down="wo")
T5_GATED_MLP = MLPLayout(gate="wi_0", up="wi_1", down="wo")
GPT2_ATTN = AttentionLayout(qkv="c_attn", fused="concat", o="c_proj")
GPT2_MLP = MLPLayout(up="c_fc", down="c_proj")
NEOX_ATTN = AttentionLayout(qkv="query_key_value", fused="interleaved", o="dense")
NEOX_MLP = MLPLayout(up="dense_h_to_4h", down="dense_4h_to_h")
PHI_ATTN = AttentionLayout(q="q_proj", k="k_proj", v="v_proj", o="dense")
PLAIN_UP_DOWN_MLP = MLPLayout(up="up_proj", down="down_proj")

_BERT = ArchSpec((BERT_ATTN,), (BERT_MLP,))
_LLAMA = ArchSpec((LLAMA_ATTN,), (LLAMA_MLP,))
_BART = ArchSpec((BART_ATTN,), (FC_MLP,))

ARCHITECTURES: dict[str, ArchSpec] = {
    **dict.fromkeys(("bert", "roberta", "xlm-roberta", "electra", "camembert", "ernie"), _BERT),
    "distilbert": ArchSpec((DISTILBERT_ATTN,), (DISTILBERT_MLP,)),
    "mpnet": ArchSpec((MPNET_ATTN,), (BERT_MLP,)),
    **dict.fromkeys(("t5", "mt5", "umt5"), ArchSpec((T5_ATTN,), (T5_GATED_MLP, T5_MLP))),
    **dict.fromkeys(("bart", "mbart", "marian", "pegasus", "blenderbot", "opt"), _BART),
    "gpt2": ArchSpec((GPT2_ATTN,), (GPT2_MLP,)),
    "gpt_neox": ArchSpec((NEOX_ATTN,), (NEOX_MLP,)),
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "olmo"), _LLAMA),
    "phi": ArchSpec((PHI_ATTN,), (FC_MLP,)),
}

# Tried, in this order, for a family the registry does not know.
GENERIC = ArchSpec(
    attention=(BERT_ATTN, LLAMA_ATTN, BART_ATTN, PHI_ATTN, DISTILBERT_ATTN, GPT2_ATTN, NEOX_ATTN,
               AttentionLayout(q="q", k="k", v="v", o="o")),
    mlp=(LLAMA_MLP, T5_GATED_MLP, BERT_MLP, PLAIN_UP_DOWN_MLP, FC_MLP, DISTILBERT_MLP, T5_MLP,
         GPT2_MLP, NEOX_MLP),
)


# --- discovery ----------------------------------------------------------------------------------

@dataclass
class Found:
    """A module matched by a layout, before it becomes a unit."""

    name: str
    module: nn.Module
    layout: AttentionLayout | MLPLayout


def _child(module: nn.Module, path: str) -> nn.Module | None:
    try:
        return module.get_submodule(path) if path else module
    except AttributeError:
        return None


def _matches(module: nn.Module, layout: AttentionLayout | MLPLayout) -> bool:
    return all(is_projection(_child(module, p)) for p in layout.projection_paths())


def _scan(model: nn.Module, layouts: tuple, keep: Callable[[str], bool]) -> list[Found]:
    found: list[Found] = []
    claimed: list[str] = []
    for name, module in model.named_modules():
        if any(name == c or name.startswith(c + ".") for c in claimed):
            continue
        for layout in layouts:
            if _matches(module, layout):
                claimed.append(name)
                if keep(name):
                    found.append(Found(name, module, layout))
                break
    return found


def spec_for(model: nn.Module, extra_attention: list[dict], extra_mlp: list[dict]) -> ArchSpec:
    """The family's spec with the user's layouts in front; the generic one for unknown families."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    base = ARCHITECTURES.get(model_type, GENERIC)
    user_attn = tuple(AttentionLayout.from_dict(d, "attention_layouts") for d in extra_attention)
    user_mlp = tuple(MLPLayout.from_dict(d, "mlp_layouts") for d in extra_mlp)
    return ArchSpec(user_attn + base.attention, user_mlp + base.mlp)


def discover(
    model: nn.Module,
    *,
    attention_layouts: list[dict] | None = None,
    mlp_layouts: list[dict] | None = None,
    attention_modules: str | None = None,
    mlp_modules: str | None = None,
    exclude_modules: str | None = None,
) -> tuple[list[Found], list[Found]]:
    """Find every attention block and MLP of `model`; raise if it cannot map the model."""
    spec = spec_for(model, attention_layouts or [], mlp_layouts or [])

    def keeper(pattern: str | None) -> Callable[[str], bool]:
        def keep(name: str) -> bool:
            if exclude_modules and re.search(exclude_modules, name):
                return False
            return pattern is None or re.search(pattern, name) is not None

        return keep

    attention = _scan(model, spec.attention, keeper(attention_modules))
    mlps = _scan(model, spec.mlp, keeper(mlp_modules))
    if not attention and not mlps:
        raise UnsupportedArchitectureError(_explain_unmapped(model))
    return attention, mlps


def _explain_unmapped(model: nn.Module) -> str:
    model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    names = [n for n, m in model.named_modules() if is_projection(m)]
    shown = ", ".join(names[:12]) + (" ..." if len(names) > 12 else "")
    return (
        f"neuroprune cannot map model type {model_type!r}: none of the known attention or MLP "
        f"layouts matches its modules. Projections found: {shown or 'none'}. Pass the layout "
        "yourself with paths relative to the block, e.g. NeuroPruneConfig(attention_layouts=[{'q': "
        "'wq', 'k': 'wk', 'v': 'wv', 'o': 'wo'}], mlp_layouts=[{'up': 'w1', 'down': 'w2'}]) "
        "(fused projections: {'qkv': 'c_attn', 'fused': 'concat', 'o': 'c_proj'})."
    )


def head_dim_of(core: nn.Module, model_config: Any, q_rows: int) -> int:
    """Head size: from the attention module's own attribute, else from the model config."""
    for attr in HEAD_DIM_ATTRS:
        value = getattr(core, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    for attr in HEAD_DIM_ATTRS:
        value = getattr(model_config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    for attr in HEAD_COUNT_ATTRS:
        value = getattr(core, attr, None) or getattr(model_config, attr, None)
        if isinstance(value, int) and value > 0 and q_rows % value == 0:
            return q_rows // value
    raise UnsupportedArchitectureError(
        f"cannot tell the head size of attention module {type(core).__name__}: it has none of "
        f"the attributes {HEAD_DIM_ATTRS + HEAD_COUNT_ATTRS} and neither has the model config."
    )



def activation_of(mlp: nn.Module, up: str) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """An MLP's activation function, looked up on the module holding its expand projection (path
    `up` relative to `mlp`), then on the MLP module itself; None if the family keeps it elsewhere."""
    parent_path = up.rpartition(".")[0]
    for owner in (mlp.get_submodule(parent_path) if parent_path else mlp, mlp):
        for attr in ACTIVATION_ATTRS:
            fn = getattr(owner, attr, None)
            if callable(fn):
                return fn
    return None


# --- what a model config says about the model's head --------------------------------------------

def is_encoder_decoder(model_config: Any) -> bool:
    """Whether the model has a decoder reading an encoder (its forward then needs decoder inputs)."""
    return bool(getattr(model_config, "is_encoder_decoder", False))


def head_kind(model_config: Any) -> str:
    """The task kind (`neuroprune.training.tasks.KINDS`) a saved model's head does, read from its config:
    ``seq2seq`` or ``causal_lm`` for generating heads, ``regression`` for one output, else
    ``classification``."""
    classes = " ".join(getattr(model_config, "architectures", None) or [])
    if is_encoder_decoder(model_config) or any(m in classes for m in SEQ2SEQ_CLASS_MARKS):
        return "seq2seq"
    if any(m in classes for m in CAUSAL_LM_CLASS_MARKS):
        return "causal_lm"
    if getattr(model_config, "problem_type", None) == "regression" or model_config.num_labels == 1:
        return "regression"
    return "classification"
