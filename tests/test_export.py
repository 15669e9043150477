"""ONNX export of a compacted encoder: onnxruntime agrees with PyTorch to 1e-4 on inputs of
another shape than the export example (dynamic batch and sequence axes)."""

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

import neuroprune
from neuroprune import NeuroPruneError
from neuroprune.cli import main as cli_main
from neuroprune.integrations.export import example_inputs, export_onnx
from test_compaction import structured

from tiny import tiny_model


def test_export_cli_writes_a_compacted_encoder_that_onnxruntime_matches(tmp_path, capsys):
    pruner = structured("bert")
    neuroprune.compact(pruner)
    pruner.save_pretrained(tmp_path / "run" / "compact")
    out = tmp_path / "bert.onnx"
    assert cli_main(["export", "--onnx", str(out), str(tmp_path / "run")]) == 0
    assert "onnxruntime matches PyTorch" in capsys.readouterr().out
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    model = pruner.model.eval()
    for batch, length in ((1, 5), (4, 23)):
        inputs = example_inputs(model, batch, length, seed=batch)
        got = session.run(None, {k: v.numpy() for k, v in inputs.items()})[0]
        with torch.no_grad():
            want = model(**inputs).last_hidden_state.numpy()
        assert got.shape == want.shape
        assert np.abs(got - want).max() < 1e-4
    # the gathered q/k/v inputs and the dropped contract rows are in the graph
    ops = {node.op_type for node in onnx.load(str(out)).graph.node}
    assert {"Gather", "ScatterElements"} <= ops


def test_encoder_decoder_export_is_refused_clearly(tmp_path):
    with pytest.raises(NeuroPruneError, match="encoder-decoder"):
        export_onnx(tiny_model("t5"), tmp_path / "t5.onnx")
    assert not (tmp_path / "t5.onnx").exists()


def test_export_prints_nothing_about_the_exporter_itself(tmp_path):
    """torch's exporter logs a line per torchvision operator it cannot register and warns about its
    own pytree use; neither is about the user's model. A fresh process, as the registration runs
    once per process."""
    import os
    import subprocess
    import sys

    target = str(tmp_path / "m.onnx")
    code = (
        "from transformers import AutoModelForSequenceClassification, BertConfig\n"
        "from neuroprune.integrations.export import export_onnx\n"
        "config = BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, "
        "intermediate_size=48)\n"
        f"print(export_onnx(AutoModelForSequenceClassification.from_config(config), {target!r}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    assert "m.onnx" in done.stdout
    for noise in ("torchvision", "LeafSpec"):
        assert noise not in done.stderr, done.stderr
