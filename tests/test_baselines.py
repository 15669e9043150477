"""Mechanics of the baselines and of the method interface: l1 values and gradients, the proximal
step, GMP's cubic schedule and masks that stay zero through optimiser steps, dense untouched."""

from __future__ import annotations

import json

import pytest
import torch

import textdata
from neuroprune import (
    GMP,
    L1,
    ConfigError,
    DenseConfig,
    GMPConfig,
    L1Config,
    NeuroPruneConfig,
    SparsityTarget,
)
from neuroprune.cli import main
from neuroprune.methods import (
    METHODS,
    build_method,
    magnitude_mask,
    method_config,
    proximal_step,
    saved_config,
)
from neuroprune.model.checkpoint import read_meta

from tiny import tiny_inputs, tiny_model


def test_l1_value_and_gradient_by_hand():
    model = tiny_model("gpt2")  # Conv1D, fused c_attn: the views must still be the parameters
    l1 = build_method("l1", model, NeuroPruneConfig(alpha=1.0))
    expected = sum(m.weight.abs().sum() for n, m in model.named_modules()
                   if n.endswith(("c_attn", "c_proj", "c_fc")))
    value = l1.regularization_loss()
    assert value.item() == pytest.approx(expected.item(), rel=1e-6)
    value.backward()
    w = model.transformer.h[0].attn.c_attn.weight
    assert torch.equal(w.grad, torch.sign(w.detach()))
    assert model.transformer.wte.weight.grad is None  # embeddings are not counted


def test_proximal_step_clips_at_zero():
    p = torch.nn.Parameter(torch.tensor([0.5, -0.5, 0.05, -0.05, 0.0]))
    proximal_step(p.abs().sum(), [p], lr=0.1)
    assert torch.equal(p.detach(), torch.tensor([0.4, -0.4, 0.0, 0.0, 0.0]))


def test_hard_proximal_step_zeroes_without_shrinking():
    p = torch.nn.Parameter(torch.tensor([0.5, -0.5, 0.05, -0.05, 0.0]))
    proximal_step(p.abs().sum(), [p], lr=0.1, hard=True)
    assert torch.equal(p.detach(), torch.tensor([0.5, -0.5, 0.0, 0.0, 0.0]))


def test_limited_proximal_step_stops_short_of_the_room():
    """Entries reach eps = 1e-3 at step factors 0.79 (0.08) and 0.19 (-0.02): room for one new
    near-zero entry shortens the step to just before the second."""
    values = torch.tensor([0.5, -0.5, 0.08, -0.02, 0.0])
    p = torch.nn.Parameter(values.clone())
    c = proximal_step(p.abs().sum(), [p], lr=0.1, room=1, eps=1e-3)
    assert c == pytest.approx(0.79, rel=1e-4)
    assert (p.detach().abs() < 1e-3).sum() == 2  # the zero already there and -0.02
    assert p[2] > 1e-3 and p[3] == 0.0
    q = torch.nn.Parameter(values.clone())
    assert proximal_step(q.abs().sum(), [q], lr=0.1, room=2, eps=1e-3) == 1.0  # room enough: full step
    assert torch.allclose(q.detach(), torch.tensor([0.4, -0.4, 0.0, 0.0, 0.0]))


def test_magnitude_mask_keeps_largest():
    mat = torch.tensor([[0.3, -0.1, 0.0], [2.0, -0.05, 0.2]])
    keep = magnitude_mask(mat, 0.5)
    assert keep.tolist() == [[True, False, False], [True, False, True]]
    assert magnitude_mask(mat, 0.0).all()


def test_gmp_schedule_is_cubic():
    gmp = GMP(tiny_model("bert"), target=SparsityTarget(0.8, ramp_begin=0.0, ramp_end=0.5))
    gmp.on_train_begin(100)
    assert gmp.sparsity_at(0) == 0.0
    assert gmp.sparsity_at(25) == pytest.approx(0.8 * (1 - 0.5**3))
    assert gmp.sparsity_at(50) == pytest.approx(0.8)
    assert gmp.sparsity_at(99) == pytest.approx(0.8)


def test_gmp_masks_stay_zero_through_optimizer_steps():
    model = tiny_model("llama")
    method = build_method("gmp", model, GMPConfig(interval=2), target_sparsity=0.7)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    inputs = tiny_inputs("llama")
    total = 12
    method.on_train_begin(total, opt)
    for step in range(1, total + 1):
        loss = model(**inputs, labels=inputs["input_ids"]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if method.masks is not None:  # the optimiser moved pruned weights off zero...
            assert any((m[~k] != 0).any() for k, m in zip(method.masks, method.index.counted_matrices()))
        assert method.on_step_end(step) == []
        # ...and the masks put them back: everything pruned so far is exactly zero
        for keep, mat in zip(method.masks or [], method.index.counted_matrices()):
            assert (mat[~keep] == 0).all()
    method.on_train_end()
    report = method.sparsity_report()
    assert report.sparsity == pytest.approx(0.7, abs=0.01)
    for layer in report.layers:  # unstructured and uniform: every matrix at the target
        for value in layer.matrices.values():
            assert value == pytest.approx(0.7, abs=0.02)
    assert report.heads_kept == report.heads_total


def test_l1_method_never_removes_heads_and_dense_changes_nothing():
    model = tiny_model("bert")
    l1 = build_method("l1", model, NeuroPruneConfig(theta=100.0), target_sparsity=0.5)
    assert l1.on_epoch_end(0) == [] and l1.sparsity_report().heads_kept == 8
    dense_model = tiny_model("bert")
    before = [p.clone() for p in dense_model.parameters()]
    dense = build_method("dense", dense_model)
    dense.on_train_begin(1, None)
    reg = dense.regularization_loss()
    assert float(reg) == 0.0 and not reg.requires_grad
    assert dense.on_step_end(1) == [] and dense.on_epoch_end(0) == []
    dense.on_train_end()
    assert all(torch.equal(a, b) for a, b in zip(before, dense_model.parameters()))
    assert dense.summary()["target_sparsity"] is None


def test_loss_mode_puts_penalty_in_loss_and_proximal_mode_does_not():
    model = tiny_model("bert")
    paper = build_method("neuroprune", model, NeuroPruneConfig(alpha=1e-2, beta=1e-2))
    assert not paper.proximal
    # the loss is the paper's alpha * R_MLP + beta * R_attn, by hand from the raw BERT weights
    weights = dict(model.named_parameters())
    r_mlp = r_attn = 0.0
    for layer in range(2):
        prefix = f"encoder.layer.{layer}."
        for name in ("intermediate.dense.weight", "output.dense.weight"):  # expand, contract: (out, in)
            w = weights[prefix + name].detach().double().abs()
            degree = ((w >= 1e-4).sum(1) / w.shape[1]).clamp(min=1 / w.shape[1])
            r_mlp += float((w.sum(1) / degree).sum())
        qkv = [weights[f"{prefix}attention.self.{n}.weight"].detach().double().abs()
               for n in ("query", "key", "value")]
        r_attn += float(torch.sqrt(sum(m.sum(0) for m in qkv) + 1e-12).sum())
    assert paper.regularization_loss().item() == pytest.approx(1e-2 * r_mlp + 1e-2 * r_attn, rel=1e-5)
    steered = build_method("neuroprune", model, NeuroPruneConfig(alpha=1e-2, beta=1e-2), target_sparsity=0.5)
    assert steered.proximal and not steered.regularization_loss().requires_grad
    assert len(steered.index.counted_weights()) == len(steered.index.counted_matrices()) == 2 * 6


@pytest.mark.parametrize(
    ("name", "target", "message"),
    [
        ("gmp", None, "needs --target-sparsity"),
        ("dense", 0.5, "does not sparsify"),
        ("magic", None, "unknown"),
    ],
)
def test_build_method_errors(name, target, message):
    with pytest.raises(ConfigError, match=message):
        build_method(name, tiny_model("bert"), target_sparsity=target)
    assert "neuroprune" in METHODS


@pytest.mark.parametrize(
    ("name", "target", "heads", "message"),
    [
        ("l1", 0.5, 4, "removes no heads"),
        ("neuroprune", None, 4, "needs --target-sparsity"),
        ("neuroprune", 0.5, 9, "out of range"),
        ("neuroprune", 0.5, 1, "out of range"),  # 2 blocks: at least one head each
        ("neuroprune", 0.1, 2, "more than the target sparsity"),
        ("neuroprune", 0.5, 0, "positive whole number"),
    ],
)
def test_target_heads_errors(name, target, heads, message):
    with pytest.raises(ConfigError, match=message):
        build_method(name, tiny_model("bert"), target_sparsity=target, target_heads=heads)


def test_cli_method_and_target_recorded(tmp_path):
    model = textdata.model_folder(tmp_path / "model", "bert")
    files = textdata.splits(tmp_path / "data", textdata.sentiment_rows, sizes=(64, 8))
    common = ["train", "--model", str(model), "--train-file", str(files["train"]), "--validation-file",
              str(files["validation"]), "--epochs", "2", "--batch-size", "8", "--learning-rate", "1e-3",
              "--report-to", "none", "--alpha", "1e-3", "--beta", "1e-3"]
    out = tmp_path / "gmp"
    assert main([*common, "--output-dir", str(out), "--method", "gmp", "--target-sparsity", "0.6"]) == 0
    sparsity = json.loads((out / "sparsity.json").read_text())
    assert sparsity["method"] == "gmp" and sparsity["target_sparsity"] == 0.6
    assert sparsity["achieved_sparsity"] == sparsity["sparsity"] == pytest.approx(0.6, abs=0.01)
    final = json.loads((out / "metrics.json").read_text())[-1]
    assert final["target_sparsity"] == 0.6 and final["achieved_sparsity"] == sparsity["sparsity"]
    out = tmp_path / "heads"
    assert main([*common, "--output-dir", str(out), "--method", "neuroprune", "--target-sparsity", "0.5",
                 "--target-heads", "5"]) == 0
    sparsity = json.loads((out / "sparsity.json").read_text())
    # at or just above: one more edge in the similarity graph can make a pass remove two heads
    assert sparsity["target_heads"] == 5 and 5 <= sparsity["heads_kept"] <= 6
    out = tmp_path / "bad"
    assert main([*common, "--output-dir", str(out), "--method", "gmp"]) == 2
    assert main([*common, "--output-dir", str(out), "--method", "l1", "--target-sparsity", "0.5",
                 "--target-heads", "4"]) == 2
    assert main([*common, "--output-dir", str(out), "--method", "l1", "--target-sparsity", "90"]) == 2


@pytest.mark.parametrize(
    ("method", "flags", "expected"),
    [
        ("neuroprune", ["--target-sparsity", "0.3", "--target-heads", "6"],
         NeuroPruneConfig(alpha=1e-3, beta=1e-3, theta=0.2)),
        ("l1", ["--target-sparsity", "0.3"], L1Config(alpha=1e-3)),
        ("gmp", ["--target-sparsity", "0.3"], GMPConfig()),
        ("dense", [], DenseConfig()),
    ],
)
def test_every_method_saves_its_own_config_and_its_run_loads_evaluates_compacts_reports(
        tmp_path, method, flags, expected):
    """One config class per method: the run folder records the method's own config (l1 has no
    beta, dense no alpha) and reads it back as that class; then eval, compact and report work on
    the run of every method."""
    model = textdata.model_folder(tmp_path / "model", "bert")
    files = textdata.splits(tmp_path / "data", textdata.sentiment_rows, sizes=(16, 8))
    out = tmp_path / method
    assert main(["train", "--model", str(model), "--train-file", str(files["train"]), "--validation-file",
                 str(files["validation"]), "--epochs", "1", "--batch-size", "8", "--report-to", "none",
                 "--alpha", "1e-3", "--beta", "1e-3", "--theta", "0.2", "--output-dir", str(out),
                 "--method", method, *flags]) == 0
    meta = read_meta(out / "model")
    assert meta["method"] == method and meta["method_config"] == expected.to_dict()
    loaded = saved_config(meta)
    assert type(loaded) is type(expected) and loaded == expected
    assert main(["eval", "--model", str(out), "--test-file", str(files["validation"]),
                 "--output", str(tmp_path / "eval.json")]) == 0
    evaluated = json.loads((tmp_path / "eval.json").read_text())
    assert evaluated["sparsity"] == pytest.approx(json.loads((out / "sparsity.json").read_text())["sparsity"])
    assert main(["compact", str(out)]) == 0
    assert read_meta(out / "compact")["method_config"] == expected.to_dict()
    assert main(["report", str(out), "--output", str(tmp_path / "report")]) == 0
    stats = json.loads((tmp_path / "report" / "stats.json").read_text())
    assert stats["runs"][0]["neuron_degree"]["eps"] == expected.eps


def test_a_config_of_another_method_is_refused_by_the_class_and_converted_by_name():
    with pytest.raises(ConfigError, match="L1 takes a L1Config, got a NeuroPruneConfig"):
        L1(tiny_model("bert"), NeuroPruneConfig())
    l1 = build_method("l1", tiny_model("bert"), NeuroPruneConfig(alpha=0.5, beta=0.25, eps=1e-3))
    assert l1.config == L1Config(alpha=0.5, eps=1e-3) and l1.alpha == 0.5 and l1.beta == 0.0
    assert method_config("gmp", {"interval": 3, "alpha": 1.0, "seed": 1}) == GMPConfig(interval=3)
    with pytest.raises(ConfigError, match="interval must be a whole number"):
        GMPConfig(interval=0)
    with pytest.raises(ConfigError, match="alpha="):
        L1Config(alpha=-1.0)
    with pytest.raises(ConfigError, match="unknown L1Config field"):
        L1Config.from_dict({"beta": 1.0})
    # folders saved before per-method configs hold a full NeuroPruneConfig for every method
    legacy = {"method": "l1", "neuroprune_config": NeuroPruneConfig(alpha=0.5).to_dict()}
    assert saved_config(legacy) == L1Config(alpha=0.5)
