"""Compaction: exact for every family (outputs, generation with a KV cache), smaller, recorded in
the checkpoint so that `neuroprune.load` rebuilds it in a fresh process, and clear errors for
bad folders."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import neuroprune
from neuroprune import CheckpointError, CompactionRule, ConfigError, ModelIndex, NeuroPrune, NeuroPruneConfig
from neuroprune.cli import main as cli_main
from neuroprune.model.surgery import weight_matrix

from tiny import DECODERS, FAMILIES, SEQ2SEQ, duplicate_group, main_output, tiny_inputs, tiny_model

ATOL = 1e-5


@torch.no_grad()
def structured(family: str, seed: int = 0) -> NeuroPrune:
    """A tiny model with random biases and the structure NeuroPrune learns: one head per block
    removed by the core, a third of the neurons with a zero expand row (their constant activation
    must be folded), a sixth with a zero contract column, half the contract rows zero, a third of
    the attention input dims dead."""
    model = tiny_model(family, seed)
    for name, p in model.named_parameters():
        if name.endswith("bias") and "norm" not in name.lower():
            p.normal_(0, 0.5)
    pruner = NeuroPrune(model, NeuroPruneConfig(theta=1e-6))
    for unit in pruner.index.attention:
        duplicate_group(model, unit, 0, unit.num_kv_heads - 1)
    assert pruner.prune_redundant_heads()
    g = torch.Generator().manual_seed(seed)
    for unit in pruner.index.mlps:
        n = unit.original_neurons
        perm = torch.randperm(n, generator=g)
        for w in unit.expand_matrices():
            w[perm[: n // 3]] = 0
        unit.contract_matrix()[:, perm[n // 3: n // 2]] = 0
        d = unit.contract_matrix().shape[0]
        unit.contract_matrix()[torch.randperm(d, generator=g)[: d // 2]] = 0
    for unit in pruner.index.attention:
        width = unit.input_l1().numel()
        dims = torch.randperm(width, generator=g)[: width // 3]
        for m in [unit.qkv] if unit.qkv is not None else [unit.q, unit.k, unit.v]:
            weight_matrix(m)[:, dims] = 0
    pruner.finalize()
    return pruner


def generate(model, family):
    x = tiny_inputs(family)
    return model.generate(input_ids=x["input_ids"], attention_mask=x["attention_mask"],
                          max_new_tokens=6, do_sample=False, use_cache=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_compaction_is_exact_and_smaller(family):
    pruner = structured(family)
    model = pruner.model
    x = tiny_inputs(family)
    expected = main_output(model, x)
    tokens = generate(model, family) if family in DECODERS + SEQ2SEQ else None
    params = sum(p.numel() for p in model.parameters())
    sparsity = pruner.sparsity_report().sparsity

    assert neuroprune.compact(pruner) is pruner.index
    torch.testing.assert_close(main_output(model, x), expected, atol=ATOL, rtol=0)
    if tokens is not None:
        assert torch.equal(generate(model, family), tokens)
    structure = pruner.index.structure()
    for key in ("mlp_neurons", "attention_inputs", "contract_rows"):
        units = pruner.index.mlps if key != "attention_inputs" else pruner.index.attention
        assert len(structure[key]) == len(units)
    for unit in pruner.index.mlps:  # a third plus a sixth of the neurons were dead
        assert len(unit.kept_neurons) == unit.original_neurons - unit.original_neurons // 2
    assert sum(p.numel() for p in model.parameters()) < 0.9 * params
    # the contract columns of neurons with a dead expand row are gone too: sparsity only grows
    assert pruner.sparsity_report().sparsity > sparsity


def test_plain_model_is_wrapped_and_rule_thresholds_apply():
    model = structured("bert").model
    never = neuroprune.compact(model, rule=CompactionRule(min_input_fraction=1.0, min_row_fraction=1.0))
    assert isinstance(never, ModelIndex) and never.model is model
    structure = never.structure()
    assert "mlp_neurons" in structure
    assert "attention_inputs" not in structure and "contract_rows" not in structure
    with pytest.raises(ConfigError, match="min_row_fraction"):
        CompactionRule(min_row_fraction=2)
    with pytest.raises(ConfigError, match="multiple_of"):
        CompactionRule(multiple_of=0)


def test_kept_widths_are_rounded_up_to_a_multiple_exactly():
    pruner = structured("gpt2")
    with torch.no_grad():
        weight_matrix(pruner.index.mlps[0].up)[:45] = 0  # 3 live neurons of 48
    x = tiny_inputs("gpt2")
    expected = main_output(pruner.model, x)
    neuroprune.compact(pruner)
    assert len(pruner.index.mlps[0].kept_neurons) == 8
    assert len(pruner.index.structure()["contract_rows"][pruner.index.mlps[0].name]) % 8 == 0
    torch.testing.assert_close(main_output(pruner.model, x), expected, atol=ATOL, rtol=0)


@torch.no_grad()
def _biased_gated_llama(seed: int = 0):
    """Llama with biases on gate and up (not on down): a neuron whose gate and up rows are both
    zero is the constant SiLU(b_gate) * b_up, which needs a bias on the contract to fold into."""
    model = tiny_model("llama", seed)
    g = torch.Generator().manual_seed(seed)
    for layer in model.model.layers:
        for proj in (layer.mlp.gate_proj, layer.mlp.up_proj):
            proj.bias = torch.nn.Parameter(torch.randn(proj.out_features, generator=g))
    return model


def test_constant_neurons_fold_into_a_new_contract_bias_that_is_restored():
    model = _biased_gated_llama()
    pruner = NeuroPrune(model)
    with torch.no_grad():
        for unit in pruner.index.mlps:
            for w in unit.expand_matrices():
                w[:10] = 0
    x = tiny_inputs("llama")
    expected = main_output(model, x)
    neuroprune.compact(pruner)
    assert all(u.down.bias is not None and u.added_contract_bias for u in pruner.index.mlps)
    torch.testing.assert_close(main_output(model, x), expected, atol=ATOL, rtol=0)
    structure = json.loads(json.dumps(pruner.index.structure()))
    assert structure["contract_biases"] == [u.name for u in pruner.index.mlps]

    fresh = ModelIndex(_biased_gated_llama(seed=1))
    fresh.restore_structure(structure)
    fresh.model.load_state_dict(model.state_dict(), strict=True)
    torch.testing.assert_close(main_output(fresh.model, x), expected, atol=ATOL, rtol=0)


def test_compacting_twice_composes():
    pruner = structured("gpt2")
    neuroprune.compact(pruner)
    with torch.no_grad():
        for unit in pruner.index.mlps:
            weight_matrix(unit.up)[:3] = 0
        weight_matrix(pruner.index.attention[0].qkv)[:, :8] = 0
    x = tiny_inputs("gpt2")
    expected = main_output(pruner.model, x)
    neuroprune.compact(pruner, rule=CompactionRule(min_input_fraction=0.0))
    torch.testing.assert_close(main_output(pruner.model, x), expected, atol=ATOL, rtol=0)
    fresh = ModelIndex(tiny_model("gpt2"))
    fresh.restore_structure(json.loads(json.dumps(pruner.index.structure())))
    fresh.model.load_state_dict(pruner.model.state_dict())
    torch.testing.assert_close(main_output(fresh.model, x), expected, atol=ATOL, rtol=0)


def test_reload_in_a_fresh_process_gives_the_same_outputs(tmp_path):
    cases = []
    for family in ("bert", "t5-gated", "llama", "gpt2"):
        pruner = structured(family)
        neuroprune.compact(pruner)
        path = pruner.save_pretrained(tmp_path / family)
        x = tiny_inputs(family)
        torch.save({"inputs": x, "expected": main_output(pruner.model, x)}, tmp_path / f"{family}.pt")
        cases.append((str(path), str(tmp_path / f"{family}.pt")))
    code = (
        "import sys, torch, neuroprune\n"
        f"for path, data in {cases!r}:\n"
        "    m = neuroprune.load(path, attn_implementation='eager')\n"
        "    d = torch.load(data)\n"
        "    with torch.no_grad(): out = m(**d['inputs'])\n"
        "    y = out.logits if getattr(out, 'logits', None) is not None else out.last_hidden_state\n"
        "    print(path, float((y - d['expected']).abs().max()))\n"
        "    assert torch.allclose(y, d['expected'], atol=1e-5, rtol=0), path\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(proc.stdout.strip().splitlines()) == 4


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compact")
    pruner = structured("bert")
    neuroprune.compact(pruner)
    return pruner.save_pretrained(tmp / "model")


def _copy(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_truncated_weights_are_refused(saved, tmp_path):
    path = _copy(saved, tmp_path / "m")
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        neuroprune.load(path)


def test_edited_weights_are_refused(saved, tmp_path):
    path = _copy(saved, tmp_path / "m")
    state = load_file(path / "model.safetensors")
    key = next(k for k in state if k.endswith("intermediate.dense.weight"))
    state[key] = torch.cat([state[key], state[key][:1]])  # one neuron more than the structure says
    save_file(state, path / "model.safetensors")
    with pytest.raises(CheckpointError, match="do not fit"):
        neuroprune.load(path)
    del state[key]
    save_file(state, path / "model.safetensors")
    with pytest.raises(CheckpointError, match="lacks weights"):
        neuroprune.load(path)


def test_weights_or_structure_from_another_model_are_refused(saved, tmp_path):
    other = structured("bert", seed=3)
    with torch.no_grad():
        weight_matrix(other.index.mlps[0].up)[:, :] = 0  # every neuron of one MLP dead: other shapes
    neuroprune.compact(other)
    other_path = other.save_pretrained(tmp_path / "other")
    path = _copy(saved, tmp_path / "m")
    (path / "model.safetensors").write_bytes((other_path / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="do not fit"):
        neuroprune.load(path)

    path = _copy(saved, tmp_path / "m2")
    meta = json.loads((path / "neuroprune.json").read_text())
    meta["structure"]["mlp_neurons"]["decoder.block.0"] = [0]
    (path / "neuroprune.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="different model"):
        neuroprune.load(path)


def test_cli_compacts_a_run_directory(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    pruner = structured("roberta")
    pruner.save_pretrained(run / "model")
    x = tiny_inputs("roberta")
    expected = main_output(pruner.model, x)
    assert cli_main(["compact", str(run)]) == 0
    assert "parameters" in capsys.readouterr().out
    meta = json.loads((run / "compact" / "neuroprune.json").read_text())
    assert meta["compaction"]["parameters_after"] < meta["compaction"]["parameters_before"]
    assert meta["compaction"]["max_abs_diff"] <= 1e-4
    loaded = neuroprune.load(run / "compact")
    torch.testing.assert_close(main_output(loaded, x), expected, atol=ATOL, rtol=0)
    assert cli_main(["compact", str(tmp_path / "nowhere")]) == 2
    assert "neither a run directory" in capsys.readouterr().err


def test_query_key_value_share_one_gather_and_release_it():
    from torch.overrides import TorchFunctionMode

    from neuroprune.model.structure import SHARED_GATHER

    class CountGathers(TorchFunctionMode):
        calls = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is torch.Tensor.index_select:
                CountGathers.calls += 1
            return func(*args, **(kwargs or {}))

    index = neuroprune.compact(structured("bert"))
    with torch.no_grad(), CountGathers():
        index.model(**tiny_inputs("bert"))
    assert CountGathers.calls == len(index.attention)
    assert all(getattr(u.q, SHARED_GATHER).value is None for u in index.attention)
