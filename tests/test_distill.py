"""Recovery by distillation (`--distill-from`): the loss against a hand computation, the teachers
that are refused before training, and a Trainer run that distils and logs the teacher's term."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, TrainerCallback

import textdata
from neuroprune.errors import ConfigError, ModelError
from neuroprune.integrations.distill import Distiller, check_teacher, head_of
from neuroprune.training.settings import TrainSettings
from neuroprune.training.train import train_run

from tiny import tiny_config


def _classifier(seed: int, num_labels: int = 3, **config) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = tiny_config("bert")
    cfg.update({"num_labels": num_labels, **config})
    model = AutoModelForSequenceClassification.from_config(cfg).eval()
    with torch.no_grad():  # logits a few units apart, so the KL is far above float32 rounding
        model.classifier.weight.mul_(100.0)
    return model


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 50, (4, 6), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 4:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 2, 1])}


# --- the loss, by hand -----------------------------------------------------------------------------
def test_logits_term_equals_the_hand_computed_tempered_kl_mixed_with_the_task_loss():
    teacher, student = _classifier(0), _classifier(1)
    batch = _batch()
    distiller = Distiller(teacher, temperature=3.0, weight=0.25)
    out = student(**batch)
    loss, parts = distiller.combine(batch, out, out.loss)

    with torch.no_grad():
        t_logits = teacher(**batch).logits.double()
    s_logits = out.logits.double()
    kl = 0.0
    for t_row, s_row in zip(t_logits.tolist(), s_logits.tolist()):
        zt = [math.exp(v / 3.0) for v in t_row]
        zs = [math.exp(v / 3.0) for v in s_row]
        pt = [v / sum(zt) for v in zt]
        ps = [v / sum(zs) for v in zs]
        kl += sum(p * (math.log(p) - math.log(q)) for p, q in zip(pt, ps))
    kd = 9.0 * kl / len(t_logits)
    log_p = torch.log_softmax(s_logits, -1)
    ce = -sum(log_p[i, y].item() for i, y in enumerate(batch["labels"].tolist())) / 4
    assert parts["distill_loss"] == pytest.approx(kd, rel=1e-5)
    assert loss.item() == pytest.approx(0.75 * ce + 0.25 * kd, rel=1e-5)
    # the gradient reaches the student only
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert student.classifier.weight.grad is not None


def test_a_teacher_equal_to_the_student_teaches_nothing_and_weight_zero_is_the_task_loss():
    student = _classifier(1)
    batch = _batch()
    out = student(**batch)
    same = Distiller(_classifier(1), weight=0.5)
    loss, parts = same.combine(batch, out, out.loss)
    assert parts["distill_loss"] == pytest.approx(0.0, abs=1e-6)
    assert loss.item() == pytest.approx(0.5 * out.loss.item(), rel=1e-6)
    loss0, _ = Distiller(_classifier(0), weight=0.0).combine(batch, out, out.loss)
    assert loss0.item() == pytest.approx(out.loss.item(), rel=1e-7)


def test_regression_heads_use_the_squared_error_between_the_predictions():
    teacher, student = _classifier(0, num_labels=1), _classifier(1, num_labels=1)
    batch = {k: v for k, v in _batch().items() if k != "labels"}
    out = student(**batch)
    with torch.no_grad():
        t = teacher(**batch).logits.squeeze(-1)
    _, parts = Distiller(teacher, temperature=5.0, weight=1.0).combine(batch, out, torch.zeros(()))
    hand = sum((a - b) ** 2 for a, b in zip(out.logits.squeeze(-1).tolist(), t.tolist())) / 4
    assert parts["distill_loss"] == pytest.approx(hand, rel=1e-5)  # no temperature on a regression


def test_token_level_logits_average_over_labelled_positions_only():
    distiller = Distiller(_classifier(0), temperature=1.0, weight=1.0)
    g = torch.Generator().manual_seed(3)
    student, teacher = torch.randn(2, 3, 5, generator=g), torch.randn(2, 3, 5, generator=g)
    labels = torch.tensor([[1, 2, -100], [3, -100, -100]])
    kd = distiller.logits_loss(student, teacher, labels != -100)
    log_t, log_s = torch.log_softmax(teacher, -1), torch.log_softmax(student, -1)
    per = (log_t.exp() * (log_t - log_s)).sum(-1)
    assert kd.item() == pytest.approx(((per[0, 0] + per[0, 1] + per[1, 0]) / 3).item(), rel=1e-5)


def test_hidden_state_term_is_the_mean_layer_mse_over_unmasked_tokens():
    teacher, student = _classifier(0), _classifier(1)
    batch = _batch()
    distiller = Distiller(teacher, weight=0.0, hidden_weight=2.0)
    out = student(**batch, output_hidden_states=True)
    loss, parts = distiller.combine(batch, out, out.loss)
    with torch.no_grad():
        t_hidden = teacher(**batch, output_hidden_states=True).hidden_states
    mask = batch["attention_mask"].bool()
    per_layer = [((s - t) ** 2).mean(-1)[mask].mean() for s, t in zip(out.hidden_states, t_hidden)]
    hand = torch.stack(per_layer).mean().item()
    assert len(per_layer) == 3  # embeddings + 2 layers
    assert parts["hidden_loss"] == pytest.approx(hand, rel=1e-5)
    assert loss.item() == pytest.approx(out.loss.item() + 2.0 * hand, rel=1e-5)


# --- refused teachers ------------------------------------------------------------------------------
def _saved(tmp_path, name, model, tokenizer=None):
    folder = tmp_path / name
    model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


def test_head_names():
    assert head_of("BertForSequenceClassification") == "ForSequenceClassification"
    assert head_of("GPT2LMHeadModel") == "LMHeadModel"
    assert head_of("BertModel") is None


@pytest.mark.parametrize("case, message", [
    ("vocab_size", "vocabulary of 120 tokens, the student 99"),
    ("num_labels", "predicts 2 labels, the student 3"),
    ("labels", "fine-tuned on another task or label order"),
    ("bare", "not a model for the student's task"),
    ("hidden", "hidden-state distillation pairs layer l"),
])
def test_teachers_that_cannot_teach_are_refused_before_training(tmp_path, case, message):
    student = _classifier(1)
    student.config.id2label = {0: "neg", 1: "neu", 2: "pos"}
    tok = textdata.tokenizer()
    if case == "vocab_size":
        teacher = _classifier(0, vocab_size=120)
    elif case == "num_labels":
        teacher = _classifier(0, num_labels=2)
    elif case == "labels":
        teacher = _classifier(0)
        teacher.config.id2label = {0: "pos", 1: "neu", 2: "neg"}
    elif case == "bare":
        from transformers import AutoModel

        teacher = AutoModel.from_config(tiny_config("bert"))
    else:
        teacher = _classifier(0, num_hidden_layers=3)
        teacher.config.id2label = dict(student.config.id2label)
    folder = _saved(tmp_path, "teacher", teacher, tok)
    with pytest.raises(ConfigError, match=message):
        Distiller.from_source(folder, student, tok, hidden_weight=1.0 if case == "hidden" else 0.0)


def test_a_tokenizer_with_other_ids_is_refused_even_at_the_same_size(tmp_path):
    student, teacher = _classifier(1), _classifier(0)
    teacher.config.architectures = ["BertForSequenceClassification"]  # as saved
    tok = textdata.tokenizer()
    other = textdata.tokenizer()
    vocab = other.get_vocab()
    assert {"good", "bad"} <= set(vocab)
    with pytest.raises(ConfigError, match="maps tokens to other ids"):
        check_teacher(teacher.config, student, {**vocab, "good": vocab["bad"], "bad": vocab["good"]},
                      tok.get_vocab())
    check_teacher(teacher.config, student, other.get_vocab(), tok.get_vocab())  # the same: accepted


@pytest.mark.parametrize("bad", [dict(temperature=0.0), dict(weight=1.5), dict(hidden_weight=-1.0)])
def test_out_of_range_settings_are_refused(bad):
    with pytest.raises(ConfigError, match="distill_"):
        Distiller(_classifier(0), **bad)
    names = {"temperature": "distill_temperature", "weight": "distill_weight",
             "hidden_weight": "distill_hidden_weight"}
    settings = TrainSettings(**{names[k]: v for k, v in bad.items()})
    with pytest.raises(ConfigError, match=names[next(iter(bad))]):
        settings.validate()


def test_a_missing_teacher_or_an_unfinished_run_is_named(tmp_path):
    student = _classifier(1)
    with pytest.raises(ModelError, match="is not a folder"):
        Distiller.from_source(tmp_path / "nowhere", student)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run_config.json").write_text("{}")
    with pytest.raises(ModelError, match="holds no model"):
        Distiller.from_source(tmp_path / "run", student)


# --- a run with a teacher ----------------------------------------------------------------------------
class _Logs(TrainerCallback):
    def __init__(self):
        self.logs: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}))


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("distill")
    model = textdata.model_folder(root / "model", "bert")
    files = textdata.splits(root / "data", textdata.sentiment_rows, sizes=(16, 8))
    base = dict(model=str(model), train_file=str(files["train"]), validation_file=str(files["validation"]),
                epochs=1, batch_size=4, learning_rate=1e-3, max_length=16, logging_steps=2,
                report_to="none", seed=3)
    teacher = train_run(TrainSettings(**base, method="dense", output_dir=str(root / "teacher")), quiet=True)
    yield root, base, teacher.run_dir
    torch.set_num_threads(threads)


def test_a_run_with_a_teacher_resolves_the_run_dir_trains_and_logs_the_distill_loss(dense_run):
    root, base, teacher_dir = dense_run
    logs = _Logs()
    run = train_run(TrainSettings(**base, method="dense", output_dir=str(root / "student"),
                                  distill_from=str(teacher_dir), distill_weight=0.7,
                                  distill_temperature=2.0), callbacks=[logs], quiet=True)
    train_logs = [entry for entry in logs.logs if "loss" in entry]
    assert len(train_logs) == 2  # 4 steps, logged every 2
    assert all(entry["distill_loss"] > 0 and math.isfinite(entry["distill_loss"]) for entry in train_logs)
    assert not any("distill_loss" in entry for entry in logs.logs if "eval_loss" in entry)
    assert json.loads((run.run_dir / "run_config.json").read_text())["distill_from"] == str(teacher_dir)

    # weight 0: exactly the run without a teacher; weight 0.7 moved the weights elsewhere
    plain = train_run(TrainSettings(**base, method="dense", output_dir=str(root / "plain")), quiet=True)
    zero = train_run(TrainSettings(**base, method="dense", output_dir=str(root / "zero"),
                                   distill_from=str(teacher_dir), distill_weight=0.0), quiet=True)
    a, b, c = (load_file(r.run_dir / "model" / "model.safetensors") for r in (plain, zero, run))
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-7)
    assert any(not torch.allclose(c[key], a[key], atol=1e-5) for key in a)


def test_a_run_refuses_a_teacher_of_another_label_set_before_training(dense_run, tmp_path):
    root, base, _ = dense_run
    other = _classifier(0, num_labels=3)
    folder = _saved(tmp_path, "three", other, textdata.tokenizer())
    with pytest.raises(ConfigError, match="predicts 3 labels, the student 2"):
        settings = TrainSettings(**base, output_dir=str(tmp_path / "run"), distill_from=str(folder))
        train_run(settings, quiet=True)
    assert not (tmp_path / "run" / "checkpoints").exists()
