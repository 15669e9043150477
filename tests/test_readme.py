"""The README's Python snippets are complete programs: each one runs as written (in a fresh
process, in an empty folder) on the packaged MiniLM, and what it saves loads back."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import neuroprune

README = Path(__file__).resolve().parents[1] / "README.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
SAVED = {0: "out/sparse-model", 1: "out/compact", 2: "out/trainer-model"}


def test_the_readme_has_the_snippets_this_test_expects():
    assert len(SNIPPETS) == len(SAVED)
    for code in SNIPPETS:
        compile(code, "README.md", "exec")  # syntax, and every name is imported in the snippet:
        assert re.search(r"^from neuroprune import|^import neuroprune", code, flags=re.M)


@pytest.mark.parametrize("number", sorted(SAVED))
def test_snippet_runs_as_written_and_its_model_loads(number, tmp_path):
    proc = subprocess.run([sys.executable, "-c", SNIPPETS[number]], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    model = neuroprune.load(tmp_path / SAVED[number])
    assert isinstance(model, torch.nn.Module)
    heads = sum(layer.attention.self.num_attention_heads for layer in model.bert.encoder.layer)
    if number == 1:  # steered: the FLOP target reached in the snippet's 40 steps, and compacted
        assert "'target_flops': 0.5" in proc.stdout, proc.stdout[-2000:]
        fraction = float(proc.stdout.strip().splitlines()[-1])
        assert fraction == pytest.approx(0.5, abs=0.02)
        assert sum(p.numel() for p in model.parameters()) < 0.9 * 22_713_986  # the dense classifier
    if number == 0:
        assert "sparsity (blocks)" in proc.stdout
    assert heads <= 72
