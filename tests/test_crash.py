"""Crash safety: non-finite values stop a run with the step and the last good checkpoint, and only
sealed, intact checkpoints are resumed from."""

import json
import math
import shutil

import pytest
import torch
from transformers import TrainerCallback

import textdata
from neuroprune import cli
from neuroprune.errors import NeuroPruneError, NonFiniteError
from neuroprune.guards import (
    MANIFEST_FILE,
    check_loss,
    check_weights,
    checkpoint_problem,
    newest_good_checkpoint,
    write_manifest,
)
from neuroprune.run_folder import RunDir
from neuroprune.training.settings import TrainSettings
from neuroprune.training.train import train_run
from sigkill import train_and_kill


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_a_non_finite_loss_names_the_step_and_the_last_good_checkpoint(value):
    with pytest.raises(NonFiniteError, match=r"loss is (nan|inf|-inf) at step 7.*run/checkpoint-6.*--resume"):
        check_loss(torch.tensor(value), step=7, last_good="run/checkpoint-6")
    with pytest.raises(NonFiniteError, match="No checkpoint had been written yet"):
        check_loss(value, step=1)
    assert issubclass(NonFiniteError, NeuroPruneError)


def test_finite_values_pass():
    check_loss(torch.tensor(3.5), step=1)
    check_weights(torch.nn.Linear(3, 2), step=1)


def test_a_non_finite_weight_is_named():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 2))
    with torch.no_grad():
        model[1].weight[0, 1] = math.nan
    with pytest.raises(NonFiniteError, match=r"parameter 1\.weight .* at step 12.*checkpoint-10"):
        check_weights(model, step=12, last_good="checkpoint-10")


def _checkpoint(root, step, payload=b"weights" * 100):
    folder = root / f"checkpoint-{step}"
    (folder / "sub").mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(payload)
    (folder / "sub" / "state.json").write_text(f'{{"step": {step}}}')
    return folder


def test_a_sealed_checkpoint_is_good_until_a_file_changes(tmp_path):
    folder = _checkpoint(tmp_path, 4)
    assert "never completed" in checkpoint_problem(folder)
    write_manifest(folder)
    assert checkpoint_problem(folder) is None
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:-10])
    assert "truncated" in checkpoint_problem(folder)
    (folder / "model.safetensors").write_bytes(data[:-1] + b"X")
    assert "checksum" in checkpoint_problem(folder)
    (folder / "model.safetensors").unlink()
    assert "missing" in checkpoint_problem(folder)
    (folder / MANIFEST_FILE).write_text("{not json")
    assert "corrupt" in checkpoint_problem(folder)


def test_the_newest_intact_checkpoint_is_chosen_and_skips_are_reported(tmp_path):
    for step in (2, 4, 10):
        write_manifest(_checkpoint(tmp_path, step))
    _checkpoint(tmp_path, 12)  # killed while saving: never sealed
    (tmp_path / "checkpoint-10" / "model.safetensors").write_bytes(b"garbage")
    messages = []
    chosen = newest_good_checkpoint(sorted(tmp_path.glob("checkpoint-*")), messages.append)
    assert chosen == tmp_path / "checkpoint-4"
    assert len(messages) == 2
    assert "checkpoint-12 is unusable" in messages[0] and "never completed" in messages[0]
    assert "checkpoint-10 is unusable" in messages[1] and "truncated" in messages[1]
    assert newest_good_checkpoint([], messages.append) is None


# --- a real run killed with SIGKILL mid-epoch, then resumed ------------------------------------
KILL_AT = 9  # 6 steps per epoch: mid-epoch 2, after the epoch-1 pruning pass and checkpoint-8

@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: extra threads only spin against the other jobs on the machine
    root = tmp_path_factory.mktemp("crash")
    model = textdata.model_folder(root / "model", "bert")
    files = textdata.splits(root / "data", textdata.sentiment_rows, sizes=(24, 8))
    settings = dict(model=str(model), train_file=str(files["train"]),
                    validation_file=str(files["validation"]),
                    epochs=2, batch_size=4, save_steps=4, learning_rate=1e-3, alpha=1e-2, beta=1e-2,
                    theta=0.085, max_length=16, logging_steps=100, report_to="none", seed=7)
    yield root, settings
    torch.set_num_threads(threads)


def _outcome(run_dir):
    sparsity = json.loads((run_dir / "sparsity.json").read_text())
    meta = json.loads((run_dir / "model" / "neuroprune.json").read_text())
    return sparsity, meta["structure"]["heads"]


def _cli(settings, output_dir, *extra):
    argv = ["train", "--output-dir", str(output_dir)]
    for key, value in settings.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    assert cli.main([*argv, *extra]) == 0


def test_sigkill_mid_epoch_then_resume_ends_like_an_uninterrupted_run(setup, tmp_path, capsys):
    root, settings = setup
    _cli(settings, tmp_path / "straight")
    expected_sparsity, expected_heads = _outcome(tmp_path / "straight")
    assert sum(len(h) for h in expected_heads.values()) < 8, "the run must remove heads to test their restore"

    killed = tmp_path / "killed"
    train_and_kill(settings, killed, KILL_AT)
    assert sorted(p.name for p in (killed / "checkpoints").glob("checkpoint-*")) == ["checkpoint-4",
                                                                                   "checkpoint-8"]
    shutil.copytree(killed, tmp_path / "corrupted")

    _cli(settings, killed, "--resume")
    sparsity, heads = _outcome(killed)
    assert heads == expected_heads
    assert sparsity["sparsity"] == pytest.approx(expected_sparsity["sparsity"], abs=1e-6)
    assert sparsity["heads_kept"] == expected_sparsity["heads_kept"]

    # the latest checkpoint corrupted on disk: detected, reported, the previous one used
    weights = tmp_path / "corrupted" / "checkpoints" / "checkpoint-8" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    capsys.readouterr()
    _cli(settings, tmp_path / "corrupted", "--resume")
    assert "checkpoint-8 is unusable: model.safetensors has" in capsys.readouterr().err
    sparsity, heads = _outcome(tmp_path / "corrupted")
    assert heads == expected_heads
    assert sparsity["sparsity"] == pytest.approx(expected_sparsity["sparsity"], abs=1e-6)


class _Poison(TrainerCallback):
    """Writes a NaN into one weight after optimiser step `step`."""

    def __init__(self, step: int, parameter: str, index: tuple[int, ...]) -> None:
        self.step, self.parameter, self.index = step, parameter, index

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            with torch.no_grad():
                model.get_parameter(self.parameter)[self.index] = math.nan


def _run(setup, tmp_path, poison):
    root, settings = setup
    values = {**settings, "save_steps": 2, "output_dir": str(tmp_path / "run")}
    with pytest.raises(NonFiniteError) as info:
        train_run(TrainSettings(**values), callbacks=[poison], quiet=True)
    return tmp_path / "run" / "checkpoints", str(info.value)


def test_a_nan_loss_stops_the_run_naming_the_step_and_last_good_checkpoint(setup, tmp_path):
    checkpoints, message = _run(setup, tmp_path, _Poison(3, "classifier.weight", (0, 0)))
    assert f"loss is nan at step 4. The last good checkpoint is {checkpoints / 'checkpoint-2'}" in message


def test_non_finite_weights_are_never_sealed_as_a_good_checkpoint(setup, tmp_path):
    # an embedding row no input uses: the loss stays finite, the save catches it
    embeddings = "bert.embeddings.word_embeddings.weight"
    checkpoints, message = _run(setup, tmp_path, _Poison(3, embeddings, (98, 0)))
    assert f"parameter {embeddings} holds NaN or infinite values at step 4" in message
    assert str(checkpoints / "checkpoint-2") in message
    assert checkpoint_problem(checkpoints / "checkpoint-2") is None
    assert "never completed" in checkpoint_problem(checkpoints / "checkpoint-4")
    assert RunDir(checkpoints.parent).latest_checkpoint() == checkpoints / "checkpoint-2"
