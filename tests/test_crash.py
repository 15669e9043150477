"""Crash safety: non-finite values stop a run with the step and the last good checkpoint, and only
sealed, intact checkpoints are resumed from."""

import math

import pytest
import torch

from neuroprune.errors import NeuroPruneError
from neuroprune.guards import (
    MANIFEST_FILE,
    NonFiniteError,
    check_loss,
    check_weights,
    checkpoint_problem,
    newest_good_checkpoint,
    write_manifest,
)


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
