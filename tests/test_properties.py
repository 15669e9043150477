"""Property-based tests over `NeuroPruneConfig` values: whatever a user writes into a config (file),
building it and running the method on a tiny model either works or raises `NeuroPruneError` with a
message, never anything else."""

import copy
import functools
import math
import re

import pytest
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
    # an accepted config round-trips through its dict form, holds the values as given (nothing
    # coerced), and every field the rules below judge was valid by them
    assert NeuroPruneConfig.from_dict(config.to_dict()) == config
    given_as_is = {k: v for k, v in values.items() if not k.endswith("_layouts")}
    assert {k: getattr(config, k) for k in given_as_is} == given_as_is
    assert not broken_fields(values), f"accepted although {broken_fields(values)} break the documented rules"


NUMBER_RULES = {"alpha": (0.0, True), "beta": (0.0, True), "theta": (0.0, False), "eps": (0.0, False),
                "tiny": (0.0, False)}  # (lower bound, bound allowed), from the NeuroPruneConfig docs
OTHER_RULES = {"merge": lambda v: v in MERGE_MODES, "prune_heads": lambda v: isinstance(v, bool),
               "bogus_field": lambda v: False}  # no such field


def broken_fields(values: dict) -> list[str]:
    """The fields of `values` that break the documented rules, judged here independently of
    `validate()` (numbers: finite, not bool, above the bound; merge one of the modes; prune_heads a
    bool; no unknown field; a regex must compile)."""
    bad = []
    for name, value in values.items():
        if name in NUMBER_RULES:
            lower, inclusive = NUMBER_RULES[name]
            number = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
            if not number or value < lower or (value == lower and not inclusive):
                bad.append(name)
        elif name in OTHER_RULES and not OTHER_RULES[name](value):
            bad.append(name)
        elif name.endswith("_modules") and value is not None:
            try:
                re.compile(value)
            except (re.error, TypeError):
                bad.append(name)
    return bad


@SETTINGS
@given(values=config_values)
def test_a_config_breaking_a_rule_is_refused_and_one_keeping_them_accepted(values):
    layouts = {k: v for k, v in values.items() if k.endswith("_layouts")}
    try:
        NeuroPruneConfig.from_dict(values)
        accepted = True
    except NeuroPruneError:
        accepted = False
    if broken_fields(values):
        assert not accepted
    elif not any(layouts.values()):  # layouts have rules of their own (AttentionLayout.from_dict)
        assert accepted == all(isinstance(v, list) for v in layouts.values())


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
    # section 5 sparsity counted here: exact zeros (removed entries included) over the dense sizes
    units = [*pruner.index.attention, *pruner.index.mlps]
    dense = sum(sum(u.original_numel.values()) for u in units)
    nonzero = sum(int((m != 0).sum()) for u in units for m in u.matrices().values())
    assert report.sparsity == pytest.approx(1 - nonzero / dense, abs=1e-12)
    for mat in pruner.index.counted_matrices(pruner.finalize_kinds):  # finalize left nothing below eps
        assert not ((mat.abs() < pruner.config.eps) & (mat != 0)).any()
    with torch.no_grad():
        model(**tiny_inputs(family))  # whatever was removed, the model still runs
