"""Every method resumes exactly: a run killed with SIGKILL mid-epoch and resumed with `--resume`
ends with the uninterrupted run's weights (1e-6), and with the same method state (controllers,
scales, masks, theta, heads, schedule position) in its last checkpoint.

What is guaranteed (docs/reliability.md): the state a method changes while it runs is saved in
every checkpoint (`neuroprune_method.json`), restored before the checkpoint's weights load (the
structure, so the shapes fit), and whatever derives from the weights (GMP's masks, the held
zeros of a penalty method) is rebuilt in `on_train_begin`, after they are loaded.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import textdata
from neuroprune import cli
from neuroprune.errors import NeuroPruneError
from neuroprune.training.settings import TrainSettings
from neuroprune.training.train import train_run
from sigkill import train_and_kill

# 24 rows, batch 4: 6 steps an epoch, 3 epochs = 18 steps; checkpoints every 4 steps; the kill
# falls mid-epoch 3 after checkpoint-12, past GMP's first mask update (step 10, interval 10)
KILL_AT = 14
METHODS = {
    "neuroprune": dict(method="neuroprune", theta=0.2),  # the paper's mode: penalties in the loss
    "neuroprune-target": dict(method="neuroprune", target_sparsity=0.5, target_heads=5),
    "neuroprune-flops": dict(method="neuroprune", target_flops=0.5),  # structural selection, masks
    # activation scores: the window of inputs since the last selection (steps 11-12 at the kill's
    # checkpoint-12: selections every 5 steps) is part of the saved state
    "neuroprune-activations": dict(method="neuroprune", target_flops=0.5, scores="activations",
                                   prune_every_steps=5),
    "l1-target": dict(method="l1", target_sparsity=0.4),
    "gmp": dict(method="gmp", target_sparsity=0.6),
    "structured": dict(method="structured", target_flops=0.5),  # removed units held by masks
    "dense": dict(method="dense"),
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("resume_methods")
    model = textdata.model_folder(root / "model", "bert")
    files = textdata.splits(root / "data", textdata.sentiment_rows, sizes=(24, 8))
    settings = dict(model=str(model), train_file=str(files["train"]),
                    validation_file=str(files["validation"]),
                    epochs=3, batch_size=4, save_steps=4, learning_rate=1e-3, alpha=1e-2, beta=1e-2,
                    max_length=16, logging_steps=100, report_to="none", seed=7)
    yield root, settings
    torch.set_num_threads(threads)


def _weights(run_dir):
    return load_file(run_dir / "model" / "model.safetensors")


def _method_state(checkpoint):
    return json.loads((checkpoint / "neuroprune_method.json").read_text())


@pytest.mark.parametrize("name", list(METHODS))
def test_sigkill_then_resume_ends_with_the_uninterrupted_weights_and_state(setup, tmp_path, name):
    root, base = setup
    settings = {**base, **METHODS[name]}
    straight = train_run(TrainSettings(**settings, output_dir=str(tmp_path / "straight")), quiet=True)
    killed = tmp_path / "killed"
    train_and_kill(settings, killed, KILL_AT)
    resumed = train_run(TrainSettings(**settings, output_dir=str(killed), resume=True), quiet=True)

    a, b = _weights(straight.run_dir), _weights(resumed.run_dir)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}")
    assert resumed.sparsity == straight.sparsity
    # the method state of the last checkpoint: saved by the straight run at step 16, and by the
    # resumed run after it restored checkpoint-12's state and trained steps 13-16 again
    state_a = _method_state(straight.run_dir / "checkpoints" / "checkpoint-16")
    state_b = _method_state(resumed.run_dir / "checkpoints" / "checkpoint-16")
    for key in state_a["state"]:
        assert state_b["state"][key] == state_a["state"][key], key
    assert state_b == state_a

    if name == "gmp":  # the masks held through the resumed steps: every pruned weight still zero
        assert resumed.sparsity["sparsity"] == pytest.approx(0.6, abs=0.01)
        assert 0.5 < state_a["state"]["gmp_sparsity"] < 0.6  # masks of step 10 in force at 16
    if name == "neuroprune-flops":  # units were removed on the schedule and held through the resume
        removed = state_a["state"]["structural"]["removed"]
        assert removed["neurons"] and state_a["state"]["structural"]["last_selection"] == 13
        assert resumed.sparsity["flops_fraction"] == pytest.approx(0.5, abs=0.02)
    if name == "neuroprune-activations":  # the resumed run scored step 13 from steps 11-13's inputs,
        # two of them restored from checkpoint-12; after the ramp the window is empty
        assert state_a["state"]["structural"]["last_selection"] == 13
        assert set(state_a["state"]["activations"]["counts"]["neurons"]) == {0}
    if name == "structured":  # removals held through the resume; the ramp's last selection
        # (step 13 = ceil(0.7 * 18)) falls between checkpoint-12 and the kill: the resumed run redid it
        assert state_a["state"]["structural"]["removed"]["neurons"]
        assert state_a["state"]["structural"]["last_selection"] == 13
    if name == "neuroprune-target":  # controllers, theta and heads really took part
        loops = state_a["state"]["controllers"]
        assert set(loops) == {"mlp", "attention"} and all(len(c["history"]) == 16 for c in loops.values())
        assert resumed.sparsity["heads_kept"] < resumed.sparsity["heads_total"]
        assert state_a["state"]["theta"] != base.get("theta", 0.15)


def test_resume_with_another_method_is_refused(setup, tmp_path, capsys):
    root, base = setup
    settings = {**base, **METHODS["gmp"], "epochs": 1}
    out = tmp_path / "run"
    train_and_kill({**settings, "epochs": 3}, out, KILL_AT)
    checkpoint = out / "checkpoints" / "checkpoint-12"
    assert _method_state(checkpoint)["method"] == "gmp"
    # the run folder remembers its settings: another method on --resume is a changed setting
    argv = ["train", "--output-dir", str(out), "--resume"]
    for key, value in {**settings, **METHODS["l1-target"], "epochs": 3}.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    capsys.readouterr()
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "method='l1'" in err and "(run has 'gmp')" in err
    # and the Trainer itself refuses a checkpoint of another method
    from transformers import AutoModelForSequenceClassification, TrainingArguments

    from neuroprune import build_method
    from neuroprune.integrations.trainer import NeuroPruneTrainer

    model = AutoModelForSequenceClassification.from_pretrained(base["model"], num_labels=2)
    args = TrainingArguments(output_dir=str(tmp_path / "t"), report_to="none", use_cpu=True)
    trainer = NeuroPruneTrainer(model=model, args=args,
                                method=build_method("dense", model))
    with pytest.raises(NeuroPruneError, match="trained with method 'gmp', not 'dense'"):
        trainer.train(resume_from_checkpoint=str(checkpoint))
