"""Save / reload of pruned models, in a fresh process, and the errors for bad folders."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import neuroprune
from neuroprune import CheckpointError, ModelIndex, NeuroPrune, NeuroPruneConfig

from tiny import duplicate_group, main_output, tiny_inputs, tiny_model


def _pruned(family, tmp_path):
    model = tiny_model(family)
    pruner = NeuroPrune(model, NeuroPruneConfig(theta=1e-6))
    for unit in pruner.index.attention:
        duplicate_group(model, unit, 0, unit.num_kv_heads - 1)
    pruner.prune_redundant_heads()
    pruner.finalize()
    path = pruner.save_pretrained(tmp_path / "model")
    return model, pruner, path


@pytest.mark.parametrize("family", ["bert", "t5", "llama", "gpt2", "gpt_neox"])
def test_round_trip_keeps_structure_history_and_outputs(family, tmp_path):
    model, pruner, path = _pruned(family, tmp_path)
    loaded = ModelIndex.from_pretrained(path, attn_implementation="eager")
    inputs = tiny_inputs(family)
    assert torch.equal(main_output(loaded.model, inputs), main_output(model, inputs))
    assert loaded.head_structure() == pruner.index.head_structure()
    assert loaded.history == json.loads(json.dumps(pruner.index.history))
    assert loaded.report(pruner.config.eps).sparsity == pytest.approx(pruner.sparsity_report().sparsity)
    assert not list(tmp_path.glob(".model.tmp-*"))  # no temporary folder left behind


def test_reload_in_a_fresh_process(tmp_path):
    model, _, path = _pruned("gpt2", tmp_path)
    inputs = tiny_inputs("gpt2")
    torch.save(inputs, tmp_path / "inputs.pt")
    torch.save(main_output(model, inputs), tmp_path / "expected.pt")
    code = (
        "import sys, torch, neuroprune\n"
        f"m = neuroprune.load({str(path)!r}, attn_implementation='eager')\n"
        f"x = torch.load({str(tmp_path / 'inputs.pt')!r})\n"
        f"e = torch.load({str(tmp_path / 'expected.pt')!r})\n"
        "with torch.no_grad(): y = m(**x).logits\n"
        "sys.exit(0 if torch.equal(y, e) else 1)\n"
    )
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def test_saving_over_an_existing_folder_replaces_it(tmp_path):
    _, pruner, path = _pruned("bert", tmp_path)
    (path / "stale.txt").write_text("old")
    pruner.save_pretrained(path)
    assert not (path / "stale.txt").exists() and (path / "neuroprune.json").exists()


def test_bad_folders_give_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="is not a folder"):
        neuroprune.load(tmp_path / "nowhere")
    tiny_model("bert").save_pretrained(tmp_path / "plain")
    with pytest.raises(CheckpointError, match="not a neuroprune model folder"):
        neuroprune.load(tmp_path / "plain")
    _, _, path = _pruned("bert", tmp_path)
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        neuroprune.load(path)


def test_weights_from_another_model_are_refused(tmp_path):
    _, _, path = _pruned("bert", tmp_path)
    other = tiny_model("bert")
    other.save_pretrained(tmp_path / "other")  # dense: shapes differ from the pruned structure
    (path / "model.safetensors").write_bytes((tmp_path / "other" / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="do not fit the model"):
        neuroprune.load(path)


def test_edited_weights_with_the_same_shapes_are_refused(tmp_path):
    _, _, path = _pruned("bert", tmp_path)
    state = load_file(path / "model.safetensors")
    key = next(k for k in state if k.endswith("query.weight"))
    state[key] = state[key] + 0.01  # same shapes, other values
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="checksum"):
        neuroprune.load(path)
