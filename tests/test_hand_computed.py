"""Formulas checked against numbers worked out by hand (literals, or plain torch / math on the
raw module weights), never against the helpers under test:

- the l_{1,0.5} attention penalty at an exactly dead input group: value (to a tolerance well
  below sqrt(tiny)) and gradients (finite; zero on the dead group; sign(w) / (2 sqrt(l1 + tiny))
  elsewhere), on a bare matrix and through a whole model's `regularization_loss`;
- the target controller's PI update, step by step, through both clamps and both scale bounds.
"""

from __future__ import annotations

import math

import pytest
import torch

from neuroprune import NeuroPrune, NeuroPruneConfig
from neuroprune.methods.penalties import group_l1_half
from neuroprune.methods.steering import SparsityTarget, TargetController

from tiny import tiny_model

TINY = 1e-12  # NeuroPruneConfig's default; sqrt(TINY) = 1e-6 is what one dead group contributes


def test_group_penalty_at_a_dead_group_by_hand():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(24, 6, generator=g, dtype=torch.float64)
    a[:, 2] = 0.0  # input dimension 2 exactly dead in Q, K and V
    a.requires_grad_(True)
    value = group_l1_half(a.abs().sum(0), TINY)
    cols = [sum(abs(float(x)) for x in a.detach()[:, j]) for j in range(6)]
    by_hand = sum(math.sqrt(c + TINY) for c in cols)
    assert cols[2] == 0.0
    assert abs(value.item() - by_hand) < 1e-10  # the dead group alone contributes 1e-6
    value.backward()
    assert torch.isfinite(a.grad).all()
    assert torch.equal(a.grad[:, 2], torch.zeros(24, dtype=torch.float64))
    for j in (0, 1, 3, 4, 5):
        expected = torch.sign(a.detach()[:, j]) / (2 * math.sqrt(cols[j] + TINY))
        torch.testing.assert_close(a.grad[:, j], expected, atol=1e-12, rtol=1e-10)


def test_all_groups_dead_cost_exactly_sqrt_tiny_each():
    dead = torch.zeros(5, dtype=torch.float64, requires_grad=True)
    value = group_l1_half(dead, TINY)
    assert value.item() == pytest.approx(5e-6, abs=1e-15)
    value.backward()
    assert torch.equal(dead.grad, torch.full((5,), 0.5 / 1e-6, dtype=torch.float64))


def _qkv_by_layer(model, family):
    """Q, K, V weight parameters of every attention block, each with whether it is stored
    transposed (GPT-2's Conv1D: (in, 3 * out)), read straight from the modules (the test's own
    view, not the layout accessors)."""
    if family == "bert":
        return [[(m.weight, False) for m in (layer.attention.self.query, layer.attention.self.key,
                                             layer.attention.self.value)] for layer in model.encoder.layer]
    if family == "gpt2":
        return [[(block.attn.c_attn.weight, True)] for block in model.transformer.h]
    return [[(m.weight, False) for m in (a.q_proj, a.k_proj, a.v_proj)]
            for a in (layer.self_attn for layer in model.model.layers)]


def _out_in(w: torch.Tensor, transposed: bool) -> torch.Tensor:
    return w.t() if transposed else w


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_exactly_dead_input_dimension_gives_finite_gradients_in_a_model(family):
    """Input dimension 5 of every block's [Q, K, V] is exactly zero (the state R_attn drives
    towards): R_attn's gradient is finite everywhere, exactly zero on that dimension and
    beta * sign(w) / (2 sqrt(column l1 + tiny)) on the others."""
    beta = 0.5
    model = tiny_model(family).double()
    blocks = _qkv_by_layer(model, family)
    with torch.no_grad():
        for mats in blocks:
            for w, t in mats:
                _out_in(w, t)[:, 5] = 0
    pruner = NeuroPrune(model, NeuroPruneConfig(alpha=0.0, beta=beta, tiny=TINY))
    loss = pruner.regularization_loss()
    cols = [sum(_out_in(w, t).detach().abs().sum(0) for w, t in mats) for mats in blocks]
    assert all(float(col[5]) == 0.0 for col in cols)
    by_hand = beta * sum(math.sqrt(float(c) + TINY) for col in cols for c in col)
    assert abs(loss.item() - by_hand) < 1e-9  # the dead dims alone: beta * 1e-6 per block
    loss.backward()
    for p in model.parameters():
        assert p.grad is None or torch.isfinite(p.grad).all()
    for mats, col in zip(blocks, cols):
        for w, t in mats:
            expected = beta * torch.sign(_out_in(w, t).detach()) / (2 * torch.sqrt(col + TINY))
            expected[:, 5] = 0
            torch.testing.assert_close(_out_in(w.grad, t), expected, atol=1e-12, rtol=1e-9)


# --- the target controller ---------------------------------------------------------------------

def test_controller_update_step_by_step_by_hand():
    """kp = 2, ki = 20, max_rate = 0.5, scale bounds [1/4, 4]:
    log_scale += clamp(20 e, +-0.5), clamped to [ln 1/4, ln 4]; scale = exp(log_scale + 2 e),
    clamped to [1/4, 4]. Worked out by hand:"""
    ln4 = math.log(4.0)
    steps = [  # (error, log_scale after, scale)
        (0.40, 0.5, math.exp(1.3)),          # 20 e = 8 -> +0.5; scale e^(0.5 + 0.8)
        (0.01, 0.7, math.exp(0.72)),         # 20 e = 0.2, under the rate limit
        (0.40, 1.2, 4.0),                    # e^(1.2 + 0.8) > 4: the scale bound
        (0.40, ln4, 4.0),                    # 1.7 > ln 4: the integral is clamped (no wind-up)
        (-0.30, ln4 - 0.5, 4 * math.exp(-1.1)),
        (-0.45, ln4 - 1.0, 4 * math.exp(-1.9)),
        (-0.45, ln4 - 1.5, 4 * math.exp(-2.4)),
        (-0.45, ln4 - 2.0, 0.25),            # 4 e^-2.9 = 0.22 < 1/4: lower scale bound
        (-0.45, ln4 - 2.5, 0.25),
        (-0.45, -ln4, 0.25),                 # ln 4 - 3 < ln 1/4: integral clamped below
        (0.01, -ln4 + 0.2, 0.25 * math.exp(0.22)),  # recovers at once: nothing wound up
    ]
    ctl = TargetController(SparsityTarget(0.5, kp=2.0, ki=20.0, max_rate=0.5, min_scale=0.25, max_scale=4.0))
    for step, (error, log_scale, scale) in enumerate(steps, 1):
        measured = 0.5 - error
        got = ctl.update(step, 100, measured, target=0.5)
        assert got == pytest.approx(scale, rel=1e-12, abs=0), step
        assert ctl.log_scale == pytest.approx(log_scale, rel=1e-12, abs=1e-12), step
        assert ctl.history[-1] == {"step": step, "target": 0.5, "measured": measured, "scale": got}


def test_controller_reads_the_cubic_schedule_when_no_target_is_given():
    """Ramp over 10%..60% of 100 steps to 0.8: at step 35 (half way) the target is
    0.8 - 0.8 * 0.5^3 = 0.7; before the ramp 0, after it 0.8."""
    ctl = TargetController(SparsityTarget(0.8, ramp_begin=0.1, ramp_end=0.6))  # kp 2, ki 20
    assert ctl.target_at(5, 100) == 0.0 and ctl.target_at(60, 100) == pytest.approx(0.8)
    assert ctl.target_at(35, 100) == pytest.approx(0.7, abs=1e-12)
    scale = ctl.update(35, 100, 0.69)  # e = 0.01: log_scale 0.2, scale e^(0.2 + 0.02)
    assert ctl.history[-1]["target"] == pytest.approx(0.7, abs=1e-12)
    assert scale == pytest.approx(math.exp(0.22), rel=1e-9)
    assert ctl.log_scale == pytest.approx(0.2, rel=1e-9)
