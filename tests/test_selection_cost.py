"""What a structural selection of a FLOP-target run costs (issue 15): `compaction.plan`, which it
calls every round, reads the device back once for the whole model, not once per block (each read
is a host-device synchronisation on a GPU), and what it read is not read again by the FLOP count;
the selection's thousands of small operators run on one CPU thread, whatever the training uses."""

import torch
from torch.profiler import ProfilerActivity, profile

from neuroprune import NeuroPruneConfig
from neuroprune.compaction import CompactionRule, plan
from neuroprune.methods import build_method
from neuroprune.methods.steering import SparsityTarget
from neuroprune.model.flops import planned_flops
from test_compaction import structured

from tiny import tiny_model

SYNC_OPS = ("aten::_local_scalar_dense", "aten::nonzero", "aten::item", "aten::is_nonzero")


def host_reads(fn, *args):
    """(fn(*args), number of device reads): synchronising operators plus `Tensor.tolist` calls."""
    calls = []
    orig = torch.Tensor.tolist

    def counted(t):
        calls.append(t.numel())
        return orig(t)

    torch.Tensor.tolist = counted
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            out = fn(*args)
    finally:
        torch.Tensor.tolist = orig
    syncs = [e.name for e in prof.events() if e.name in SYNC_OPS]
    return out, len(syncs) + len(calls)


def test_plan_reads_the_device_once_for_all_blocks():
    for family in ("bert", "llama"):
        index = structured(family).index
        assert len(index.attention) + len(index.mlps) >= 4
        for rule in (CompactionRule(), CompactionRule(0.0, 0.0, 1)):
            p, reads = host_reads(plan, index, rule)
            assert reads == 1, (family, rule, reads)
            assert any(a.keep_inputs for a in p.attention) or any(m.keep_rows for m in p.mlps)
            flops, reads = host_reads(planned_flops, p)
            assert reads == 0 and flops > 0


def test_kept_count_follows_in_place_changes_of_removable():
    p = plan(structured("llama").index).mlps[0]
    before = p.kept_count
    assert before == int((~p.removable).sum())
    p.removable[p.removable.nonzero().flatten()[:3]] = False  # as compact_uniform keeps spares
    assert p.kept_count == before + 3
    p.removable = torch.zeros_like(p.removable)
    assert p.kept_count == p.removable.numel()


def test_selection_runs_on_one_thread_and_restores_the_count():
    method = build_method("neuroprune", tiny_model("bert"), NeuroPruneConfig(),
                          SparsityTarget(flops=0.6, seq_len=16))
    method.on_train_begin(20)
    pruner = method.structural
    seen = []
    scorer = pruner.scorer

    def spy(removed):
        seen.append(torch.get_num_threads())
        return scorer(removed)

    pruner.scorer = spy
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        pruner.select(pruner.every)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert seen and set(seen) == {1}
    assert any(pruner.removed.to_dict()[k] for k in ("neurons", "groups", "inputs"))
