"""NeuroPruneTrainer: the regulariser in the loss (also under gradient accumulation), heads pruned
at epoch ends and every N steps with the optimiser kept in step, finalisation, the values it logs,
and a custom method plugged in."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from transformers import (
    AutoModelForSequenceClassification,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)

import textdata
from neuroprune import NeuroPrune, NeuroPruneConfig, SparsityMethod
from neuroprune.integrations.trainer import NeuroPruneTrainer

from tiny import duplicate_group, tiny_config


def _setup(tmp_path, duplicate=True, **args):
    torch.manual_seed(0)
    config = tiny_config("bert")
    config.num_labels = 2
    model = AutoModelForSequenceClassification.from_config(config)
    pruner = NeuroPrune(model, NeuroPruneConfig(alpha=1e-3, beta=1e-3, theta=0.02))
    if duplicate:
        with torch.no_grad():
            duplicate_group(model, pruner.index.attention[0], src=1, dst=3)
    tok = textdata.tokenizer()
    rows = textdata.sentiment_rows(16)
    data = Dataset.from_list(rows).map(
        lambda b: {**tok(b["sentence"]), "labels": b["label"]},
        batched=True,
        remove_columns=["sentence", "label"],
    )
    defaults = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        num_train_epochs=2,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        learning_rate=1e-3,
        disable_tqdm=True,
    )
    args = TrainingArguments(**{**defaults, **args})
    return model, pruner, tok, data, args


def _trainer(model, tok, data, args, **kw):
    return NeuroPruneTrainer(
        model=model,
        args=args,
        train_dataset=data,
        eval_dataset=data,
        data_collator=DataCollatorWithPadding(tok),
        **kw,
    )


def test_heads_pruned_each_epoch_optimizer_in_step_and_finalised(tmp_path):
    model, pruner, tok, data, args = _setup(tmp_path)
    trainer = _trainer(model, tok, data, args, method=pruner)
    trainer.train()
    assert pruner.index.attention[0].num_heads == 3  # the duplicate went at the end of epoch 1
    assert pruner.index.passes == 2
    params = {id(p) for p in model.parameters()}
    opt = trainer.optimizer.optimizer
    for group in opt.param_groups:
        for p in group["params"]:
            assert id(p) in params  # no stale (pre-removal) tensor left in the optimiser
            if p in opt.state:
                assert opt.state[p]["exp_avg"].shape == p.shape
    # finalised: in the penalised matrices nothing below eps but exact zeros; W^O (no penalty) untouched
    assert "o" not in pruner.finalize_kinds and {"q", "k", "v", "up", "down"} <= pruner.finalize_kinds
    for mat in pruner.index.counted_matrices(pruner.finalize_kinds):
        assert not ((mat.abs() < pruner.config.eps) & (mat != 0)).any()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert {"sparsity", "heads_kept", "penalty_mlp", "penalty_attention"} <= set(logged[0])
    assert logged[0]["heads_kept"] == 8 and logged[-1]["heads_kept"] == 7
    metrics = trainer.evaluate()
    assert metrics["heads_kept"] == 7 and "sparsity/bert.encoder.layer.0.attention" in metrics
    assert "degree_sd/bert.encoder.layer.0" in metrics


def test_prune_every_steps_within_one_epoch(tmp_path):
    model, pruner, tok, data, args = _setup(tmp_path, num_train_epochs=1)
    pruner.prune_every_steps = 2
    trainer = _trainer(model, tok, data, args, method=pruner)
    trainer.train()
    assert pruner.index.passes == 2  # steps 2 and 4 (the epoch end at step 4 does not prune twice)
    assert pruner.index.history and pruner.index.history[0]["pass"] == 0


def test_regulariser_is_in_the_loss_once_per_optimizer_step(tmp_path):
    model, pruner, tok, data, args = _setup(tmp_path, duplicate=False, gradient_accumulation_steps=2)
    trainer = _trainer(model, tok, data, args, method=pruner)
    batch = trainer._prepare_inputs(DataCollatorWithPadding(tok)(data[:4]))
    model.train()
    torch.manual_seed(0)
    task = Trainer.compute_loss(trainer, model, dict(batch))
    torch.manual_seed(0)
    total = trainer.compute_loss(model, dict(batch))
    reg = pruner.regularization_loss()
    assert total.item() == pytest.approx(task.item() + reg.item(), rel=1e-5)
    # when the task loss is already normalised over the accumulated batch, the Trainer does not
    # divide it by the accumulation steps, so the regulariser is divided here instead
    trainer.current_gradient_accumulation_steps = 2
    trainer.loss_is_scaled_for_ga = True
    torch.manual_seed(0)
    scaled = trainer.compute_loss(model, dict(batch))
    assert scaled.item() == pytest.approx(task.item() + reg.item() / 2, rel=1e-5)
    model.eval()  # evaluation loss is the task loss alone
    assert trainer.compute_loss(model, dict(batch)).item() < task.item() + reg.item() / 2


class CountingMethod(SparsityMethod):
    name = "counting"

    def __init__(self, model):
        super().__init__(model)
        self.steps, self.epochs, self.ended, self.began = 0, 0, False, None

    def on_train_begin(self, total_steps, optimizer=None):
        super().on_train_begin(total_steps, optimizer)
        self.began = (total_steps, optimizer)

    def regularization_loss(self):
        return 0.0 * sum(p.sum() for p in self.model.parameters())

    def on_step_end(self, step):
        self.steps = step
        return []

    def on_epoch_end(self, epoch):
        self.epochs = epoch + 1
        return []

    def on_train_end(self):
        self.ended = True

    def log_values(self, detailed=False):
        return {"custom_value": 1.5}


def test_a_custom_method_plugs_in(tmp_path):
    model, _, tok, data, args = _setup(tmp_path, duplicate=False)
    method = CountingMethod(model)
    trainer = _trainer(model, tok, data, args, method=method)
    trainer.train()
    assert (method.steps, method.epochs, method.ended) == (8, 2, True)
    # one callback drives every hook, on_train_begin included: total steps and the real optimiser
    assert method.began[0] == 8 and method.began[1] is trainer.optimizer.optimizer
    assert all(h.get("custom_value") == 1.5 for h in trainer.state.log_history)


def test_per_layer_statistics_reach_tensorboard(tmp_path, monkeypatch):
    """The sparsity and neuron-degree sd of every layer go through the Trainer's own TensorBoard
    callback: read back from the event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logs = tmp_path / "logs"
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(logs))
    model, pruner, tok, data, args = _setup(
        tmp_path, num_train_epochs=1, report_to="tensorboard", eval_strategy="epoch"
    )
    _trainer(model, tok, data, args, method=pruner).train()
    events = EventAccumulator(str(next(p.parent for p in logs.rglob("events.out.tfevents.*"))))
    tags = set(events.Reload().Tags()["scalars"])
    assert {"train/sparsity", "train/heads_kept", "train/penalty_mlp"} <= tags
    # logged with each evaluation; the callback files non-"eval_" keys under train/
    assert "train/degree_sd/bert.encoder.layer.0" in tags
    assert "train/sparsity/bert.encoder.layer.1.attention" in tags
    assert events.Scalars("train/heads_kept")[-1].value == 7
