"""`neuroprune train` / `eval` from the command line: the run directory contract, config files
(YAML and JSON, round trip through run_config.json), and one-paragraph errors with exit 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import textdata
from neuroprune.cli import main


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model = textdata.model_folder(root / "model", "bert")
    files = textdata.splits(root / "data", textdata.sentiment_rows)
    test = textdata.write(root / "data" / "test.jsonl", textdata.sentiment_rows(8, seed=5))
    return {
        "root": root,
        "model": str(model),
        "train": str(files["train"]),
        "validation": str(files["validation"]),
        "test": str(test),
    }


def _train(env, out, *extra):
    return main(
        [
            "train",
            "--model",
            env["model"],
            "--train-file",
            env["train"],
            "--validation-file",
            env["validation"],
            "--output-dir",
            str(out),
            "--epochs",
            "1",
            "--batch-size",
            "8",
            "--report-to",
            "none",
            "--logging-steps",
            "1",
            *extra,
        ]
    )


def test_train_writes_the_run_directory_and_eval_reads_it(env, capsys):
    out = env["root"] / "run"
    assert _train(env, out, "--alpha", "0.001", "--test-file", env["test"], "--max-train-samples", "12") == 0
    config = json.loads((out / "run_config.json").read_text())
    assert config["alpha"] == 0.001 and config["max_train_samples"] == 12 and config["epochs"] == 1
    versions = json.loads((out / "versions.json").read_text())
    assert {"python", "torch", "transformers", "neuroprune", "seed", "cpu_count"} <= set(versions)
    metrics = json.loads((out / "metrics.json").read_text())
    required = {
        "epoch",
        "step",
        "eval_accuracy",
        "sparsity",
        "model_sparsity",
        "heads_kept",
        "heads_total",
        "penalty_mlp",
        "penalty_attention",
        "train_loss",
        "wall_clock_s",
    }
    assert len(metrics) == 2 and all(required <= set(m) for m in metrics)  # epoch 1, then final
    assert metrics[-1]["final"] and "test_accuracy" in metrics[-1]
    assert metrics[0]["step"] == 2  # 12 samples / batch 8
    sparsity = json.loads((out / "sparsity.json").read_text())
    assert sparsity["heads_total"] == 8 and len(sparsity["layers"]) == 4
    assert (out / "model" / "neuroprune.json").exists() and list((out / "checkpoints").glob("checkpoint-*"))
    assert not list(out.rglob(".*.tmp*"))  # no temporary files left behind
    stdout = capsys.readouterr().out
    printed = json.loads(stdout[stdout.rindex('{\n "run_dir"') :])
    assert printed["run_dir"] == str(out) and printed["heads_total"] == 8

    report = env["root"] / "eval.json"
    assert main(["eval", "--model", str(out), "--test-file", env["test"], "--output", str(report)]) == 0
    evaluated = json.loads(report.read_text())
    assert evaluated["test_accuracy"] == pytest.approx(metrics[-1]["test_accuracy"])
    assert evaluated["heads_kept"] == sparsity["heads_kept"]


def test_config_file_round_trip(env, tmp_path):
    yaml_file = tmp_path / "cfg.yaml"
    yaml_file.write_text(
        f"model: {env['model']}\ntrain-file: {env['train']}\nvalidation_file: {env['validation']}\n"
        "alpha: 1e-4\nbeta: 2e-4\ntheta: 0.3\nepochs: 1\nbatch_size: 8\nreport_to: none\n"
        "text_fields: [sentence]\nprune_heads: false\n"
    )
    out = tmp_path / "a"
    assert main(["train", "--config", str(yaml_file), "--output-dir", str(out), "--beta", "3e-4"]) == 0
    saved = json.loads((out / "run_config.json").read_text())
    assert (saved["alpha"], saved["beta"], saved["theta"]) == (
        1e-4,
        3e-4,
        0.3,
    )  # YAML 1e-4 is a number; flag wins
    assert saved["text_fields"] == ["sentence"] and saved["prune_heads"] is False
    # The resolved config of one run is a valid config file for the next, and reproduces it.
    again = tmp_path / "b"
    assert main(["train", "--config", str(out / "run_config.json"), "--output-dir", str(again)]) == 0
    second = json.loads((again / "run_config.json").read_text())
    assert {k: v for k, v in second.items() if k != "output_dir"} == {
        k: v for k, v in saved.items() if k != "output_dir"
    }
    first_metrics = json.loads((out / "metrics.json").read_text())
    second_metrics = json.loads((again / "metrics.json").read_text())
    assert first_metrics[-1]["eval_loss"] == pytest.approx(second_metrics[-1]["eval_loss"], rel=1e-5)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"--model": "/nonexistent/model"}, "model path /nonexistent/model does not exist"),
        ({"--train-file": "/nonexistent/train.jsonl"}, "train file /nonexistent/train.jsonl does not exist"),
        ({"--train-file": "EMPTY"}, "is empty"),
        ({"--label-field": "stars"}, "field 'stars' is not in the file"),
        (
            {"--task": "regression"},
            "line 1: label 'pos' in 'label' is not a number, but the task is regression",
        ),
        ({"--alpha": "-1"}, "alpha=-1.0 is out of range: alpha must be >= 0.0"),
        ({"--theta": "0"}, "theta=0.0 is out of range: theta must be > 0.0"),
        ({"--epochs": "0"}, "epochs=0.0 is out of range: epochs must be > 0"),
        ({"--config": "MISSING.yaml"}, "config file MISSING.yaml does not exist"),
        ({"--config": "BAD"}, "unknown setting 'alpah'"),
    ],
)
def test_bad_input_is_one_paragraph_and_exit_2(env, tmp_path, capsys, change, message):
    strings = textdata.splits(tmp_path / "d", textdata.sentiment_rows, labels="str")
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "bad.yaml").write_text("alpah: 0.1\n")
    args = {
        "--model": env["model"],
        "--train-file": str(strings["train"]),
        "--output-dir": str(tmp_path / "o"),
        "--report-to": "none",
    }
    special = {"EMPTY": str(tmp_path / "empty.jsonl"), "BAD": str(tmp_path / "bad.yaml")}
    args.update({k: special.get(v, v) for k, v in change.items()})
    argv = ["train"] + [x for pair in args.items() for x in pair]
    assert main(argv) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # earlier lines can only be progress bars
    assert last.startswith("neuroprune train: error:") and message in last
    assert "Traceback" not in err


def test_existing_run_is_not_overwritten_silently(env, tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(env, out, "--max-train-samples", "4") == 0
    assert _train(env, out, "--max-train-samples", "4") == 2
    assert "already holds a run; pass --resume" in capsys.readouterr().err
    assert _train(env, out, "--max-train-samples", "4", "--overwrite") == 0


def test_entry_point_exit_code_and_message():
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "neuroprune.cli",
            "train",
            "--train-file",
            "/nope.jsonl",
            "--epochs",
            "-1",
            "--report-to",
            "none",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "neuroprune train: error: epochs=-1.0 is out of range: epochs must be > 0."


def test_without_validation_data_metrics_still_has_one_record_per_epoch(env, tmp_path):
    out = tmp_path / "noval"
    argv = [
        "train",
        "--model",
        env["model"],
        "--train-file",
        env["train"],
        "--output-dir",
        str(out),
        "--epochs",
        "2",
        "--max-train-samples",
        "8",
        "--batch-size",
        "8",
        "--report-to",
        "none",
    ]
    assert main(argv) == 0
    records = json.loads((out / "metrics.json").read_text())
    assert [(r["step"], r.get("final", False)) for r in records] == [(1, False), (2, False), (2, True)]
    assert all({"sparsity", "heads_kept", "penalty_mlp", "train_loss"} <= set(r) for r in records)


def test_a_failed_start_leaves_nothing_that_refuses_the_retry(env, tmp_path):
    out = tmp_path / "run"
    assert _train(env, out, "--label-field", "stars") == 2  # fails while reading the data
    assert not (out / "run_config.json").exists()
    assert _train(env, out, "--max-train-samples", "4") == 0  # the retry needs no --overwrite
    assert json.loads((out / "run_config.json").read_text())["label_field"] is None
    # a folder holding only the settings of a start that failed (older versions wrote them first)
    only_settings = tmp_path / "old"
    only_settings.mkdir()
    (only_settings / "run_config.json").write_text((out / "run_config.json").read_text())
    assert _train(env, only_settings, "--max-train-samples", "4") == 0


def test_resume_of_a_finished_run_trains_nothing_and_adds_no_record(env, tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(env, out, "--max-train-samples", "8") == 0
    before = (out / "metrics.json").read_text()
    model = (out / "model" / "model.safetensors").read_bytes()
    capsys.readouterr()
    assert _train(env, out, "--max-train-samples", "8", "--resume") == 0
    captured = capsys.readouterr()
    assert "holds a finished run" in captured.err and "nothing to resume" in captured.err
    assert (out / "metrics.json").read_text() == before
    assert (out / "model" / "model.safetensors").read_bytes() == model
    records = json.loads(before)
    printed = json.loads(captured.out[captured.out.rindex('{\n "run_dir"'):])
    assert printed["eval_accuracy"] == pytest.approx(records[-1]["eval_accuracy"], abs=1e-4)
    assert sum(1 for r in records if r.get("final")) == 1


def test_ctrl_c_says_how_to_resume(env, tmp_path, capsys, monkeypatch):
    from transformers import TrainerCallback

    import neuroprune.training.train as train_module

    class Interrupt(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == 2:
                raise KeyboardInterrupt

    real = train_module.train_run
    monkeypatch.setattr(train_module, "train_run", lambda s: real(s, callbacks=[Interrupt()]))
    out = tmp_path / "run"
    assert _train(env, out, "--epochs", "2", "--save-steps", "1", "--max-train-samples", "16") == 130
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (f"neuroprune train: interrupted. Continue from checkpoint-2 with: neuroprune train "
                   f"--output-dir {out} --resume")
    monkeypatch.setattr(train_module, "train_run", real)
    again = ("--epochs", "2", "--save-steps", "1", "--max-train-samples", "16", "--resume")
    assert _train(env, out, *again) == 0
    assert json.loads((out / "metrics.json").read_text())[-1]["step"] == 4


def test_eval_names_the_test_file_and_defaults_to_the_runs_validation_file(env, tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(env, out, "--max-train-samples", "8") == 0
    final = json.loads((out / "metrics.json").read_text())[-1]
    capsys.readouterr()
    assert main(["eval", "--model", str(out)]) == 0  # no file: the run's own validation file
    captured = capsys.readouterr()
    assert f"on the validation file {env['validation']} (the run's own)" in captured.err
    metrics = json.loads(captured.out)
    assert metrics["validation_accuracy"] == pytest.approx(final["eval_accuracy"])
    assert metrics["validation_loss"] == pytest.approx(final["eval_loss"], rel=1e-5)

    bad = textdata.write(tmp_path / "test.jsonl", [{"sentence": "good film", "label": 7}])
    assert main(["eval", "--model", str(out), "--test-file", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}, line 1: label 7" in err
    assert main(["eval", "--model", str(out), "--test-file", env["test"]]) == 0
    assert "test_accuracy" in json.loads(capsys.readouterr().out)
    unlabelled = textdata.write(tmp_path / "u.jsonl", [{"sentence": "good film"}])
    assert main(["eval", "--model", str(out), "--test-file", str(unlabelled)]) == 2
    assert f"{unlabelled}: no label field found" in capsys.readouterr().err
    assert main(["eval", "--model", str(out), "--test-file", str(unlabelled), "--label-field", "label"]) == 2
    assert f"{unlabelled} has no label field 'label', so it cannot be scored" in capsys.readouterr().err
    assert main(["eval", "--model", str(out / "model")]) == 2  # a model folder: no run settings
    assert "nothing to evaluate: pass --test-file FILE" in capsys.readouterr().err


def _saved_bert(path, dead=0, scattered=0):
    """A tiny BERT saved as a model folder, with `dead` MLP neurons of layer 0 dead (zero contract
    columns) and `scattered` zeros in layer 1's expand matrix, one per neuron row (none dead)."""
    import torch

    from neuroprune import NeuroPrune
    from neuroprune.model.surgery import weight_matrix

    from tiny import tiny_model

    method = NeuroPrune(tiny_model("bert", 0))
    with torch.no_grad():
        weight_matrix(method.index.mlps[0].down)[:, :dead] = 0
        up = weight_matrix(method.index.mlps[1].up)
        for row in range(scattered):
            up[row, row % up.shape[1]] = 0
    method.save_pretrained(path)
    return path


def test_compact_explains_what_it_removed_against_the_dense_model(tmp_path, capsys):
    # tiny BERT: hidden 32, 2 layers of 4 heads, 48 MLP neurons; 8 dead neurons in layer 0
    model = _saved_bert(tmp_path / "m", dead=8)
    assert main(["compact", str(model), "-o", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    dense = sum(p.numel() for p in __import__("tiny").tiny_model("bert", 0).parameters())
    after = dense - 8 * (32 + 1) - 8 * 32  # expand rows with their biases, contract columns
    s, d, n = 128, 32, 48  # block FLOPs at 128 tokens, by hand
    attention = 2 * s * (d * 3 * d + d * d) + 4 * s * s * d
    mlp = 2 * s * n * 2 * d
    fraction = (2 * attention + mlp + 2 * s * (n - 8) * 2 * d) / (2 * attention + 2 * mlp)
    assert f"parameters: {dense:,} dense -> {after:,} compacted ({after / dense:.1%} of the dense" in out
    assert f"block FLOPs (attention + MLP, 128 tokens): {fraction:.1%} of the dense model's" in out
    assert "removed: 8 of 96 MLP neurons" in out and "why:" not in out
    meta = json.loads((tmp_path / "c" / "neuroprune.json").read_text())["compaction"]
    assert meta["flops_fraction"] == pytest.approx(fraction) and meta["parameters_compacted"] == after

    # 5 dead neurons: 43 kept is rounded up to 48 (--multiple-of 8): the output says so
    model = _saved_bert(tmp_path / "m5", dead=5)
    assert main(["compact", str(model), "-o", str(tmp_path / "c5")]) == 0
    out = capsys.readouterr().out
    assert "removed: nothing" in out and "kept: 5 dead MLP neurons" in out and "--multiple-of 1" in out

    # scattered zeros only: nothing is removable, and the output says why
    model = _saved_bert(tmp_path / "ms", scattered=48)
    assert main(["compact", str(model), "-o", str(tmp_path / "cs")]) == 0
    out = capsys.readouterr().out
    counted = 2 * (4 * d * d + 2 * d * n)  # q, k, v, o, expand, contract of both layers
    assert f"parameters: {dense:,} dense -> {dense:,} compacted (100.0% of the dense model)" in out
    assert f"why: {48 / counted:.2%} of the block weights are zero, but the zeros are scattered" in out
