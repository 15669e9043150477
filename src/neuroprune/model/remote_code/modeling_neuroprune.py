"""Load a model compacted (or head-pruned) by neuroprune with the standard Auto classes.

neuroprune copies this file verbatim into every folder whose per-layer shapes differ from what
its config describes, and points `config.json`'s `auto_map` at it, so that

    AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)
    pipeline("text-classification", model=folder, trust_remote_code=True)

work without neuroprune installed. It imports only torch and transformers.

How: every class named `NeuroPrune<StockName>` (e.g. `NeuroPruneBertConfig`,
`NeuroPruneBertForSequenceClassification`) is made on first access as a subclass of the stock
transformers class. The config subclass reads the saved family config (whose layer count
`config.json` hides behind a message, so that stock classes refuse the folder instead of loading
other weights); the model subclass builds the stock model from it, then, before any weight is
loaded, resizes it to the structure saved under the config key `neuroprune`: projection shapes,
head-count attributes, gathered inputs, dropped output rows and per-head position-bias slicing.
"""

from __future__ import annotations

import copy
import inspect
from typing import Any

import torch
import transformers
from torch import nn

STRUCTURE_KEY = "neuroprune"  # config.json key holding the saved structure (see `apply_structure`)
MODEL_TYPE = "neuroprune_compacted"  # unknown to the stock Auto classes: they refuse the folder
PREFIX = "NeuroPrune"
OUTPUT_FILL = "neuroprune_output_fill"  # persistent buffer: the constant value of every output row


# --- the config --------------------------------------------------------------------------------

def stock_config_dict(config_dict: dict[str, Any]) -> dict[str, Any]:
    """The family config dict saved in a neuroprune `config.json`: the stock model type and
    architectures, and the real value of the field hidden behind the message."""
    saved = config_dict.get(STRUCTURE_KEY) or {}
    out = {k: v for k, v in config_dict.items() if k not in ("auto_map", STRUCTURE_KEY)}
    out.update(saved.get("hidden_fields", {}))
    out["model_type"] = saved["base_model_type"]  # not "model_type": stock configs would take this dict
    if "architectures" in saved:
        out["architectures"] = saved["architectures"]
    return out


def _config_class(stock: type) -> type:
    """A subclass of a stock config that reads and writes the neuroprune `config.json`."""

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> Any:
        saved = config_dict.get(STRUCTURE_KEY)
        if saved is None:
            raise ValueError(f"{cls.__name__} needs the `{STRUCTURE_KEY}` entry that neuroprune writes "
                             "into config.json.")
        plain = stock_config_dict(config_dict)
        plain.pop("model_type")
        plain[STRUCTURE_KEY] = saved
        plain["auto_map"] = config_dict.get("auto_map")
        return stock.from_dict.__func__(cls, plain, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        out = stock.to_dict(self)
        saved = out.get(STRUCTURE_KEY) or {}
        for name, message in saved.get("hidden_messages", {}).items():
            out[name] = message
        return out

    return type(PREFIX + stock.__name__, (stock,), {
        "model_type": MODEL_TYPE, "from_dict": from_dict, "to_dict": to_dict, "__module__": __name__,
    })


# --- the model ---------------------------------------------------------------------------------

def _model_class(stock: type) -> type:
    """A subclass of a stock model class that takes the saved structure before weights load."""

    def __init__(self, config: Any, *args: Any, **kwargs: Any) -> None:
        stock.__init__(self, config, *args, **kwargs)
        apply_structure(self, getattr(config, STRUCTURE_KEY))

    return type(PREFIX + stock.__name__, (stock,), {
        "__init__": __init__, "config_class": _make(PREFIX + stock.config_class.__name__),
        "__module__": __name__,
    })


def _make(name: str) -> type:
    cached = globals().get(name)
    if isinstance(cached, type):
        return cached
    stock = getattr(transformers, name[len(PREFIX):], None) if name.startswith(PREFIX) else None
    if isinstance(stock, type) and issubclass(stock, transformers.PreTrainedConfig):
        made = _config_class(stock)
    elif isinstance(stock, type) and issubclass(stock, transformers.PreTrainedModel):
        made = _model_class(stock)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = made
    return made


def __getattr__(name: str) -> type:
    """`NeuroPrune<StockName>` classes, made on first access (transformers looks them up by name)."""
    return _make(name)


# --- the structure -----------------------------------------------------------------------------

def _module(model: nn.Module, path: str) -> nn.Module:
    """`path` as saved (from the model class that was saved), in this model class: a base model
    lacks the head class's prefix, a head class adds it."""
    prefix = getattr(model, "base_model_prefix", "")
    for candidate in (path, path.removeprefix(prefix + "."), f"{prefix}.{path}"):
        try:
            return model.get_submodule(candidate) if candidate else model
        except AttributeError:
            continue
    raise ValueError(f"the saved neuroprune structure names module {path!r}, which this model lacks.")


def _resize(module: nn.Module, shapes: dict[str, list[int]]) -> None:
    """Give a module empty parameters of the saved shapes (the weights file fills them)."""
    like = next(module.parameters(recurse=False))
    for name, shape in shapes.items():
        setattr(module, name, nn.Parameter(torch.empty(shape, dtype=like.dtype, device=like.device)))
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape
    elif hasattr(module, "nf"):  # transformers' Conv1D stores (in, out)
        module.nf = module.weight.shape[1]


def select_last(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`x[..., index]` through a 2-D view of `x` (much faster on CPU than on the 3-D tensor)."""
    return x.reshape(-1, x.shape[-1]).index_select(1, index).view(*x.shape[:-1], index.numel())


def _on(module: nn.Module, attr: str, device: torch.device) -> torch.Tensor:
    """An index kept as a Python list, as a tensor on `device` (cached): not a buffer, because
    transformers re-creates non-persistent buffers empty after loading."""
    cache = module.__dict__.setdefault("_neuroprune_index_cache", {})
    key = (attr, device)
    if key not in cache:
        cache[key] = torch.tensor(getattr(module, attr), dtype=torch.long, device=device)
    return cache[key]


class SharedGather:
    """The gathered input of a block's q, k and v projections, computed once per call: they are
    called one after the other on the same tensor."""

    def __init__(self, users: int) -> None:
        self.users, self.left = users, 0
        self.source: torch.Tensor | None = None
        self.value: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        if self.source is x and self.left > 0:
            value, self.left = self.value, self.left - 1
            if not self.left:
                self.source = self.value = None
            return value
        value = select_last(x, index)
        self.source, self.value, self.left = (x, value, self.users - 1) if self.users > 1 else (None, None, 0)
        return value


def _gather_input(module: nn.Module, args: tuple) -> tuple:
    index = _on(module, "_neuroprune_input_keep", args[0].device)
    return (module._neuroprune_shared(args[0], index), *args[1:])


def _scatter_output(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    fill = getattr(module, OUTPUT_FILL)
    index = _on(module, "_neuroprune_output_keep", output.device)
    full = fill.to(output.dtype).expand(*output.shape[:-1], fill.shape[0])
    return full.scatter(-1, index.expand(*output.shape[:-1], index.shape[0]), output)


def _t5_full_bias(core: nn.Module, args: dict[str, Any], heads: int) -> torch.Tensor | None:
    """T5's first self-attention layer computes the relative position bias itself, for all
    original heads; build it here so that every layer can slice it to its own heads."""
    hidden = args["hidden_states"]
    kv = args.get("key_value_states")
    q_len = hidden.shape[1]
    if kv is not None:
        k_len, past = kv.shape[1], 0
    else:
        cache = args.get("cache", args.get("kwargs", {}).get("past_key_values"))
        past = cache.get_seq_length(core.layer_idx) if cache is not None else 0
        k_len = past + q_len
    if getattr(core, "has_relative_attention_bias", False):
        return core.compute_bias(q_len, k_len, device=hidden.device, past_seen_tokens=past)
    return torch.zeros((1, heads, q_len, k_len), device=hidden.device, dtype=hidden.dtype)


BIAS_FACTORIES = {"t5": _t5_full_bias}


def _slice_heads(tensor: Any, dims: str, original: int, kept: list[int]) -> Any:
    """`tensor` (built by the model for all original heads) cut to this layer's heads; `dims`
    says where the heads are: "batch,heads" (dim 1), "heads" (dim 0), "batch*heads" (flattened)."""
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


def _slice_head_bias(core: nn.Module, spec: dict[str, Any]) -> None:
    """Slice the per-head bias the model builds for all original heads (T5, MPNet relative
    positions, ALiBi slopes) and a per-head mask to this layer's heads on the way in, and hand
    the full bias on to the next layer on the way out where the family passes it along (T5)."""
    signature = inspect.signature(core.forward)
    arg, mask_arg = spec.get("arg") or "", spec.get("mask_arg") or ""
    factory = BIAS_FACTORIES.get(spec.get("factory") or "")
    if spec.get("factory") and factory is None:
        raise ValueError(f"the saved structure needs the per-head bias factory {spec['factory']!r}, "
                         f"which this modeling file lacks (it has {sorted(BIAS_FACTORIES)}).")
    original, kept, dims = spec["original_heads"], spec["kept_heads"], spec.get("dims") or "batch,heads"
    state: dict[str, torch.Tensor | None] = {"full": None}

    def pre(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        bound = signature.bind(*args, **kwargs)
        if arg:
            bias = bound.arguments.get(arg)
            if bias is None and factory is not None:
                bias = factory(module, bound.arguments, original)
            state["full"] = bias
            if bias is not None:
                bound.arguments[arg] = _slice_heads(bias, dims, original, kept)
        if mask_arg and bound.arguments.get(mask_arg) is not None:
            bound.arguments[mask_arg] = _slice_heads(bound.arguments[mask_arg], "batch,heads", original, kept)
        return bound.args, bound.kwargs

    def post(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        full, state["full"] = state["full"], None
        index = spec.get("output")
        if index is None or full is None or not isinstance(output, tuple):
            return None
        return output[:index] + (full,) + output[index + 1:]

    core.register_forward_pre_hook(pre, with_kwargs=True)
    core.register_forward_hook(post, with_kwargs=True)


@torch.no_grad()
def apply_structure(model: nn.Module, saved: dict[str, Any]) -> None:
    """Resize a freshly built stock model to the saved per-layer structure.

    `saved` (written by neuroprune): `parameters` {module: {param: shape}}, `attributes`
    {module: {name: int}} (head counts, widths), `gathered_inputs` [{modules, keep}] (projections
    that read only the kept input dims, gathered once per block), `dropped_rows` {module: {keep,
    width}} (output rows computed; the others are the constant `neuroprune_output_fill`), and
    `config_attributes` {module: {name: int}} (head counts a module reads from its own copy of
    the config), `head_bias` {module: {arg, output, factory, dims, mask_arg, original_heads,
    kept_heads}}.
    """
    for path, shapes in saved.get("parameters", {}).items():
        _resize(_module(model, path), shapes)
    for path, values in saved.get("attributes", {}).items():
        module = _module(model, path)
        for name, value in values.items():
            setattr(module, name, value)
    for path, values in saved.get("config_attributes", {}).items():
        module = _module(model, path)  # reads head counts from `self.config` (Phi-3): its own copy
        module.config = copy.copy(module.config)
        for name, value in values.items():
            setattr(module.config, name, value)
    for group in saved.get("gathered_inputs", []):
        shared = SharedGather(len(group["modules"]))
        for path in group["modules"]:
            module = _module(model, path)
            module._neuroprune_input_keep = list(group["keep"])
            module._neuroprune_shared = shared
            module.register_forward_pre_hook(_gather_input)
    for path, rows in saved.get("dropped_rows", {}).items():
        module = _module(model, path)
        module._neuroprune_output_keep = list(rows["keep"])
        module.register_buffer(OUTPUT_FILL, module.weight.new_zeros(rows["width"]))
        module.register_forward_hook(_scatter_output)
    for path, spec in saved.get("head_bias", {}).items():
        _slice_head_bias(_module(model, path), spec)
