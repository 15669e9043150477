"""The console of a training run (issue 16): the logged loss is the task loss with the penalty
beside it (checked against both computed directly), no penalty fields for methods without one,
one short line per evaluation instead of the log dict, row counts in the reading bars, the
finalize note and the missed-target warnings."""

from __future__ import annotations

import json

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding, TrainingArguments

import textdata
from neuroprune import NeuroPrune, NeuroPruneConfig
from neuroprune.cli import main
from neuroprune.integrations.console import (
    TARGET_TOLERANCE,
    evaluation_line,
    step_postfix,
    unmet_targets,
)
from neuroprune.integrations.trainer import NeuroPruneTrainer
from neuroprune.methods import Dense
from neuroprune.training.data import read_file

from tiny import tiny_config


def _model():
    torch.manual_seed(0)
    config = tiny_config("bert")
    config.update({"num_labels": 2, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0})
    model = AutoModelForSequenceClassification.from_config(config)
    model.accepts_loss_kwargs = False  # its loss ignores num_items_in_batch (as trainer_factory sets)
    return model


def _data(tok, n=8):
    rows = textdata.sentiment_rows(n)
    return Dataset.from_list(rows).map(
        lambda b: {**tok(b["sentence"]), "labels": b["label"]}, batched=True,
        remove_columns=["sentence", "label"],
    )


def _trainer(tmp_path, model, method, accumulation=1, **args):
    tok = textdata.tokenizer()
    data = _data(tok)
    settings = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=8 // accumulation, num_train_epochs=3,
        gradient_accumulation_steps=accumulation, logging_steps=1, report_to="none", save_strategy="no",
        use_cpu=True, learning_rate=0.0, disable_tqdm=True,
    )
    trainer = NeuroPruneTrainer(model=model, args=TrainingArguments(**{**settings, **args}),
                                train_dataset=data, data_collator=DataCollatorWithPadding(tok), method=method)
    return trainer, tok, data


@pytest.mark.parametrize("accumulation", [1, 2])
def test_logged_loss_is_the_task_loss_and_the_penalty_is_logged_apart(tmp_path, accumulation):
    # learning rate 0, no dropout, no head pruning: every step sees the same weights, so the task
    # loss and the penalty of every step are those computed here once, directly
    model = _model()
    method = NeuroPrune(model, NeuroPruneConfig(alpha=0.1, beta=0.1, prune_heads=False))
    trainer, tok, data = _trainer(tmp_path, model, method, accumulation)
    batch = {k: v for k, v in DataCollatorWithPadding(tok)(data[:8]).items()}
    with torch.no_grad():
        task = float(model(**batch).loss)
        penalty = float(method.regularization_loss())
    assert penalty > 10 * task  # the case of the issue: the sum would hide the task loss
    trainer.train()
    logs = [r for r in trainer.state.log_history if "loss" in r]
    assert len(logs) == 3
    for record in logs:
        assert record["loss"] == pytest.approx(task, rel=1e-4, abs=1e-4)
        assert record["penalty"] == pytest.approx(penalty, rel=1e-4)
    end = trainer.state.log_history[-1]
    assert end["train_loss"] == pytest.approx(task, rel=1e-4, abs=1e-4)
    assert end["train_penalty"] == pytest.approx(penalty, rel=1e-4)


def test_no_penalty_fields_without_a_penalty(tmp_path):
    model = _model()
    trainer, _, _ = _trainer(tmp_path, model, Dense(model))
    trainer.train()
    keys = set().union(*trainer.state.log_history)
    assert not {k for k in keys if "penalty" in k}
    assert "loss" in keys and "sparsity" in keys


def test_the_console_line_is_short_and_names_what_matters():
    logs = {"eval_loss": 0.69314, "eval_accuracy": 0.5, "eval_runtime": 1.3, "eval_samples_per_second": 24.0,
            "sparsity": 0.0123, "heads_kept": 70, "heads_total": 72, "epoch": 1.0,
            **{f"sparsity/layer.{i}": 0.01 for i in range(12)},
            **{f"degree_sd/layer.{i}": 0.2 for i in range(6)}}
    line = evaluation_line(logs, {"loss": 0.6723, "penalty": 304.6}, 10, 20)
    assert line == ("epoch 1.00, step 10/20 | eval: loss 0.6931, accuracy 0.5 | task loss 0.6723, "
                    "penalty 304.6 | sparsity 1.23%, heads 70/72")
    steered = {**logs, "near_zero_sparsity": 0.25, "target_sparsity_now": 0.4}
    assert "sparsity at finalize 25.00% (target now 40.00%)" in evaluation_line(steered, {"loss": 0.5}, 1, 2)
    assert step_postfix({"loss": 0.61, "sparsity": 0.5, "heads_kept": 3, "heads_total": 8}) == {
        "loss": "0.61", "sparsity": "50.00%", "heads": "3/8"}
    assert "penalty" in step_postfix({"loss": 0.61, "penalty": 2.0})


def test_unmet_targets_name_the_value_reached_and_what_to_change():
    near = {"target_sparsity": 0.5, "achieved_sparsity": 0.5 - TARGET_TOLERANCE / 2, "alpha": 1e-4,
            "beta": 1e-4}
    assert unmet_targets(near) == []
    (missed,) = unmet_targets({**near, "achieved_sparsity": 0.0016, "alpha": 0.006}, steps=10)
    assert "target sparsity 50.00% was not reached: the run ended at 0.16% in 10 steps" in missed
    assert "--epochs" in missed and "larger --alpha / --beta" in missed and "alpha 0.006" in missed
    start = {"alpha": 1e-4, "beta": 1e-4}
    (weak,) = unmet_targets({**near, "achieved_sparsity": 0.1, "alpha": 5e-4, "beta": 2e-4}, 10, start)
    assert "larger --alpha / --beta" in weak and "alpha 0.0001 -> 0.0005" in weak
    (saturated,) = unmet_targets({**near, "achieved_sparsity": 0.1, "alpha": 4.5, "beta": 2.0}, 10, start)
    assert "larger --alpha" not in saturated
    assert "raised the penalties 20,000x or more (alpha 0.0001 -> 4.5, beta 0.0001 -> 2)" in saturated
    (heads,) = unmet_targets({"target_heads": 36, "heads_kept": 40})
    assert "36 heads was not reached: 40 heads remain" in heads
    assert unmet_targets({"target_heads": 36, "heads_kept": 36}) == []
    (flops,) = unmet_targets({"target_flops": 0.5, "flops_fraction": 0.6})
    assert "FLOPs 50.00% of dense was not reached" in flops and "60.00%" in flops
    assert unmet_targets({"target_flops": 0.5, "flops_fraction": 0.505}) == []
    assert unmet_targets({"target_sparsity": None, "achieved_sparsity": 0.0}) == []


def test_reading_bars_end_with_the_row_count(tmp_path, capsys):
    path = textdata.write(tmp_path / "train.jsonl", textdata.sentiment_rows(37))
    path.write_text(path.read_text() + "\n\n")  # blank lines are not rows
    assert len(read_file(path, "train").dataset) == 37
    assert "reading train.jsonl: 37 rows" in capsys.readouterr().err
    csv = textdata.write(tmp_path / "train.csv", textdata.sentiment_rows(5))
    read_file(csv, "train")
    assert "reading train.csv: 5 rows" in capsys.readouterr().err


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("console")
    files = textdata.splits(root / "data", textdata.sentiment_rows)
    return {"root": root, "model": str(textdata.model_folder(root / "model", "bert")),
            "train": str(files["train"]), "validation": str(files["validation"])}


def _train(env, out, *extra):
    return main(["train", "--model", env["model"], "--train-file", env["train"], "--validation-file",
                 env["validation"], "--output-dir", str(out), "--epochs", "1", "--batch-size", "8",
                 "--report-to", "none", "--logging-steps", "1", *extra])


def test_cli_console_one_line_per_evaluation_and_the_finalize_note(env, capsys):
    out = env["root"] / "paper"
    # a large eps: finalize zeroes many weights that training left small but not zero
    assert _train(env, out, "--alpha", "1e-3", "--beta", "1e-3", "--eps", "0.02", "--epochs", "2") == 0
    err = capsys.readouterr().err
    assert "{'" not in err and "sparsity/" not in err  # no log dicts, no per-layer values
    lines = [line for line in err.replace("\r", "\n").splitlines() if "| eval: " in line]
    assert len(lines) == 2 and all(len(line) < 250 for line in lines)
    assert all("task loss" in line and "penalty" in line for line in lines)
    records = json.loads((out / "metrics.json").read_text())
    final = json.loads((out / "sparsity.json").read_text())["sparsity"]
    assert records[-2]["sparsity"] < final  # the last record during training, then finalize
    note = next(line for line in err.splitlines() if "finalize set" in line)
    assert f"-> {100 * final:.2f}% in the final model" in note and "eps = 0.02" in note
    # per-layer detail stays in the log files, the penalty beside the task loss
    assert any(k.startswith("sparsity/") for k in records[0]) and "train_penalty" in records[0]


def test_cli_warns_when_a_target_is_missed_and_not_when_it_is_met(env, capsys):
    out = env["root"] / "missed"
    assert _train(env, out, "--target-sparsity", "0.9", "--max-train-samples", "8") == 0
    err = capsys.readouterr().err
    achieved = json.loads((out / "sparsity.json").read_text())["achieved_sparsity"]
    assert achieved < 0.9 - TARGET_TOLERANCE
    warning = next(line for line in err.splitlines() if "warning:" in line)
    reached = f"the run ended at {100 * achieved:.2f}% in 1 steps"
    assert f"target sparsity 90.00% was not reached: {reached}" in warning
    assert "not reached" in json.loads((out / "metrics.json").read_text())[-1]["warnings"]

    out = env["root"] / "met"
    assert _train(env, out, "--method", "gmp", "--target-sparsity", "0.5", "--max-train-samples", "8") == 0
    assert "warning:" not in capsys.readouterr().err
    assert "warnings" not in json.loads((out / "metrics.json").read_text())[-1]
