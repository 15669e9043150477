"""Tiny random models of every supported family, built from configs (no hub access)."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM

VOCAB = 99
COMMON = dict(vocab_size=VOCAB)

CONFIGS: dict[str, dict] = {
    "bert": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48),
    "roberta": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48),
    "distilbert": dict(dim=32, n_layers=2, n_heads=4, hidden_dim=48),
    "mpnet": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48),
    "t5": dict(d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2, num_heads=4,
               decoder_start_token_id=0, pad_token_id=0),
    "t5-gated": dict(d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2, num_heads=4,
                     feed_forward_proj="gated-gelu", decoder_start_token_id=0, pad_token_id=0),
    "bart": dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                 decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48,
                 max_position_embeddings=64),
    "gpt2": dict(n_embd=32, n_layer=2, n_head=4, n_inner=48, n_positions=64, bos_token_id=1, eos_token_id=2),
    "opt": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=48,
                word_embed_proj_dim=32, max_position_embeddings=64),
    "llama": dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64),
    "qwen2": dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64),
    "gpt_neox": dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                     max_position_embeddings=64),
}
ENCODERS = ("bert", "roberta", "distilbert", "mpnet")
SEQ2SEQ = ("t5", "t5-gated", "bart")
DECODERS = ("gpt2", "opt", "llama", "qwen2", "gpt_neox")
FAMILIES = ENCODERS + SEQ2SEQ + DECODERS


def tiny_config(family: str):
    model_type = family.split("-")[0]
    return AutoConfig.for_model(model_type, **COMMON, **CONFIGS[family])


def tiny_model(family: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = tiny_config(family)
    if family in SEQ2SEQ:
        cls = AutoModelForSeq2SeqLM
    elif family in DECODERS:
        cls = AutoModelForCausalLM
    else:
        cls = AutoModel
    return cls.from_config(config, attn_implementation="eager").eval()


def tiny_inputs(family: str, batch: int = 2, length: int = 7, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if family in SEQ2SEQ:
        inputs["decoder_input_ids"] = torch.randint(3, VOCAB, (batch, 5), generator=g)
    return inputs


def main_output(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    return out.logits if hasattr(out, "logits") and out.logits is not None else out.last_hidden_state


@torch.no_grad()
def duplicate_group(model: torch.nn.Module, unit, src: int, dst: int) -> None:
    """Make key/value group `dst` of an attention unit an exact copy of group `src` (its query
    heads' Q rows and its K and V rows), and, where heads also own a relative position bias
    (T5, MPNet), copy that bias column too, so the two groups compute the same function."""
    from neuroprune.model.surgery import head_rows

    if unit.layout.fused == "interleaved":
        w = unit.qkv.weight.view(unit.num_heads, 3 * unit.head_dim, -1)
        w[dst] = w[src]
        if unit.qkv.bias is not None:
            b = unit.qkv.bias.view(unit.num_heads, -1)
            b[dst] = b[src]
    else:
        q, k, v = unit.qkv_matrices()
        q[unit.query_rows([dst])] = q[unit.query_rows([src])]
        for m in (k, v):
            m[head_rows([dst], unit.head_dim)] = m[head_rows([src], unit.head_dim)]
        biases = (
            [unit.qkv.bias] if unit.qkv is not None else [p.bias for p in (unit.q, unit.k, unit.v)]
        )
        if all(b is not None for b in biases):
            if unit.qkv is not None:
                qb, rest = biases[0][: q.shape[0]], biases[0][q.shape[0]:]
                kb, vb = rest.chunk(2)
            else:
                qb, kb, vb = biases
            qb[unit.query_rows([dst])] = qb[unit.query_rows([src])]
            for b in (kb, vb):
                b[head_rows([dst], unit.head_dim)] = b[head_rows([src], unit.head_dim)]
    for name, module in model.named_modules():
        if name.endswith("relative_attention_bias"):
            module.weight[:, dst] = module.weight[:, src]
