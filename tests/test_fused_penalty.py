"""The per-step penalty of NeuroPrune as one autograd node (`penalties.fused_penalty`, issue 15)
gives the gradients of the per-matrix reference (`NeuroPrune.weighted_penalties`, plain autograd
through abs / sum / sqrt), and the cached preferential-attachment row weights (`degree_every`)
change nothing at period 1: a seeded FLOP-target run removes the same units and ends on the same
weights as with the reference penalty. At the default period (the selection period) the cache is
refreshed after every selection and the run still lands on its FLOP target."""

from __future__ import annotations

import pytest
import torch

from neuroprune.compaction import flop_count
from neuroprune.config import NeuroPruneConfig
from neuroprune.methods import build_method
from neuroprune.methods.neuroprune import NeuroPrune
from neuroprune.methods.penalties import row_weights
from neuroprune.methods.steering import SparsityTarget

from tiny import tiny_inputs, tiny_model


def _sparsify(model: torch.nn.Module, seed: int = 0) -> None:
    """Exact zeros and entries below eps, so degrees are not all 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_((torch.rand(p.shape, generator=g) > 0.3).to(p.dtype))


@pytest.mark.parametrize("family", ["bert", "llama", "gpt2"])  # separate q/k/v, gated MLP, fused Conv1D
@pytest.mark.parametrize("output_penalty", [False, True])
def test_fused_gradients_equal_the_reference(family, output_penalty):
    model = tiny_model(family)
    _sparsify(model)
    cfg = NeuroPruneConfig(alpha=0.3, beta=0.7, eps=0.02, output_penalty=output_penalty)
    method = build_method("neuroprune", model, cfg)
    params = list(model.parameters())
    reference = sum(method.weighted_penalties().values())
    fused = method.part_penalty(method.parts)
    assert float(fused.detach()) == pytest.approx(float(reference.detach()), rel=1e-6)
    for scale in (1.0, 0.37):  # a scaled loss (gradient accumulation): same up to rounding
        old = torch.autograd.grad(reference * scale, params, allow_unused=True, retain_graph=True)
        new = torch.autograd.grad(fused * scale, params, allow_unused=True, retain_graph=True)
        for a, b in zip(old, new):
            assert (a is None) == (b is None)
            if a is not None:
                if scale == 1.0:
                    assert torch.equal(a, b)  # the same floating-point products
                else:
                    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


def _flops_run(steps: int, degree_every: int | None, reference: bool = False) -> NeuroPrune:
    torch.manual_seed(0)
    model = tiny_model("bert")
    method = build_method("neuroprune", model, NeuroPruneConfig(alpha=1e-2, beta=1e-2, eps=1e-3),
                          SparsityTarget(flops=0.5, seq_len=16))
    method.degree_every_steps = degree_every
    if reference:  # the per-matrix autograd penalty the fused node replaced
        method.part_penalty = lambda parts: sum(  # type: ignore[method-assign]
            method.weighted_penalties(tuple(p.weight for p in parts)).values(), torch.zeros(()))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    method.on_train_begin(steps, opt)
    inputs = tiny_inputs("bert")
    model.train()
    for step in range(1, steps + 1):
        loss = model(**inputs).last_hidden_state.pow(2).mean() + method.regularization_loss()
        loss.backward()
        opt.step()
        opt.zero_grad()
        method.on_step_end(step)
    return method


def test_period_one_run_is_the_reference_run():
    ref, new = _flops_run(30, 1, reference=True), _flops_run(30, 1)
    assert new.degree_every == 1
    assert new.structural.removed.to_dict() == ref.structural.removed.to_dict()
    assert new.structural.planned == ref.structural.planned
    for a, b in zip(ref.model.parameters(), new.model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_cached_degrees_refresh_after_selections_and_land():
    method = _flops_run(120, None)
    every = method.structural.every
    assert method.degree_every == every > 1  # the default under a FLOP target: the selection period
    terms = method._pa_terms()
    cached = method.degree_weights(terms)
    assert method.degree_weights(terms) is cached  # no recomputation between refreshes
    method.on_step_end(method.step + 1 if (method.step + 1) % every else method.step + 2)
    assert method.degree_weights(terms) is cached
    method.on_step_end(every * (method.step // every + 1))  # a refresh step
    fresh = method.degree_weights(terms)
    assert fresh is not cached
    for w, t in zip(fresh, terms):
        assert torch.equal(w, row_weights(t, method.config.eps))
    assert abs(flop_count(method, seq_len=16).fraction - 0.5) <= 0.02
