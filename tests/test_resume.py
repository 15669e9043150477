"""`--resume`: a run killed after a checkpoint continues from it, with the heads it had already
removed restored, and ends exactly where the uninterrupted run ends."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModel, TrainerCallback

import textdata
from neuroprune import ModelIndex, load
from neuroprune.errors import ConfigError
from neuroprune.run_folder import RunDir
from neuroprune.training.settings import TrainSettings
from neuroprune.training.train import train_run

from tiny import duplicate_group


class Crash(Exception):
    pass


class CrashAfterFirstSave(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        raise Crash(f"simulated crash after saving step {state.global_step}")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    folder = textdata.model_folder(root / "model", "bert")
    model = AutoModel.from_pretrained(folder)
    with torch.no_grad():  # two identical heads in layer 0: one is removed after epoch 1
        duplicate_group(model, ModelIndex(model).attention[0], src=0, dst=2)
    model.save_pretrained(folder)
    files = textdata.splits(root / "data", textdata.sentiment_rows, sizes=(24, 8))
    return root, folder, files


def _settings(setup, out, **kw):
    root, folder, files = setup
    values = dict(
        model=str(folder),
        output_dir=str(root / out),
        train_file=str(files["train"]),
        validation_file=str(files["validation"]),
        epochs=3,
        batch_size=8,
        logging_steps=1,
        report_to="none",
        learning_rate=1e-3,
        alpha=1e-3,
        beta=1e-3,
        theta=0.01,
    )
    return TrainSettings(**{**values, **kw})


def test_resume_restores_removed_heads_and_ends_where_the_uninterrupted_run_ends(setup):
    full = train_run(_settings(setup, "full"), quiet=True)
    with pytest.raises(Crash):
        train_run(_settings(setup, "resumed"), callbacks=[CrashAfterFirstSave()], quiet=True)
    run = RunDir(setup[0] / "resumed")
    checkpoint = run.latest_checkpoint()
    assert checkpoint is not None and checkpoint.name == "checkpoint-3"
    saved = json.loads((checkpoint / "neuroprune_method.json").read_text())
    assert saved["state"]["structure"]["heads"]["bert.encoder.layer.0.attention"] == [
        1,
        2,
        3,
    ]  # ties go to the later head
    assert not (run.path / "model").exists()

    resumed = train_run(_settings(setup, "resumed", resume=True), quiet=True)
    a, b = load(full.run_dir / "model"), load(resumed.run_dir / "model")
    assert a.config.num_attention_heads == b.config.num_attention_heads
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], rtol=1e-5, atol=1e-6, msg=key)
    assert resumed.sparsity["heads_kept"] == full.sparsity["heads_kept"] == 7
    steps = [(r["step"], r.get("final", False)) for r in resumed.records]
    assert (
        steps
        == [(r["step"], r.get("final", False)) for r in full.records]
        == [(3, False), (6, False), (9, False), (9, True)]
    )
    assert resumed.metrics["eval_loss"] == pytest.approx(full.metrics["eval_loss"], rel=1e-5)
    history = json.loads((resumed.run_dir / "model" / "neuroprune.json").read_text())["structure"]["history"]
    assert [h["removed_heads"] for h in history] == [[0]]


def test_resume_refuses_changed_settings(setup):
    train_run(_settings(setup, "short", epochs=1), quiet=True)
    with pytest.raises(ConfigError, match=r"alpha=0.5 \(run has 0.001\)"):
        train_run(_settings(setup, "short", epochs=1, alpha=0.5, resume=True), quiet=True)
