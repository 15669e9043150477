"""Issue 17: families beyond the first eleven, built tiny from their configs (no hub), end to end:
discovery, penalties, head removal (exact for identical heads; decoders generate the same tokens),
finalize, compaction, save and reload. Each family stands for a layout:

- fused [q | k | v] with grouped-query attention and fused [gate | up]: phi3 (modernbert: the same
  two fusions, bidirectional, without GQA);
- multi-query attention: falcon-mq and gpt_bigcode (one fused projection), gemma (separate);
- grouped interleaved [q_1..q_g | k | v]: falcon (new decoder architecture);
- per-head positional terms computed from the config's head count (ALiBi): bloom (slopes
  flattened with the batch), mpt (slopes by head), falcon-alibi (slopes folded into a per-head mask);
- attention under other names: deberta-v2 (query_proj / key_proj / value_proj with per-head
  positional projections);
- named separate Q/K/V families: mistral, qwen3, gemma2, phi, stablelm, olmo, cohere, starcoder2,
  electra, xlm-roberta.
"""

from __future__ import annotations

import copy

import pytest
import torch

import neuroprune
from neuroprune import CompactionRule, ModelIndex, NeuroPrune, NeuroPruneConfig
from neuroprune.model.surgery import weight_matrix

from tiny import NEW_DECODERS, NEW_FAMILIES, duplicate_group, main_output, tiny_inputs, tiny_model

# family -> (query heads, key/value heads, removal groups, fused layout, gated MLP, MLP width)
EXPECTED = {
    "phi3": (4, 2, 2, "concat", True, 48),
    "modernbert": (4, 4, 4, "concat", True, 48),
    "falcon": (4, 2, 2, "interleaved", False, 48),
    "falcon-mq": (4, 1, 4, "interleaved", False, 48),
    "falcon-alibi": (4, 4, 4, "interleaved", False, 48),
    "bloom": (4, 4, 4, "interleaved", False, 128),
    "mpt": (4, 4, 4, "concat", False, 128),  # MptMLP is 4 x hidden whatever the config says
    "gpt_bigcode": (4, 1, 4, "interleaved", False, 48),
    "deberta-v2": (4, 4, 4, "", False, 48),
    "gemma": (4, 1, 4, "", True, 48),
    "mistral": (4, 2, 2, "", True, 48),
    "qwen3": (4, 2, 2, "", True, 48),
    "gemma2": (4, 2, 2, "", True, 48),
    "phi": (4, 4, 4, "", False, 48),
    "stablelm": (4, 4, 4, "", True, 48),
    "olmo": (4, 2, 2, "", True, 48),
    "cohere": (4, 2, 2, "", True, 48),
    "starcoder2": (4, 2, 2, "", False, 48),
    "electra": (4, 4, 4, "", False, 48),
    "xlm-roberta": (4, 4, 4, "", False, 48),
}
ALIBI = ("bloom", "mpt", "falcon-alibi")
HEADS_AND_NEURONS = CompactionRule(min_input_fraction=1.0, min_row_fraction=1.0, multiple_of=1)


@torch.no_grad()
def randomize_biases(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-zero biases (most families start them at 0, which would hide a bias left behind)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("bias") and "norm" not in name.lower() and p.dim() == 1:
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def test_at_least_ten_new_families_cover_every_layout():
    assert set(EXPECTED) == set(NEW_FAMILIES) and len(NEW_FAMILIES) >= 10


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_family_is_mapped(family):
    heads, kv, groups, fused, gated, width = EXPECTED[family]
    index = ModelIndex(tiny_model(family))
    assert len(index.attention) == 2 and len(index.mlps) == 2
    for unit in index.attention:
        assert (unit.num_heads, unit.kv_heads, unit.num_kv_heads, unit.head_dim) == (heads, kv, groups, 8)
        assert unit.layout.fused == fused
        q, k, v = unit.qkv_matrices()
        assert q.shape == (heads * 8, 32) and k.shape == v.shape == (kv * 8, 32)
    for mlp in index.mlps:
        assert mlp.gated == gated and mlp.original_neurons == width
        assert all(m.shape == (width, 32) for m in mlp.expand_matrices())
        assert mlp.contract_matrix().shape == (32, width)


def test_fused_views_read_the_right_rows():
    """Phi-3 qkv_proj: rows [4 q heads | 2 k heads | 2 v heads]; gate_up_proj: [gate | up].
    Falcon (new decoder architecture): per key/value group [q, q, k, v]."""
    unit = ModelIndex(tiny_model("phi3")).attention[0]
    w = unit.qkv.weight.detach()
    q, k, v = unit.qkv_matrices()
    assert torch.equal(q, w[:32]) and torch.equal(k, w[32:48]) and torch.equal(v, w[48:64])
    mlp = ModelIndex(tiny_model("phi3")).mlps[0]
    w = mlp.up.weight.detach()
    gate, up = mlp.expand_matrices()
    assert torch.equal(gate, w[:48]) and torch.equal(up, w[48:])
    unit = ModelIndex(tiny_model("falcon")).attention[0]
    w = unit.qkv.weight.detach()
    q, k, v = unit.qkv_matrices()
    assert torch.equal(q[16:32], w[32:48]) and torch.equal(k[8:16], w[48:56])
    assert torch.equal(v[0:8], w[24:32])


def silenced_reference(model: torch.nn.Module, group: int, into: int) -> torch.nn.Module:
    """The dense model with group `group`'s output-projection slice added into group `into`'s and
    its own slice zeroed: what removing the group with merge='output' must compute when its
    positional term differs from its twin's (ALiBi slopes are per head)."""
    ref = copy.deepcopy(model)
    for unit in ModelIndex(ref).attention:
        unit.merge_output(group, into)
        with torch.no_grad():
            weight_matrix(unit.o)[:, unit.query_rows([group])] = 0
    return ref


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_identical_heads_are_removed_exactly(family):
    """Group 0 := group 1 in every block; the pass removes group 0 into group 1. Outputs stay
    within 1e-4 and decoders generate the same tokens (with a KV cache). ALiBi families give
    the twin heads different slopes, so there the result must equal the dense model with group
    0 folded into group 1 and silenced (each kept head keeps its own slope) instead."""
    model = tiny_model(family)
    randomize_biases(model)
    pruner = NeuroPrune(model, NeuroPruneConfig(theta=1e-6))
    for unit in pruner.index.attention:
        duplicate_group(model, unit, src=1, dst=0)
    x = tiny_inputs(family)
    reference = silenced_reference(model, 0, 1) if family in ALIBI else copy.deepcopy(model)
    expected = main_output(reference, x)
    if family in ALIBI:  # the twins are not interchangeable: their slopes differ
        assert not torch.allclose(expected, main_output(model, x), atol=1e-4)
    gs = pruner.index.attention[0].group_size
    removed = pruner.prune_redundant_heads()
    assert removed == {u.name: list(range(gs)) for u in pruner.index.attention}
    heads = EXPECTED[family][0]
    assert all(u.num_heads == heads - gs for u in pruner.index.attention)
    torch.testing.assert_close(main_output(model, x), expected, atol=1e-4, rtol=1e-4)
    if family in NEW_DECODERS:
        ids = x["input_ids"][:1]
        kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(model.generate(ids, **kwargs), reference.generate(ids, **kwargs))


@torch.no_grad()
def kill(index: ModelIndex, dead_neurons: int = 5) -> None:
    """Group 0 of every block writes nothing (zero O columns), and the first neurons of every MLP
    are dead (zero contract columns): what finalize leaves of pruned structure."""
    for unit in index.attention:
        weight_matrix(unit.o)[:, unit.query_rows([0])] = 0
    for mlp in index.mlps:
        weight_matrix(mlp.down)[:, :dead_neurons] = 0


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_penalties_finalize_compaction_and_reload(family, tmp_path):
    model = tiny_model(family)
    randomize_biases(model)
    pruner = NeuroPrune(model, NeuroPruneConfig(alpha=1e-2, beta=1e-2, theta=1e-6))
    loss = pruner.regularization_loss()
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    for _, module in pruner.index.counted_modules({"q", "k", "v", "qkv", "up", "gate"}):
        assert module.weight.grad is not None and module.weight.grad.abs().sum() > 0
    model.zero_grad()

    kill(pruner.index)
    pruner.finalize()
    x = tiny_inputs(family)
    expected = main_output(model, x)
    params = sum(p.numel() for p in model.parameters())
    neuroprune.compact(pruner, rule=HEADS_AND_NEURONS)
    torch.testing.assert_close(main_output(model, x), expected, atol=1e-4, rtol=1e-4)
    heads, _, groups, _, _, width = EXPECTED[family]
    for unit in pruner.index.attention:
        assert unit.kept_groups == list(range(1, groups))
        assert unit.num_heads == heads - heads // groups
    assert all(m.kept_neurons == list(range(5, width)) for m in pruner.index.mlps)
    assert sum(p.numel() for p in model.parameters()) < params

    pruner.save_pretrained(tmp_path / "model")
    loaded = neuroprune.load(tmp_path / "model")
    torch.testing.assert_close(main_output(loaded, x), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["phi3", "falcon-mq", "bloom", "deberta-v2"])
def test_training_steps_across_a_head_removal(family):
    """A plain loop (AdamW, the penalties in the loss) that removes a head mid-way: the optimiser
    follows the fused / shared / per-head-positional surgery (remap_optimizer) and training goes
    on with finite losses; the removed head's Adam moments are gone with its rows."""
    model = tiny_model(family).train()
    pruner = NeuroPrune(model, NeuroPruneConfig(alpha=1e-3, beta=1e-3, theta=1e-6))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = tiny_inputs(family)

    def step() -> float:
        out = model(**x)
        hidden = out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state
        loss = hidden.float().pow(2).mean() + pruner.regularization_loss()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    assert all(torch.isfinite(torch.tensor(step())) for _ in range(2))
    for unit in pruner.index.attention:
        duplicate_group(model, unit, src=1, dst=0)
    removed = pruner.prune_redundant_heads()
    assert removed and pruner.last_changes
    kept_moments = {id(c.new): optimizer.state[c.old]["exp_avg"].index_select(c.dim, c.index.cpu())
                    for c in pruner.last_changes}
    neuroprune.remap_optimizer(optimizer, pruner.last_changes)
    for change in pruner.last_changes:
        assert torch.equal(optimizer.state[change.new]["exp_avg"], kept_moments[id(change.new)])
    assert all(torch.isfinite(torch.tensor(step())) for _ in range(2))


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_planned_parameter_count_matches_compaction(family):
    """`compaction.plan` + `flops.removed_parameters` predict what `compact` removes, for the
    fused, multi-query and per-head-projection layouts too (dead group 0, five dead input dims,
    five dead neurons per block)."""
    from neuroprune.compaction import plan
    from neuroprune.model.flops import removed_parameters

    model = tiny_model(family)
    pruner = NeuroPrune(model)
    kill(pruner.index)
    with torch.no_grad():
        for unit in pruner.index.attention:
            for module in (unit.qkv,) if unit.qkv is not None else (unit.q, unit.k, unit.v):
                weight_matrix(module)[:, :5] = 0
    rule = CompactionRule(min_input_fraction=0.1, min_row_fraction=1.0, multiple_of=1)
    predicted = removed_parameters(plan(pruner.index, rule))
    before = sum(p.numel() for p in model.parameters())
    neuroprune.compact(pruner, rule=rule)
    assert before - sum(p.numel() for p in model.parameters()) == predicted > 0


@pytest.mark.parametrize("family", ["phi3", "falcon-mq", "mpt"])
def test_training_run_end_to_end(family, tmp_path):
    """`neuroprune train` (train_run) on a causal LM of the new layouts: trains with the
    penalties, removes heads at the epoch end, finalizes, saves; the saved folder reloads with
    the trained weights and the heads the run kept."""
    import json

    from safetensors.torch import load_file

    import textdata
    from neuroprune.training.settings import TrainSettings
    from neuroprune.training.train import train_run

    config = tiny_model(family).config
    config.update({"pad_token_id": 0, "eos_token_id": 5, "bos_token_id": 2})
    folder = tmp_path / "model"
    type(tiny_model(family))(config).save_pretrained(folder)
    textdata.tokenizer("decoder").save_pretrained(folder)
    files = textdata.splits(tmp_path / "data", textdata.lm_rows)
    settings = TrainSettings(model=str(folder), output_dir=str(tmp_path / "run"), task="causal_lm",
                             train_file=str(files["train"]), validation_file=str(files["validation"]),
                             epochs=1, batch_size=8, logging_steps=1, report_to="none", max_length=32,
                             theta=10.0)  # every group is similar: each block keeps one
    result = train_run(settings, quiet=True)
    assert torch.isfinite(torch.tensor(result.metrics["eval_perplexity"]))
    reloaded = neuroprune.load(result.run_dir / "model")
    saved = load_file(result.run_dir / "model" / "model.safetensors")
    assert all(torch.equal(reloaded.state_dict()[k], v) for k, v in saved.items())
    heads = json.loads((result.run_dir / "model" / "neuroprune.json").read_text())["structure"]["heads"]
    assert len(heads) == 2 and all(len(kept) == 1 for kept in heads.values())


def test_uniform_compaction_of_multi_query_attention_loads_with_the_stock_class(tmp_path):
    """Gemma with one key/value head: layer 0 has a dead query head, layer 1 lost one in training.
    Uniform compaction keeps 3 query heads everywhere and the one shared K/V head (a zero query
    head comes back in layer 1 only if needed); the stock class loads the folder, outputs equal."""
    from transformers import AutoModelForCausalLM

    from neuroprune.compaction import compact_uniform

    model = tiny_model("gemma")
    pruner = NeuroPrune(model)
    first, second = pruner.index.attention
    with torch.no_grad():
        weight_matrix(first.o)[:, first.query_rows([0])] = 0
    second.keep_groups([0, 1, 3])  # as head pruning during training leaves it
    x = tiny_inputs("gemma")
    expected = main_output(model, x)
    result = compact_uniform(pruner)
    changes = result.config_changes
    assert changes["num_attention_heads"] == 3 and changes["num_key_value_heads"] == 1
    assert all((u.num_heads, u.kv_heads) == (3, 1) for u in result.index.attention)
    assert all(u.k.out_features == 8 and u.q.out_features == 24 for u in result.index.attention)
    torch.testing.assert_close(main_output(model, x), expected, atol=1e-5, rtol=0)
    result.index.save_pretrained(tmp_path / "u")
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "u").eval()
    torch.testing.assert_close(main_output(stock, x), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["gemma", "phi3", "falcon-mq"])
def test_sparsity_pattern_plot_of_pruned_layouts(family):
    """The report's [Q, K, V] pattern panel after a head removal (multi-query: the one shared K/V
    head stays drawn as present)."""
    from neuroprune.analysis.plots import sparsity_pattern

    model = tiny_model(family)
    pruner = NeuroPrune(model, NeuroPruneConfig(theta=1e-6))
    for unit in pruner.index.attention:
        duplicate_group(model, unit, src=1, dst=0)
    assert pruner.prune_redundant_heads()
    figure = sparsity_pattern(family, pruner.index.attention, pruner.index.mlps[0])
    assert figure.axes


@pytest.mark.parametrize("family", ["falcon-alibi", "bloom"])
def test_deep_copy_of_a_pruned_model_keeps_its_own_heads(family):
    """`neuroprune compact` keeps a deep copy as the reference: the per-head slicing hooks read the
    heads from the module they run on, so compacting the original (a dead head goes) leaves the
    copy's slicing alone."""
    model = tiny_model(family)
    pruner = NeuroPrune(model, NeuroPruneConfig(theta=1e-6))
    for unit in pruner.index.attention:
        duplicate_group(model, unit, src=1, dst=0)
    pruner.prune_redundant_heads()
    kill(pruner.index)  # position 0 = original head 1 dies
    x = tiny_inputs(family)
    reference = copy.deepcopy(model)
    expected = main_output(reference, x)
    neuroprune.compact(pruner, rule=HEADS_AND_NEURONS)
    assert all(u.kept_heads == [2, 3] for u in pruner.index.attention)
    torch.testing.assert_close(main_output(reference, x), expected, atol=0, rtol=0)
    torch.testing.assert_close(main_output(model, x), expected, atol=1e-4, rtol=1e-4)


SDPA_FAMILIES = ("phi3", "falcon-mq", "falcon-alibi", "gpt_bigcode", "gemma", "modernbert")


@pytest.mark.parametrize("family", SDPA_FAMILIES)
def test_identical_heads_are_removed_exactly_under_sdpa(family):
    """The same removal with PyTorch's scaled-dot-product attention (the default implementation):
    its kernels read the head counts and the (per-head) mask the surgery rewrote."""
    from transformers import AutoModel, AutoModelForCausalLM

    from tiny import tiny_config

    torch.manual_seed(0)
    cls = AutoModelForCausalLM if family in NEW_DECODERS else AutoModel
    model = cls.from_config(tiny_config(family), attn_implementation="sdpa").eval()
    pruner = NeuroPrune(model, NeuroPruneConfig(theta=1e-6))
    for unit in pruner.index.attention:
        duplicate_group(model, unit, src=1, dst=0)
    x = tiny_inputs(family)
    expected = main_output(silenced_reference(model, 0, 1), x)
    assert pruner.prune_redundant_heads()
    torch.testing.assert_close(main_output(model, x), expected, atol=1e-5, rtol=1e-5)
