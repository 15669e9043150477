"""Compacted and head-pruned folders load with the standard Auto classes and
`trust_remote_code=True` (the same outputs as `neuroprune.load`), also without neuroprune
installed and through `pipeline`; without `trust_remote_code` every stock path fails loudly, with
a message that says what to do, and none loads other weights."""

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
)

import neuroprune
from neuroprune import NeuroPrune, NeuroPruneConfig
from neuroprune.model.remote_code import LOAD_HINT, MODELING_FILE
from test_compaction import structured
from textdata import tokenizer

from tiny import (
    DECODERS,
    FAMILIES,
    NEW_DECODERS,
    NEW_FAMILIES,
    SEQ2SEQ,
    duplicate_group,
    main_output,
    tiny_config,
    tiny_inputs,
)

ATOL = 1e-5


def auto_class(family: str) -> type:
    if family in SEQ2SEQ:
        return AutoModelForSeq2SeqLM
    return AutoModelForCausalLM if family in DECODERS + NEW_DECODERS else AutoModel


def compacted_folder(tmp_path, family: str, compact: bool = True):
    """A tiny model with heads removed and (optionally) compacted, saved; and its reference."""
    pruner = structured(family)
    if compact:
        neuroprune.compact(pruner)
    folder = tmp_path / family
    pruner.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("family", FAMILIES + NEW_FAMILIES)
def test_compacted_folder_loads_with_auto_class_and_remote_code(tmp_path, family):
    folder = compacted_folder(tmp_path, family)
    reference = neuroprune.load(folder)
    model = auto_class(family).from_pretrained(folder, trust_remote_code=True).eval()
    assert type(model).__name__ == "NeuroPrune" + type(reference).__name__
    assert isinstance(model, type(reference))
    x = tiny_inputs(family)
    torch.testing.assert_close(main_output(model, x), main_output(reference, x), atol=ATOL, rtol=0)
    # the same shapes, tensor by tensor, and buffers the weights file fills
    own = model.state_dict()
    for key, value in reference.state_dict().items():
        assert own[key].shape == value.shape, key
    if family in DECODERS + NEW_DECODERS + SEQ2SEQ:  # generation with a KV cache through the remote class
        ids = x["input_ids"]
        kwargs = dict(max_new_tokens=5, do_sample=False, use_cache=True, attention_mask=x["attention_mask"])
        tokens = model.generate(input_ids=ids, **kwargs)
        assert torch.equal(tokens, reference.generate(input_ids=ids, **kwargs))


@pytest.mark.parametrize("family", ["t5", "llama", "mpnet"])
def test_head_pruned_folder_loads_with_auto_class(tmp_path, family):
    """Heads removed, nothing compacted: head counts and (T5, MPNet) the per-head position-bias
    slicing come from the saved structure."""
    pruner = structured(family)
    pruner.save_pretrained(tmp_path / family)
    saved = json.loads((tmp_path / family / "config.json").read_text())["neuroprune"]
    assert bool(saved["head_bias"]) == (family != "llama") and not saved["gathered_inputs"]
    reference = neuroprune.load(tmp_path / family)
    assert reference.config.architectures == [type(reference).__name__]  # the stock names come back
    model = auto_class(family).from_pretrained(tmp_path / family, trust_remote_code=True).eval()
    x = tiny_inputs(family)
    torch.testing.assert_close(main_output(model, x), main_output(reference, x), atol=ATOL, rtol=0)
    kept = [u.num_heads for u in pruner.index.attention]
    assert [u.num_heads for u in neuroprune.ModelIndex(model).attention] == kept
    assert all(h < u.original_heads for h, u in zip(kept, pruner.index.attention))


def test_base_model_loads_from_a_head_checkpoint(tmp_path):
    """AutoModel on a GPT2LMHeadModel folder: the saved module paths lose the `transformer.` prefix."""
    folder = compacted_folder(tmp_path, "gpt2")
    reference = neuroprune.load(folder)
    base = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    assert type(base).__name__ == "NeuroPruneGPT2Model"
    x = tiny_inputs("gpt2")
    with torch.no_grad():
        torch.testing.assert_close(base(**x).last_hidden_state, reference.transformer(**x).last_hidden_state,
                                   atol=ATOL, rtol=0)


def test_modeling_file_is_the_package_source_and_needs_only_torch_and_transformers(tmp_path):
    folder = compacted_folder(tmp_path, "bert")
    assert (folder / MODELING_FILE.name).read_bytes() == MODELING_FILE.read_bytes()
    imported = set()
    for node in ast.walk(ast.parse(MODELING_FILE.read_text())):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
    assert imported - set(sys.stdlib_module_names) == {"torch", "transformers"}, imported
    # and it loads in a process where neuroprune cannot be imported
    expected = main_output(neuroprune.load(folder), tiny_inputs("bert"))
    torch.save(tiny_inputs("bert"), tmp_path / "x.pt")
    script = textwrap.dedent(f"""
        import sys
        sys.modules["neuroprune"] = None  # import neuroprune -> ImportError
        import torch
        from transformers import AutoModel
        model = AutoModel.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        with torch.no_grad():
            y = model(**torch.load({str(tmp_path / 'x.pt')!r})).last_hidden_state
            torch.save(y, {str(tmp_path / 'y.pt')!r})
    """)
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HOME": str(tmp_path)}
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, env=env)
    torch.testing.assert_close(torch.load(tmp_path / "y.pt"), expected, atol=ATOL, rtol=0)


def classifier_folder(tmp_path):
    """A compacted BertForSequenceClassification with a tokenizer."""
    torch.manual_seed(0)
    config = tiny_config("bert")
    config.num_labels = 3
    model = AutoModelForSequenceClassification.from_config(config, attn_implementation="eager").eval()
    pruner = NeuroPrune(model, NeuroPruneConfig(theta=1e-6))
    with torch.no_grad():
        for unit in pruner.index.attention:
            duplicate_group(model, unit, 0, unit.num_kv_heads - 1)
        assert pruner.prune_redundant_heads()
        for unit in pruner.index.mlps:
            unit.contract_matrix()[:, : unit.original_neurons // 2] = 0
    neuroprune.compact(pruner)
    folder = tmp_path / "classifier"
    pruner.save_pretrained(folder, tokenizer("encoder"))
    return folder


def test_pipeline_with_remote_code_gives_the_neuroprune_scores(tmp_path):
    folder = classifier_folder(tmp_path)
    texts = ["the film is good", "a dull plot and a weak cast"]
    remote = transformers.pipeline("text-classification", model=str(folder), trust_remote_code=True,
                                   top_k=None)
    local = transformers.pipeline("text-classification", model=neuroprune.load(folder),
                                  tokenizer=transformers.AutoTokenizer.from_pretrained(folder), top_k=None)
    assert type(remote.model).__name__ == "NeuroPruneBertForSequenceClassification"
    for got, want in zip(remote(texts), local(texts)):
        assert [g["label"] for g in got] == [w["label"] for w in want]
        assert [g["score"] for g in got] == pytest.approx([w["score"] for w in want], abs=ATOL)


@pytest.mark.parametrize("kwargs", [{}, {"ignore_mismatched_sizes": True}])
def test_without_remote_code_every_stock_path_fails_loudly(tmp_path, kwargs):
    folder = classifier_folder(tmp_path)
    for load in (AutoModelForSequenceClassification.from_pretrained, AutoModel.from_pretrained,
                 transformers.AutoConfig.from_pretrained):
        with pytest.raises(ValueError, match="trust_remote_code=True"):
            load(folder, **kwargs)
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        transformers.pipeline("text-classification", model=str(folder), model_kwargs=kwargs)
    # a stock class used directly reads the family config: its layer count is the instruction
    for cls in (transformers.BertForSequenceClassification, transformers.BertModel):
        with pytest.raises(Exception, match="neuroprune.load") as err:
            cls.from_pretrained(folder, **kwargs)
        assert "trust_remote_code=True" in str(err.value)


@pytest.mark.parametrize("family", ["gpt2", "t5", "llama"])
def test_stock_classes_of_other_families_refuse_too(tmp_path, family):
    folder = compacted_folder(tmp_path, family)
    stock = type(neuroprune.load(folder))
    with pytest.raises(Exception, match="neuroprune.load"):
        stock.from_pretrained(folder, ignore_mismatched_sizes=True)
    assert LOAD_HINT in (folder / "config.json").read_text()


def test_dense_folder_stays_a_stock_folder(tmp_path):
    pruner = NeuroPrune(AutoModel.from_config(tiny_config("bert")), NeuroPruneConfig())
    pruner.save_pretrained(tmp_path / "dense")
    saved = json.loads((tmp_path / "dense" / "config.json").read_text())
    assert saved["model_type"] == "bert" and "auto_map" not in saved
    assert not (tmp_path / "dense" / MODELING_FILE.name).exists()
    AutoModel.from_pretrained(tmp_path / "dense")  # no remote code needed


def test_remote_model_saves_a_folder_that_loads_again(tmp_path):
    folder = compacted_folder(tmp_path, "llama")
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    model.save_pretrained(tmp_path / "again")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again", trust_remote_code=True).eval()
    saved = json.loads((tmp_path / "again" / "config.json").read_text())
    assert saved["num_hidden_layers"] == LOAD_HINT and saved["model_type"] == "neuroprune_compacted"
    x = tiny_inputs("llama")
    torch.testing.assert_close(main_output(again, x), main_output(model, x), atol=ATOL, rtol=0)


def test_our_tokenizer_loading_never_asks_about_remote_code(tmp_path):
    """`AutoTokenizer` reads the config, whose auto_map names custom code: transformers asks
    "[y/N]" on a terminal and blocks. Every loader of ours reads the stock tokenizer without it."""
    folder = classifier_folder(tmp_path)
    code = ("import sys; from neuroprune.model.checkpoint import load_tokenizer; "
            f"print(load_tokenizer({str(folder)!r})('the film is good')['input_ids'])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == str(tokenizer("encoder")("the film is good")["input_ids"])
    assert "[y/N]" not in proc.stdout + proc.stderr
    # nor warns that the folder's `neuroprune_compacted` config builds a model of another type
    assert "You are using a model of type" not in proc.stdout + proc.stderr, proc.stderr[-2000:]
    src = Path(neuroprune.__file__).parent
    unguarded = [str(p.relative_to(src)) for p in src.rglob("*.py")
                 if "AutoTokenizer.from_pretrained(" in p.read_text() and p.name not in ("checkpoint.py",
                                                                                            "modelload.py")]
    assert unguarded == [], f"load tokenizers of saved folders with checkpoint.load_tokenizer: {unguarded}"
