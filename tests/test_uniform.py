"""Uniform compaction: the same number of key/value groups and neurons in every layer, written into
the config, so the stock class loads the folder without remote code; exact (dead structure kept
where a layer needs less, removed groups re-added as zeros); refused where the config cannot say it."""

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import neuroprune
from neuroprune import NeuroPrune, NeuroPruneConfig
from neuroprune.cli import main as cli_main
from neuroprune.compaction import compact_uniform
from neuroprune.errors import UnsupportedArchitectureError
from neuroprune.model.surgery import weight_matrix
from test_compaction import structured

from tiny import VOCAB, main_output, tiny_inputs

ATOL = 1e-5
D, HEADS, KV, HEAD_DIM, FFN, LAYERS = 64, 8, 4, 8, 64, 3


@torch.no_grad()
def uneven_llama(family: str = "llama", dead_groups: tuple = ([1, 2], [1, 2, 3])) -> NeuroPrune:
    """Three layers (4 key/value groups of 2 heads) that need different widths: groups dead 2 / 3
    / (3 already removed in training, the last one alive), neurons dead 40 / 16 / 56 of 64."""
    torch.manual_seed(0)
    config = AutoConfig.for_model(family, vocab_size=VOCAB, hidden_size=D, num_attention_heads=HEADS,
                                  num_key_value_heads=KV, intermediate_size=FFN, num_hidden_layers=LAYERS,
                                  max_position_embeddings=64)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    pruner = NeuroPrune(model, NeuroPruneConfig())
    attention, mlps = pruner.index.attention, pruner.index.mlps
    for unit, dead in zip(attention[:2], dead_groups):
        weight_matrix(unit.o)[:, unit.query_rows(dead)] = 0
    attention[2].keep_groups([0])  # as head pruning during training leaves it
    g = torch.Generator().manual_seed(0)
    for unit, dead in zip(mlps, (40, 16, 56)):
        weight_matrix(unit.down)[:, torch.randperm(FFN, generator=g)[:dead]] = 0
    return pruner


def test_uniform_keeps_the_widest_layer_everywhere_exactly(tmp_path):
    pruner = uneven_llama()
    model = pruner.model
    x = tiny_inputs("llama")
    expected = main_output(model, x)
    kwargs = dict(max_new_tokens=6, do_sample=False, use_cache=True, attention_mask=x["attention_mask"])
    tokens = model.generate(input_ids=x["input_ids"], **kwargs)
    dense_params = sum(p.numel() for p in AutoModelForCausalLM.from_config(model.config).parameters())

    result = compact_uniform(pruner)
    assert (result.groups, result.neurons) == (2, 48)
    assert result.min_groups_needed == [2, 1, 1] and result.min_neurons_needed == [24, 48, 8]
    assert result.config_changes == {"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
                                     "intermediate_size": 48}
    assert result.index.model is model and result.index.structure()["heads"] == {
        u.name: [0, 1] for u in result.index.attention}  # a dense model of the new config
    torch.testing.assert_close(main_output(model, x), expected, atol=ATOL, rtol=0)
    assert torch.equal(model.generate(input_ids=x["input_ids"], **kwargs), tokens)
    # hand count: per layer q 32x64, k and v 16x64, o 64x32 (was 64/32/32/64), MLP 3 x 48x64 (was 64)
    removed = LAYERS * ((64 - 32) * D * 2 + (32 - 16) * D * 2 + 3 * (FFN - 48) * D)
    assert sum(p.numel() for p in model.parameters()) == dense_params - removed

    result.index.save_pretrained(tmp_path / "u")
    saved = json.loads((tmp_path / "u" / "config.json").read_text())
    assert saved["model_type"] == "llama" and "auto_map" not in saved and saved["num_key_value_heads"] == 2
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "u").eval()  # no remote code
    assert type(stock).__name__ == "LlamaForCausalLM"
    torch.testing.assert_close(main_output(stock, x), expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(main_output(neuroprune.load(tmp_path / "u"), x), expected, atol=ATOL, rtol=0)


def test_uniform_costs_parameters_against_the_non_uniform_compaction():
    uniform, plain = uneven_llama(), uneven_llama()
    compact_uniform(uniform)
    neuroprune.compact(plain, rule=neuroprune.CompactionRule(1.0, 1.0, 8))
    n_uniform = sum(p.numel() for p in uniform.model.parameters())
    n_plain = sum(p.numel() for p in plain.model.parameters())
    # non-uniform keeps groups 2/1/1 and neurons 24/48/8: 2 groups (2 heads each) and 24+40 neurons fewer
    extra = 2 * (2 * HEAD_DIM * D * 2 + HEAD_DIM * D * 2) + (24 + 40) * 3 * D
    assert n_uniform - n_plain == extra


def test_head_count_is_raised_to_one_the_config_accepts():
    """3 groups = 6 heads: LlamaConfig refuses hidden size 64 with 6 heads, so 4 groups stay (exact)."""
    pruner = uneven_llama(dead_groups=([3], [1, 2, 3]))
    x = tiny_inputs("llama")
    expected = main_output(pruner.model, x)
    result = compact_uniform(pruner)
    assert result.min_groups_needed == [3, 1, 1] and result.groups == 4
    torch.testing.assert_close(main_output(pruner.model, x), expected, atol=ATOL, rtol=0)


def test_qwen2_biases_and_padding_stay_exact(tmp_path):
    pruner = uneven_llama("qwen2")
    with torch.no_grad():
        for unit in pruner.index.attention:
            for m in (unit.q, unit.k, unit.v):
                m.bias.normal_(0, 0.5)
    x = tiny_inputs("llama")
    expected = main_output(pruner.model, x)
    result = compact_uniform(pruner)
    torch.testing.assert_close(main_output(pruner.model, x), expected, atol=ATOL, rtol=0)
    result.index.save_pretrained(tmp_path / "q")
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "q").eval()
    torch.testing.assert_close(main_output(stock, x), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_families_whose_config_cannot_say_it_are_refused(family):
    pruner = structured(family)  # one head per block removed, scattered dead neurons
    shapes = {k: v.shape for k, v in pruner.model.state_dict().items()}
    with pytest.raises(UnsupportedArchitectureError, match="trust_remote_code=True"):
        compact_uniform(pruner)
    assert {k: v.shape for k, v in pruner.model.state_dict().items()} == shapes  # refused before any change


def test_a_parameter_the_stock_class_lacks_is_refused_before_any_change():
    """A Llama built with MLP biases whose contract bias was removed by hand: the stock class
    (mlp_bias=True) has `down_proj.bias`, the model not. Refused with the model untouched (the
    check used to come after the MLPs were already narrowed)."""
    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", vocab_size=VOCAB, hidden_size=D, num_attention_heads=HEADS,
                                  num_key_value_heads=KV, intermediate_size=FFN, num_hidden_layers=2,
                                  max_position_embeddings=64, mlp_bias=True)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    for layer in model.model.layers:
        layer.mlp.down_proj.bias = None
    pruner = NeuroPrune(model, NeuroPruneConfig())
    with torch.no_grad():
        for unit in pruner.index.mlps:
            weight_matrix(unit.down)[:, :16] = 0  # dead neurons: something to remove
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    with pytest.raises(UnsupportedArchitectureError, match="down_proj.bias"):
        compact_uniform(pruner)
    assert {k: v.shape for k, v in model.state_dict().items()} == shapes


def test_a_family_whose_mlp_width_is_another_config_field_is_refused_before_any_change():
    """OPT keeps its MLP width in `ffn_dim`: a config given `intermediate_size` still builds the old
    width, so the refusal must come before the MLPs are narrowed (it used to come after)."""
    torch.manual_seed(0)
    config = AutoConfig.for_model("opt", vocab_size=VOCAB, hidden_size=32, num_attention_heads=4,
                                  ffn_dim=48, num_hidden_layers=2, word_embed_proj_dim=32,
                                  max_position_embeddings=64)
    model = AutoModelForCausalLM.from_config(config).eval()
    pruner = NeuroPrune(model, NeuroPruneConfig())
    with torch.no_grad():
        for unit in pruner.index.mlps:
            weight_matrix(unit.down)[:, :8] = 0  # dead neurons: something to remove
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UnsupportedArchitectureError, match="fc2 at 48 inputs, not 40"):
        compact_uniform(pruner)
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_cli_uniform_saves_a_stock_folder(tmp_path, capsys):
    pruner = uneven_llama()
    x = tiny_inputs("llama")
    expected = main_output(pruner.model, x)
    pruner.save_pretrained(tmp_path / "model")
    assert cli_main(["compact", str(tmp_path / "model"), "--uniform", "-o", str(tmp_path / "out")]) == 0
    assert "uniform: 2 key/value groups and 48 neurons in every layer" in capsys.readouterr().out
    meta = json.loads((tmp_path / "out" / "neuroprune.json").read_text())
    assert meta["compaction"]["uniform"]["groups_needed"] == [2, 1, 1]
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    torch.testing.assert_close(main_output(stock, x), expected, atol=ATOL, rtol=0)


def test_cli_uniform_refuses_gather_thresholds_and_unsupported_families(tmp_path, capsys):
    pruner = uneven_llama()
    pruner.save_pretrained(tmp_path / "model")
    assert cli_main(["compact", str(tmp_path / "model"), "--uniform", "--min-row-fraction", "0.5"]) != 0
    assert "--uniform keeps no gathered inputs" in capsys.readouterr().err
    structured("bert").save_pretrained(tmp_path / "bert")
    assert cli_main(["compact", str(tmp_path / "bert"), "--uniform", "-o", str(tmp_path / "out")]) != 0
    assert "trust_remote_code=True" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()

