"""Data-parallel NeuroPrune: two CPU processes (gloo) remove the same heads and reach the same
sparsity as one process over the same data, even when a rank's weights drift before pruning;
sharded training is refused with a reason."""

import json
import os
import subprocess
import sys
import types

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from accelerate.utils import DistributedType
from safetensors.torch import load_file
from torch.nn.parallel import DistributedDataParallel
from transformers import AutoModel, BertForSequenceClassification

import textdata
from neuroprune import ModelIndex, NeuroPrune, NeuroPruneConfig, cli, remap_optimizer
from neuroprune import distributed as npdist
from neuroprune.methods.heads import prune_unit

from tiny import duplicate_group, tiny_config

BATCH, STEPS, EPOCHS = 8, 3, 2
CONFIG = dict(alpha=1e-3, beta=1e-3, theta=0.02)


def _model() -> BertForSequenceClassification:
    torch.manual_seed(0)
    cfg = tiny_config("bert")
    cfg.hidden_dropout_prob = cfg.attention_probs_dropout_prob = 0.0  # same maths in 1 or 2 processes
    cfg.num_labels = 2
    return BertForSequenceClassification(cfg)


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randint(3, 99, (EPOCHS * STEPS, BATCH, 6), generator=g), torch.randint(
        0, 2, (EPOCHS * STEPS, BATCH), generator=g
    )


def _train(rank: int, world: int, init_file: str, out: str) -> dict:
    """A plain DDP loop: NeuroPrune penalties, distributed head pruning after every epoch,
    wrapper rebuilt and AdamW state remapped afterwards, finalize at the end."""
    if world > 1:
        torch.set_num_threads(1)  # two processes on a shared machine: no thread oversubscription
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    model = _model()
    pruner = NeuroPrune(model, NeuroPruneConfig(**CONFIG))
    duplicate_group(model, pruner.index.attention[0], 0, 1)  # planted redundancy: one head per layer
    duplicate_group(model, pruner.index.attention[1], 2, 3)
    wrapped = DistributedDataParallel(model) if world > 1 else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids, labels = _data()
    part = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    local_decision = None
    for epoch in range(EPOCHS):
        for step in range(STEPS):
            i = epoch * STEPS + step
            loss = wrapped(input_ids=ids[i, part], labels=labels[i, part]).loss
            (loss + pruner.regularization_loss()).backward()
            opt.step()
            opt.zero_grad()
        if rank == 1 and epoch == 0:
            # rank 1 drifts: on its own it would no longer see head 1 of layer 0 as redundant
            with torch.no_grad():
                q = pruner.index.attention[0].qkv_matrices()[0]
                q[pruner.index.attention[0].query_rows([1])] += 0.5
            # what rank 1 would decide alone (no collective: `prune_unit` on a copy, block by block)
            alone = ModelIndex(_copy(model))
            events = [prune_unit(u, CONFIG["theta"], "output")[0] for u in alone.attention]
            local_decision = {e.layer: e.removed_heads for e in events if e is not None}
        pruner.prune_redundant_heads()  # under a process group: rank 0's decision on every rank
        remap_optimizer(opt, pruner.last_changes)
        if world > 1:
            wrapped = npdist.rewrap_ddp(wrapped)
    pruner.finalize()
    result = {
        "heads": pruner.index.head_structure(),
        "history": [[h["layer"], h["removed_heads"]] for h in pruner.index.history],
        "sparsity": pruner.sparsity_report().sparsity,
        "local_decision": local_decision,
    }
    torch.save(model.state_dict(), f"{out}.{rank}.pt")
    with open(f"{out}.{rank}.json", "w") as f:
        json.dump(result, f)
    if world > 1:
        dist.destroy_process_group()
    return result


def _copy(model):
    clone = _model()
    clone.load_state_dict(model.state_dict())
    return clone


def test_two_processes_remove_the_same_heads_as_one(tmp_path):
    reference = _train(0, 1, "", str(tmp_path / "single"))
    mp.spawn(_train, args=(2, str(tmp_path / "init"), str(tmp_path / "ddp")), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"ddp.{r}.json").read_text()) for r in range(2)]

    # the planted duplicates went, on every rank, exactly as in one process
    assert reference["heads"] == {"bert.encoder.layer.0.attention": [1, 2, 3],
                                  "bert.encoder.layer.1.attention": [0, 1, 3]}
    # rank 1 alone would have decided differently: the broadcast is what makes them agree
    assert ranks[1]["local_decision"] == {"bert.encoder.layer.1.attention": [2]}
    for result in ranks:
        assert result["heads"] == reference["heads"]
        assert result["history"] == reference["history"]
        assert result["sparsity"] == pytest.approx(reference["sparsity"], abs=1e-3)
    single = torch.load(tmp_path / "single.0.pt")
    for r in range(2):
        state = torch.load(tmp_path / f"ddp.{r}.pt")
        assert state.keys() == single.keys()
        for key, value in single.items():
            torch.testing.assert_close(state[key], value, atol=1e-5, rtol=1e-4, msg=key)


def test_without_a_process_group_it_is_the_plain_method():
    model = _model()
    pruner = NeuroPrune(model, NeuroPruneConfig(**CONFIG))
    duplicate_group(model, pruner.index.attention[0], 1, 2)
    assert not npdist.is_distributed() and npdist.is_main_process()
    assert pruner.prune_redundant_heads() == {"bert.encoder.layer.0.attention": [1]}
    assert npdist.same_on_all_ranks({"anything": 1})


@pytest.mark.parametrize(
    "kind, name", [(DistributedType.FSDP, "FSDP"), (DistributedType.DEEPSPEED, "DeepSpeed")]
)
def test_sharded_training_is_refused_with_the_reason(kind, name):
    accelerator = types.SimpleNamespace(distributed_type=kind)
    with pytest.raises(npdist.DistributedError, match=f"cannot train under {name}.*changes parameter shapes"):
        npdist.refuse_sharded(_model(), accelerator)
    npdist.refuse_sharded(_model(), types.SimpleNamespace(distributed_type=DistributedType.MULTI_CPU))


def test_a_deepspeed_engine_is_recognised_by_the_model_alone():
    engine = type("DeepSpeedEngine", (torch.nn.Module,), {})()
    engine.module = _model()
    with pytest.raises(npdist.DistributedError, match="DeepSpeed"):
        npdist.refuse_sharded(engine)


def test_rewrap_refuses_a_bare_model():
    with pytest.raises(npdist.DistributedError, match="DistributedDataParallel"):
        npdist.rewrap_ddp(_model())


def _planted_model_folder(path):
    """A tiny BERT folder (with tokenizer) whose layers each hold one duplicated head; no dropout,
    whose masks would come from different random streams in one and in two processes."""
    folder = textdata.model_folder(path, "bert")
    model = AutoModel.from_pretrained(folder, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    units = ModelIndex(model).attention
    duplicate_group(model, units[0], 0, 1)
    duplicate_group(model, units[1], 2, 3)
    model.save_pretrained(folder)
    return folder


def test_torchrun_training_ends_with_the_heads_and_sparsity_of_one_process(tmp_path):
    """`neuroprune train` under torchrun (2 CPU processes, gloo, 4 rows each) against one process
    (8 rows) over the same data: same global batches, same heads removed, same weights."""
    model = _planted_model_folder(tmp_path / "model")
    files = textdata.splits(tmp_path / "data", textdata.sentiment_rows, sizes=(16, 8))
    flags = ["train", "--model", str(model), "--train-file", str(files["train"]), "--validation-file",
             str(files["validation"]), "--epochs", "2", "--learning-rate", "1e-3", "--alpha", "1e-2",
             "--beta", "1e-2", "--theta", "0.02", "--max-length", "16", "--logging-steps", "100",
             "--report-to", "none", "--seed", "3"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert cli.main([*flags, "--batch-size", "8", "--output-dir", str(tmp_path / "one")]) == 0
    finally:
        torch.set_num_threads(threads)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    proc = subprocess.run([*torchrun, "-m", "neuroprune.cli", *flags, "--batch-size", "4", "--output-dir",
                           str(tmp_path / "two")], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]

    def outcome(run):
        meta = json.loads((tmp_path / run / "model" / "neuroprune.json").read_text())
        sparsity = json.loads((tmp_path / run / "sparsity.json").read_text())["sparsity"]
        return meta["structure"]["heads"], sparsity, load_file(tmp_path / run / "model" / "model.safetensors")

    heads, sparsity, weights = outcome("one")
    assert heads == {"bert.encoder.layer.0.attention": [1, 2, 3], "bert.encoder.layer.1.attention": [0, 1, 3]}
    heads2, sparsity2, weights2 = outcome("two")
    assert heads2 == heads
    assert sparsity2 == pytest.approx(sparsity, abs=1e-4)  # a weight within float noise of eps may flip
    for key, value in weights.items():
        torch.testing.assert_close(weights2[key], value, atol=1e-5, rtol=1e-4, msg=key)


@pytest.mark.filterwarnings("ignore:FSDP is switching to use `NO_SHARD`")
def test_real_fsdp_wrapped_models_are_refused(tmp_path):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        legacy = FullyShardedDataParallel(_model(), device_id=torch.device("cpu"))
        composable = _model()
        fully_shard(composable, mesh=init_device_mesh("cpu", (1,)))
        for wrapped in (legacy, composable):
            with pytest.raises(npdist.DistributedError, match="cannot train under FSDP"):
                npdist.refuse_sharded(wrapped)
    finally:
        dist.destroy_process_group()
