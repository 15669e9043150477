"""The cheap per-step path (issue 15) gives the results of the implementation it replaced.

`Reference` below is the per-step code as it was before issue 15 (commit fdb96e5), kept here as an
independent slow reference: a Python loop per matrix, boolean-mask indexing, one `int()` per
matrix for the measurement, `masked_fill_` for the held zeros, the preferential-attachment penalty
with its own `|w|` pass for the degree. It drives the same method object (controllers, schedule
and part targets are shared code, not under test); only the per-step work is swapped.

Stated tolerance. With the work period 1 (every run shorter than 200 steps, and `work_every=1`):
the near-zero counts per matrix kind are identical integers at every step, the controllers'
scales agree to 1e-9 relative, the final weights to 1e-6 absolute and their exact zeros are the
same entries (the new masks may leave -0.0 where the old ones wrote +0.0; both are zero). With a
work period of 4 (what a run of 400+ steps gets): the steered sparsity after the last step is
within 0.02 of the reference run's, and of the target.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from neuroprune import NeuroPruneConfig
from neuroprune.methods import build_method
from neuroprune.methods.penalty import AT_TARGET
from neuroprune.methods.steering import SparsityTarget, count_of, fraction

from tiny import VOCAB, tiny_config

STEPS = 36


# --- the reference: the per-step path before issue 15 -----------------------------------------
def ref_row_degree(mats, eps):
    length = sum(m.shape[1] for m in mats)
    count = sum((m.detach().abs() >= eps).sum(1) for m in mats)
    return count.to(mats[0].dtype) / length


def ref_pa_l1(mats, eps):
    length = sum(m.shape[1] for m in mats)
    weight = 1.0 / ref_row_degree(mats, eps).clamp(min=1.0 / length)
    return (sum(m.abs().sum(1) for m in mats) * weight).sum()


def ref_part_penalty(method, parts):
    """NeuroPrune's alpha * sum R_MLP and beta * sum R_attn, or l1's alpha * sum |w|."""
    cfg, total = method.config, torch.zeros(())
    for part in parts:
        if method.name == "l1":
            total = total + method.alpha * sum(m.abs().sum() for m in method.index.counted_matrices())
        elif part.weight == "alpha":
            r = sum(ref_pa_l1(u.expand_matrices(), cfg.eps) + ref_pa_l1([u.contract_matrix()], cfg.eps)
                    for u in method.index.mlps)
            total = total + method.alpha * r
        else:
            r = sum(torch.sqrt(u.input_l1() + cfg.tiny).sum() for u in method.index.attention)
            total = total + method.beta * r
    return total


@torch.no_grad()
def ref_near_zero(method):
    counts, finalized = {}, method.finalize_kinds
    for unit in [*method.index.attention, *method.index.mlps]:
        for key, mat in unit.matrices().items():
            dense = unit.original_numel[key]
            small = mat.abs() < method.config.eps if key in finalized else mat == 0
            zeros, total = counts.get(key, (0, 0))
            counts[key] = (zeros + dense - mat.numel() + int(small.sum()), total + dense)
    return counts


@torch.no_grad()
def ref_step_factor(pairs, lr, hard, room, eps):
    reach = []
    for param, grad in pairs:
        size = param.abs()
        moving = (param * grad > 0) & (size >= eps)
        distance = size[moving] if hard else size[moving] - eps
        t = distance / (lr * grad.abs()[moving])
        reach.append(t[t <= 1])
    candidates = torch.cat(reach) if reach else torch.zeros(0)
    if candidates.numel() <= room:
        return 1.0
    return float(torch.kthvalue(candidates, room + 1).values) * (1 - 1e-6)


def ref_proximal_step(penalty, params, lr, hard, room, eps):
    grads = torch.autograd.grad(penalty, params, allow_unused=True)
    pairs = [(p, g) for p, g in zip(params, grads) if g is not None]
    c = 1.0 if room is None else ref_step_factor(pairs, lr, hard, room, eps)
    with torch.no_grad():
        for param, grad in pairs:
            new = param - (lr * c) * grad
            crossing = new * param <= 0
            if hard:
                param.masked_fill_(crossing, 0.0)
                continue
            new[crossing] = 0.0
            param.copy_(new)


class Reference:
    """The old `on_step_end` of a penalty method with a target, on the method's own state."""

    def __init__(self, method):
        self.m = method
        self.masks = [p == 0 for p in method.index.counted_weights()]

    def on_step_end(self, step):
        m = self.m
        m.step = step
        with torch.no_grad():
            for param, zero in zip(m.index.counted_weights(), self.masks):
                param.masked_fill_(zero, 0.0)
        active = m.parts
        if m.counts is not None:
            active = [p for p in m.parts
                      if fraction(m.counts, p.kinds) < m.part_target(step, m.counts, p) - AT_TARGET]
        lr = m.optimizer.param_groups[0]["lr"]
        now = ref_near_zero(m)
        for part in active:
            zeros, total = count_of(now, part.kinds)
            room = max(0, math.floor(m.part_target(step, now, part) * total) - zeros)
            ref_proximal_step(ref_part_penalty(m, [part]), m.index.counted_weights(part.kinds), lr,
                              m.target.step == "hard", room, m.config.eps)
        m.counts = ref_near_zero(m)
        for part in m.parts:
            goal = m.part_target(step, m.counts, part)
            m.scales[part.name] = m.controllers[part.name].update(
                step, m.total_steps, fraction(m.counts, part.kinds), goal)
        m.apply_scales()
        self.masks = [p == 0 for p in m.index.counted_weights()]
        return []


# --- the runs ---------------------------------------------------------------------------------
def run(name, target, reference, every=None, step="soft"):
    """A seeded plain loop (AdamW) on a tiny BERT classifier; returns the method and the
    per-step trajectory (near-zero counts, scales)."""
    torch.manual_seed(0)
    config = tiny_config("bert")
    config.num_labels = 2
    model = AutoModelForSequenceClassification.from_config(config, attn_implementation="eager")
    g = torch.Generator().manual_seed(0)
    x = torch.randint(3, VOCAB, (16 * STEPS, 12), generator=g)
    y = ((x == 7).any(1) | (x[:, 0] > 50)).long()
    method = build_method(name, model, NeuroPruneConfig(alpha=1e-3, beta=1e-3, theta=0.02),
                          SparsityTarget(target, step=step))
    method.work_every = every
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    method.on_train_begin(STEPS, opt)
    hook = Reference(method).on_step_end if reference else method.on_step_end
    trajectory = []
    for s, idx in enumerate(torch.arange(len(x)).split(16), start=1):
        loss = model(input_ids=x[idx], labels=y[idx]).loss + method.regularization_loss()
        loss.backward()
        opt.step()
        opt.zero_grad()
        hook(s)
        trajectory.append((dict(method.counts or {}), dict(method.scales)))
    return method, trajectory


@pytest.mark.parametrize(("name", "target", "step"),
                         [("neuroprune", 0.6, "soft"), ("neuroprune", 0.6, "hard"), ("l1", 0.7, "soft")])
def test_per_step_path_gives_the_reference_trajectory(name, target, step):
    new, new_traj = run(name, target, reference=False, step=step)
    old, old_traj = run(name, target, reference=True, step=step)
    assert new.period == 1
    assert fraction(old_traj[-1][0]) > 0.3  # the run really sparsified (the comparison means something)
    for s, ((counts, scales), (ref_counts, ref_scales)) in enumerate(zip(new_traj, old_traj), start=1):
        assert counts == ref_counts, f"step {s}"
        for part, scale in scales.items():
            assert scale == pytest.approx(ref_scales[part], rel=1e-9), f"step {s} {part}"
    for p, q in zip(new.index.counted_weights(), old.index.counted_weights()):
        assert torch.equal(p == 0, q == 0)  # the same structure
        assert torch.allclose(p, q, rtol=0, atol=1e-6)


def test_work_period_stays_on_the_reference_trajectory():
    """Every 4th step does the target path's work (with 4 steps' learning rate): the run ends as
    sparse as the reference, within 0.02, and at the target."""
    new, _ = run("neuroprune", 0.6, reference=False, every=4)
    old, _ = run("neuroprune", 0.6, reference=True)
    assert new.period == 4
    assert len(new.controllers["mlp"].history) == STEPS // 4  # the work ran every 4th step only
    for part in new.parts:
        assert fraction(new.counts, part.kinds) == pytest.approx(fraction(old.counts, part.kinds), abs=0.02)
    assert fraction(new.counts) == pytest.approx(fraction(old.counts), abs=0.02)
    assert fraction(new.counts) == pytest.approx(new.overall_target(STEPS), abs=0.02)


def test_penalty_in_the_loss_equals_the_reference_value_and_gradient():
    """Paper mode: the penalty (|w| shared by the l1 and the degree) and its gradient are the old
    ones."""
    torch.manual_seed(0)
    config = tiny_config("bert")
    model = AutoModelForSequenceClassification.from_config(config, attn_implementation="eager")
    with torch.no_grad():  # some rows sparse, so the degree weights differ between rows
        for p in model.parameters():
            p.masked_fill_(torch.rand_like(p) < 0.3, 0.0)
    method = build_method("neuroprune", model, NeuroPruneConfig(alpha=1e-3, beta=2e-3))
    params = method.index.counted_weights()
    new = method.regularization_loss()
    old = ref_part_penalty(method, method.parts)
    assert new.item() == pytest.approx(old.item(), rel=1e-6)
    for a, b in zip(torch.autograd.grad(new, params, allow_unused=True),
                    torch.autograd.grad(old, params, allow_unused=True)):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.allclose(a, b, rtol=1e-6, atol=0)
