"""Discovery of attention blocks and MLPs for every family, and the errors / overrides."""

import pytest
import torch
from torch import nn

from neuroprune import ConfigError, ModelIndex, NeuroPrune, NeuroPruneConfig, UnsupportedArchitectureError

from tiny import FAMILIES, tiny_model

# family -> (attention blocks, MLPs, query heads per block, key/value heads per block, layout)
EXPECTED = {
    "bert": (2, 2, 4, 4, "separate"),
    "roberta": (2, 2, 4, 4, "separate"),
    "distilbert": (2, 2, 4, 4, "separate"),
    "mpnet": (2, 2, 4, 4, "separate"),
    "t5": (6, 4, 4, 4, "separate"),  # encoder self, decoder self + cross
    "t5-gated": (6, 4, 4, 4, "separate"),
    "bart": (6, 4, 4, 4, "separate"),
    "gpt2": (2, 2, 4, 4, "concat"),
    "opt": (2, 2, 4, 4, "separate"),
    "llama": (2, 2, 4, 2, "separate"),
    "qwen2": (2, 2, 4, 2, "separate"),
    "gpt_neox": (2, 2, 4, 4, "interleaved"),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_is_mapped(family):
    pruner = NeuroPrune(tiny_model(family))
    n_attn, n_mlp, heads, kv, layout = EXPECTED[family]
    assert len(pruner.index.attention) == n_attn and len(pruner.index.mlps) == n_mlp
    for unit in pruner.index.attention:
        assert (unit.num_heads, unit.num_kv_heads, unit.head_dim) == (heads, kv, 8)
        assert (unit.layout.fused or "separate") == layout
        q, k, v = unit.qkv_matrices()
        assert q.shape == (heads * 8, 32) and k.shape == v.shape == (kv * 8, 32)
    for mlp in pruner.index.mlps:
        assert mlp.original_neurons == 48
        assert all(m.shape == (48, 32) for m in mlp.expand_matrices())
        assert mlp.contract_matrix().shape == (32, 48)
    gated = family in ("t5-gated", "llama", "qwen2")
    assert all((m.gate is not None) == gated for m in pruner.index.mlps)


def test_t5_has_self_and_cross_attention():
    names = [u.name for u in ModelIndex(tiny_model("t5")).attention]
    assert sum("EncDecAttention" in n for n in names) == 2
    assert sum(n.startswith("decoder") and "SelfAttention" in n for n in names) == 2


def test_interleaved_layout_reads_per_head_blocks():
    """GPT-NeoX stores [q_h, k_h, v_h] per head; the canonical Q must pick every third block."""
    unit = ModelIndex(tiny_model("gpt_neox")).attention[0]
    w = unit.qkv.weight.detach()
    q, k, v = unit.qkv_matrices()
    assert torch.equal(q[8:16], w[24:32]) and torch.equal(k[0:8], w[8:16]) and torch.equal(v[0:8], w[16:24])


def test_regex_selection_and_exclusion():
    model = tiny_model("t5")
    pruner = NeuroPrune(model, NeuroPruneConfig(attention_modules=r"^encoder\.", exclude_modules="block\\.1"))
    assert [u.name for u in pruner.index.attention] == ["encoder.block.0.layer.0.SelfAttention"]
    assert all("block.1" not in m.name for m in pruner.index.mlps)


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.head_dim, self.n_heads = 4, 2
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(8, 8) for _ in range(4))
        self.w1, self.w2 = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (
            m(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2) for m in (self.wq, self.wk, self.wv)
        )
        att = torch.softmax(q @ k.transpose(-1, -2) / self.head_dim**0.5, -1) @ v
        x = x + self.wo(att.transpose(1, 2).reshape(b, t, -1))
        return x + self.w2(torch.relu(self.w1(x)))


class _Custom(nn.Module):
    def __init__(self):
        super().__init__()
        self.config = type("Cfg", (), {"model_type": "homebrew"})()
        self.blocks = nn.Sequential(_Block(), _Block())

    def forward(self, x):
        return self.blocks(x)


class _FusedBlock(nn.Module):
    """An attention block whose one fused projection cannot be read from its shapes alone."""

    def __init__(self):
        super().__init__()
        self.head_dim, self.n_heads = 4, 2
        self.wqkv, self.wo = nn.Linear(8, 24), nn.Linear(8, 8)
        self.w1, self.w2 = nn.Linear(8, 16), nn.Linear(16, 8)


def test_unknown_fused_model_gets_one_clear_error():
    model = _Custom()
    model.blocks = nn.Sequential(_FusedBlock(), _FusedBlock())
    with pytest.raises(UnsupportedArchitectureError) as err:
        NeuroPrune(model)
    text = str(err.value)
    assert "'homebrew'" in text and "blocks.0.wqkv" in text and "attention_layouts" in text
    assert "no block has recognisable separate query, key, value and output projections" in text


def test_unknown_model_is_recognised_by_its_shapes(caplog):
    """wq / wk / wv / wo and w1 / w2 are in no registry: found from their shapes, with a warning
    that names what was taken for what."""
    with caplog.at_level("WARNING"):
        index = ModelIndex(_Custom())
    assert [u.name for u in index.attention] == ["blocks.0", "blocks.1"]
    unit = index.attention[0]
    block = index.model.blocks[0]
    assert (unit.q, unit.k, unit.v, unit.o) == (block.wq, block.wk, block.wv, block.wo)
    assert [(m.name, m.up, m.down) for m in index.mlps[:1]] == [("blocks.0", index.model.blocks[0].w1,
                                                                index.model.blocks[0].w2)]
    assert "by the shapes" in caplog.text and "'q': 'wq'" in caplog.text


def test_user_layout_maps_an_unknown_model_and_prunes_it_exactly():
    torch.manual_seed(0)
    model = _Custom().eval()
    cfg = NeuroPruneConfig(
        theta=1e-6,
        attention_layouts=[{"q": "wq", "k": "wk", "v": "wv", "o": "wo"}],
        mlp_layouts=[{"up": "w1", "down": "w2"}],
    )
    pruner = NeuroPrune(model, cfg)
    assert len(pruner.index.attention) == 2 and len(pruner.index.mlps) == 2
    from tiny import duplicate_group

    duplicate_group(model, pruner.index.attention[0], 0, 1)
    x = torch.randn(2, 5, 8)
    before = model(x)
    assert pruner.prune_redundant_heads() == {"blocks.0": [0]}
    assert model.blocks[0].n_heads == 1  # head-count attribute kept consistent
    assert torch.allclose(model(x), before, atol=1e-6)


# --- coverage: partial mappings, missing attention, per-head terms, layouts from a config file ---

class _FusedAttention(nn.Module):
    """An attention module whose [q | k | v] order cannot be told from shapes."""

    def __init__(self):
        super().__init__()
        self.wqkv, self.wo = nn.Linear(32, 96), nn.Linear(32, 32)


def test_attention_found_in_some_layers_only_is_refused():
    model = tiny_model("llama")
    model.model.layers[1].self_attn = _FusedAttention()
    with pytest.raises(UnsupportedArchitectureError) as err:
        ModelIndex(model)
    text = str(err.value)
    assert "'llama'" in text and "model.layers.1" in text and "partial mapping" in text
    # leaving the layer out on purpose is fine
    assert [u.name for u in ModelIndex(model, {"exclude_modules": r"layers\.1\."}).attention] == [
        "model.layers.0.self_attn"
    ]


def test_model_without_attention_is_refused_unless_allowed(caplog):
    model = tiny_model("llama")
    for layer in model.model.layers:
        layer.self_attn = _FusedAttention()
    with pytest.raises(UnsupportedArchitectureError) as err:
        NeuroPrune(model)
    assert "no attention block was found" in str(err.value) and "allow_missing_attention" in str(err.value)
    with caplog.at_level("WARNING"):
        pruner = NeuroPrune(model, NeuroPruneConfig(allow_missing_attention=True))
    assert "head removal are off" in caplog.text
    assert pruner.index.attention == [] and len(pruner.index.mlps) == 2
    assert pruner.regularization_loss().item() > 0 and pruner.prune_redundant_heads() == {}


def test_unsliced_per_head_term_refuses_head_removal_before_training():
    """A T5 under an unknown model type: the generic q/k/v/o layout matches, but T5Attention
    takes `position_bias` (built for all heads), which that layout cannot cut."""
    model = tiny_model("t5")
    model.config.model_type = "t5-like"
    with pytest.raises(UnsupportedArchitectureError) as err:
        NeuroPrune(model)
    text = str(err.value)
    assert "'t5-like'" in text and "'position_bias'" in text and "prune_heads=False" in text
    pruner = NeuroPrune(model, NeuroPruneConfig(prune_heads=False))  # penalties, MLPs: fine
    assert len(pruner.index.attention) == 6 and pruner.regularization_loss().item() > 0
    with pytest.raises(UnsupportedArchitectureError):
        pruner.index.attention[0].keep_groups([0])


def test_layouts_from_a_config_file(tmp_path, caplog):
    """`neuroprune train --config` reads attention_layouts / mlp_layouts (YAML lists of mappings,
    or JSON strings) into the method's config."""
    import argparse

    from neuroprune.cli.train import register, resolve_settings

    config = tmp_path / "run.yaml"
    config.write_text("attention-layouts:\n  - {q: wq, k: wk, v: wv, o: wo}\n"
                      "mlp_layouts: '[{\"up\": \"w1\", \"down\": \"w2\"}]'\n")
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    settings = resolve_settings(parser.parse_args(["train", "--config", str(config)]))
    method_config = settings.method_config()
    assert method_config.attention_layouts == [{"q": "wq", "k": "wk", "v": "wv", "o": "wo"}]
    with caplog.at_level("WARNING"):
        index = NeuroPrune(_Custom(), method_config).index
    assert [u.layout.q for u in index.attention] == ["wq", "wq"] and "by the shapes" not in caplog.text
    assert [m.layout.up for m in index.mlps] == ["w1", "w1"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("attention_layouts:\n  - {q: wq, o: wo}\n")
    with pytest.raises(ConfigError) as err:
        resolve_settings(parser.parse_args(["train", "--config", str(bad)])).method_config()
    assert "attention_layouts" in str(err.value) and "`q`, `k`, `v`" in str(err.value)


def test_model_recognised_by_shapes_prunes_heads_exactly():
    from tiny import duplicate_group

    torch.manual_seed(0)
    model = _Custom().eval()
    pruner = NeuroPrune(model, NeuroPruneConfig(theta=1e-6))
    for unit in pruner.index.attention:
        duplicate_group(model, unit, 1, 0)
    x = torch.randn(2, 5, 8)
    before = model(x)
    assert pruner.prune_redundant_heads() == {"blocks.0": [0], "blocks.1": [0]}
    assert model.blocks[1].n_heads == 1
    torch.testing.assert_close(model(x), before, atol=1e-6, rtol=0)


def test_deberta_v1_attention_is_refused_with_the_reason():
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.for_model("deberta", vocab_size=99, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=48)
    model = AutoModel.from_config(config)
    with pytest.raises(UnsupportedArchitectureError) as err:
        NeuroPrune(model)
    assert "'deberta'" in str(err.value) and "q_bias" in str(err.value) and "v2" in str(err.value)
    pruner = NeuroPrune(model, NeuroPruneConfig(allow_missing_attention=True))  # MLPs only
    assert pruner.index.attention == [] and len(pruner.index.mlps) == 2


class _MultiQueryBlock(nn.Module):
    """Two query heads reading one key/value head, under names no registry knows."""

    def __init__(self):
        super().__init__()
        self.head_dim, self.n_heads = 4, 2
        self.to_q, self.to_k, self.to_v = nn.Linear(8, 8), nn.Linear(8, 4), nn.Linear(8, 4)
        self.proj = nn.Linear(8, 8)
        self.fc_in, self.fc_out = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x):
        b, t, _ = x.shape
        q = self.to_q(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k, v = (m(x).view(b, t, 1, self.head_dim).transpose(1, 2) for m in (self.to_k, self.to_v))
        att = torch.softmax(q @ k.transpose(-1, -2) / self.head_dim**0.5, -1) @ v
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, -1))
        return x + self.fc_out(torch.relu(self.fc_in(x)))


def test_multi_query_block_recognised_by_shapes_loses_a_query_head_exactly():
    from tiny import duplicate_group

    torch.manual_seed(0)
    model = _Custom().eval()
    model.blocks = nn.Sequential(_MultiQueryBlock(), _MultiQueryBlock())
    pruner = NeuroPrune(model, NeuroPruneConfig(theta=1e-6))
    unit = pruner.index.attention[0]
    assert (unit.num_heads, unit.kv_heads, unit.num_kv_heads, unit.multi_query) == (2, 1, 2, True)
    assert unit.o is model.blocks[0].proj and pruner.index.mlps[0].up is model.blocks[0].fc_in
    for unit in pruner.index.attention:
        duplicate_group(model, unit, 1, 0)
    x = torch.randn(2, 5, 8)
    before = model(x)
    assert pruner.prune_redundant_heads() == {"blocks.0": [0], "blocks.1": [0]}
    assert model.blocks[0].to_q.out_features == 4 and model.blocks[0].to_k.out_features == 4
    torch.testing.assert_close(model(x), before, atol=1e-6, rtol=0)


def test_gpt2_cross_attention_is_refused_not_misread():
    """GPT-2's cross-attention keeps Q in `q_attn` and only [k | v] in `c_attn`; the fused
    [q | k | v] layout would read it as grouped-query attention with two K/V heads and prune K
    rows as if they were queries. Refused, naming the block and the way out."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from neuroprune import NeuroPrune, NeuroPruneConfig, UnsupportedArchitectureError

    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=100,
                                       add_cross_attention=True))
    with pytest.raises(UnsupportedArchitectureError, match=r"h\.0\.crossattention.*q_attn.*exclude_modules"):
        NeuroPrune(model, NeuroPruneConfig())
    kept = NeuroPrune(model, NeuroPruneConfig(exclude_modules="crossattention"))
    assert [u.name for u in kept.index.attention] == ["transformer.h.0.attn", "transformer.h.1.attn"]
    assert all(u.num_heads == 4 and u.num_kv_heads == 4 for u in kept.index.attention)
