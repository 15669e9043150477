"""Every task kind end to end on tiny random models and tiny in-test data, and the metric
conventions (GLUE, sacrebleu BLEU, ROUGE, perplexity) against direct computation."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import textdata
from neuroprune import load
from neuroprune.training.settings import TrainSettings
from neuroprune.training.tasks import (
    Task,
    classification_metrics,
    perplexity_metrics,
    seq2seq_metrics,
    token_nll,
)
from neuroprune.training.train import train_run


def _run(tmp_path, family, files, **kw):
    model = textdata.model_folder(tmp_path / "model", family)
    settings = TrainSettings(
        model=str(model),
        output_dir=str(tmp_path / "run"),
        train_file=str(files["train"]),
        validation_file=str(files["validation"]),
        epochs=1,
        batch_size=8,
        logging_steps=1,
        report_to="none",
        max_length=32,
        theta=0.05,
        **kw,
    )
    return train_run(settings, quiet=True)


def _check_run(result, metric):
    value = result.metrics[f"eval_{metric}"]
    assert math.isfinite(value)
    reloaded = load(result.run_dir / "model")
    saved = load_file(result.run_dir / "model" / "model.safetensors")
    state = reloaded.state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved.items())  # the trained weights, not a fresh init
    assert result.records[-1]["final"] is True
    return value


@torch.no_grad()
def _predictions(run_dir, rows, fields):
    """The saved model's outputs on the validation rows, one row at a time (no padding)."""
    model, tok = load(run_dir / "model").eval(), textdata.tokenizer("encoder")
    out = []
    for row in rows:
        enc = tok(*[row[f] for f in fields], return_tensors="pt", truncation=True, max_length=32)
        out.append(model(**enc).logits[0])
    return torch.stack(out)


def test_single_sentence_classification(tmp_path):
    result = _run(tmp_path, "bert", textdata.splits(tmp_path / "data", textdata.sentiment_rows))
    assert result.task.kind == "classification" and result.task.metric_names == ("accuracy", "f1")
    accuracy = _check_run(result, "accuracy")
    rows = textdata.sentiment_rows(8, seed=1)  # the validation split
    predicted = _predictions(result.run_dir, rows, ["sentence"]).argmax(-1).tolist()
    by_hand = sum(p == r["label"] for p, r in zip(predicted, rows)) / len(rows)
    assert accuracy == pytest.approx(by_hand, abs=1e-9)


def test_sentence_pair_classification_uses_the_glue_convention_of_its_folder(tmp_path):
    files = textdata.splits(tmp_path / "mrpc", textdata.sentiment_rows, ".tsv", pair=True)
    result = _run(tmp_path, "roberta", files)
    assert result.task.name == "mrpc" and result.task.main_metric == "f1"
    _check_run(result, "f1")


def test_string_labels_become_classes(tmp_path):
    files = textdata.splits(tmp_path / "data", textdata.sentiment_rows, ".csv", labels="str")
    result = _run(tmp_path, "distilbert", files)
    assert result.task.label_names == ["neg", "pos"]
    assert load(result.run_dir / "model").config.id2label == {0: "neg", 1: "pos"}


def test_float_labels_mean_regression(tmp_path):
    files = textdata.splits(tmp_path / "data", textdata.sentiment_rows, ".csv", labels="float")
    result = _run(tmp_path, "bert", files)
    assert result.task.kind == "regression"
    pearson = _check_run(result, "pearson")
    assert "eval_spearmanr" in result.metrics
    rows = textdata.sentiment_rows(8, seed=1, labels="float")
    predicted = _predictions(result.run_dir, rows, ["sentence"])[:, 0].numpy()
    by_hand = np.corrcoef(predicted, [r["label"] for r in rows])[0, 1]
    assert pearson == pytest.approx(by_hand, abs=1e-4)  # float32 predictions vs float64 by hand


def test_translation_reports_bleu(tmp_path):
    files = textdata.splits(tmp_path / "data", textdata.translation_rows)
    result = _run(tmp_path, "t5", files, generation_max_length=8)
    assert result.task.kind == "seq2seq" and result.task.main_metric == "bleu"
    assert 0 <= _check_run(result, "bleu") <= 100


def test_summarisation_reports_rouge(tmp_path):
    files = textdata.splits(tmp_path / "data", textdata.summary_rows)
    result = _run(tmp_path, "bart", files, task="seq2seq", task_name="summarization", generation_max_length=8)
    for key in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
        assert 0 <= result.metrics[f"eval_{key}"] <= 100


def test_causal_lm_reports_perplexity_of_the_saved_model(tmp_path):
    files = textdata.splits(tmp_path / "data", textdata.lm_rows)
    result = _run(tmp_path, "gpt2", files, task="causal_lm")
    ppl = _check_run(result, "perplexity")
    # Direct: mean next-token NLL over all predicted tokens of the validation rows (the Trainer's
    # eval_loss divides by all label tokens, including the unpredicted first one, so it is lower).
    model, tok = load(result.run_dir / "model").eval(), textdata.tokenizer("decoder")
    nll = tokens = 0.0
    for row in textdata.lm_rows(8, seed=1):
        ids = torch.tensor([tok(row["text"])["input_ids"]])
        with torch.no_grad():
            loss = model(input_ids=ids, labels=ids).loss
        nll, tokens = nll + loss.item() * (ids.shape[1] - 1), tokens + ids.shape[1] - 1
    assert ppl == pytest.approx(math.exp(nll / tokens), rel=1e-4)


def test_glue_metric_conventions():
    logits = np.array([[2.0, 0], [0, 1], [0, 3], [1, 0], [0, 1]])
    labels = np.array([0, 1, 0, 0, 1])
    cola = classification_metrics(Task("classification", "cola", ["0", "1"]), logits, labels)
    assert cola["matthews_correlation"] == pytest.approx(2 / 3) and cola["accuracy"] == pytest.approx(0.8)
    mrpc = classification_metrics(Task("classification", "mrpc", ["0", "1"]), logits, labels)
    assert mrpc["f1"] == pytest.approx(0.8)
    three = classification_metrics(Task("classification", None, ["a", "b", "c"]), np.eye(3), np.arange(3))
    assert three == {"accuracy": 1.0}
    stsb = classification_metrics(
        Task("regression", "stsb"), np.array([[1.0], [2.0], [4.0]]), np.array([1, 2, 3.0])
    )
    assert stsb["spearmanr"] == pytest.approx(1.0) and 0.9 < stsb["pearson"] < 1.0


def test_seq2seq_metrics_against_libraries():
    tok = textdata.tokenizer("seq2seq")
    refs = ["der film ist gut", "die geschichte ist sehr gut"]
    ids = tok(refs, padding=True)["input_ids"]
    same = seq2seq_metrics(
        "translation", SimpleNamespace(predictions=np.array(ids), label_ids=np.array(ids)), tok
    )
    assert same["bleu"] == pytest.approx(100.0)
    hyp = tok(["der film ist schlecht", "die geschichte ist gut"], padding=True)["input_ids"]
    labels = np.array(ids)
    labels[labels == tok.pad_token_id] = -100  # as the seq2seq collator pads labels
    rouge = seq2seq_metrics(
        "summarization", SimpleNamespace(predictions=np.array(hyp), label_ids=labels), tok
    )
    assert 0 < rouge["rouge2"] < rouge["rouge1"] < 100


def test_perplexity_from_token_nll():
    torch.manual_seed(0)
    logits, labels = torch.randn(3, 6, 11), torch.randint(0, 11, (3, 6))
    labels[0, 4:] = -100
    stats = token_nll(logits, labels)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1))
    ppl = perplexity_metrics(SimpleNamespace(predictions=stats.numpy()))["perplexity"]
    assert ppl == pytest.approx(math.exp(loss.item()), rel=1e-5)
