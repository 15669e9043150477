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
import logging
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from neuroprune.errors import ConfigError, UnsupportedArchitectureError
from neuroprune.model.surgery import in_features, is_projection, out_features, weight_matrix

logger = logging.getLogger(__name__)

# Attributes that hold a head count / a width of all heads together, on whichever module the
# family keeps them; head removal rewrites those that exist.
HEAD_COUNT_ATTRS = ("num_heads", "num_attention_heads", "n_heads", "n_head")
KV_HEAD_COUNT_ATTRS = ("num_key_value_heads", "num_kv_heads", "kv_heads")
# Query heads per key/value head, kept equal to num_heads // num_kv_heads (repeat_kv reads it).
KV_GROUPS_ATTRS = ("num_key_value_groups",)
WIDTH_ATTRS = ("all_head_size", "inner_dim", "split_size")
HEAD_DIM_ATTRS = ("head_dim", "attention_head_size", "key_value_proj_dim", "head_size", "d_kv")
# Attributes under which a family keeps its MLP activation function, on the MLP module or on
# the module holding the expand projection (compaction folds constant activations of dead neurons).
ACTIVATION_ATTRS = ("act_fn", "act", "activation_fn", "activation", "intermediate_act_fn", "gelu_impl")
# Parts of the class names in `config.architectures` that mark a model with a generating head.
SEQ2SEQ_CLASS_MARKS = ("ConditionalGeneration", "Seq2Seq")
CAUSAL_LM_CLASS_MARKS = ("CausalLM", "LMHead")

# Forward arguments that carry a per-head term the model computes once for all its heads (relative
# position biases, ALiBi): a layout must say how to cut them (`head_bias_arg`) before heads go.
PER_HEAD_ARGS = ("position_bias", "alibi", "relative_position_bias", "rel_pos_bias")
# Where the heads sit in a per-head bias tensor (see `AttentionLayout.head_bias_dims`).
BIAS_DIMS = ("batch,heads", "batch*heads", "heads")
# Config attributes that give the hidden size (structural discovery).
HIDDEN_SIZE_ATTRS = ("hidden_size", "d_model", "n_embd", "dim")

BiasFactory = Callable[[nn.Module, dict[str, Any], int], torch.Tensor | None]


@dataclass(frozen=True)
class AttentionLayout:
    """Where an attention block keeps its projections (paths relative to the matched module).

    Attributes:
        q, k, v: separate query / key / value projections (leave empty when `qkv` is used).
        qkv: one fused projection producing Q, K and V.
        fused: how `qkv`'s outputs are ordered: ``"concat"`` = [all Q | all K | all V] (GPT-2
            `c_attn`, Phi-3 `qkv_proj` with fewer K/V heads, multi-query [all Q | k | v]),
            ``"interleaved"`` = per key/value group [its query heads | k | v], i.e. per head
            [q | k | v] without grouped-query attention (GPT-NeoX, Bloom), [q_1..q_g | k | v] with
            it (Falcon's new decoder architecture).
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
        head_bias_dims: where the heads are in `head_bias_arg`: ``"batch,heads"`` = dim 1 (T5,
            MPNet), ``"batch*heads"`` = dim 0 flattened with the batch (Bloom / Falcon ALiBi),
            ``"heads"`` = dim 0 (MPT ALiBi). Biases built by the model for all original heads
            (ALiBi slopes from the config's head count) are sliced to this layer's heads.
        head_mask_arg: a forward argument of `core` holding an additive attention mask that may
            carry a per-head dimension at dim 1 (Falcon folds its ALiBi into the mask); sliced
            when that dimension has the original head count.
        head_projections: further projections whose output rows are per query head (DeBERTa's
            `pos_key_proj` / `pos_query_proj`); they lose the rows of removed heads.
        width_attrs: further attributes of `core` that hold the width of all query heads
            together (GPT-BigCode's `embed_dim`); rewritten on head removal.
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
    head_bias_dims: Literal["batch,heads", "batch*heads", "heads"] = "batch,heads"
    head_mask_arg: str = ""
    head_projections: tuple[str, ...] = ()
    width_attrs: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "attention layout") -> AttentionLayout:
        if isinstance(data, dict):  # JSON / YAML give lists
            data = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        layout = _from_dict(cls, data, source)
        separate = layout.q and layout.k and layout.v
        if not layout.o or not (separate or (layout.qkv and layout.fused)):
            raise ConfigError(
                f"{source}: {data!r} must give `o` and either all of `q`, `k`, `v` or `qkv` with "
                "`fused` ('concat' or 'interleaved')."
            )
        if layout.fused not in ("", "concat", "interleaved"):
            raise ConfigError(f"{source}: fused={layout.fused!r} must be 'concat' or 'interleaved'.")
        if layout.head_bias_dims not in BIAS_DIMS:
            raise ConfigError(
                f"{source}: head_bias_dims={layout.head_bias_dims!r} must be one of {', '.join(BIAS_DIMS)}."
            )
        return layout

    def projection_paths(self) -> tuple[str, ...]:
        return (self.qkv, self.o) if self.qkv else (self.q, self.k, self.v, self.o)


@dataclass(frozen=True)
class MLPLayout:
    """Where an MLP keeps its expand (`up`), optional `gate` and contract (`down`) projections;
    `gate_up` is one projection whose rows are [gate | up] (Phi-3 `gate_up_proj`, ModernBERT `Wi`:
    the first half goes through the activation and multiplies the second)."""

    up: str = ""
    down: str = ""
    gate: str = ""
    gate_up: str = ""

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "mlp layout") -> MLPLayout:
        layout = _from_dict(cls, data, source)
        if not layout.down or bool(layout.up) == bool(layout.gate_up) or (layout.gate and layout.gate_up):
            raise ConfigError(
                f"{source}: {data!r} must give `down` and either `up` (with an optional `gate`) or "
                "`gate_up` (one fused projection, rows [gate | up])."
            )
        return layout

    @property
    def expand(self) -> str:
        """The path of the projection that holds the up rows (the fused one for `gate_up`)."""
        return self.gate_up or self.up

    def projection_paths(self) -> tuple[str, ...]:
        return tuple(p for p in (self.gate, self.up, self.gate_up, self.down) if p)


def layout_dict(layout: AttentionLayout | MLPLayout) -> dict[str, Any]:
    """The fields of a layout that differ from the defaults: what to pass as `attention_layouts` /
    `mlp_layouts` to name it explicitly."""
    return {f.name: getattr(layout, f.name) for f in dataclasses.fields(layout)
            if getattr(layout, f.name) != f.default}


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
    """The layouts of one model family, most specific first, and its defaults.

    `unit_scores`: how NeuroPrune ranks units under a FLOP target when the config says
    ``scores="auto"``: ``"activations"`` for decoder-only LLM families, whose few channels with
    very large activations make weight-only scores remove load-bearing units (SmolLM2: chance
    accuracy after 10% of the FLOPs go by weight scores, 78.5 of 82.0 by activation scores), and
    the paper's ``"weights"`` elsewhere (level with activations on MiniLM)."""

    attention: tuple[AttentionLayout, ...]
    mlp: tuple[MLPLayout, ...]
    unit_scores: str = "weights"


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
# Phi-3: [q heads | k heads | v heads] in one projection (grouped-query), [gate | up] in another.
PHI3_ATTN = AttentionLayout(qkv="qkv_proj", fused="concat", o="o_proj")
PHI3_MLP = MLPLayout(gate_up="gate_up_proj", down="down_proj")
# Falcon: per key/value group [q_1..q_g | k | v] (new decoder architecture), [all q | k | v]
# (multi-query) or per head [q | k | v]: all three are the grouped interleaved order. With ALiBi
# the model hands every layer slopes for all heads, flattened with the batch, and folds them
# into the (then per-head) attention mask.
FALCON_ATTN = AttentionLayout(
    qkv="query_key_value", fused="interleaved", o="dense", head_bias_arg="alibi",
    head_bias_dims="batch*heads", head_mask_arg="attention_mask",
)
BLOOM_ATTN = AttentionLayout(
    qkv="query_key_value", fused="interleaved", o="dense", head_bias_arg="alibi",
    head_bias_dims="batch*heads",
)
MPT_ATTN = AttentionLayout(
    qkv="Wqkv", fused="concat", o="out_proj", head_bias_arg="position_bias", head_bias_dims="heads"
)
# GPT-BigCode: multi-query [all q | k | v] or per head [q | k | v]; splits by `embed_dim`.
BIGCODE_ATTN = AttentionLayout(qkv="c_attn", fused="interleaved", o="c_proj", width_attrs=("embed_dim",))
DEBERTA_V2_ATTN = AttentionLayout(
    q="self.query_proj", k="self.key_proj", v="self.value_proj", o="output.dense", core="self",
    head_projections=("self.pos_key_proj", "self.pos_query_proj"),
)
MODERNBERT_ATTN = AttentionLayout(qkv="Wqkv", fused="concat", o="Wo")
MODERNBERT_MLP = MLPLayout(gate_up="Wi", down="Wo")

_BERT = ArchSpec((BERT_ATTN,), (BERT_MLP,))
_LLAMA = ArchSpec((LLAMA_ATTN,), (LLAMA_MLP,), unit_scores="activations")
_BART = ArchSpec((BART_ATTN,), (FC_MLP,))

ARCHITECTURES: dict[str, ArchSpec] = {
    **dict.fromkeys(("bert", "roberta", "xlm-roberta", "electra", "camembert", "ernie"), _BERT),
    "distilbert": ArchSpec((DISTILBERT_ATTN,), (DISTILBERT_MLP,)),
    "mpnet": ArchSpec((MPNET_ATTN,), (BERT_MLP,)),
    **dict.fromkeys(("t5", "mt5", "umt5"), ArchSpec((T5_ATTN,), (T5_GATED_MLP, T5_MLP))),
    **dict.fromkeys(("bart", "mbart", "marian", "pegasus", "blenderbot"), _BART),
    "opt": ArchSpec((BART_ATTN,), (FC_MLP,), unit_scores="activations"),
    "gpt2": ArchSpec((GPT2_ATTN,), (GPT2_MLP,), unit_scores="activations"),
    "gpt_neox": ArchSpec((NEOX_ATTN,), (NEOX_MLP,), unit_scores="activations"),
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "olmo", "olmo2",
                     "stablelm", "cohere"), _LLAMA),
    "phi": ArchSpec((PHI_ATTN,), (FC_MLP,), unit_scores="activations"),
    "phi3": ArchSpec((PHI3_ATTN,), (PHI3_MLP,), unit_scores="activations"),
    "falcon": ArchSpec((FALCON_ATTN,), (NEOX_MLP,), unit_scores="activations"),
    "bloom": ArchSpec((BLOOM_ATTN,), (NEOX_MLP,), unit_scores="activations"),
    "mpt": ArchSpec((MPT_ATTN,), (PLAIN_UP_DOWN_MLP,), unit_scores="activations"),
    "gpt_bigcode": ArchSpec((BIGCODE_ATTN,), (GPT2_MLP,), unit_scores="activations"),
    "starcoder2": ArchSpec((LLAMA_ATTN,), (GPT2_MLP,), unit_scores="activations"),
    "deberta-v2": ArchSpec((DEBERTA_V2_ATTN,), (BERT_MLP,)),
    "modernbert": ArchSpec((MODERNBERT_ATTN,), (MODERNBERT_MLP,)),
}

# Families whose attention is known and deliberately not mapped, with the reason (the error says it).
UNSUPPORTED_ATTENTION: dict[str, str] = {
    "deberta": (
        "DeBERTa (v1) keeps per-head query and value biases as bare parameters (q_bias, v_bias) "
        "outside its fused in_proj, and its optional talking-head projections mix all heads, so a "
        "head cannot be cut out of it; DeBERTa-v2 / v3 are supported"
    ),
}

# Tried, in this order, for a family the registry does not know.
GENERIC = ArchSpec(
    attention=(BERT_ATTN, DEBERTA_V2_ATTN, LLAMA_ATTN, BART_ATTN, PHI_ATTN, DISTILBERT_ATTN,
               GPT2_ATTN, NEOX_ATTN, PHI3_ATTN, AttentionLayout(q="q", k="k", v="v", o="o")),
    mlp=(LLAMA_MLP, PHI3_MLP, T5_GATED_MLP, BERT_MLP, PLAIN_UP_DOWN_MLP, FC_MLP, DISTILBERT_MLP,
         T5_MLP, GPT2_MLP, NEOX_MLP),
)


# --- discovery ----------------------------------------------------------------------------------

@dataclass
class Found:
    """A module matched by a layout (or recognised by its shapes), before it becomes a unit."""

    name: str
    module: nn.Module
    layout: AttentionLayout | MLPLayout
    structural: bool = False  # recognised from the shapes of its projections, not a known layout


def child_module(module: nn.Module, path: str) -> nn.Module | None:
    try:
        return module.get_submodule(path) if path else module
    except AttributeError:
        return None


def _matches(module: nn.Module, layout: AttentionLayout | MLPLayout) -> bool:
    return all(is_projection(child_module(module, p)) for p in layout.projection_paths())


def _inside(name: str, blocks: list[str]) -> bool:
    return any(name == b or name.startswith(b + ".") or not b for b in blocks)


def _scan(model: nn.Module, layouts: tuple) -> list[Found]:
    found: list[Found] = []
    for name, module in model.named_modules():
        if _inside(name, [f.name for f in found]):
            continue
        for layout in layouts:
            if _matches(module, layout):
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
    allow_missing_attention: bool = False,
) -> tuple[list[Found], list[Found]]:
    """Find every attention block and MLP of `model`; raise if it cannot map the model.

    Known layouts are tried first; blocks they miss are then recognised by the shapes of their
    projections (`_structural_attention`, `_structural_mlps`). The result must cover the model
    evenly (`check_coverage`): a model with attention in some layers and not in others, or with
    no attention at all, is refused (the latter unless `allow_missing_attention`). The name
    filters apply last, so leaving blocks out on purpose is not mistaken for a partial mapping.
    """
    spec = spec_for(model, attention_layouts or [], mlp_layouts or [])
    attention = _scan(model, spec.attention)
    used = _projections_of(attention)
    mlps = [f for f in _scan(model, spec.mlp) if not set(_projections_of([f])) & set(used)]
    attention += _structural_attention(model, used + _projections_of(mlps))
    mlps += _structural_mlps(model, attention, mlps)
    if not attention and not mlps:
        raise UnsupportedArchitectureError(_explain_unmapped(model))
    check_coverage(model, attention, mlps, allow_missing_attention, exclude_modules)
    guessed = [f.name for f in attention + mlps if f.structural]
    if guessed:
        logger.warning(
            "neuroprune recognised %d block(s) of model type %r by the shapes of their projections "
            "(first: %s, taken as %s); pass attention_layouts / mlp_layouts to name them instead.",
            len(guessed), _model_type(model), guessed[0],
            layout_dict(next(f.layout for f in attention + mlps if f.structural)),
        )

    def keeper(pattern: str | None) -> Callable[[Found], bool]:
        def keep(found: Found) -> bool:
            if exclude_modules and re.search(exclude_modules, found.name):
                return False
            return pattern is None or re.search(pattern, found.name) is not None

        return keep

    kept = [f for f in attention if keeper(attention_modules)(f)]
    _refuse_split_query(kept)
    return kept, [f for f in mlps if keeper(mlp_modules)(f)]


# Names of a separate query projection beside a fused one: GPT-2's cross-attention keeps its query
# in `q_attn` and only [k | v] in `c_attn`, which the fused [q | k | v] layout would misread.
SEPARATE_QUERY_NAMES = ("q_attn", "q_proj", "query")


def _refuse_split_query(attention: list[Found]) -> None:
    """A block matched by a fused [q | k | v] layout that also has its own query projection is a
    cross-attention whose fused projection holds [k | v] only: reading it as [q | k | v] would
    take K rows for Q rows and prune silently wrong heads."""
    for found in attention:
        if not found.layout.qkv:
            continue
        extra = [n for n in SEPARATE_QUERY_NAMES if is_projection(child_module(found.module, n))]
        if extra:
            raise UnsupportedArchitectureError(
                f"{found.name} has a separate query projection `{extra[0]}` beside its fused "
                f"`{found.layout.qkv}`: a cross-attention (e.g. GPT-2 with add_cross_attention) whose "
                "fused projection holds "
                "[k | v] only, which neuroprune does not support. Leave these blocks out with "
                f"exclude_modules (e.g. exclude_modules={found.name.rsplit('.', 1)[-1]!r}) to prune "
                "the rest of the model."
            )


def _projections_of(blocks: list[Found]) -> list[str]:
    """Full names of the projections the blocks' layouts use."""
    out = []
    for f in blocks:
        extra = getattr(f.layout, "head_projections", ())
        out += [f"{f.name}.{p}" if f.name else p for p in (*f.layout.projection_paths(), *extra)]
    return out


def _model_type(model: nn.Module) -> str:
    return getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__


def hidden_size_of(model: nn.Module) -> int | None:
    """The model width: from its config, else the input width most projections have."""
    config = getattr(model, "config", None)
    for attr in HIDDEN_SIZE_ATTRS:
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    widths = Counter(in_features(m) for m in model.modules() if is_projection(m))
    return widths.most_common(1)[0][0] if widths else None


def _parent(name: str) -> str:
    return name.rpartition(".")[0]


def _relative(name: str, block: str) -> str:
    return name[len(block) + 1:] if block else name


def _common(a: str, b: str) -> str:
    out = []
    for x, y in zip(a.split("."), b.split(".")):
        if x != y:
            break
        out.append(x)
    return ".".join(out)


def _structural_attention(model: nn.Module, taken: list[str]) -> list[Found]:
    """Attention blocks no layout matched, recognised by shapes: three sibling projections in a
    row reading the model width (query, key, value in declaration order; key and value of one
    width, the query's a multiple of it), then the next projection reading the query width and
    writing the model width (the output), in the same module or its parent. Projections between
    value and output that write the query width per head (DeBERTa's positional projections)
    become `head_projections`. Q and K enter every computation symmetrically, so the
    declaration order only matters for telling the output projection from the rest."""
    width = hidden_size_of(model)
    projections = [(n, m) for n, m in model.named_modules() if is_projection(m) and n not in taken]
    found: list[Found] = []
    i = 0
    while i + 3 < len(projections):
        (qn, q), (kn, k), (vn, v) = projections[i:i + 3]
        parent = _parent(qn)
        shapes_fit = (
            _parent(kn) == parent == _parent(vn)
            and in_features(q) == in_features(k) == in_features(v) == width
            and out_features(k) == out_features(v) and out_features(q) % out_features(k) == 0
        )
        output = None
        extras: list[str] = []
        if shapes_fit:
            for on, o in projections[i + 3:]:
                if in_features(o) == out_features(q) and out_features(o) == width:
                    output = on
                    break
                if _parent(on) == parent and in_features(o) == width and out_features(o) == out_features(q):
                    extras.append(on)
                    continue
                break
        block = _common(parent, _parent(output)) if output else ""
        if output is None or block not in (parent, _parent(parent)):
            i += 1
            continue
        layout = AttentionLayout(
            q=_relative(qn, block), k=_relative(kn, block), v=_relative(vn, block),
            o=_relative(output, block), core=_relative(parent, block) if parent != block else "",
            head_projections=tuple(_relative(e, block) for e in extras),
        )
        found.append(Found(block, model.get_submodule(block), layout, structural=True))
        i += 4 + len(extras)
    return found


def _layers(model: nn.Module) -> list[tuple[str, list[str]]]:
    """(list name, item names) of every `nn.ModuleList` / `nn.Sequential` of two or more modules
    of one class: the repeated layers a transformer is made of."""
    out = []
    for name, module in model.named_modules():
        repeated = isinstance(module, (nn.ModuleList, nn.Sequential)) and len(module) > 1
        if repeated and len({type(m) for m in module}) == 1:
            out.append((name, [f"{name}.{i}" if name else str(i) for i in range(len(module))]))
    return out


def _structural_mlps(model: nn.Module, attention: list[Found], mlps: list[Found]) -> list[Found]:
    """MLPs no layout matched, in layers that have an attention block but no MLP: two projections
    in a row inside the layer and outside its attention, model width -> n -> model width (n not
    the model width), with a third of the first's shape just before them taken as the gate."""
    width = hidden_size_of(model)
    claimed = set(_projections_of(attention + mlps))
    found: list[Found] = []
    for _, items in _layers(model):
        for item in items:
            has_attention = any(_inside(a.name, [item]) for a in attention)
            if not has_attention or any(_inside(m.name, [item]) for m in mlps):
                continue
            layer = model.get_submodule(item)
            projs = [(f"{item}.{n}", m) for n, m in layer.named_modules()
                     if is_projection(m) and f"{item}.{n}" not in claimed]
            for j in range(len(projs) - 1):
                (un, up), (dn, down) = projs[j:j + 2]
                n = out_features(up)
                if not (in_features(up) == width == out_features(down) and in_features(down) == n != width):
                    continue
                before = projs[j - 1] if j else None
                same_shape = before is not None and weight_matrix(before[1]).shape == weight_matrix(up).shape
                gate = before if same_shape else None
                block = _common(_common(_parent(un), _parent(dn)), _parent(gate[0]) if gate else _parent(un))
                layout = MLPLayout(up=_relative(un, block), down=_relative(dn, block),
                                   gate=_relative(gate[0], block) if gate else "")
                found.append(Found(block, model.get_submodule(block), layout, structural=True))
                break
    return found


def check_coverage(model: nn.Module, attention: list[Found], mlps: list[Found],
                   allow_missing_attention: bool = False, exclude_modules: str | None = None) -> None:
    """Refuse a partial mapping: every repeated layer of one list must have as many attention
    blocks (and MLPs) as its siblings (layers `exclude_modules` leaves out do not count), and a
    model without any attention block is refused unless `allow_missing_attention` (then head
    pruning and the attention penalty are off)."""
    for kind, blocks in (("attention", attention), ("MLP", mlps)):
        for list_name, all_items in _layers(model):
            items = [i for i in all_items if not (exclude_modules and re.search(exclude_modules, i + "."))]
            counts = [sum(_inside(b.name, [item]) for b in blocks) for item in items]
            if len(set(counts)) > 1:
                missing = [item for item, c in zip(items, counts) if c < max(counts)]
                shown = f"{missing[:4]}{' ...' if len(missing) > 4 else ''}"
                raise UnsupportedArchitectureError(
                    f"model type {_model_type(model)!r}: {kind} blocks were found in some layers of "
                    f"{list_name or 'the model'} but not in {shown}; "
                    "a partial mapping would prune some layers and silently skip others. Name the "
                    "missing layout with attention_layouts / mlp_layouts, or leave those layers out "
                    "on purpose with exclude_modules."
                )
    if not attention:
        reason = UNSUPPORTED_ATTENTION.get(_model_type(model))
        message = (
            f"model type {_model_type(model)!r}: no attention block was found (MLPs: "
            f"{len(mlps)}){': ' + reason if reason else ''}. Projections found: "
            f"{_projection_names(model)}. Name its layout with "
            "attention_layouts, e.g. [{'q': 'wq', 'k': 'wk', 'v': 'wv', 'o': 'wo'}] or "
            "[{'qkv': 'Wqkv', 'fused': 'concat', 'o': 'out_proj'}]"
        )
        if not allow_missing_attention:
            raise UnsupportedArchitectureError(
                message + ", or pass allow_missing_attention=True to prune the MLPs only."
            )
        logger.warning(message + "; allow_missing_attention=True: the attention penalty and head "
                       "removal are off, only the MLPs are pruned.")


def _projection_names(model: nn.Module) -> str:
    names = [n for n, m in model.named_modules() if is_projection(m)]
    return (", ".join(names[:12]) + (" ..." if len(names) > 12 else "")) or "none"


def _explain_unmapped(model: nn.Module) -> str:
    return (
        f"neuroprune cannot map model type {_model_type(model)!r}: none of the known attention or "
        f"MLP layouts matches its modules, and no block has recognisable separate query, key, "
        f"value and output projections. Projections found: {_projection_names(model)}. Pass the "
        "layout yourself with paths relative to the block, e.g. NeuroPruneConfig(attention_layouts="
        "[{'q': 'wq', 'k': 'wk', 'v': 'wv', 'o': 'wo'}], mlp_layouts=[{'up': 'w1', 'down': 'w2'}]) "
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

def default_unit_scores(model: nn.Module) -> str:
    """The family's `ArchSpec.unit_scores` (``"weights"`` for a family the registry does not know)."""
    spec = ARCHITECTURES.get(_model_type(model))
    return spec.unit_scores if spec is not None else "weights"


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
