"""Property-based tests over `NeuroPruneConfig` values: whatever a user writes into a config (file),
building it and running the method on a tiny model either works or raises `NeuroPruneError` with a
message, never anything else."""

import copy
import functools
import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from neuroprune import NeuroPrune, NeuroPruneConfig, NeuroPruneError
from neuroprune.config import MERGE_MODES

from tiny import tiny_inputs, tiny_model

SETTINGS = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)

junk = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 3), st.text(max_size=4), st.lists(st.integers(), max_size=2)
)
numbers = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0, 1e-12, 1e-4, 0.15, 1.0, 1e9]), junk
)
regex = st.one_of(st.none(), st.sampled_from(["layer\\.0", "attention", "h\\.1", "(", "[a-", "^$"]), junk)
paths = st.sampled_from(
    ["query", "key", "value", "output.dense", "self.query", "c_attn", "c_proj", "q_proj", "nope", ""]
)
layout_keys = st.sampled_from(["q", "k", "v", "o", "qkv", "fused", "core", "up", "down", "gate", "wat"])
layout = st.dictionaries(layout_keys, st.one_of(paths, st.sampled_from(["concat", "interleaved"]), junk),
                         max_size=5)
layouts = st.one_of(st.lists(st.one_of(layout, junk), max_size=2), junk)

config_values = st.fixed_dictionaries(
    {},
    optional={
        "alpha": numbers, "beta": numbers, "theta": numbers, "eps": numbers, "tiny": numbers,
        "merge": st.one_of(st.sampled_from(MERGE_MODES), junk),
        "prune_heads": st.one_of(st.booleans(), junk),
        "attention_modules": regex, "mlp_modules": regex, "exclude_modules": regex,
        "attention_layouts": layouts, "mlp_layouts": layouts,
        "bogus_field": junk,
    },
)


def _message_error(err: NeuroPruneError) -> None:
    assert str(err).strip(), f"{type(err).__name__} raised without a message"


@functools.cache
def _pristine(family: str) -> torch.nn.Module:
    return tiny_model(family)


@SETTINGS
@given(values=config_values)
def test_any_config_value_is_accepted_or_refused_with_our_error(values):
    try:
        config = NeuroPruneConfig.from_dict(values)
    except NeuroPruneError as err:
        _message_error(err)
        return
    # an accepted config round-trips through its dict form and holds usable numbers
    assert NeuroPruneConfig.from_dict(config.to_dict()) == config
    assert config.theta > 0 and config.eps > 0 and config.alpha >= 0 and config.beta >= 0
    assert all(math.isfinite(getattr(config, f)) for f in ("alpha", "beta", "theta", "eps", "tiny"))


@settings(SETTINGS, max_examples=40)
@given(values=config_values, family=st.sampled_from(["bert", "gpt2", "llama"]))
def test_running_the_method_under_any_config_works_or_raises_our_error(values, family):
    model = copy.deepcopy(_pristine(family))
    try:
        pruner = NeuroPrune(model, NeuroPruneConfig.from_dict(values))
        pruner.regularization_loss().backward()
        pruner.prune_redundant_heads()
        pruner.finalize()
        report = pruner.sparsity_report()
    except NeuroPruneError as err:
        _message_error(err)
        return
    assert 0.0 <= report.sparsity <= 1.0
    with torch.no_grad():
        model(**tiny_inputs(family))  # whatever was removed, the model still runs
