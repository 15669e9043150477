"""Tests written to kill the mutants of `neuroprune/methods/penalty.py` that survived the first
mutation run (scripts/mutation.py, docs/testing.md): the target path's period, the controller
update, the proximal step and its limit, the logs and the state, each against a value worked out
by hand (counts from the raw weights, the schedule and controller formulas written out), never
against another method object's output. Every test is fast (tiny BERT, no training)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import pytest
import torch

from neuroprune import ConfigError, SparsityTarget
from neuroprune.config import MethodConfig
from neuroprune.methods.baselines import L1, L1Config
from neuroprune.methods.penalty import Part, PenaltyMethod, ZeroMasks, proximal_step, step_factor, work_period
from neuroprune.model.index import ATTENTION_KINDS, MLP_KINDS

from tiny import tiny_model

# tiny BERT: 2 layers, hidden 32, intermediate 48; counted matrices by kind
SUFFIX_KIND = {
    "attention.self.query": "q",
    "attention.self.key": "k",
    "attention.self.value": "v",
    "attention.output.dense": "o",
    "intermediate.dense": "up",
    "output.dense": "down",
}
STEERED = {"mlp": {"up", "down"}, "qkv": {"q", "k", "v"}}


@dataclass(frozen=True, kw_only=True)
class ToyConfig(MethodConfig):
    alpha: float = 1e-3
    beta: float = 1e-3


class Toy(PenaltyMethod):
    """Two parts, each a plain l1 of its own matrices: alpha on the MLPs, beta on Q/K/V; W^O is
    free (steered by no weight), as NeuroPrune's W^O is by default."""

    name = "toy"
    config_class = ToyConfig

    def define_parts(self) -> list[Part]:
        return [Part("mlp", "alpha", MLP_KINDS), Part("qkv", "beta", ATTENTION_KINDS)]

    def part_penalty(self, parts: list[Part]) -> torch.Tensor:
        terms = [self.weights[p.weight] * m.abs().sum()
                 for p in parts for m in self.index.counted_matrices(p.kinds)]
        return sum(terms, torch.zeros(()))


def weights_by_kind(model) -> dict[str, list[torch.Tensor]]:
    """The counted weights of tiny BERT by kind, found by module name (not by the index)."""
    out: dict[str, list[torch.Tensor]] = {}
    for name, module in model.named_modules():
        for suffix, kind in SUFFIX_KIND.items():
            mlp_output = suffix == "output.dense" and not name.endswith("attention.output.dense")
            if name.endswith(suffix) and (suffix != "output.dense" or mlp_output):
                out.setdefault(kind, []).append(module.weight)
    return out


def counts_by_hand(model, eps: float, finalized: set[str]) -> dict[str, tuple[int, int]]:
    """(near-zero, entries) per kind: |w| < eps in the finalized kinds, exact zeros in the others."""
    out = {}
    for kind, mats in weights_by_kind(model).items():
        small = sum(int((m.abs() < eps).sum()) if kind in finalized else int((m == 0).sum()) for m in mats)
        out[kind] = (small, sum(m.numel() for m in mats))
    return out


def frac(counts, kinds=None) -> float:
    z = sum(v[0] for k, v in counts.items() if kinds is None or k in kinds)
    t = sum(v[1] for k, v in counts.items() if kinds is None or k in kinds)
    return z / t if t else 0.0


def goal_by_hand(target: float, counts, part: str) -> float:
    """A part's share of the overall target: the free kinds (W^O) count as they are, the other
    part as its zeros or its common share, whichever is more."""
    steered = STEERED["mlp"] | STEERED["qkv"]
    total = sum(t for _, t in counts.values())
    free = sum(z for k, (z, _) in counts.items() if k not in steered)
    size = {p: sum(counts[k][1] for k in kinds if k in counts) for p, kinds in STEERED.items()}
    zeros = {p: sum(counts[k][0] for k in kinds if k in counts) for p, kinds in STEERED.items()}
    share = (target * total - free) / (size["mlp"] + size["qkv"])
    other = "qkv" if part == "mlp" else "mlp"
    goal = (target * total - free - max(zeros[other], share * size[other])) / size[part]
    return min(0.999, max(0.0, goal))


def soft_shrink(w: torch.Tensor, amount: float) -> torch.Tensor:
    new = w - amount * torch.sign(w)
    return torch.where(new * w > 0, new, torch.zeros_like(w))


def snapshot(model) -> dict[str, list[torch.Tensor]]:
    return {k: [m.detach().clone() for m in mats] for k, mats in weights_by_kind(model).items()}


# --- the period of the target path's work --------------------------------------------------------

def test_work_period_by_hand():
    # total_steps // 25, between 1 and 8
    assert [work_period(n) for n in (1, 10, 49, 50, 74, 75, 199, 200, 10_000)] == [1, 1, 1, 2, 2, 3, 7, 8, 8]


@pytest.mark.parametrize(("period", "total", "due"), [(2, 5, [2, 4, 5]), (4, 10, [4, 8, 10])])
def test_work_runs_every_period_and_at_the_last_step_with_the_steps_since_the_last(period, total, due):
    """l1, proximal, no target: the proximal step runs at multiples of the period and at the last
    step, and carries the learning rate of every step since the last one (at most the period)."""
    model = tiny_model("bert")
    method = L1(model, L1Config(alpha=1e-3), proximal=True)
    method.work_every = period
    method.on_train_begin(total, torch.optim.SGD(model.parameters(), lr=0.5))
    assert method.period == period
    expected = snapshot(model)
    last, worked = 0, []
    for step in range(1, total + 1):
        assert method.on_step_end(step) == []
        if step in due:
            steps, last = min(period, step - last), step
            expected = {k: [soft_shrink(w, 0.5 * 1e-3 * steps) for w in ws] for k, ws in expected.items()}
        worked.append(method.state_dict()["worked_at"])
        for kind, mats in weights_by_kind(model).items():
            for got, want in zip(mats, expected[kind]):
                assert torch.allclose(got.detach(), want, rtol=0, atol=1e-7), (step, kind)
    assert worked == [max([0] + [d for d in due if d <= s]) for s in range(1, total + 1)]


def test_without_train_begin_and_optimiser_the_step_is_one_step_at_lr_one():
    """A method without a target may run before on_train_begin (no optimiser: lr 1, period 1);
    one with a target may not."""
    model = tiny_model("bert")
    method = L1(model, L1Config(alpha=1e-3), proximal=True)
    before = snapshot(model)
    method.on_step_end(3)
    for kind, mats in weights_by_kind(model).items():
        for got, w in zip(mats, before[kind]):
            assert torch.allclose(got.detach(), soft_shrink(w, 1e-3), rtol=0, atol=1e-7)
    steered = L1(tiny_model("bert"), L1Config(alpha=1e-3), target=SparsityTarget(0.5))
    with pytest.raises(ConfigError, match="on_train_begin"):
        steered.on_step_end(1)


# --- construction and a fresh method ------------------------------------------------------------

def test_a_weight_that_is_zero_defines_no_part():
    only_attention = Toy(tiny_model("bert"), ToyConfig(alpha=0.0, beta=1e-3))
    assert [p.name for p in only_attention.parts] == ["qkv"]
    assert only_attention.finalize_kinds == ATTENTION_KINDS
    assert only_attention.scales == {"qkv": 1.0}
    with pytest.raises(ConfigError, match="alpha or beta > 0"):
        L1(tiny_model("bert"), L1Config(alpha=0.0), target=SparsityTarget(0.5))


def test_the_proximal_argument_overrides_the_default():
    model = tiny_model("bert")
    assert L1(model, L1Config(alpha=1e-3), target=SparsityTarget(0.5)).proximal is True
    assert L1(model, L1Config(alpha=1e-3)).proximal is False
    assert L1(model, L1Config(alpha=1e-3), proximal=True).proximal is True
    in_loss = L1(model, L1Config(alpha=1e-3), target=SparsityTarget(0.5), proximal=False)
    assert in_loss.proximal is False
    loss = in_loss.regularization_loss()  # the penalty goes into the loss: alpha * sum |w|
    by_hand = 1e-3 * sum(float(m.detach().abs().sum()) for ms in weights_by_kind(model).values() for m in ms)
    assert loss.requires_grad and float(loss.detach()) == pytest.approx(by_hand, rel=1e-5)


def test_a_fresh_method_state_logs_and_summary_by_hand():
    model = tiny_model("bert")
    target = SparsityTarget(0.6)
    method = Toy(model, ToyConfig(alpha=2e-3, beta=3e-3), target=target)
    assert method.measured is None and method.counts is None
    assert method.zeros.masks == [] and ZeroMasks(method.index).masks == []
    state = method.state_dict()
    assert state["weights"] == {"alpha": 2e-3, "beta": 3e-3}
    assert state["scales"] == {"mlp": 1.0, "qkv": 1.0}
    assert state["counts"] is None and state["worked_at"] == 0 and state["step"] == 0
    assert state["controllers"] == {p: {"settings": asdict(target), "log_scale": 0.0, "history": []}
                                    for p in ("mlp", "qkv")}
    values = method.log_values()  # before the first step: no target figures yet
    assert set(values) == {"sparsity", "model_sparsity", "heads_kept", "heads_total", "alpha", "beta"}
    assert (values["alpha"], values["beta"]) == (2e-3, 3e-3)
    detailed = method.log_values(detailed=True)
    layers = {"encoder.layer.0.attention", "encoder.layer.1.attention", "encoder.layer.0", "encoder.layer.1"}
    assert {k for k in detailed if k.startswith("sparsity/")} == {f"sparsity/{n}" for n in layers}
    assert method.summary() == {"method": "toy", "target_sparsity": 0.6, "achieved_sparsity": 0.0,
                                "alpha": 2e-3, "beta": 3e-3, "proximal": True}


def test_penalty_without_parts_is_a_plain_zero_on_the_model_device():
    method = L1(tiny_model("bert"), L1Config(alpha=0.0))
    assert method.parts == []
    value = method.penalty()
    assert value.shape == () and float(value) == 0.0 and not value.requires_grad
    on_meta = L1(tiny_model("bert").to("meta"), L1Config(alpha=0.0))
    assert on_meta.penalty().device.type == "meta"


# --- shares of the target -------------------------------------------------------------------------

def test_part_targets_of_a_part_of_one_entry_and_above_one_by_hand():
    method = Toy(tiny_model("bert"), ToyConfig(alpha=1e-3, beta=1e-3),
                 target=SparsityTarget(0.2, ramp_end=0.0))  # the full target from step 1 on
    method.on_train_begin(10)
    mlp, qkv = method.parts
    counts = {"q": (0, 1), "o": (0, 3)}  # one steered entry: needed 0.2 * 4 = 0.8 of it
    assert method.part_target(5, counts) == pytest.approx(0.8, abs=1e-12)
    assert method.part_target(5, counts, qkv) == pytest.approx(0.8, abs=1e-12)
    assert method.part_target(5, counts, mlp) == 0.0
    high = Toy(tiny_model("bert"), ToyConfig(alpha=1e-3, beta=1e-3), target=SparsityTarget(0.9, ramp_end=0.0))
    high.on_train_begin(10)
    assert high.part_target(5, {"q": (0, 10), "o": (0, 90)}) == 0.999  # 90 of 10 entries: capped


def test_hold_pauses_a_part_at_its_own_share_not_at_the_common_one():
    """q/k/v above the common share lowers the MLPs' goal (goal_by_hand): MLPs at 0.4 with a goal
    of 0.27 are at target and pause, though below the common share 0.58."""
    model = tiny_model("bert")
    target = SparsityTarget(0.5, ramp_end=0.0, limit_step=False)
    method = Toy(model, ToyConfig(alpha=1e-2, beta=1e-2), target=target)
    method.on_train_begin(10, torch.optim.SGD(model.parameters(), lr=0.1))
    counts = {"q": (1843, 2048), "k": (1843, 2048), "v": (1844, 2048), "o": (0, 2048),
              "up": (1229, 3072), "down": (1229, 3072)}
    assert goal_by_hand(0.5, counts, "mlp") == pytest.approx(0.2667, abs=1e-4)
    assert goal_by_hand(0.5, counts, "qkv") == pytest.approx(0.5833, abs=1e-4)
    method.counts = counts
    before = snapshot(model)
    method.proximal_steps(5)
    after = snapshot(model)
    for kind in before:  # both parts are at or above their goals: nothing moves
        assert all(torch.equal(a, b) for a, b in zip(after[kind], before[kind])), kind


def test_a_part_exactly_at_target_minus_the_margin_holds():
    model = tiny_model("bert")
    method = L1(model, L1Config(alpha=1e-2), target=SparsityTarget(0.5, ramp_end=0.0, limit_step=False))
    method.on_train_begin(10, torch.optim.SGD(model.parameters(), lr=0.1))
    assert 499 / 1000 == 0.5 - 1e-3  # exactly AT_TARGET below the target: at target, paused
    method.counts = {"q": (499, 1000)}
    before = snapshot(model)
    method.proximal_steps(5)
    assert all(torch.equal(a, b) for k, ws in snapshot(model).items() for a, b in zip(ws, before[k]))
    method.counts = {"q": (498, 1000)}  # one entry more below: it steps
    method.proximal_steps(5)
    assert any(not torch.equal(a, b) for k, ws in snapshot(model).items() for a, b in zip(ws, before[k]))


# --- the steered run, simulated by hand ------------------------------------------------------------

def test_steered_run_with_a_period_by_hand():
    """Toy method, target 0.6 (ramp to step 7 of 10), work every 4 steps, no hold, no step limit:
    at steps 4, 8, 10 each part shrinks by lr * steps * its current weight, then each controller
    integrates its part's error for the steps since the last work (4, 4, 2) and scales its
    weight. Everything is recomputed here from the raw weights and the formulas."""
    model = tiny_model("bert")
    eps, lr, base = 1e-3, 0.02, {"alpha": 0.02, "beta": 0.03}
    target = SparsityTarget(0.6, ramp_begin=0.0, ramp_end=0.7, hold=False, limit_step=False)
    method = Toy(model, ToyConfig(alpha=base["alpha"], beta=base["beta"], eps=eps), target=target)
    method.work_every = 4
    method.on_train_begin(10, torch.optim.SGD(model.parameters(), lr=lr))
    part_weight = {"mlp": "alpha", "qkv": "beta"}
    finalized = STEERED["mlp"] | STEERED["qkv"]
    log_scale = {"mlp": 0.0, "qkv": 0.0}
    weight = dict(base)
    history = {"mlp": [], "qkv": []}
    last = 0
    for step in range(1, 11):
        before = snapshot(model)
        method.on_step_end(step)
        after = snapshot(model)
        if step not in (4, 8, 10):
            assert all(torch.equal(a, b) for k in before for a, b in zip(after[k], before[k]))
            continue
        steps, last = min(4, step - last), step
        for part, kinds in STEERED.items():
            amount = lr * steps * weight[part_weight[part]]
            for kind in kinds:
                for a, b in zip(after[kind], before[kind]):
                    assert torch.allclose(a, soft_shrink(b, amount), rtol=0, atol=1e-6), (step, kind)
        assert all(torch.equal(a, b) for a, b in zip(after["o"], before["o"]))  # W^O is free
        counts = counts_by_hand(model, eps, finalized)
        assert method.counts == counts
        scheduled = 0.6 if step >= 7 else 0.6 * (1 - (1 - step / 7) ** 3)
        for part in ("mlp", "qkv"):
            measured, goal = frac(counts, STEERED[part]), goal_by_hand(scheduled, counts, part)
            error = goal - measured
            log_scale[part] += steps * max(-0.5, min(0.5, 20.0 * error))  # ki 20, max_rate 0.5
            scale = math.exp(log_scale[part] + 2.0 * error)  # kp 2 (bounds 1e-4 .. 1e8 not reached)
            weight[part_weight[part]] = base[part_weight[part]] * scale
            history[part].append((step, goal, measured, scale))
    assert last == 10
    for part in ("mlp", "qkv"):
        loop = method.controllers[part]
        assert loop.log_scale == pytest.approx(log_scale[part], rel=1e-9)
        got = [(h["step"], h["target"], h["measured"], h["scale"]) for h in loop.history]
        assert [g[0] for g in got] == [4, 8, 10]
        for g, h in zip(got, history[part]):
            assert g == pytest.approx(h, rel=1e-9)
    assert method.alpha == pytest.approx(weight["alpha"], rel=1e-9)
    assert method.beta == pytest.approx(weight["beta"], rel=1e-9)
    assert method.zeros.masks == []  # no hold: the zeros are never recorded
    counts = counts_by_hand(model, eps, finalized)
    values = method.log_values()
    assert values["alpha"] == pytest.approx(weight["alpha"])
    assert values["beta"] == pytest.approx(weight["beta"])
    assert values["target_sparsity_now"] == pytest.approx(0.6, abs=1e-12)
    assert values["near_zero_sparsity"] == pytest.approx(frac(counts), abs=1e-12)
    assert values["near_zero_sparsity_mlp"] == pytest.approx(frac(counts, STEERED["mlp"]), abs=1e-12)
    assert values["near_zero_sparsity_qkv"] == pytest.approx(frac(counts, STEERED["qkv"]), abs=1e-12)
    assert frac(counts, STEERED["mlp"]) != frac(counts, STEERED["qkv"])
    exact = sum(int((m == 0).sum()) for ms in weights_by_kind(model).values() for m in ms)
    summary = method.summary()
    assert summary == {"method": "toy", "target_sparsity": 0.6,
                       "achieved_sparsity": pytest.approx(exact / 14336),
                       "alpha": pytest.approx(weight["alpha"]), "beta": pytest.approx(weight["beta"]),
                       "proximal": True}
    state = method.state_dict()
    assert state["worked_at"] == 10 and state["step"] == 10
    assert state["scales"] == pytest.approx({p: h[-1][3] for p, h in history.items()})


def test_hard_target_step_zeroes_without_shrinking():
    model = tiny_model("bert")
    method = L1(model, L1Config(alpha=0.02), target=SparsityTarget(0.9, step="hard", limit_step=False))
    method.on_train_begin(10, torch.optim.SGD(model.parameters(), lr=0.5))
    before = snapshot(model)
    method.on_step_end(1)  # threshold lr * alpha = 0.01
    for kind, mats in snapshot(model).items():
        for a, b in zip(mats, before[kind]):
            assert torch.equal(a, torch.where(b.abs() <= 0.01, torch.zeros_like(b), b)), kind


def test_limited_step_leaves_a_part_at_its_share_with_no_new_near_zero_entry():
    """The part already holds floor(target * entries) near-zero entries: room 0, so the step stops
    just before the first entry would reach eps (the config's eps, 1e-3)."""
    model = tiny_model("bert")
    eps = 1e-3
    with torch.no_grad():
        model.encoder.layer[0].attention.self.query.weight[:10] = 0.0
    zeros = sum(z for z, _ in counts_by_hand(model, eps, set(SUFFIX_KIND.values())).values())
    total = 14336
    method = L1(model, L1Config(alpha=0.02, eps=eps),
                target=SparsityTarget((zeros + 0.5) / total, ramp_end=0.0, hold=False))
    method.on_train_begin(10, torch.optim.SGD(model.parameters(), lr=0.5))
    before = snapshot(model)
    method.on_step_end(1)
    after = snapshot(model)
    assert sum(z for z, _ in counts_by_hand(model, eps, set(SUFFIX_KIND.values())).values()) == zeros
    assert any(not torch.equal(a, b) for k in before for a, b in zip(after[k], before[k]))  # a step was taken


def test_limited_step_is_as_long_as_the_config_eps_allows():
    """Every weight at least 0.005 in size, 320 exact zeros, room 0: the step stops just before
    the smallest weights reach the config's eps = 1e-3, i.e. at c = (0.005 - 1e-3) / (lr alpha)
    = 0.4 (not at 0.5, where they would reach zero)."""
    model = tiny_model("bert")
    with torch.no_grad():
        for mats in weights_by_kind(model).values():
            for m in mats:
                m.copy_(torch.sign(m) * m.abs().clamp(min=0.005))
        model.encoder.layer[0].attention.self.query.weight[:10] = 0.0
    method = L1(model, L1Config(alpha=0.02, eps=1e-3),
                target=SparsityTarget(320.5 / 14336, ramp_end=0.0, hold=False))
    method.on_train_begin(10, torch.optim.SGD(model.parameters(), lr=0.5))
    before = snapshot(model)
    method.on_step_end(1)
    amount = 0.5 * 0.02 * 0.4 * (1 - 1e-6)
    for kind, mats in snapshot(model).items():
        for got, w in zip(mats, before[kind]):
            assert torch.allclose(got, soft_shrink(w, amount), rtol=0, atol=1e-7), kind
    assert sum(z for z, _ in counts_by_hand(model, 1e-3, set(SUFFIX_KIND.values())).values()) == 320


# --- state ------------------------------------------------------------------------------------------

def test_loading_a_state_without_the_penalty_fields_keeps_the_fresh_values():
    """A state with only the base fields (structure, step): scales 1, the user's weights, no
    counts, the last work at the saved step, fresh controllers."""
    method = Toy(tiny_model("bert"), ToyConfig(alpha=2e-3, beta=3e-3), target=SparsityTarget(0.6))
    structure = method.index.structure()
    method.load_state_dict({"structure": structure, "step": 3})
    assert method.scales == {"mlp": 1.0, "qkv": 1.0}
    assert method.weights == {"alpha": 2e-3, "beta": 3e-3}
    assert method.counts is None and method.worked_at == 3 and method.step == 3
    assert [c.log_scale for c in method.controllers.values()] == [0.0, 0.0]


def test_loading_a_state_by_hand():
    method = Toy(tiny_model("bert"), ToyConfig(alpha=2e-3, beta=3e-3), target=SparsityTarget(0.6))
    loop = {"settings": asdict(SparsityTarget(0.6, kp=1.5)), "log_scale": 0.7,
            "history": [{"step": 4, "target": 0.3, "measured": 0.2, "scale": 2.5}]}
    method.load_state_dict({
        "structure": method.index.structure(), "step": 6, "weights": {"alpha": 0.5, "beta": 0.25},
        "scales": {"mlp": 2.0, "qkv": 3.0}, "counts": {"q": [1, 2], "up": [3.0, 4.0]}, "worked_at": 4,
        "controllers": {"mlp": loop},
    })
    assert (method.alpha, method.beta) == (0.5, 0.25)
    assert method.scales == {"mlp": 2.0, "qkv": 3.0}
    assert method.counts == {"q": (1, 2), "up": (3, 4)} and type(method.counts["up"][0]) is int
    assert method.worked_at == 4 and method.step == 6
    assert method.controllers["mlp"].log_scale == 0.7 and method.controllers["mlp"].settings.kp == 1.5
    assert method.controllers["mlp"].history == loop["history"]
    assert method.controllers["qkv"].log_scale == 0.0


# --- proximal_step and step_factor ------------------------------------------------------------------

def test_proximal_step_without_a_graph_or_with_an_unused_parameter():
    p = torch.nn.Parameter(torch.tensor([0.5, -0.5]))
    q = torch.nn.Parameter(torch.tensor([0.3]))
    assert proximal_step(torch.zeros(()), [p], lr=0.1) == 0.0  # nothing to differentiate: no step
    assert torch.equal(p.detach(), torch.tensor([0.5, -0.5]))
    assert proximal_step(p.abs().sum(), [p, q], lr=0.1) == 1.0  # q is not in the penalty: untouched
    assert torch.allclose(p.detach(), torch.tensor([0.4, -0.4]))
    assert torch.equal(q.detach(), torch.tensor([0.3]))


def test_limited_proximal_step_with_the_default_eps_of_zero():
    """Without eps, entries count when they reach zero: at c = |w| / (lr |g|) = 0.8 and 0.2."""
    p = torch.nn.Parameter(torch.tensor([0.5, -0.5, 0.08, -0.02, 0.0]))
    c = proximal_step(p.abs().sum(), [p], lr=0.1, room=1)
    assert c == pytest.approx(0.8 * (1 - 1e-6), rel=1e-6)


def test_hard_limited_step_counts_crossing_zero_not_eps():
    """Hard: an entry goes when it crosses zero, at c = |w| / (lr |g|): 0.8 for 0.08 (0.79 would
    be the soft step's, reaching eps = 1e-3)."""
    p = torch.nn.Parameter(torch.tensor([0.5, -0.5, 0.08, -0.02, 0.0]))
    c = proximal_step(p.abs().sum(), [p], lr=0.1, hard=True, room=1, eps=1e-3)
    assert c == pytest.approx(0.8 * (1 - 1e-6), rel=1e-6)
    assert torch.equal(p.detach(), torch.tensor([0.5, -0.5, 0.08, 0.0, 0.0]))
    q = torch.tensor([0.5, -0.5, 0.08, -0.02, 0.0])
    grads = torch.sign(q)
    hard, soft = (step_factor([(q.clone(), grads)], 0.1, h, 1, 1e-3) for h in (True, False))
    assert hard == pytest.approx(0.8 * (1 - 1e-6), rel=1e-6)
    assert soft == pytest.approx(0.79 * (1 - 1e-6), rel=1e-5)


def test_proximal_step_never_moves_a_zero_and_zeroes_what_lands_on_zero():
    p = torch.nn.Parameter(torch.tensor([0.0, 0.5]))
    proximal_step(-p.sum(), [p], lr=0.1)  # the gradient pushes every entry up, the zero too
    assert torch.equal(p.detach(), torch.tensor([0.0, 0.6]))
    q = torch.nn.Parameter(torch.tensor([0.5, 0.25]))
    proximal_step(q.abs().sum(), [q], lr=0.5, hard=True)  # 0.5 lands exactly on zero, 0.25 crosses
    assert torch.equal(q.detach(), torch.tensor([0.0, 0.0]))


def test_step_factor_boundaries_by_hand():
    # an entry already at zero is not "newly" below eps = 0, whatever its gradient
    w, g = torch.tensor([0.0, 0.5, 0.05]), torch.ones(3)
    assert step_factor([(w, g)], 0.1, False, 0, 0.0) == pytest.approx(0.5 * (1 - 1e-6), rel=1e-6)
    # an entry exactly at eps (not below it) that the step moves below counts: c = 0
    assert step_factor([(torch.tensor([0.25, 2.0]), torch.ones(2))], 0.1, False, 0, 0.25) == 0.0
    # reaching eps exactly at the full step (t = (0.75 - 0.25) / 0.5 = 1) counts: c stops just short
    assert step_factor([(torch.tensor([0.75]), torch.ones(1))], 0.5, False, 0, 0.25) == 1 - 1e-6
    two = torch.tensor([0.75, -0.75])
    assert step_factor([(two, torch.sign(two))], 0.5, False, 1, 0.25) == 1 - 1e-6
